"""The sampler's two programs, jitted by rlmt_jax.rollout.sampling.Sampler (one each per number of prompts and
prompt bucket), with the model given as (graphdef, params) and merged inside so a new policy never recompiles:

- prefill: runs every prompt once, gives its KV cache to its `n` samples and chooses their first tokens;
- decode: one `lax.while_loop` per decode window that feeds one token per row per step into the (donated)
  cache and stops when every row has produced an EOS or `max_new_tokens` are out.

Or, to report progress while a batch decodes (`rlmt-jax generate`; never in training), the same loop in chunks:
decode_start makes the loop's state, each decode_steps call runs its steps up to a given one (the windows'
loops as in `decode`, also stopping at that step) and returns the state with a DecodeProgress, and
decode_finish lays the state out as `decode` does. The steps are the same computations in the same order, so
the tokens and log-probs are those `decode` samples.

R = prompts * n rows (row r is sample r % n of prompt r // n), P = the bucket's prompt length,
N = max_new_tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention import decode_slot_multiple
from models.sharding import constrain
from models.transformer import KVCache
from rlmt_jax.rollout.decode_cache import cache_block_widths, samples_cache, window_view, with_window
from rlmt_jax.rollout.next_token import choose_next_token
from rlmt_jax.rollout.sampling_config import SamplingConfig

STOP_EOS = 0  # the row produced one of the EOS ids (kept as its last response token)
STOP_LENGTH = 1  # the row reached max_new_tokens without one
STOP_REASONS = ("eos", "length")


def token_positions(mask: jax.Array) -> jax.Array:
    """Position of each token among the real ones of its row: clip(cumsum(mask) - 1, 0).  [B, T] -> [B, T]."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def prefill(graphdef: nnx.GraphDef, config: SamplingConfig, params, prompt_ids, prompt_mask, key):
    """prompt_ids, prompt_mask: [B, P] -> (cache for R = B * n rows of P + N - 1 slots with the prompts in
    slots 0..P-1, first tokens [R], their log-probs [R], their positions [R])."""
    model = nnx.merge(graphdef, params)
    batch, prompt_len = prompt_ids.shape
    positions = token_positions(prompt_mask)
    cache = model.init_cache(batch, prompt_len, jnp.dtype(config.cache_dtype))
    last_logits, cache = _last_logits(model, prompt_ids, positions, prompt_mask, cache, 0)
    cache = samples_cache(cache, config, model.config, prompt_len)

    logits = jnp.repeat(last_logits, config.n, axis=0)
    tokens, logprobs = choose_next_token(
        logits, row_uniforms(key, jnp.arange(logits.shape[0]), 0), config.temperature, config.top_k, config.top_p
    )
    first_positions = jnp.repeat(positions[:, -1] + 1, config.n, axis=0)
    return cache, tokens, logprobs, first_positions


class DecodeProgress(NamedTuple):
    """Where a chunked decode stands (decode_steps): replicated scalars over the whole batch's rows.

    step: the next response token to choose (all rows have max(step, their length) tokens); rows_done: rows
    that produced an EOS; tokens: response tokens so far over all rows (EOS included)."""

    step: jax.Array
    rows_done: jax.Array
    tokens: jax.Array


def decode(graphdef: nnx.GraphDef, config: SamplingConfig, params, cache, first, first_logprobs, first_positions,
           prompt_ids, prompt_mask, key):
    """The decode loop from the prefill's cache and first tokens (first, first_logprobs, first_positions: [R]).
    -> (the Rollout's arrays: tokens, prompt_mask, response_mask, logprobs [R, P + N], prompt_lengths,
    response_lengths, stop_reason [R]; the cache, returned only so that the donated cache is updated in place)"""
    model = nnx.merge(graphdef, params)
    loop = _DecodeLoop.of(model, config, first_positions, prompt_ids.shape[1], key)
    state = loop.run(loop.start(cache, first, first_logprobs, first_positions))
    return _rollout_arrays(config, state, prompt_ids, prompt_mask), state.cache


def decode_start(config: SamplingConfig, cache, first, first_logprobs, first_positions) -> _DecodeState:
    """The chunked decode's state before step 1 (the state `decode` starts its loop from)."""
    eos = jnp.asarray(config.eos_ids or (-1,), jnp.int32)
    return _start_state(config, eos, cache, first, first_logprobs, first_positions)


def decode_steps(graphdef: nnx.GraphDef, config: SamplingConfig, params, state: _DecodeState, first_positions,
                 prompt_ids, key, until) -> tuple[_DecodeState, DecodeProgress]:
    """Decode steps from `state` (donated) until step `until` (a traced int: no new program per chunk), every
    row done, or max_new_tokens.  -> (the state, where it stands)"""
    model = nnx.merge(graphdef, params)
    loop = _DecodeLoop.of(model, config, first_positions, prompt_ids.shape[1], key)
    state = loop.run(state, until)
    progress = DecodeProgress(state.step, jnp.sum(state.done, dtype=jnp.int32), jnp.sum(state.lengths))
    return state, progress


def decode_finish(config: SamplingConfig, state: _DecodeState, prompt_ids, prompt_mask) -> tuple[jax.Array, ...]:
    """The Rollout's arrays of a chunked decode's final state (those `decode` returns)."""
    return _rollout_arrays(config, state, prompt_ids, prompt_mask)


class _DecodeState(NamedTuple):
    step: jax.Array  # the response token being chosen (0 is chosen by prefill)
    cache: KVCache
    last: jax.Array  # [R] the token chosen at step - 1
    positions: jax.Array  # [R] its position
    done: jax.Array  # [R] bool: an EOS has been chosen
    lengths: jax.Array  # [R] response tokens so far (EOS included)
    tokens: jax.Array  # [R, N]
    logprobs: jax.Array  # [R, N]


@dataclasses.dataclass(frozen=True, eq=False)  # holds traced arrays: hashed by identity
class _DecodeLoop:
    """What every decode step reads: the model, the rotary tables of every position the loop feeds (computed
    once, [R, N, head_dim] each), the lm head laid out once (vocab_major_head), the EOS ids, the key."""

    model: nnx.Module
    config: SamplingConfig
    prompt_len: int
    rope: tuple[jax.Array, jax.Array]
    head: jax.Array
    eos: jax.Array
    key: jax.Array

    @classmethod
    def of(cls, model: nnx.Module, config: SamplingConfig, first_positions, prompt_len: int, key) -> _DecodeLoop:
        fed_positions = first_positions[:, None] + jnp.arange(config.max_new_tokens, dtype=jnp.int32)[None, :]
        rope = tuple(model.rotary_tables(fed_positions))
        return cls(model, config, prompt_len, rope, vocab_major_head(model),
                   jnp.asarray(config.eos_ids or (-1,), jnp.int32), key)

    def is_eos(self, tokens: jax.Array) -> jax.Array:
        """[R] -> [R] bool."""
        return _is_eos(self.eos, tokens)

    def start(self, cache, first, first_logprobs, first_positions) -> _DecodeState:
        """The state before step 1: the prefill's first tokens in column 0."""
        return _start_state(self.config, self.eos, cache, first, first_logprobs, first_positions)

    def run(self, state: _DecodeState, until=None) -> _DecodeState:
        """Every decode window in turn: window j feeds the tokens written to cache block j (its response slots)
        and attends to blocks 0..j only. A window whose rows are all done runs no step. With `until` (a chunk
        of a chunked decode) no step >= until runs either: the windows before the state's step then run none,
        and the next chunk goes on in the window where this one stopped."""
        attended = 0
        widths = cache_block_widths(self.config, self.prompt_len, decode_slot_multiple(self.model.config))
        for j, width in enumerate(widths if self.config.response_blocks() else ()):
            attended += width
            last_step = attended - self.prompt_len  # steps 1.. feed slot prompt_len + step - 1
            full = state.cache
            state = jax.lax.while_loop(functools.partial(self.continues, last_step=last_step, until=until),
                                       self.advance, state._replace(cache=window_view(full, j + 1, attended)))
            state = state._replace(cache=with_window(full, state.cache))
        return state

    def continues(self, s: _DecodeState, last_step, until=None) -> jax.Array:
        """Whether step s.step runs: tokens are still to choose, some row is not done, the window holds it (and
        the chunk, with `until`)."""
        runs = (s.step < self.config.max_new_tokens) & ~jnp.all(s.done) & (s.step <= last_step)
        return runs if until is None else runs & (s.step < until)

    def advance(self, s: _DecodeState) -> _DecodeState:
        """Feeds each row's last token at cache slot P + step - 1 and chooses its response token `step` (a pad,
        log-prob 0, in rows that are done)."""
        cfg = self.config
        rows = s.last.shape[0]
        slot = self.prompt_len + s.step - 1
        feed_mask = jnp.ones((rows, 1), bool)
        rope = tuple(jax.lax.dynamic_slice_in_dim(t, s.step - 1, 1, axis=1) for t in self.rope)
        logits, cache = _last_logits(self.model, s.last[:, None], s.positions[:, None], feed_mask, s.cache, slot,
                                     rope, self.head, decode_step=True)
        tokens, logprobs = choose_next_token(
            logits, row_uniforms(self.key, jnp.arange(rows), s.step), cfg.temperature, cfg.top_k, cfg.top_p
        )
        tokens = jnp.where(s.done, cfg.pad_id, tokens)
        logprobs = jnp.where(s.done, 0.0, logprobs)
        column = (0, s.step)
        return _DecodeState(
            step=s.step + 1,
            cache=cache,
            last=tokens,
            positions=s.positions + 1,
            done=s.done | self.is_eos(tokens),
            lengths=s.lengths + (~s.done).astype(jnp.int32),
            tokens=jax.lax.dynamic_update_slice(s.tokens, tokens[:, None], column),
            logprobs=jax.lax.dynamic_update_slice(s.logprobs, logprobs[:, None], column),
        )


def _is_eos(eos: jax.Array, tokens: jax.Array) -> jax.Array:
    """Whether each token is one of the EOS ids.  [R] -> [R] bool."""
    return jnp.any(tokens[:, None] == eos[None, :], axis=-1)


def _start_state(config: SamplingConfig, eos: jax.Array, cache, first, first_logprobs,
                 first_positions) -> _DecodeState:
    """The state before step 1: the prefill's first tokens in column 0."""
    rows, new = first.shape[0], config.max_new_tokens
    return _DecodeState(
        step=jnp.int32(1),
        cache=cache,
        last=first,
        positions=first_positions,
        done=_is_eos(eos, first),
        lengths=jnp.ones((rows,), jnp.int32),
        tokens=jnp.full((rows, new), config.pad_id, jnp.int32).at[:, 0].set(first),
        logprobs=jnp.zeros((rows, new), jnp.float32).at[:, 0].set(first_logprobs),
    )


def _rollout_arrays(config: SamplingConfig, s: _DecodeState, prompt_ids, prompt_mask) -> tuple[jax.Array, ...]:
    """The Rollout's arrays from the loop's final state: each prompt [B, P] repeated for its n samples, then the
    response (rlmt_jax.rollout.sampling's layout of a Rollout)."""
    prompt_ids = jnp.repeat(prompt_ids, config.n, axis=0)
    prompt_mask = jnp.repeat(prompt_mask, config.n, axis=0)
    response_mask = jnp.arange(config.max_new_tokens, dtype=jnp.int32)[None, :] < s.lengths[:, None]
    no_prompt = jnp.zeros_like(prompt_mask)
    return (
        jnp.concatenate([prompt_ids, s.tokens], axis=1),
        jnp.concatenate([prompt_mask, jnp.zeros_like(response_mask)], axis=1),
        jnp.concatenate([no_prompt, response_mask], axis=1),
        jnp.concatenate([jnp.zeros(prompt_mask.shape, jnp.float32), s.logprobs], axis=1),
        jnp.sum(prompt_mask, axis=1, dtype=jnp.int32),
        s.lengths,
        jnp.where(s.done, STOP_EOS, STOP_LENGTH).astype(jnp.int32),
    )


def _last_logits(model, input_ids, positions, mask, cache, index, rope=None, head=None,
                 decode_step=False) -> tuple[jax.Array, KVCache]:
    """model.decode with the lm head applied to the last column only.  -> (logits [batch, vocab], cache).

    head: the lm head as [vocab, embed] (`vocab_major_head`), or None for the model's own.
    decode_step: a step of the decode loop, whose rows' valid slots are each one run (decode_hidden_states'
    contiguous_rows): a prompt left-padded to slot P - 1 by `left_pad`, a row's n samples copying its slots,
    then every step writing its slot with mask True for every row (stopped rows too, fed pads that nothing
    reads); a window's view is a prefix of them."""
    hidden, cache = model.decode_hidden_states(input_ids, positions, mask, cache, index, rope,
                                               contiguous_rows=decode_step)
    if head is None:
        return model.lm_logits(hidden[:, -1:])[:, 0], cache
    logits = jnp.einsum("bd,vd->bv", hidden[:, -1], head)
    return constrain(logits, ("batch", "vocab")), cache


def vocab_major_head(model) -> jax.Array:
    """The lm head as [vocab, embed] in the compute dtype (the embedding table itself when tied). Laid out
    once before the decode loop: each step's [rows, embed] x [embed, vocab] product then reads the weights
    row by row, contiguously, which XLA:CPU streams faster than the [embed, vocab] layout."""
    return constrain(model.lm_head_weight().T, ("vocab", "embed"))


def row_uniforms(key: jax.Array, row_ids: jax.Array, token_index) -> jax.Array:
    """One uniform in [0, 1) per row for its response token `token_index` (a scalar, or [rows]), from the
    row's own stream: fold_in(fold_in(key, row id), token index). A row draws the same numbers wherever it
    runs: in any slot of the slot engine, at any batch position, with any other rows.  row_ids: [rows] -> [rows]"""
    token_index = jnp.broadcast_to(jnp.asarray(token_index, jnp.int32), row_ids.shape)

    def draw(row, index):
        return jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, row), index), ())

    return jax.vmap(draw)(row_ids, token_index)
