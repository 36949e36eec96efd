"""Attention through the platform's kernels: which one, and how our masks map onto it.

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

Decode steps (one query per row against the KV cache):
  cudnn   JAX's GPU decode kernel (jax.experimental.pallas.ops.gpu.decode_attention; Pallas interpret mode off
          GPU), when the caller vouches that each row attends to one contiguous run of slots: the sampler, whose
          rows are a left-padded prompt then every fed token (transformer.decode_hidden_states passes the run as
          `CacheRows`; any other decode call, and a head_dim the kernel cannot tile, stay on xla). The kernel
          attends to slots start_idx <= s < kv_seq_len of a row, exactly such a run: start_idx is the row's
          first valid slot, kv_seq_len the slot just written + 1, both made block-local per cache block.
          Layout: keys heads-major [batch, kv_heads, cache_len, head_dim] like values (`key_cache_layout`),
          chosen once when the cache is made (init_cache). The kernel reads one [cache_len, head_dim] matrix
          per (row, kv head): with the xla path's transposed keys every step would first copy the whole cache
          into that layout. For the same reason we call its per-(row, kv head) `decode_attn_unbatched` under
          vmap on the cache as it is, not its `gqa`, which takes [batch, seq, kv_heads, head_dim] and swaps
          axes (a copy). Same elements either way: the memory plan is unchanged.
          Windows: the sampler's decode windows hand the cache over as blocks (CacheBlocks, each its own
          buffer); each block is one kernel call returning its unnormalised output with the softmax residuals
          (l = sum of exp, m = max), and the blocks are merged by the log-sum-exp rule (`merge_blocks`), so no
          block is concatenated or copied. The kernel cuts a block into k_splits pieces of power-of-two key
          tiles (>= 16), so every block's length is a multiple of DECODE_SLOT_MULTIPLE: the sampler puts its
          block ends there (`decode_slot_multiple`; the last block then has up to 15 slots never written).
          It runs per device like the kernels above (batch and kv heads split by the rules). A kernel takes
          whole arrays, so what XLA would fuse into its dots is a copy here: a cache dtype other than the
          compute dtype is cast every step (keep rollout.cache_dtype = runtime.dtype), and with scanned layers
          each step slices its layer out of the stacked cache (unscanned models keep one buffer per layer).
  splash  the slot engine's decode steps (rows that start at slot 0, each at its own slot: `CacheRows` with
          start 0, from transformer.decode_hidden_states given an index per row) run JAX's TPU paged-attention
          kernel (jax.experimental.pallas.ops.tpu.paged_attention; TPU interpret mode off TPU), `paged_decode`.
          The kernel reads keys and values as pages [kv_heads, pages, page_slots, head_dim] with one length
          per row counted from its first page's slot 0. Our heads-major cache [batch, kv_heads, cache_len,
          head_dim] is that, reshaped for free, once each (row, kv head) is taken as its own sequence of
          cache_len / PAGE_SLOTS pages under a single kv head: the kernel's query heads are then the row's
          group of query heads for that kv head, and its page table is fixed (sequence i owns pages
          i * pages .. (i + 1) * pages - 1). So keys are heads-major ("bnsk") for splash too, and a slot's cache
          is one block, a multiple of PAGED_SLOT_MULTIPLE slots: the kernel reads only the pages below each
          row's length, so decode windows have nothing left to save. JAX's newer ragged_paged_attention reads
          the same pages but does not run in TPU interpret mode in the JAX we pin (0.10.2), so it could not be
          checked here; paged_attention is the decode-only kernel it generalises.
          The static sampler's left-padded rows cannot take it (a row's first real token sits anywhere inside
          a page, and the kernel has no start offset): its splash decode steps, and every xla one, run
          grouped_attention over the cache (layers.cached_attention), keys transposed
          [batch, kv_heads, head_dim, cache_len] on xla so that XLA:CPU runs plain matmuls.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from models.config import ConfigError
from models.sharding import per_device

KERNELS = ("splash", "cudnn")
DECODE_KERNELS = ("cudnn",)  # implementations whose decode steps run a kernel over the cache
# A cache block given to the decode kernel is a multiple of this many slots: the kernel's key tiles are
# powers of two of at least 16 slots (Triton), and its k_splits pieces of a block at least 16 long.
DECODE_SLOT_MULTIPLE = 16
DECODE_KEY_TILE = 128  # the largest key tile (slots) the decode kernel loads at once
DECODE_SPLITS = 16  # the most pieces one block is split into (each one program; JAX's default)
PAGED_DECODE_KERNELS = ("splash",)  # implementations whose slot-engine decode steps run the paged kernel
PAGE_SLOTS = 64  # cache slots per page of the paged kernel (one DMA of [64, head_dim] per page)
PAGES_PER_BLOCK = 8  # pages the paged kernel attends to per compute block (512 slots)
PAGED_SLOT_MULTIPLE = PAGE_SLOTS * PAGES_PER_BLOCK  # a slot's cache for the paged kernel: whole compute blocks


class CausalTokens(NamedTuple):
    """mask[b, t, s] = valid[b, s] and s <= t, kept as its [batch, seq] row of real tokens."""

    valid: jax.Array  # [batch, seq] bool


class CacheRows(NamedTuple):
    """The mask of a decode step (one query per row) whose rows each attend to one contiguous run of cache
    slots: mask[b, 0, s] = start[b] <= s < end[b]."""

    start: jax.Array  # [batch] int32, the row's first attended slot
    end: jax.Array  # [batch] int32, one past its last (the slot just written)


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


def decodes_with_kernel(cfg, platform: str | None = None) -> bool:
    """Whether decode steps of ModelConfig `cfg` run the decode kernel on `platform` (default: JAX's default
    backend): its implementation has one, and the kernel can load its heads (Triton tiles of [slots, head_dim]
    need a power-of-two head_dim, and its dots >= 16)."""
    hd = cfg.head_dim
    implementation = resolve_attention(cfg.attention, cfg.dtype, platform)
    return implementation in DECODE_KERNELS and hd >= 16 and hd & (hd - 1) == 0


def decodes_slots_with_paged_kernel(cfg, platform: str | None = None) -> bool:
    """Whether the slot engine's decode steps of ModelConfig `cfg` run the paged kernel on `platform` (default:
    JAX's default backend): its implementation has one (splash, TPU)."""
    return resolve_attention(cfg.attention, cfg.dtype, platform) in PAGED_DECODE_KERNELS


def key_cache_layout(cfg) -> str:
    """The KV cache's key layout for ModelConfig `cfg`: "bnsk" [batch, kv_heads, cache_len, head_dim] for the
    decode kernels, else "bnks" [batch, kv_heads, head_dim, cache_len] (module docstring)."""
    return "bnsk" if decodes_with_kernel(cfg) or decodes_slots_with_paged_kernel(cfg) else "bnks"


def slot_cache_multiple(cfg) -> int | None:
    """What a slot engine's cache (one block) must be a multiple of for the paged kernel, or None when its
    decode steps do not take it (then its blocks are the static sampler's, decode_slot_multiple)."""
    return PAGED_SLOT_MULTIPLE if decodes_slots_with_paged_kernel(cfg) else None


def decode_slot_multiple(cfg) -> int:
    """What every cache block's length must be a multiple of in decode: DECODE_SLOT_MULTIPLE for the kernel."""
    return DECODE_SLOT_MULTIPLE if decodes_with_kernel(cfg) else 1


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


# ------------------------------------------------------------------------------------------ GPU decode
def decode_attention(q: jax.Array, key_blocks, value_blocks, rows: CacheRows, implementation: str = "cudnn"
                     ) -> jax.Array:
    """One decode step through the decode kernel of `implementation`: JAX's GPU decode kernel (cudnn), or the
    paged kernel for rows from slot 0 (splash, `paged_decode`), per device (batch and kv heads split by the
    rules).

    q: [batch, 1, heads, head_dim]; key_blocks, value_blocks: consecutive blocks of cache slots, each
    [batch, kv_heads, width, head_dim] (width a multiple of DECODE_SLOT_MULTIPLE); rows: the slots each row
    attends to, numbered over all blocks.  -> [batch, 1, heads, head_dim]
    """
    if implementation in PAGED_DECODE_KERNELS:
        if len(key_blocks) != 1:
            raise ValueError(f"decode attention: the paged kernel reads a slot's cache as one block, got "
                             f"{len(key_blocks)} (slot_programs.slot_widths)")
        return paged_decode(q, key_blocks[0], value_blocks[0], rows.end)
    b, _, h, hd = q.shape
    kv = key_blocks[0].shape[1]
    widths = tuple(block.shape[2] for block in key_blocks)
    interpret = jax.default_backend() != "gpu"
    blocks = len(widths)

    def local(q, start, end, *caches):
        keys, values = caches[:blocks], caches[blocks:]
        parts, offset = [], 0
        for k, v, width in zip(keys, values, widths):
            part_start = jnp.clip(start - offset, 0, width)  # the row's run inside this block, block-local
            part_end = jnp.clip(end - offset, 0, width)
            parts.append(_decode_block(q, k, v, part_start, part_end, interpret))
            offset += width
        return merge_blocks(parts).astype(q.dtype)

    q_axes = ("batch", "kv_heads", None, "head_dim")
    cache_axes = ("batch", "kv_heads", "cache_seq", "head_dim")
    run = per_device(local, (q_axes, ("batch",), ("batch",), *(cache_axes,) * (2 * blocks)), q_axes)
    end = jnp.broadcast_to(rows.end, rows.start.shape).astype(jnp.int32)
    out = run(q.reshape(b, kv, h // kv, hd), rows.start.astype(jnp.int32), end, *key_blocks, *value_blocks)
    return out.reshape(b, 1, h, hd)


def _decode_block(q, k, v, start, end, interpret: bool):
    """The kernel over one block for every (row, kv head): q [batch, kv_heads, group, head_dim], k, v
    [batch, kv_heads, width, head_dim], start, end [batch] (block-local). -> (out unnormalised
    [batch, kv_heads, group, head_dim], l [batch, kv_heads, group] = sum of exp(score - m), m = max score);
    a row with no slot here has out 0, l 0 and m the float32 minimum."""
    from jax.experimental.pallas.ops.gpu import decode_attention as decode

    width, hd = k.shape[2], k.shape[3]
    if width % DECODE_SLOT_MULTIPLE:
        raise ValueError(f"decode attention: a cache block of {width} slots; the kernel needs a multiple of "
                         f"{DECODE_SLOT_MULTIPLE} (the sampler aligns its blocks, sampling.cache_block_widths)")
    tile, splits = _decode_tiling(width)
    kernel = functools.partial(
        decode.decode_attn_unbatched, sm_scale=1.0 / math.sqrt(hd), block_h=DECODE_SLOT_MULTIPLE, block_k=tile,
        k_splits=splits, num_warps=None, num_stages=2, grid=None, interpret=interpret, debug=False,
        return_residuals=True, normalize_output=False)
    per_kv_head = jax.vmap(kernel, in_axes=(0, 0, 0, None, None))  # one row's start and end for all its heads
    out, (l, m) = jax.vmap(per_kv_head)(q, k.astype(q.dtype), v.astype(q.dtype), start, end)
    return out, l, m


def _decode_tiling(width: int) -> tuple[int, int]:
    """(key tile, k_splits) for a block of `width` slots: the largest power-of-two tile (<= DECODE_KEY_TILE)
    dividing it, then the most pieces (<= DECODE_SPLITS) that are whole tiles."""
    tile = DECODE_KEY_TILE
    while width % tile:
        tile //= 2
    tiles = width // tile
    splits = max(d for d in range(1, min(DECODE_SPLITS, tiles) + 1) if tiles % d == 0)
    return tile, splits


def merge_blocks(parts) -> jax.Array:
    """Attention over several blocks from each block's (out, l, m) (`_decode_block`): with M = max_j m_j,
    out = sum_j out_j exp(m_j - M) / sum_j l_j exp(m_j - M), in float32 (0 for a row with no slot at all).
    -> [..., head_dim] float32"""
    top = functools.reduce(jnp.maximum, [m for _, _, m in parts])
    total = jnp.zeros_like(top)
    out = 0.0
    for part, l, m in parts:
        weight = jnp.exp(m - top)
        out = out + part.astype(jnp.float32) * weight[..., None]
        total = total + l * weight
    return out / jnp.where(total > 0, total, 1.0)[..., None]


# ------------------------------------------------------------------------------------------ TPU decode
def paged_decode(q: jax.Array, keys: jax.Array, values: jax.Array, end: jax.Array) -> jax.Array:
    """One decode step of rows that start at slot 0 through JAX's TPU paged-attention kernel, per device (batch
    and kv heads split by the rules); TPU interpret mode off TPU.

    q: [batch, 1, heads, head_dim]; keys, values: [batch, kv_heads, cache_len, head_dim] (cache_len a multiple
    of PAGED_SLOT_MULTIPLE); end: [batch], row b attends to slots 0 .. end[b] - 1 (at least 1).
    -> [batch, 1, heads, head_dim]
    """
    b, _, h, hd = q.shape
    kv, width = keys.shape[1], keys.shape[2]
    if width % PAGED_SLOT_MULTIPLE:
        raise ValueError(f"decode attention: a slot cache of {width} slots; the paged kernel needs a multiple of "
                         f"{PAGED_SLOT_MULTIPLE} (slot_programs.slot_widths)")
    interpret = jax.default_backend() != "tpu"

    def local(q, k, v, end):
        rows, heads, group = q.shape[0], q.shape[1], q.shape[2]
        sequences, pages = rows * heads, width // PAGE_SLOTS  # one sequence per (row, kv head)
        table = jnp.arange(sequences * pages, dtype=jnp.int32).reshape(sequences, pages)
        as_pages = lambda x: x.reshape(1, sequences * pages, PAGE_SLOTS, hd)  # noqa: E731  (free: heads-major)
        lengths = jnp.repeat(end, heads)
        scaled = (q.astype(jnp.float32) * (1.0 / math.sqrt(hd))).reshape(sequences, group, hd)  # kernel: no scale
        with _tpu_interpret(interpret):
            out = _paged_attention()(scaled, as_pages(k), as_pages(v), lengths, table,
                                     pages_per_compute_block=PAGES_PER_BLOCK)
        return out.reshape(q.shape).astype(q.dtype)

    q_axes = ("batch", "kv_heads", None, "head_dim")
    cache_axes = ("batch", "kv_heads", "cache_seq", "head_dim")
    run = per_device(local, (q_axes, cache_axes, cache_axes, ("batch",)), q_axes)
    out = run(q.reshape(b, kv, h // kv, hd), keys, values, jnp.maximum(end, 1).astype(jnp.int32))
    return out.reshape(b, 1, h, hd)


def _paged_attention():
    """JAX's paged-attention kernel (imported when first used, like the other kernels)."""
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

    return paged_attention


def _tpu_interpret(interpret: bool):
    """TPU interpret mode for the Pallas calls traced under it (off TPU), else nothing."""
    if not interpret:
        return contextlib.nullcontext()
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.force_tpu_interpret_mode()
