"""Building blocks of the decoder: RMSNorm, rotary embedding (with Llama 3 scaling), GQA attention, gated MLP.

Numerics follow Hugging Face transformers: norms and softmax in float32, rotary tables in float32 and cast to
the compute dtype, rotate-half layout (HF checkpoints are stored for it).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.attention import (CacheRows, CausalTokens, decode_attention, kernel_attention, key_cache_layout,
                              resolve_attention)
from models.config import ModelConfig, RopeScaling
from models.sharding import constrain, param, per_device

# A large finite negative, not -inf: a query whose keys are all masked (a pad row) then gets a uniform
# softmax instead of NaN, as in transformers.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype, std: float = 0.02) -> jax.Array:
    return std * jax.random.normal(rngs.params(), shape, dtype)


class RMSNorm(nnx.Module):
    """y = w * x / sqrt(mean(x^2) + eps), the mean taken in float32.  x: [..., dim]."""

    def __init__(self, dim: int, eps: float, param_dtype):
        self.eps = eps
        self.scale = param(jnp.ones((dim,), param_dtype), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """inv_freq[i] = theta^(-2i/head_dim), i < head_dim/2, with `llama3` scaling when given.  -> [head_dim/2]

    llama3: wavelength w = 2*pi/inv_freq. w < L/high: kept; w > L/low: divided by `factor`; in between,
    interpolated with s = (L/w - low)/(high - low): (1-s)*inv_freq/factor + s*inv_freq (L = original max positions).
    """
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    inv_freq = inv_freq.astype(np.float32)
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin for rotate-half rotary embedding.  positions: [batch, seq] -> each [batch, seq, head_dim].

    The tables are computed once and stored. Left to itself XLA fuses the cos/sin into every consumer, so each
    layer's forward and backward evaluate them again, once per head; on CPU a cos costs ~20 multiplies and this
    was ~10% of a training step. A conditional is a fusion boundary XLA keeps (an optimization barrier is
    removed before fusion on CPU); both branches compute the same tables, so the predicate does not matter.
    """

    def tables(positions):
        freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
        angles = jnp.concatenate([freqs, freqs], axis=-1)
        return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)

    unfoldable = positions.reshape(-1)[0] >= 0
    return jax.lax.cond(unfoldable, tables, tables, positions)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x * cos + rotate_half(x) * sin, rotate_half([a, b]) = [-b, a].  x: [batch, seq, heads, head_dim]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class Attention(nnx.Module):
    """Grouped-query attention. Kernels: q [embed, heads, head_dim], k/v [embed, kv_heads, head_dim],
    o [heads, head_dim, embed]."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        pdt = jnp.dtype(cfg.param_dtype)
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
        self.dtype = jnp.dtype(cfg.dtype)
        self.implementation = resolve_attention(cfg.attention, cfg.dtype)
        self.key_layout = key_cache_layout(cfg)
        self.q_proj = param(_normal(rngs, (d, h, hd), pdt), ("embed", "heads", "head_dim"))
        self.k_proj = param(_normal(rngs, (d, kv, hd), pdt), ("embed", "kv_heads", "head_dim"))
        self.v_proj = param(_normal(rngs, (d, kv, hd), pdt), ("embed", "kv_heads", "head_dim"))
        self.o_proj = param(_normal(rngs, (h, hd, d), pdt), ("heads", "head_dim", "embed"))
        if cfg.qkv_bias:
            self.q_bias = param(jnp.zeros((h, hd), pdt), ("heads", "head_dim"))
            self.k_bias = param(jnp.zeros((kv, hd), pdt), ("kv_heads", "head_dim"))
            self.v_bias = param(jnp.zeros((kv, hd), pdt), ("kv_heads", "head_dim"))
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        self.o_bias = param(jnp.zeros((d,), pdt), ("embed",)) if cfg.o_bias else None

    def _project(self, x, kernel, bias):
        y = jnp.einsum("btd,dhk->bthk", x, kernel[...].astype(self.dtype))
        return y if bias is None else y + bias[...].astype(self.dtype)

    def _project_fused(self, x):
        """q, k, v from one matmul (used when sampling: in a decode loop XLA hoists the concatenation of the
        kernels out of the loop, and on CPU one wide matmul per step streams the weights much faster than three
        narrow ones). The kernels are laid side by side per kv head, [embed, kv_heads, group + 2, head_dim]:
        each kv head's group of query heads, then its key and value, so a split over kv heads splits all three
        alike."""
        h, kv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        group = h // kv

        def per_kv_head(q, k, v):  # [..., heads | kv_heads, head_dim] -> [..., kv_heads, group + 2, head_dim]
            lead = q.shape[:-2]
            return jnp.concatenate([q.reshape(*lead, kv, group, hd), k[..., None, :], v[..., None, :]], axis=-2)

        kernel = per_kv_head(self.q_proj[...], self.k_proj[...], self.v_proj[...])
        qkv = jnp.einsum("btd,dngk->btngk", x, kernel.astype(self.dtype))
        if self.q_bias is not None:
            qkv = qkv + per_kv_head(self.q_bias[...], self.k_bias[...], self.v_bias[...]).astype(self.dtype)
        b, t = x.shape[:2]
        return qkv[:, :, :, :group].reshape(b, t, h, hd), qkv[:, :, :, group], qkv[:, :, :, group + 1]

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array,
        cache: tuple[jax.Array, jax.Array] | None = None,
        index: jax.Array | None = None,
        layer: int | jax.Array | None = None,
    ):
        """x: [batch, seq, embed]; mask: [batch, seq, kv_len] (True = may attend), or for a kernel
        implementation (models/attention.py) the `CausalTokens` of a causal mask over seq, or for a decode
        step through the decode kernel the `CacheRows` each row attends to.

        Without a cache kv_len = seq. With one, cache = (k, v) in the KVCache layouts, either this layer's
        (layer None) or every layer's (a leading layers axis; `layer` picks one), each an array or the
        `CacheBlocks` of consecutive slots: the new keys and values are written at slots index..index+seq-1
        of the layer (inside the last block), then its kv_len slots (all blocks) are attended to; with a
        `CausalTokens` mask the cache holds nothing before these tokens (a prefill from slot 0), so they attend
        to each other only, through the kernel; with `CacheRows` (seq 1) the decode kernel reads the blocks.
        Returns (out [batch, seq, embed], the updated cache or None).
        """
        if cache is None:
            q, k, v = (self._project(x, w, b) for w, b in ((self.q_proj, self.q_bias), (self.k_proj, self.k_bias),
                                                            (self.v_proj, self.v_bias)))
        else:
            q, k, v = self._project_fused(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = constrain(q, ("batch", "seq", "heads", "head_dim"))
        k = constrain(k, ("batch", "seq", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "seq", "kv_heads", "head_dim"))
        if isinstance(mask, CausalTokens):
            out = kernel_attention(q, k, v, mask.valid, self.implementation)
        elif cache is None:
            out = causal_self_attention(q, k, v, mask)
        if cache is not None:
            key_blocks, value_blocks = (c.blocks if isinstance(c, CacheBlocks) else (c,) for c in cache)
            # Write, then read what was written: the reads then come after the write in the data flow, which
            # lets XLA update the cache in place inside a decode loop instead of copying it.
            key_blocks = write_blocks(key_blocks, k, layer, index, self.key_layout)
            value_blocks = write_blocks(value_blocks, v, layer, index, "bnsk")

            def read(block):
                block = block if layer is None else jax.lax.dynamic_index_in_dim(block, layer, keepdims=False)
                return block.astype(self.dtype)

            keys, values = [read(b) for b in key_blocks], [read(b) for b in value_blocks]
            if isinstance(mask, CacheRows):
                out = decode_attention(q, keys, values, mask, self.implementation)
            elif not isinstance(mask, CausalTokens):
                out = cached_attention(q, keys, values, mask, self.key_layout)
            cache = tuple(CacheBlocks(new) if isinstance(old, CacheBlocks) else new[0]
                          for old, new in zip(cache, (key_blocks, value_blocks)))
        out = jnp.einsum("bthk,hkd->btd", out, self.o_proj[...].astype(self.dtype))
        if self.o_bias is not None:
            out = out + self.o_bias[...].astype(self.dtype)
        return out, cache


def write_blocks(blocks: tuple, new: jax.Array, layer, index, layout: str) -> tuple:
    """Writes new [batch, seq, kv_heads, head_dim] into consecutive cache blocks (KVCache layouts) at slot
    `index`, numbered over all blocks. A scalar index (one slot for every row): the tokens go into the last
    block, whose first slot is the slots of the others. An index per row ([batch], seq 1: the slot engine,
    whose rows each fill their own cache from slot 0): every block takes the rows whose slot it holds; a slot
    past the last block is not written."""
    slot_axis = -1 if layout == "bnks" else -2
    if jnp.ndim(index) == 0:
        start = sum(block.shape[slot_axis] for block in blocks[:-1])
        local = index - start if start else index
        return (*blocks[:-1], write_cache(blocks[-1], new, layer, local, layout))
    written, start = [], 0
    for block in blocks:
        width = block.shape[slot_axis]
        local = index - start
        # a row whose slot is in another block writes out of bounds, which the scatter drops
        local = jnp.where((local >= 0) & (local < width), local, width)
        written.append(write_cache(block, new, layer, local, layout))
        start += width
    return tuple(written)


def write_cache(cache: jax.Array, new: jax.Array, layer, index, layout: str) -> jax.Array:
    """Writes new [batch, seq, kv_heads, head_dim] at slots index..index+seq-1 of one layer's cache (layer None)
    or of layer `layer` of every layer's cache (a leading layers axis); index [batch] (seq 1): row b at its
    own slot index[b].  Layouts (KVCache): "bnks"
    [batch, kv_heads, head_dim, cache_len] (keys on the xla path), "bnsk" [batch, kv_heads, cache_len,
    head_dim] (values; keys for the decode kernel)."""
    transposed = layout == "bnks"
    new = jnp.transpose(new, (0, 2, 3, 1) if transposed else (0, 2, 1, 3)).astype(cache.dtype)
    if jnp.ndim(index) == 1:  # a slot per row (seq 1)
        axes = ("batch", "kv_heads", "head_dim", "cache_seq") if transposed else \
            ("batch", "kv_heads", "cache_seq", "head_dim")
        values = new[..., 0] if transposed else new[:, :, 0]
        if layer is None:
            return write_rows(cache, values, index, axes, axes.index("cache_seq"))
        return write_rows(cache, values, index, (None, *axes), 1 + axes.index("cache_seq"), layer)
    start = (0, 0, 0, index) if transposed else (0, 0, index, 0)
    if layer is None:
        return jax.lax.dynamic_update_slice(cache, new, start)
    return jax.lax.dynamic_update_slice(cache, new[None], (layer, *start))


def write_rows(array: jax.Array, values: jax.Array, index: jax.Array, axes: tuple, slot_axis: int,
               layer=None) -> jax.Array:
    """array[b, ..., index[b], ...] = values[b, ...] for every row b: one element per row along `slot_axis`
    (with `layer`, in layer `layer` of a leading layers axis); a row whose index is past the axis writes
    nothing. Rows are the axis named "batch" in `axes`, the array's logical axes; values has the array's axes
    without the slot and layers axes.

    A scatter by rows as such is one XLA cannot keep on the devices that hold the rows (it gathers the indices
    and values of every row to every device, every decode step): this one runs per device (models.sharding
    .per_device), each device writing its own rows."""
    batch_axis = axes.index("batch")
    values_axes = tuple(a for i, a in enumerate(axes) if i != slot_axis and (layer is None or i != 0))

    def local(array, values, index, *layer):
        at = [slice(None)] * array.ndim
        at[batch_axis] = jnp.arange(index.shape[0])
        at[slot_axis] = index
        if layer:
            at[0] = layer[0]
        return array.at[tuple(at)].set(values.astype(array.dtype), mode="drop")

    lead = () if layer is None else (jnp.asarray(layer, jnp.int32),)
    run = per_device(local, (axes, values_axes, ("batch",), *((),) * len(lead)), axes)
    return run(array, values, index, *lead)


@jax.tree_util.register_pytree_node_class
class CacheBlocks:
    """One cache (keys or values, KVCache layouts) held as consecutive blocks of slots, each its own buffer:
    blocks[0] holds slots 0..n0-1, blocks[1] the next n1, and so on. A decode loop that passes only the
    blocks filled so far reads only those slots each step, with no copy (a slice of one big buffer would be
    copied); its new tokens are written into the last block it passes."""

    def __init__(self, blocks):
        self.blocks = tuple(blocks)

    def tree_flatten(self):
        return self.blocks, None

    @classmethod
    def tree_unflatten(cls, _, blocks):
        return cls(blocks)


def cached_attention(q: jax.Array, k, v, mask: jax.Array, k_layout: str = "bnks") -> jax.Array:
    """grouped_attention over one layer's cache: keys [batch, kv_heads, head_dim, cache_len] ("bnks"), values
    [batch, kv_heads, cache_len, head_dim], so that both products are plain row-major matmuls per (row, kv head),
    q @ k and probs @ v (with keys [cache_len, head_dim] XLA:CPU transposes them on every decode step, which
    doubled the step's attention time). Keys may also be heads-major ("bnsk", the decode kernel's cache when a
    step does not take the kernel). k and v may be lists of consecutive blocks of slots.
    -> [batch, seq, heads, head_dim]"""
    return grouped_attention(q, k, v, mask, k_layout=k_layout, v_layout="bnsk")


def grouped_attention(q: jax.Array, k, v, mask: jax.Array, k_layout: str = "bsnk", v_layout: str = "bsnk") -> jax.Array:
    """softmax(q k^T / sqrt(head_dim) + mask) v with kv heads shared by groups of query heads.

    q: [batch, seq, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim] (layout "bsnk"), or heads-major
    [batch, kv_heads, kv_len, head_dim] ("bnsk"), or for keys transposed [batch, kv_heads, head_dim, kv_len]
    ("bnks"), or lists of such blocks that together make kv_len (scores are taken per block, the softmax over
    all of them, and the blocks' products with their values summed); mask: [batch, seq, kv_len].
    -> [batch, seq, heads, head_dim]. Scores and softmax in float32.
    """
    key_blocks = list(k) if isinstance(k, (list, tuple)) else [k]
    value_blocks = list(v) if isinstance(v, (list, tuple)) else [v]
    b, t, h, hd = q.shape
    kv_heads = value_blocks[0].shape[v_layout.index("n")]
    q = q.reshape(b, t, kv_heads, h // kv_heads, hd)
    # One query per row (a decode step): without the length-1 seq axis the products are plain batched matmuls.
    # Several queries: heads-major [batch, kv_heads, group, seq, head_dim] first, so that every product is a plain
    # batched matmul (XLA:CPU has no bfloat16 x bfloat16 -> float32 dot that also transposes an operand).
    query, scored, out_axes = ("bngk", "bngs", "bngk") if t == 1 else ("bngtk", "bngts", "bngtk")
    q = q[:, 0] if t == 1 else q.transpose(0, 2, 3, 1, 4)
    scores = [jnp.einsum(f"{query},{k_layout}->{scored}", q, block, preferred_element_type=jnp.float32)
              for block in key_blocks]
    scores = scores[0] if len(scores) == 1 else jnp.concatenate(scores, axis=-1)
    if t == 1:
        scores = scores[:, :, :, None]
    scores = jnp.where(mask[:, None, None, :, :], scores / math.sqrt(hd), MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(value_blocks[0].dtype)
    if t == 1:
        probs = probs[:, :, :, 0]
    if len(value_blocks) == 1:
        out = jnp.einsum(f"{scored},{v_layout}->{out_axes}", probs, value_blocks[0])
    else:
        out, start = None, 0
        for block in value_blocks:
            width = block.shape[v_layout.index("s")]
            part = jnp.einsum(f"{scored},{v_layout}->{out_axes}", probs[..., start:start + width], block)
            out, start = part if out is None else out + part, start + width
    out = out[:, None] if t == 1 else out.transpose(0, 3, 1, 2, 4)
    return out.reshape(b, t, h, hd)


# Queries of one causal attention block: the block at queries [i*C, (i+1)*C) reads keys [0, (i+1)*C) only,
# which skips the masked upper triangle (~40% of the scores at 512 tokens with 4 blocks).
CAUSAL_BLOCK = 128


@jax.custom_vjp
def causal_self_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """grouped_attention of a whole sequence under a causal mask (no cache), blockwise, with its gradient
    written out by hand.

    q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim]; mask: [batch, seq, seq], False
    wherever key > query (causal, plus any padding).  -> [batch, seq, heads, head_dim].

    Queries go in blocks of CAUSAL_BLOCK that score only the keys up to their block's end. A fully masked
    query row (left padding) is uniform over those keys instead of all keys: its output differs from
    grouped_attention's, and nothing real reads it. The backward works heads-major, [batch, kv_heads, group,
    seq, ...], so that its products are batched matmuls over (row, kv head) with no transposed copies of the
    probabilities; per block, with P = softmax(S), S = q k^T / sqrt(head_dim) + mask:
    dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(P * dP)) (0 where masked), dQ = dS K / sqrt(d),
    dK = dS^T Q / sqrt(d), dK and dV summed over the blocks that read each key.
    """
    return _attention_forward(q, k, v, mask)[0]


def _heads_major(x: jax.Array, kv_heads: int) -> jax.Array:
    """[batch, seq, heads, head_dim] -> [batch, kv_heads, group, seq, head_dim]."""
    b, t, h, hd = x.shape
    return x.reshape(b, t, kv_heads, h // kv_heads, hd).transpose(0, 2, 3, 1, 4)


def _tokens_major(x: jax.Array) -> jax.Array:
    """[batch, kv_heads, group, seq, head_dim] -> [batch, seq, heads, head_dim]."""
    b, n, g, t, hd = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(b, t, n * g, hd)


def _query_blocks(seq: int) -> list[tuple[int, int]]:
    """[start, end) of each query block; block i reads keys [0, end)."""
    return [(start, min(start + CAUSAL_BLOCK, seq)) for start in range(0, seq, CAUSAL_BLOCK)]


def _attention_forward(q, k, v, mask):
    kv_heads = k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    qh = _heads_major(q, kv_heads)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [batch, kv_heads, seq, head_dim]
    outs, probs = [], []
    for start, end in _query_blocks(q.shape[1]):
        scores = jnp.einsum("bngtk,bnsk->bngts", qh[:, :, :, start:end], kh[:, :, :end],
                            preferred_element_type=jnp.float32)
        block_mask = mask[:, None, None, start:end, :end]
        block_probs = jax.nn.softmax(jnp.where(block_mask, scores * scale, MASK_VALUE), axis=-1)
        outs.append(jnp.einsum("bngts,bnsk->bngtk", block_probs.astype(vh.dtype), vh[:, :, :end]))
        probs.append(block_probs)
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return _tokens_major(out), (qh, kh, vh, tuple(probs), mask)


def _attention_backward(residuals, d_out):
    qh, kh, vh, probs, mask = residuals
    scale = 1.0 / math.sqrt(qh.shape[-1])
    d_outh = _heads_major(d_out, kh.shape[1])
    b, n, g, seq, hd = qh.shape
    # dV and dK are built transposed, [batch, kv_heads, head_dim, seq]: then only the small [seq, head_dim]
    # operands are transposed for the matmuls, never the [seq, seq] ones.
    d_v = jnp.zeros((b, n, hd, seq), jnp.float32)
    d_k = jnp.zeros((b, n, hd, seq), jnp.float32)
    d_qs = []
    for (start, end), block_probs in zip(_query_blocks(seq), probs):
        d_o = d_outh[:, :, :, start:end]
        d_v = d_v.at[..., :end].add(jnp.einsum("bngtk,bngts->bnks", d_o, block_probs.astype(d_o.dtype),
                                               preferred_element_type=jnp.float32))
        d_probs = jnp.einsum("bngtk,bnsk->bngts", d_o, vh[:, :, :end], preferred_element_type=jnp.float32)
        d_scores = block_probs * (d_probs - jnp.sum(block_probs * d_probs, axis=-1, keepdims=True))
        d_scores = jnp.where(mask[:, None, None, start:end, :end], d_scores * scale, 0.0).astype(qh.dtype)
        d_qs.append(jnp.einsum("bngts,bnsk->bngtk", d_scores, kh[:, :, :end]))
        d_k = d_k.at[..., :end].add(jnp.einsum("bngtk,bngts->bnks", qh[:, :, :, start:end], d_scores,
                                               preferred_element_type=jnp.float32))
    d_q = d_qs[0] if len(d_qs) == 1 else jnp.concatenate(d_qs, axis=3)
    return (_tokens_major(d_q), d_k.transpose(0, 3, 1, 2).astype(kh.dtype), d_v.transpose(0, 3, 1, 2).astype(vh.dtype),
            None)


causal_self_attention.defvjp(_attention_forward, _attention_backward)


class MLP(nnx.Module):
    """down(silu(gate(x)) * up(x)).  gate/up: [embed, mlp], down: [mlp, embed]."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        pdt = jnp.dtype(cfg.param_dtype)
        self.dtype = jnp.dtype(cfg.dtype)
        self.gate_proj = param(_normal(rngs, (d, f), pdt), ("embed", "mlp"))
        self.up_proj = param(_normal(rngs, (d, f), pdt), ("embed", "mlp"))
        self.down_proj = param(_normal(rngs, (f, d), pdt), ("mlp", "embed"))

    def __call__(self, x: jax.Array, fused: bool = False) -> jax.Array:
        """x: [batch, seq, embed] -> [batch, seq, embed]. fused (used when sampling): gate and up as one
        [embed, 2 * mlp] matmul, as in Attention._project_fused; no custom gradient."""
        gate, up, down = (w[...].astype(self.dtype) for w in (self.gate_proj, self.up_proj, self.down_proj))
        if not fused:
            return gated_mlp(x, gate, up, down)
        # stacked [embed, 2, mlp]: the same memory as [gate | up], and a split of mlp splits both alike
        gate_up = jnp.einsum("btd,dcf->btcf", x, jnp.stack([gate, up], axis=1))
        return (jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1]) @ down


@jax.custom_vjp
def gated_mlp(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """(silu(x @ w_gate) * (x @ w_up)) @ w_down.  x: [batch, seq, embed]; w_gate, w_up: [embed, mlp];
    w_down: [mlp, embed].  -> [batch, seq, embed]

    The gradient is written out by hand (below): as plain [tokens, features] matmuls with the SiLU
    derivative fused into one elementwise pass, XLA:CPU no longer folds the gate's gradient into a transposed
    copy of the [tokens, mlp] activations in every layer, which halved the MLP's backward time.
    """
    return _gated_mlp_forward(x, w_gate, w_up, w_down)[0]


def _gated_mlp_forward(x, w_gate, w_up, w_down):
    gate = constrain(x @ w_gate, ("batch", "seq", "mlp"))
    up = constrain(x @ w_up, ("batch", "seq", "mlp"))
    out = (jax.nn.silu(gate) * up) @ w_down
    return out, (x, gate, up, w_gate, w_up, w_down)


def _gated_mlp_backward(residuals, d_out):
    """d_hidden = d_out w_down^T; with s = sigmoid(gate): d_up = d_hidden * gate * s,
    d_gate = d_hidden * up * s * (1 + gate * (1 - s)); weight gradients are inputs^T @ output gradients."""
    x, gate, up, w_gate, w_up, w_down = residuals
    tokens = x.shape[:-1]
    flat = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731  [tokens, features]
    x2, gate2, up2, d_out2 = flat(x), flat(gate), flat(up), flat(d_out)
    d_hidden = d_out2 @ w_down.T
    sig = jax.nn.sigmoid(gate2)
    silu = gate2 * sig
    d_w_down = (silu * up2).T @ d_out2
    d_up = d_hidden * silu
    d_gate = d_hidden * up2 * sig * (1 + gate2 * (1 - sig))
    d_x = d_gate @ w_gate.T + d_up @ w_up.T
    return (d_x.reshape(*tokens, -1).astype(x.dtype), (x2.T @ d_gate).astype(w_gate.dtype),
            (x2.T @ d_up).astype(w_up.dtype), d_w_down.astype(w_down.dtype))


gated_mlp.defvjp(_gated_mlp_forward, _gated_mlp_backward)


class DecoderBlock(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pdt)
        self.attn = Attention(cfg, rngs)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pdt)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, cos, sin, mask, cache=None, index=None, layer=None):
        """-> (x [batch, seq, embed], cache): see Attention for the cache."""
        attn_out, cache = self.attn(self.input_norm(x), cos, sin, mask, cache, index, layer)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_norm(x), fused=cache is not None)
        return constrain(x, ("batch", "seq", "embed")), cache
