"""Flax ports against transformers' PyTorch models: float32 logits and scores within 1e-4."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import models
from tests.hf_factory import CONFIGS, PAD_ID, make_checkpoint

TOL = 1e-4


def torch_logits(model, ids, mask=None, positions=None):
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids),
            attention_mask=None if mask is None else torch.tensor(mask),
            position_ids=None if positions is None else torch.tensor(positions),
        )
    return out.logits.float().numpy()


def random_ids(rng, batch, seq, vocab=150):
    return rng.integers(4, vocab, size=(batch, seq)).astype(np.int32)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("scan_layers", [False, True])
def test_causal_lm_logits_match_transformers(tmp_path, name, scan_layers):
    path, reference = make_checkpoint(tmp_path / name, name)
    model = models.load_pretrained(path, scan_layers=scan_layers)
    ids = random_ids(np.random.default_rng(0), 2, 40)  # 40 > the llama31 configs' scaled wavelengths
    ours = np.asarray(model(jnp.asarray(ids)))
    diff = np.abs(ours - torch_logits(reference, ids)).max()
    print(f"{name} scan={scan_layers} max |logit diff| = {diff:.2e}")
    assert diff < TOL


@pytest.mark.parametrize("name", ["llama31", "qwen25"])
def test_left_padded_batch_matches_each_row_alone(tmp_path, name):
    path, reference = make_checkpoint(tmp_path / name, name)
    model = models.load_pretrained(path)
    rng = np.random.default_rng(1)
    lengths = [24, 17, 9]
    ids = np.full((3, 24), PAD_ID, np.int32)
    mask = np.zeros((3, 24), np.int32)
    for row, n in enumerate(lengths):
        ids[row, 24 - n:] = random_ids(rng, 1, n)[0]
        mask[row, 24 - n:] = 1
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int32)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions)))
    theirs = torch_logits(reference, ids, mask, positions)
    for row, n in enumerate(lengths):
        alone = np.asarray(model(jnp.asarray(ids[row:row + 1, 24 - n:])))[0]
        np.testing.assert_allclose(ours[row, 24 - n:], alone, atol=TOL)
        np.testing.assert_allclose(ours[row, 24 - n:], theirs[row, 24 - n:], atol=TOL)


@pytest.mark.parametrize("name", ["llama3", "qwen25"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_reward_model_scores_match_transformers(tmp_path, name, side):
    path, reference = make_checkpoint(tmp_path / name, name, task="seq_cls")
    model = models.load_pretrained(path)
    assert isinstance(model, models.RewardModel)
    rng = np.random.default_rng(2)
    lengths = [20, 13, 5, 20]
    ids = np.full((4, 20), PAD_ID, np.int32)
    mask = np.zeros((4, 20), np.int32)
    for row, n in enumerate(lengths):
        span = slice(20 - n, 20) if side == "left" else slice(0, n)
        ids[row, span] = random_ids(rng, 1, n)[0]
        mask[row, span] = 1
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    theirs = torch_logits(reference, ids, mask)
    assert ours.shape == (4, 1)
    diff = np.abs(ours - theirs).max()
    print(f"{name} seq-cls {side}-padded max |score diff| = {diff:.2e}")
    assert diff < TOL
    # Without a mask the pad id decides which token is pooled, as in transformers.
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), torch_logits(reference, ids), atol=TOL)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_prefill_then_decode_equals_full_forward(tmp_path, scan_layers):
    path, _ = make_checkpoint(tmp_path / "m", "qwen25")
    model = models.load_pretrained(path, scan_layers=scan_layers)
    rng = np.random.default_rng(3)
    prompt_len, steps, lengths = 12, 6, [12, 7]
    ids = np.full((2, prompt_len + steps), PAD_ID, np.int32)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, prompt_len - n:] = random_ids(rng, 1, n + steps)[0]
        mask[row, prompt_len - n:] = 1
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int32)
    full = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions)))

    cache = model.init_cache(2, prompt_len + steps + 3)
    logits, cache = model.decode(
        jnp.asarray(ids[:, :prompt_len]), jnp.asarray(positions[:, :prompt_len]),
        jnp.asarray(mask[:, :prompt_len]), cache, 0)
    stepped = [np.asarray(logits)]
    for t in range(prompt_len, prompt_len + steps):
        logits, cache = model.decode(
            jnp.asarray(ids[:, t:t + 1]), jnp.asarray(positions[:, t:t + 1]), jnp.asarray(mask[:, t:t + 1]),
            cache, t)
        stepped.append(np.asarray(logits))
    stepped = np.concatenate(stepped, axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(stepped[real], full[real], atol=1e-5)


def test_bfloat16_checkpoint_loads_and_computes_in_bfloat16(tmp_path):
    path, reference = make_checkpoint(tmp_path / "bf16", "llama3", dtype=torch.bfloat16)
    model = models.load_pretrained(path, dtype="bfloat16", param_dtype="bfloat16")
    assert model.model.embed[...].dtype == jnp.bfloat16
    ids = random_ids(np.random.default_rng(4), 1, 16)
    ours = np.asarray(model(jnp.asarray(ids)).astype(jnp.float32))
    theirs = torch_logits(reference, ids)
    assert np.abs(ours - theirs).max() < 0.1  # bf16 noise, both sides; float32 parity is tested above
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.99
