"""Tiny random Hugging Face reward models (PyTorch, saved as safetensors with their tokenizer) for tests.

`save_tiny_reward_model(path, tokenizer_dir, family)` writes a LlamaForSequenceClassification or
Qwen2ForSequenceClassification directory that both transformers and models.load_pretrained read,
and returns the torch model for reference scores.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fixtures_tokenizers import load_tokenizer

from rlmt_jax.inputs.toy_tokenizer import ToyTokenizerSpec, build_toy_tokenizer


def save_tiny_reward_model(path, tokenizer_dir, family: str = "llama3", seed: int = 0):
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForSequenceClassification,
        Qwen2Config,
        Qwen2ForSequenceClassification,
    )

    tokenizer = load_tokenizer(tokenizer_dir)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    if family == "llama3":
        config = LlamaConfig(
            **common,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
        model = LlamaForSequenceClassification(config)
    else:
        model = Qwen2ForSequenceClassification(Qwen2Config(**common, rms_norm_eps=1e-6, rope_theta=1000000.0))
    with torch.no_grad():  # random init leaves the score head tiny; make scores spread out
        model.score.weight.normal_(0.0, 1.0)
    model.eval()
    path = Path(path)
    model.save_pretrained(str(path))
    for item in Path(tokenizer_dir).iterdir():
        shutil.copy(item, path / item.name)
    return model


def torch_scores(torch_model, tokenizer, conversations, max_length=None):
    """Reference: render each conversation with the RM template, tokenize, right-pad, PyTorch forward.

    -> (scores [n] numpy, token rows)
    """
    import torch

    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=False) for c in conversations]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    with torch.no_grad():
        return torch_model(input_ids=ids, attention_mask=mask).logits[:, 0].numpy(), rows


@pytest.fixture(scope="session")
def llama_rm_dir(tmp_path_factory):
    """A Llama-3.1-style reward model (Llama chat template, pad token set) and its torch twin."""
    root = tmp_path_factory.mktemp("rm")
    build_toy_tokenizer(root / "tok", ToyTokenizerSpec(family="llama3"))
    torch_model = save_tiny_reward_model(root / "llama-rm", root / "tok", "llama3")
    return root / "llama-rm", torch_model


@pytest.fixture(scope="session")
def qwen_rm_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    build_toy_tokenizer(root / "tok", ToyTokenizerSpec(family="qwen2"))
    torch_model = save_tiny_reward_model(root / "qwen-rm", root / "tok", "qwen2")
    return root / "qwen-rm", torch_model
