"""The slot engine's programs, jitted by rlmt_jax.rollout.slot_sampler.SlotSampler, with the model given as
(graphdef, params) and merged inside so a new policy never recompiles:

- empty_slots: S idle slots, each with its own KV cache of C slots (blocks of cache_block_widths, as the
  static sampler's), numbered from position 0;
- prefill_prompts: every prompt of a call once (right-padded, from position 0), as the static sampler's prefill;
- admit: up to A rows into chosen free slots, each copying its prompt's prefilled cache and choosing its first
  token (one program per admission bucket A; no model compute);
- take_slots: the slots still decoding packed into fewer (a step's tail, once no row waits), each device's
  from its own;
- decode_chunk: up to `chunk_tokens` decode steps of every active slot, each at its own cache slot and
  position, attending to the first `window + 1` cache blocks only (one program per window); it returns early
  once `refill_at` rows have stopped, so that freed slots do not idle while rows wait.

A row's tokens come from its own random stream (decode.row_uniforms over its row id and token index), so
they do not depend on which slot it runs in, nor on which rows share the batch.

S = slots, C = the cache's slots (the largest prompt bucket + max_new_tokens - 1, rounded up to the decode
kernel's block multiple), N = max_new_tokens, P = the admission's prompt bucket.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from typing import NamedTuple

from models.attention import decode_slot_multiple, slot_cache_multiple
from models.layers import CacheBlocks, write_rows
from models.sharding import constrain
from models.transformer import KVCache
from rlmt_jax.rollout.decode import _is_eos, _last_logits, vocab_major_head
from rlmt_jax.rollout.decode_cache import cache_axes, cache_block_widths, window_view, with_window
from rlmt_jax.rollout.next_token import choose_next_token
from rlmt_jax.rollout.sampling_config import SamplingConfig


class SlotState(NamedTuple):
    """The engine's device state, S slots (sharded over the rollout mesh's batch axes)."""

    cache: KVCache  # k, v: CacheBlocks (a tuple of them per layer when layers are not scanned); valid [S, C]
    last: jax.Array  # [S] int32: the token to feed next
    index: jax.Array  # [S] int32: the cache slot it is fed at, which is also its position
    row: jax.Array  # [S] int32: the row id the slot holds (its random stream); -1 when never used
    count: jax.Array  # [S] int32: response tokens chosen so far (EOS included)
    active: jax.Array  # [S] bool: the slot's row is still decoding
    tokens: jax.Array  # [S, N] int32: the row's response so far (pads after `count`)
    logprobs: jax.Array  # [S, N] float32: their log-probs (0 after `count`)
    versions: jax.Array  # [S, N] int32: the policy version that chose each token (-1 after `count`)
    stream: jax.Array  # [S, key data] uint32: the row's random stream, fold_in(its call's key, its row id)


class ChunkSummary(NamedTuple):
    """What the host reads after each chunk: which slots still decode and how many tokens each has."""

    active: jax.Array  # [S] bool
    count: jax.Array  # [S] int32


def slot_widths(config: SamplingConfig, model_config, longest_prompt: int) -> tuple[int, ...]:
    """Slots of each cache block of a slot: the static sampler's blocks for a prompt of `longest_prompt`, or
    for the paged kernel (models.attention.slot_cache_multiple) one block of them all, rounded up to its
    multiple: the kernel reads only the pages each row has reached, which is what windows are for."""
    multiple = slot_cache_multiple(model_config)
    if multiple:
        return (-(-sum(cache_block_widths(config, longest_prompt)) // multiple) * multiple,)
    return cache_block_widths(config, longest_prompt, decode_slot_multiple(model_config))


def empty_slots(model_config, config: SamplingConfig, slots: int, longest_prompt: int) -> SlotState:
    """S idle slots with zeroed caches of slot_widths blocks."""
    widths = slot_widths(config, model_config, longest_prompt)
    layers, kv, hd = model_config.num_hidden_layers, model_config.num_key_value_heads, model_config.head_dim
    dtype = jnp.dtype(config.cache_dtype)
    key_axes, value_axes = cache_axes(model_config)

    def blocks(axes):
        def shape(width):  # the axes name the layout: (layers, batch, kv_heads, {head_dim, cache_seq} ...)
            sizes = {"batch": slots, "kv_heads": kv, "head_dim": hd, "cache_seq": width}
            return (layers, *(sizes[axis] for axis in axes[1:]))
        return CacheBlocks(constrain(jnp.zeros(shape(width), dtype), axes) for width in widths)

    k, v = blocks(key_axes), blocks(value_axes)
    if not model_config.scan_layers:
        k, v = (tuple(CacheBlocks(b[layer] for b in x.blocks) for layer in range(layers)) for x in (k, v))
    cache = KVCache(k=k, v=v, valid=constrain(jnp.zeros((slots, sum(widths)), bool), ("batch", None)))
    per_slot = lambda value, dtype: constrain(jnp.full((slots,), value, dtype), ("batch",))  # noqa: E731
    new = config.max_new_tokens
    return SlotState(
        cache=cache, last=per_slot(config.pad_id, jnp.int32), index=per_slot(0, jnp.int32),
        row=per_slot(-1, jnp.int32), count=per_slot(0, jnp.int32), active=per_slot(False, bool),
        tokens=constrain(jnp.full((slots, new), config.pad_id, jnp.int32), ("batch", None)),
        logprobs=constrain(jnp.zeros((slots, new), jnp.float32), ("batch", None)),
        versions=constrain(jnp.full((slots, new), -1, jnp.int32), ("batch", None)),
        stream=constrain(jnp.zeros((slots, jax.random.key_data(jax.random.key(0)).shape[-1]), jnp.uint32),
                         ("batch", None)),
    )


def row_streams(key, row_ids) -> jax.Array:
    """Each row's random stream as key data: fold_in(key, row id).  row_ids: [A] -> [A, key data] uint32."""
    return jax.vmap(lambda row: jax.random.key_data(jax.random.fold_in(key, row)))(row_ids)


def stream_uniforms(streams, token_index) -> jax.Array:
    """decode.row_uniforms from the rows' streams: a uniform for token `token_index` of each.  -> [A]"""
    draw = lambda data, index: jax.random.uniform(jax.random.fold_in(jax.random.wrap_key_data(data), index), ())  # noqa: E731
    return jax.vmap(draw)(streams, jnp.broadcast_to(token_index, streams.shape[:1]))


class PromptCache(NamedTuple):
    """Every prompt of a call prefilled once (B prompts, P slots each): what admissions copy into the slots."""

    k: jax.Array  # [layers, B, ...] in the cache's key layout
    v: jax.Array  # [layers, B, ...]
    valid: jax.Array  # [B, P] bool
    lengths: jax.Array  # [B] int32
    logits: jax.Array  # [B, vocab] float32: the next token's logits after each prompt


def prefill_prompts(graphdef: nnx.GraphDef, config: SamplingConfig, params, prompt_ids, prompt_lengths) -> PromptCache:
    """prompt_ids: [B, P] right-padded (token p of a prompt at position p); prompt_lengths: [B]. One forward
    over every prompt, once, however many of its n samples later take a slot (as the static sampler's
    prefill)."""
    model = nnx.merge(graphdef, params)
    prompts, prompt_len = prompt_ids.shape
    columns = jnp.arange(prompt_len, dtype=jnp.int32)
    mask = columns[None, :] < prompt_lengths[:, None]
    positions = jnp.broadcast_to(columns, prompt_ids.shape)
    cache = model.init_cache(prompts, prompt_len, jnp.dtype(config.cache_dtype))
    hidden, cache = model.decode_hidden_states(prompt_ids, positions, mask, cache, 0)
    last = jnp.take_along_axis(hidden, (prompt_lengths - 1)[:, None, None], axis=1)
    logits = model.lm_logits(last)[:, 0].astype(jnp.float32)
    return PromptCache(cache.k, cache.v, mask, prompt_lengths, logits)


def admit(config: SamplingConfig, model_config, state: SlotState, prompts: PromptCache, source, slot_ids, row_ids,
          key, version) -> SlotState:
    """Rows into free slots: each copies its prompt's prefilled cache and chooses its first token from the
    prompt's logits with its own random stream. source, slot_ids, row_ids: [A], the prompt (of B), slot and row
    id of each admitted row (a slot id >= S admits nothing: filler rows of the bucket); version: the policy's.
    -> the state with those slots active (or done already, when the first token is an EOS or max_new_tokens
    is 1)."""
    rows, new = source.shape[0], config.max_new_tokens
    streams = row_streams(key, row_ids)
    first, first_logprobs = choose_next_token(prompts.logits[source], stream_uniforms(streams, 0),
                                              config.temperature, config.top_k, config.top_p)
    eos = jnp.asarray(config.eos_ids or (-1,), jnp.int32)
    put = lambda x, values: x.at[slot_ids].set(values, mode="drop")  # noqa: E731
    prompt_len = prompts.valid.shape[1]
    valid = jnp.pad(prompts.valid[source], ((0, 0), (0, state.cache.valid.shape[1] - prompt_len)))
    key_axes, value_axes = cache_axes(model_config)
    return SlotState(
        cache=KVCache(k=_put_prompts(state.cache.k, prompts.k[:, source], slot_ids, key_axes),
                      v=_put_prompts(state.cache.v, prompts.v[:, source], slot_ids, value_axes),
                      valid=put(state.cache.valid, valid)),
        last=put(state.last, first),
        index=put(state.index, prompts.lengths[source]),
        row=put(state.row, row_ids),
        count=put(state.count, jnp.ones_like(first)),
        active=put(state.active, ~_is_eos(eos, first) & (new > 1)),
        tokens=put(state.tokens, jnp.full((rows, new), config.pad_id, jnp.int32).at[:, 0].set(first)),
        logprobs=put(state.logprobs, jnp.zeros((rows, new), jnp.float32).at[:, 0].set(first_logprobs)),
        versions=put(state.versions, jnp.full((rows, new), -1, jnp.int32).at[:, 0].set(version)),
        stream=put(state.stream, streams),
    )


def readmit(graphdef: nnx.GraphDef, config: SamplingConfig, params, state: SlotState, sequence_ids,
            sequence_lengths, slot_ids, row_ids, key, last, count, tokens, logprobs, versions) -> SlotState:
    """Rows that were decoding when their call ended (partial rollouts, rollout.max_staleness) back into free
    slots, their caches computed again with these params: sequence_ids [A, L] right-padded, each row's prompt
    and its response but the last token (sequence_lengths [A] of them); last, count [A]: that last token and the
    tokens so far; tokens, logprobs, versions [A, N]: what the row has sampled, by which versions; slot_ids,
    row_ids [A] and the key of the row's call, as admit's."""
    model = nnx.merge(graphdef, params)
    length = sequence_ids.shape[1]
    columns = jnp.arange(length, dtype=jnp.int32)
    mask = columns[None, :] < sequence_lengths[:, None]
    cache = model.init_cache(sequence_ids.shape[0], length, jnp.dtype(config.cache_dtype))
    _, cache = model.decode_hidden_states(sequence_ids, jnp.broadcast_to(columns, sequence_ids.shape), mask, cache, 0)
    put = lambda x, values: x.at[slot_ids].set(values, mode="drop")  # noqa: E731
    valid = jnp.pad(mask, ((0, 0), (0, state.cache.valid.shape[1] - length)))
    key_axes, value_axes = cache_axes(model.config)
    return SlotState(
        cache=KVCache(k=_put_prompts(state.cache.k, cache.k, slot_ids, key_axes),
                      v=_put_prompts(state.cache.v, cache.v, slot_ids, value_axes),
                      valid=put(state.cache.valid, valid)),
        last=put(state.last, last), index=put(state.index, sequence_lengths), row=put(state.row, row_ids),
        count=put(state.count, count), active=put(state.active, jnp.ones_like(count, bool)),
        tokens=put(state.tokens, tokens), logprobs=put(state.logprobs, logprobs),
        versions=put(state.versions, versions), stream=put(state.stream, row_streams(key, row_ids)),
    )


def _put_prompts(blocks, prompt_cache: jax.Array, slot_ids, axes: tuple):
    """The slots' caches with the sequences' [layers, A, ...] (L slots each) written into their first L slots,
    across the blocks they span (a prompt fits block 0, which holds the largest prompt bucket)."""
    slot_axis = axes.index("cache_seq")
    length = prompt_cache.shape[slot_axis]

    def put_all(layer_blocks, kv):  # kv: [layers?, A, ...] with the blocks' leading axes
        lead = layer_blocks[0].ndim - len(axes)  # 0 stacked, -1 one layer's
        written, start = [], 0
        for block in layer_blocks:
            width = block.shape[slot_axis + lead]
            take = max(0, min(width, length - start))
            if take:
                at = [slice(None)] * block.ndim
                at[1 + lead] = slot_ids
                at[slot_axis + lead] = slice(0, take)
                part = jax.lax.slice_in_dim(kv, start, start + take, axis=slot_axis + lead)
                block = block.at[tuple(at)].set(part.astype(block.dtype), mode="drop")
            written.append(block)
            start += width
        return CacheBlocks(written)

    if isinstance(blocks, CacheBlocks):
        return put_all(blocks.blocks, prompt_cache)
    return tuple(put_all(layer.blocks, prompt_cache[i]) for i, layer in enumerate(blocks))


def decode_chunk(graphdef: nnx.GraphDef, config: SamplingConfig, longest_prompt: int, chunk_tokens: int,
                 window: int, params, state: SlotState, version, refill_at) -> tuple[SlotState, ChunkSummary]:
    """Up to `chunk_tokens` steps of every active slot: each feeds its last token at its own cache slot (its
    position) and chooses its next response token, attending to the cache blocks 0..window. The loop ends after
    `chunk_tokens` steps, when no slot is active, or once `refill_at` rows have stopped in this chunk (a traced
    int: no program per value). The caller picks `window` so that no active slot passes its blocks. Each token
    is drawn from its row's stream and recorded with `version` (the params' policy version).
    -> (the state, its summary)"""
    model = nnx.merge(graphdef, params)
    widths = slot_widths(config, model.config, longest_prompt)
    attended = sum(widths[:window + 1])
    slots, new = state.last.shape[0], config.max_new_tokens
    eos = jnp.asarray(config.eos_ids or (-1,), jnp.int32)
    positions = state.index[:, None] + jnp.arange(chunk_tokens, dtype=jnp.int32)[None, :]
    rope = tuple(model.rotary_tables(positions))  # [S, chunk, head_dim] each, once per chunk
    head = vocab_major_head(model)

    def continues(carry):
        step, s, stopped = carry
        return (step < chunk_tokens) & jnp.any(s.active) & (stopped < refill_at)

    def advance(carry):
        step, s, stopped = carry
        step_rope = tuple(jax.lax.dynamic_slice_in_dim(t, step, 1, axis=1) for t in rope)
        logits, cache = _last_logits(model, s.last[:, None], s.index[:, None], jnp.ones((slots, 1), bool), s.cache,
                                     s.index, step_rope, head, decode_step=True)
        tokens, logprobs = choose_next_token(logits, stream_uniforms(s.stream, s.count), config.temperature,
                                             config.top_k, config.top_p)
        column = jnp.where(s.active, s.count, new)  # idle and stopped slots write nothing
        count = s.count + s.active.astype(jnp.int32)
        active = s.active & ~_is_eos(eos, tokens) & (count < new)
        return step + 1, SlotState(
            cache=cache,
            last=jnp.where(s.active, tokens, s.last),
            index=s.index + s.active.astype(jnp.int32),
            row=s.row,
            count=count,
            active=active,
            tokens=write_rows(s.tokens, tokens, column, ("batch", None), 1),
            logprobs=write_rows(s.logprobs, logprobs, column, ("batch", None), 1),
            versions=write_rows(s.versions, jnp.full_like(column, version), column, ("batch", None), 1),
            stream=s.stream,
        ), stopped + jnp.sum(s.active & ~active, dtype=jnp.int32)

    full = state.cache
    view = state._replace(cache=window_view(full, window + 1, attended))
    _, view, _ = jax.lax.while_loop(continues, advance, (jnp.int32(0), view, jnp.int32(0)))
    state = view._replace(cache=with_window(full, view.cache))
    return state, ChunkSummary(state.active, state.count)


def take_slots(model_config, state: SlotState, keep) -> SlotState:
    """A state of the slots `keep`: [D, K] slot ids inside each of the D blocks the batch split makes (block d:
    slots d * S / D ... on the d-th shard), so every slot stays on its device: D x K slots, block by block.  The
    engine packs a step's last active rows into fewer slots with it: a decode step then costs K slots a device,
    not S / D."""
    blocks, per_block = keep.shape
    key_axes, value_axes = cache_axes(model_config)

    def take(x, axes):
        axis = axes.index("batch")
        grouped = x.reshape(*x.shape[:axis], blocks, x.shape[axis] // blocks, *x.shape[axis + 1:])
        index = keep.reshape((1,) * axis + (blocks, per_block) + (1,) * (x.ndim - axis - 1))
        taken = jnp.take_along_axis(grouped, index, axis=axis + 1, mode="clip")
        return constrain(taken.reshape(*x.shape[:axis], blocks * per_block, *x.shape[axis + 1:]), axes)

    def take_blocks(blocks_of, axes):
        if isinstance(blocks_of, CacheBlocks):  # scanned: [layers, S, ...]
            return CacheBlocks(take(b, axes) for b in blocks_of.blocks)
        return tuple(CacheBlocks(take(b, axes[1:]) for b in layer.blocks) for layer in blocks_of)

    cache = KVCache(k=take_blocks(state.cache.k, key_axes), v=take_blocks(state.cache.v, value_axes),
                    valid=take(state.cache.valid, ("batch", None)))
    vector, rows = ("batch",), ("batch", None)
    return SlotState(cache=cache, last=take(state.last, vector), index=take(state.index, vector),
                     row=take(state.row, vector), count=take(state.count, vector), active=take(state.active, vector),
                     tokens=take(state.tokens, rows), logprobs=take(state.logprobs, rows),
                     versions=take(state.versions, rows), stream=take(state.stream, rows))
