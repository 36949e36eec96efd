"""Tiny random Hugging Face checkpoints built locally with transformers (PyTorch) for parity tests.

Every config exercises a feature of the real models at toy size; nothing is downloaded.
"""

from __future__ import annotations

import os

import torch
import transformers

TINY = dict(vocab_size=160, hidden_size=64, intermediate_size=112, num_hidden_layers=2, max_position_embeddings=256)

CONFIGS = {
    # Llama 3: GQA 2:1, no rope scaling.
    "llama3": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0)),
    # Llama 3.1: llama3 rope scaling with a short original context so test sequences cross a scaled wavelength.
    "llama31": ("llama", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
    # Llama 3.2 1B/3B: tied embeddings plus rope scaling.
    "llama32_tied": ("llama", dict(
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
    # Qwen2.5-7B shape: qkv bias, GQA 7:1, explicit head_dim.
    "qwen25": ("qwen2", dict(hidden_size=112, num_attention_heads=14, num_key_value_heads=2, head_dim=8,
                             rope_theta=1000000.0)),
    # Qwen2.5 0.5B-3B: tied embeddings.
    "qwen25_tied": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                  rope_theta=1000000.0)),
}
PAD_ID = 159


def hf_config(name: str, **overrides):
    family, extra = CONFIGS[name]
    kwargs = {**TINY, **extra, "bos_token_id": 1, "eos_token_id": [2, 3], **overrides}
    cls = transformers.LlamaConfig if family == "llama" else transformers.Qwen2Config
    return cls(**kwargs)


def make_checkpoint(directory, name: str, task: str = "causal_lm", seed: int = 0, dtype=torch.float32, **overrides):
    """Saves a random model of config `name` to `directory` and returns (directory, torch model in eval mode).

    task: 'causal_lm' or 'seq_cls' (a reward model with one label and a pad token, as Skywork's).
    """
    torch.manual_seed(seed)
    if task == "seq_cls":
        overrides = {"num_labels": 1, "pad_token_id": PAD_ID, **overrides}
    config = hf_config(name, **overrides)
    family = CONFIGS[name][0]
    if task == "causal_lm":
        cls = transformers.LlamaForCausalLM if family == "llama" else transformers.Qwen2ForCausalLM
    else:
        cls = (transformers.LlamaForSequenceClassification if family == "llama"
               else transformers.Qwen2ForSequenceClassification)
    model = cls(config).to(dtype).eval()
    with torch.no_grad():  # random biases and norm scales, so a wrong mapping cannot hide behind zeros/ones
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or "norm" in pname:
                p.add_(0.1 * torch.randn_like(p))
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    return os.fspath(directory), model
