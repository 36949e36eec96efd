"""Causal attention over whole sequences through the platform's kernel: which one, and how our masks map onto it.

Implementations (ModelConfig.attention, the run config's `runtime.attention`):
  xla     the blocked path written for XLA:CPU, with its hand-written gradient (layers.causal_self_attention);
          takes the dense [batch, seq, seq] mask.
  splash  the TPU Pallas splash-attention kernel (jax.experimental.pallas.ops.tpu.splash_attention), with
          its own gradient; padding as segment ids. Off TPU it runs in Pallas interpret mode (tests).
  cudnn   cuDNN flash attention through jax.nn.dot_product_attention, with its own gradient; padding as
          per-row lengths. Off GPU the same call runs with implementation="xla" (tests).
  auto    splash on TPU, cudnn on GPU in bfloat16/float16 (cuDNN has no float32 flash), xla elsewhere.

Both kernels see the mask as `CausalTokens`: query t attends to key s when s <= t and token s is real, which is
the dense mask `causal_mask(attention_mask)` builds, without its [seq, seq] array. They run per device (batch
and kv heads split by the rules table, models.sharding.per_device), each query head kept with its kv head.
Decode steps stay on the xla path (grouped_attention over the cache): JAX's TPU decode kernels (paged_attention,
ragged_paged_attention) read a paged cache, and its GPU one (pallas.ops.gpu.decode_attention.gqa) keys laid out
[batch, seq, kv_heads, head_dim]; our cache keeps keys transposed per kv head in decode-window blocks.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from models.config import ConfigError
from models.sharding import per_device

KERNELS = ("splash", "cudnn")


class CausalTokens(NamedTuple):
    """mask[b, t, s] = valid[b, s] and s <= t, kept as its [batch, seq] row of real tokens."""

    valid: jax.Array  # [batch, seq] bool


def resolve_attention(setting: str, dtype, platform: str | None = None) -> str:
    """The implementation `setting` means on `platform` (default: JAX's default backend) for compute `dtype`:
    'auto' resolved (module docstring), any other name returned as is."""
    if setting != "auto":
        return setting
    platform = platform or jax.default_backend()
    if platform == "tpu":
        return "splash"
    if platform in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def kernel_attention(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array, implementation: str) -> jax.Array:
    """Causal attention by `implementation` ('splash' or 'cudnn') over the real tokens `valid`, per device.

    q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim]; valid: [batch, seq].
    -> [batch, seq, heads, head_dim]. Rows of pad queries hold values nothing real reads.
    """
    b, t, h, hd = q.shape
    kv = k.shape[2]
    on_platform = jax.default_backend() == ("tpu" if implementation == "splash" else "gpu")
    if implementation == "cudnn" and on_platform and q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ConfigError(f"attention: 'cudnn' needs a bfloat16 or float16 compute dtype, got {q.dtype} "
                          "(set runtime.dtype, or runtime.attention: xla)")
    body = functools.partial(_splash if implementation == "splash" else _dot_product,
                             on_platform=on_platform)

    def grouped(q, k, v, valid):  # q grouped per kv head, so a split over kv heads keeps each group whole
        local_b, local_t, local_kv, group, _ = q.shape
        return body(q.reshape(local_b, local_t, local_kv * group, hd), k, v, valid).reshape(q.shape)

    q_axes = ("batch", "seq", "kv_heads", None, "head_dim")
    kv_axes = ("batch", "seq", "kv_heads", "head_dim")
    run = per_device(grouped, (q_axes, kv_axes, kv_axes, ("batch", "seq")), q_axes)
    return run(q.reshape(b, t, kv, h // kv, hd), k, v, valid.astype(bool)).reshape(b, t, h, hd)


# ------------------------------------------------------------------------------------------------- cuDNN
def _dot_product(q, k, v, valid, on_platform: bool):
    """jax.nn.dot_product_attention with is_causal and per-row lengths, which mark the real tokens as a prefix
    of each row. Each row's real tokens (one contiguous run: left padding, right padding or both) are rotated
    to the front first and back after, so that its first real token is at 0.  shapes as kernel_attention."""
    t = q.shape[1]
    start = jnp.argmax(valid, axis=1).astype(jnp.int32)  # first real token (0 for a row of pads)
    lengths = jnp.sum(valid, axis=1, dtype=jnp.int32)
    columns = jnp.arange(t, dtype=jnp.int32)[None, :]

    def rotate(x, shift):  # x[b, (s + shift[b]) mod t] at s
        index = (columns + shift[:, None]) % t
        return jnp.take_along_axis(x, index[:, :, None, None], axis=1)

    out = jax.nn.dot_product_attention(
        rotate(q, start), rotate(k, start), rotate(v, start), is_causal=True, query_seq_lengths=lengths,
        key_value_seq_lengths=lengths, implementation="cudnn" if on_platform else "xla")
    return rotate(out, -start)


# ------------------------------------------------------------------------------------------------ splash
SPLASH_BLOCKS = (512, 256, 128)  # the largest that divides the (padded) length; 128 is the kernel's lane width


def _splash(q, k, v, valid, on_platform: bool):
    """The splash kernel, one call per row (vmap), with segment ids 1 for real tokens and 0 for pads and a
    causal mask: a pad query attends to earlier pads (at least itself), so no row is empty. Sequences are
    padded to a multiple of 128 (pads, segment 0). The kernel does not scale: q is scaled first.
    shapes as kernel_attention."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, t, h, hd = q.shape
    padded = -(-t // SPLASH_BLOCKS[-1]) * SPLASH_BLOCKS[-1]

    def heads_major(x):  # [b, t, n, d] -> [b, n, padded, d]
        return jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, padded - t), (0, 0)))

    segments = jnp.pad(valid.astype(jnp.int32), ((0, 0), (0, padded - t)))
    kernel = _splash_kernel(h, padded, not on_platform)
    q = q * jnp.asarray(1.0 / math.sqrt(hd), q.dtype)
    out = jax.vmap(kernel)(heads_major(q), heads_major(k), heads_major(v),
                           segment_ids=splash.SegmentIds(q=segments, kv=segments))
    return out[:, :, :t].transpose(0, 2, 1, 3)


@functools.lru_cache(maxsize=16)
def _splash_kernel(heads: int, seq: int, interpret: bool):
    """A causal splash kernel for `heads` query heads over `seq` tokens (a multiple of 128); made once per
    shape (its block tables are built on the host, as concrete arrays even when first asked for in a trace)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    block = next(size for size in SPLASH_BLOCKS if seq % size == 0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = splash.MultiHeadMask([splash.CausalMask((seq, seq)) for _ in range(heads)])
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)
