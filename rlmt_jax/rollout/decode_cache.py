"""The sampler's KV cache: its layout, and its blocks, one per decode window.

Keys are kept transposed, [layers, rows, kv_heads, head_dim, slots] (or heads-major like the values,
[layers, rows, kv_heads, slots, head_dim], for the decode kernel: cache_axes); the valid mask is
[rows, slots]. The slots are split into blocks, each its own buffer (models.layers.CacheBlocks): block 0 holds
the prompt's slots and decode window 0's response slots, block j window j's (cache_block_widths). While the
loop fills block j it passes blocks 0..j only (window_view), so its attention reads those slots and no more.
Models whose layers are not scanned hold each layer's blocks apart: a tuple of CacheBlocks per layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.attention import decode_slot_multiple, key_cache_layout
from models.layers import CacheBlocks
from models.sharding import constrain
from models.transformer import KVCache
from rlmt_jax.rollout.sampling_config import SamplingConfig

# Logical axes of the KV cache the sampler keeps (keys transposed; heads-major like the values for the decode
# kernel, see cache_axes): read by the memory plan too.
KEY_CACHE_AXES = (None, "batch", "kv_heads", "head_dim", "cache_seq")
VALUE_CACHE_AXES = (None, "batch", "kv_heads", "cache_seq", "head_dim")


def cache_axes(model_config) -> tuple[tuple, tuple]:
    """The logical axes of the sampler's key and value caches for a model config (its key layout)."""
    heads_major = key_cache_layout(model_config) == "bnsk"
    return (VALUE_CACHE_AXES if heads_major else KEY_CACHE_AXES), VALUE_CACHE_AXES


def cache_block_widths(config: SamplingConfig, prompt_len: int, multiple: int = 1) -> tuple[int, ...]:
    """Slots of each cache block: the first holds the prompt and window 0's response slots, each later one its
    window's (config.response_blocks()). With `multiple` > 1 (the decode kernel's, models.attention
    .decode_slot_multiple) every block ends at a multiple of it: a window then fills up to its rounded end
    (the next starts there), and the last block may hold up to multiple - 1 slots that are never written."""
    ends, end = [], prompt_len
    for width in config.response_blocks() or (0,):
        end += width
        rounded = -(-end // multiple) * multiple
        if not ends or rounded > ends[-1]:
            ends.append(rounded)
    return tuple(stop - start for start, stop in zip((0, *ends[:-1]), ends))


def samples_cache(prompt_cache: KVCache, config: SamplingConfig, model_config, prompt_len: int) -> KVCache:
    """The prefilled cache of B prompts (P slots each) given to their n samples: R = B * n rows in blocks of
    cache_block_widths slots, the prompt's slots filled, the response slots empty (valid False)."""
    widths = cache_block_widths(config, prompt_len, decode_slot_multiple(model_config))
    valid = jnp.pad(jnp.repeat(prompt_cache.valid, config.n, axis=0), ((0, 0), (0, sum(widths) - prompt_len)))
    key_axes, value_axes = cache_axes(model_config)
    cache = KVCache(k=_blocked(prompt_cache.k, key_axes, config, widths),
                    v=_blocked(prompt_cache.v, value_axes, config, widths), valid=valid)
    if not model_config.scan_layers:  # each layer's blocks their own buffers: no slicing in the decode loop
        cache = cache._replace(k=_per_layer_blocks(cache.k), v=_per_layer_blocks(cache.v))
    return cache


def window_view(cache: KVCache, blocks: int, slots: int) -> KVCache:
    """The first `blocks` blocks of the cache, holding its first `slots` slots: what a decode window reads."""
    return KVCache(k=_first_blocks(cache.k, blocks), v=_first_blocks(cache.v, blocks), valid=cache.valid[:, :slots])


def with_window(cache: KVCache, view: KVCache) -> KVCache:
    """`cache` with the blocks and valid slots of a `window_view` of it replaced by `view` (the window's, filled)."""
    slots = view.valid.shape[1]
    return KVCache(k=_with_first_blocks(cache.k, view.k), v=_with_first_blocks(cache.v, view.v),
                   valid=cache.valid.at[:, :slots].set(view.valid))


def _blocked(prompt_cache: jax.Array, axes: tuple, config: SamplingConfig, widths: tuple[int, ...]) -> CacheBlocks:
    """The prefilled cache [layers, prompts, ...] given to its n samples, as one block per decode window of
    `widths` slots (cache_block_widths): the prompt's slots and the first window's, then each later window's,
    empty."""
    slot_axis = axes.index("cache_seq")
    first = jnp.repeat(prompt_cache, config.n, axis=1)
    pad = [(0, widths[0] - first.shape[slot_axis]) if axis == slot_axis else (0, 0) for axis in range(first.ndim)]
    blocks = [jnp.pad(first, pad)]
    for width in widths[1:]:
        blocks.append(jnp.zeros(first.shape[:slot_axis] + (width,) + first.shape[slot_axis + 1:], first.dtype))
    return CacheBlocks(constrain(block, axes) for block in blocks)


def _per_layer_blocks(blocks: CacheBlocks) -> tuple[CacheBlocks, ...]:
    """Stacked blocks [layers, ...] -> per layer, that layer's blocks (for models whose layers are not scanned)."""
    layers = blocks.blocks[0].shape[0]
    return tuple(CacheBlocks(block[layer] for block in blocks.blocks) for layer in range(layers))


def _first_blocks(cache, count: int):
    """The first `count` blocks of a blocked cache (CacheBlocks, or a tuple of them per layer)."""
    if isinstance(cache, CacheBlocks):
        return CacheBlocks(cache.blocks[:count])
    return tuple(CacheBlocks(layer.blocks[:count]) for layer in cache)


def _with_first_blocks(cache, first):
    """`cache` with its first blocks replaced by those of `first` (what _first_blocks took, updated)."""
    if isinstance(cache, CacheBlocks):
        return CacheBlocks((*first.blocks, *cache.blocks[len(first.blocks):]))
    return tuple(_with_first_blocks(layer, new) for layer, new in zip(cache, first))
