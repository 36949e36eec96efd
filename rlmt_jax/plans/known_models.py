"""The architectures (config.json fields) of the published checkpoints the paper's recipes name.

`rlmt-jax plan` sizes a run before anything is downloaded: when a model path has no config.json, the
architecture is taken from this table, looked up by hub id (`meta-llama/Llama-3.1-8B-Instruct`) or by the
last part of the path (`/data/models/Llama-3.1-8B-Instruct`). Values are those of each model's published
config.json (only the fields ModelConfig reads).
"""

from __future__ import annotations

import os

_LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": _LLAMA31_ROPE,
    "max_position_embeddings": 131072,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}

LLAMA31_8B_INSTRUCT = {**LLAMA31_8B, "eos_token_id": [128001, 128008, 128009]}

# Skywork-Reward-Llama-3.1-8B-v0.2: Llama-3.1-8B-Instruct with a one-label score head. Its tokenizer adds a
# `[PAD]` token (id 128256) that it pads with, so the embedding table has one more row than Llama's:
# vocab_size 128257 (assumed here; one row of 4096 floats either way, 16 KiB).
SKYWORK_REWARD_LLAMA31_8B = {
    **LLAMA31_8B,
    "architectures": ["LlamaForSequenceClassification"],
    "vocab_size": 128257,
    "eos_token_id": 128009,
    "pad_token_id": 128256,
    "num_labels": 1,
}

QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
}

QWEN25_7B_INSTRUCT = {**QWEN25_7B, "max_position_embeddings": 32768, "eos_token_id": 151645}

KNOWN_MODELS: dict[str, dict] = {
    "meta-llama/Llama-3.1-8B": LLAMA31_8B,
    "meta-llama/Llama-3.1-8B-Instruct": LLAMA31_8B_INSTRUCT,
    "Qwen/Qwen2.5-7B": QWEN25_7B,
    "Qwen/Qwen2.5-7B-Instruct": QWEN25_7B_INSTRUCT,
    "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2": SKYWORK_REWARD_LLAMA31_8B,
}


def known_model(path: str) -> tuple[str, dict] | None:
    """(hub id, config.json dict) of a published model named by `path`, or None.

    Matches the hub id itself or the path's last component (a local copy named after the model),
    case-insensitively.
    """
    wanted = path.rstrip("/\\").lower()
    base = os.path.basename(wanted)
    for hub_id, config in KNOWN_MODELS.items():
        if wanted == hub_id.lower() or base == hub_id.split("/")[1].lower():
            return hub_id, dict(config)
    return None
