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

from models.hf_io import (  # noqa: E402
    CheckpointError,
    DestinationError,
    SafetensorsReader,
    check_destination,
    load_pretrained,
    save_pretrained,
)

__all__ += ["CheckpointError", "DestinationError", "SafetensorsReader", "check_destination", "load_pretrained",
            "save_pretrained"]
