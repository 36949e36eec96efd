"""Gradients of our models against transformers' autograd, float32, on left-padded batches.

The attention and MLP gradients are written by hand (models/layers.py custom VJPs), so every parameter's
gradient is checked against PyTorch's, with each remat mode and with scanned layers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import models
from models.hf_io import hf_tensors
from models import layers
from models.layers import causal_self_attention, gated_mlp, grouped_attention
from tests.hf_factory import PAD_ID, make_checkpoint

LENGTHS = (21, 14, 6)
SEQ = 21


def padded_batch(seed: int = 0):
    """Three left-padded rows of different lengths.  -> ids, mask, positions [3, SEQ], weights [3, SEQ, vocab]."""
    rng = np.random.default_rng(seed)
    ids = np.full((len(LENGTHS), SEQ), PAD_ID, np.int32)
    mask = np.zeros((len(LENGTHS), SEQ), np.int32)
    for row, n in enumerate(LENGTHS):
        ids[row, SEQ - n:] = rng.integers(4, 150, size=n)
        mask[row, SEQ - n:] = 1
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int32)
    return ids, mask, positions


def loss_weights(shape, seed: int = 1) -> np.ndarray:
    """Random weights of every logit, zero on pad tokens: the loss is sum(weights * logits)."""
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def torch_gradients(reference, ids, mask, positions, weights) -> dict[str, np.ndarray]:
    reference.zero_grad(set_to_none=True)
    logits = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                       position_ids=torch.tensor(positions)).logits
    (logits * torch.tensor(weights)).sum().backward()
    return {name: p.grad.numpy() for name, p in reference.named_parameters() if p.grad is not None}


def our_gradients(model, ids, mask, positions, weights) -> dict[str, np.ndarray]:
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
        logits = nnx.merge(graphdef, params)(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions))
        return jnp.sum(jnp.asarray(weights) * logits)

    grads = jax.jit(jax.grad(loss))(params)
    return dict(hf_tensors(nnx.merge(graphdef, grads)))  # HF names and layouts


@pytest.mark.parametrize(("name", "remat", "scan_layers", "causal_block"), [
    ("llama31", "none", False, 128),  # llama3 rope scaling
    ("qwen25", "none", False, 8),  # qkv bias, GQA 7:1; three query blocks (8, 8, 5)
    ("llama32_tied", "dots", True, 128),  # tied embeddings, one kv head
    ("llama3", "full", True, 4),
    ("qwen25_tied", "dots", False, 128),
])
def test_every_parameter_gradient_matches_transformers(tmp_path, monkeypatch, name, remat, scan_layers,
                                                       causal_block):
    monkeypatch.setattr(layers, "CAUSAL_BLOCK", causal_block)
    path, reference = make_checkpoint(tmp_path / name, name)
    model = models.load_pretrained(path, remat=remat, scan_layers=scan_layers)
    ids, mask, positions = padded_batch()
    weights = loss_weights((*ids.shape, model.config.vocab_size)) * mask[..., None]
    theirs = torch_gradients(reference, ids, mask, positions, weights)
    ours = our_gradients(model, ids, mask, positions, weights)
    if "lm_head.weight" in ours and "lm_head.weight" not in theirs:  # tied: HF reports it on the embedding
        ours.pop("lm_head.weight")
    assert sorted(ours) == sorted(theirs)
    worst = max(np.abs(ours[k] - theirs[k]).max() / max(np.abs(theirs[k]).max(), 1e-6) for k in theirs)
    print(f"{name} remat={remat} scan={scan_layers}: largest relative gradient difference {worst:.1e}")
    assert worst < 1e-4


def attention_inputs(batch=2, seq=9, heads=6, kv_heads=2, head_dim=8, dtype=jnp.float32):
    """q, k, v, a causal mask with row 0 left-padded by 3, and upstream gradients that are 0 on the padded
    query rows (as a loss over real tokens gives them)."""
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (batch, seq, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim), dtype)
    real = jnp.arange(seq)[None, :] >= jnp.array([[3], [0]])
    mask = jnp.tril(jnp.ones((seq, seq), bool))[None] & real[:, None, :]
    upstream = jax.random.normal(keys[3], q.shape, dtype) * real[:, :, None, None]
    return q, k, v, mask, upstream


@pytest.mark.parametrize("causal_block", [128, 4, 3])  # one block; blocks (4, 4, 1); three full blocks
def test_attention_and_its_gradient_equal_the_plain_formula(monkeypatch, causal_block):
    monkeypatch.setattr(layers, "CAUSAL_BLOCK", causal_block)
    q, k, v, mask, upstream = attention_inputs()
    real_rows = np.asarray(mask.any(-1))  # [batch, seq]: query rows with a key to attend to
    out, plain_out = causal_self_attention(q, k, v, mask), grouped_attention(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(out)[real_rows], np.asarray(plain_out)[real_rows], rtol=1e-6, atol=1e-6)
    plain = jax.grad(lambda q, k, v: jnp.sum(upstream * grouped_attention(q, k, v, mask)), (0, 1, 2))(q, k, v)
    ours = jax.grad(lambda q, k, v: jnp.sum(upstream * causal_self_attention(q, k, v, mask)), (0, 1, 2))(q, k, v)
    for a, b in zip(ours, plain):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    # a fully padded query row gets no gradient through its (uniform) probabilities
    assert float(jnp.abs(ours[0][0, :3]).max()) == 0.0


def test_mlp_gradient_equals_autodiff_of_the_plain_formula():
    keys = jax.random.split(jax.random.key(1), 5)
    x = jax.random.normal(keys[0], (2, 5, 16))
    w_gate, w_up = (0.3 * jax.random.normal(k, (16, 24)) for k in keys[1:3])
    w_down = 0.3 * jax.random.normal(keys[3], (24, 16))
    upstream = jax.random.normal(keys[4], (2, 5, 16))

    def plain(x, w_gate, w_up, w_down):
        return jnp.sum(upstream * ((jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down))

    expected = jax.grad(plain, (0, 1, 2, 3))(x, w_gate, w_up, w_down)
    ours = jax.grad(lambda *a: jnp.sum(upstream * gated_mlp(*a)), (0, 1, 2, 3))(x, w_gate, w_up, w_down)
    for a, b in zip(ours, expected):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_bfloat16_gradients_keep_their_dtypes():
    q, k, v, mask, upstream = attention_inputs(dtype=jnp.bfloat16)
    grads = jax.grad(lambda q, k, v: jnp.sum(upstream * causal_self_attention(q, k, v, mask)).astype(jnp.float32),
                     (0, 1, 2))(q, k, v)
    assert [g.dtype for g in grads] == [jnp.bfloat16] * 3
    x = jnp.ones((1, 2, 16), jnp.bfloat16)
    weights = (jnp.ones((16, 8), jnp.bfloat16), jnp.ones((16, 8), jnp.bfloat16), jnp.ones((8, 16), jnp.bfloat16))
    mlp_grads = jax.grad(lambda *a: jnp.sum(gated_mlp(*a)).astype(jnp.float32), (0, 1, 2, 3))(x, *weights)
    assert [g.dtype for g in mlp_grads] == [jnp.bfloat16] * 4
