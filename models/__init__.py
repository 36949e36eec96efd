"""Flax NNX ports of the Llama-3.x and Qwen2.5 decoders: architecture only, nothing about RL."""

from models.config import ConfigError, ModelConfig, RopeScaling
from models.layers import CacheBlocks
from models.transformer import (
    CausalLM,
    Decoder,
    KVCache,
    RewardModel,
    ValueModel,
    build_model,
    value_model_from,
)

__all__ = [
    "CacheBlocks", "CausalLM", "ConfigError", "Decoder", "KVCache", "ModelConfig", "RewardModel", "RopeScaling",
    "ValueModel", "build_model", "value_model_from",
]

from models.hf_io import CheckpointError, SafetensorsReader, load_pretrained, save_pretrained  # noqa: E402

__all__ += ["CheckpointError", "SafetensorsReader", "load_pretrained", "save_pretrained"]
