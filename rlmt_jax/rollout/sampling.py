"""Rollouts: a batch of prompts -> `n` sampled responses each, with the log-probs the RL losses need.

The Sampler pads the prompts (left, to the smallest bucket length that holds the longest of them; on a mesh,
agreed between the processes), places the policy in its decode layout when it has one (rlmt_jax.rollout
.decode_layout), and runs two jitted programs per (number of prompts, prompt bucket), prefill and decode
(rlmt_jax.rollout.decode). How it samples is a SamplingConfig (rlmt_jax.rollout.sampling_config).

Layout of a Rollout (R = prompts * n rows, grouped: row r is sample r % n of prompt r // n;
P = the bucket's prompt length, N = max_new_tokens):
    columns 0 .. P-1       the prompt, left-padded
    columns P .. P+N-1     the response, right-padded after its stop (EOS included in the response)
A teacher-forced forward over `tokens` with `attention_mask` and `positions` (= cumsum(mask) - 1) sees the
same sequences at the same positions as the sampler did, and its log-probs at `response_mask` equal
`logprobs` (position t holds the log-prob of token t, predicted from the tokens before it).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlmt_jax.core.errors import UserError
from rlmt_jax.rollout.decode import (STOP_EOS, STOP_LENGTH, STOP_REASONS, decode, decode_finish, decode_start,
                                     decode_steps, prefill, token_positions)
from rlmt_jax.rollout.decode_cache import KEY_CACHE_AXES, VALUE_CACHE_AXES, cache_axes, cache_block_widths
from rlmt_jax.rollout.decode_layout import DecodeLayout
from rlmt_jax.rollout.sampling_config import (AUTO_DECODE_WINDOWS, CACHE_DTYPES, MIN_TOKENS_FOR_WINDOWS,
                                              SamplingConfig, default_prompt_buckets)
from rlmt_jax.scale.multihost import HostRows


class Rollout(NamedTuple):
    """Sampled sequences, R = prompts * n rows, T = prompt_len + max_new_tokens columns (layout above).

    tokens: [R, T] int32; prompt_mask, response_mask: [R, T] bool; logprobs: [R, T] float32, the log-prob of
    token t under softmax(logits / temperature) at response positions, 0 elsewhere; prompt_lengths,
    response_lengths: [R] int32 (the response counts its EOS); stop_reason: [R] int32, STOP_EOS or STOP_LENGTH.
    """

    tokens: jax.Array
    prompt_mask: jax.Array
    response_mask: jax.Array
    logprobs: jax.Array
    prompt_lengths: jax.Array
    response_lengths: jax.Array
    stop_reason: jax.Array
    prompt_len: int  # P: the bucket length; the response starts at this column
    group_size: int  # n
    # [R, T] int32: the policy version that chose each response token (-1 elsewhere); None: all this call's
    # (the static sampler; the slot engine's rows started ahead of their step have older ones)
    versions: np.ndarray | None = None

    @property
    def attention_mask(self) -> jax.Array:
        """prompt_mask | response_mask: [R, T] bool."""
        return self.prompt_mask | self.response_mask

    @property
    def positions(self) -> jax.Array:
        """clip(cumsum(attention_mask) - 1, 0): the positions the sampler used.  [R, T] int32."""
        return token_positions(self.attention_mask)

    def response_tokens(self, row: int) -> list[int]:
        """The response of one row as a list of ids (EOS included when it stopped on one)."""
        length = int(self.response_lengths[row])
        return [int(t) for t in np.asarray(self.tokens[row, self.prompt_len:self.prompt_len + length])]


def bucket_length(longest: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds a prompt of `longest` tokens."""
    for length in buckets:
        if longest <= length:
            return length
    raise UserError(
        f"sampling prompt_buckets: a prompt of {longest} tokens is longer than the largest bucket {buckets[-1]}; "
        "truncate prompts to the limit (data.max_prompt_tokens) or raise it"
    )


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts right-aligned in `length` columns.  -> (ids [B, length] int32, mask [B, length] bool)."""
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, length - len(prompt):] = np.asarray(prompt, np.int32)
            mask[row, length - len(prompt):] = True
    return ids, mask


def agreed_prompt_sizes(prompts: Sequence[Sequence[int]], hosts: HostRows | None) -> tuple[int, int]:
    """(the longest prompt of all processes, this process's number of prompts), after checking that there are
    prompts, none empty, and (with `hosts`) as many on every process: every process runs the same programs."""
    if not prompts:
        raise UserError("sampling: no prompts given")
    for row, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise UserError(f"sampling: prompt {row} is empty (a prompt needs at least one token)")
    longest, count = max(len(p) for p in prompts), len(prompts)
    if hosts is not None:
        agreed = hosts.gather(np.asarray([longest, count], np.int64))
        if len(set(agreed[:, 1].tolist())) > 1:
            raise ValueError(f"sampling: the processes passed different numbers of prompts {agreed[:, 1]}")
        longest = int(agreed[:, 0].max())
    return longest, count


def padded_prompts(prompts: Sequence[Sequence[int]], config: SamplingConfig,
                   hosts: HostRows | None) -> tuple[jax.Array, jax.Array, int]:
    """(ids, mask) [B, bucket] of the prompts, left-padded, and this process's number of prompts. With `hosts`
    (a mesh): global arrays of every process's prompts, in the bucket of the longest of all, with filler copies
    so that the rows split over the mesh."""
    longest, count = agreed_prompt_sizes(prompts, hosts)
    if hosts is not None:
        # filler prompts (copies of the last; their rows are dropped) make the rows split over the mesh
        prompts = [*prompts, *[prompts[-1]] * (-count % hosts.rows_multiple)]
    length = bucket_length(longest, config.prompt_buckets)
    ids, mask = left_pad(prompts, length, config.pad_id)
    ids, mask = (jnp.asarray(ids), jnp.asarray(mask)) if hosts is None else hosts.put((ids, mask))
    return ids, mask, count


class BatchProgress(NamedTuple):
    """Where a batch's decode stands, given to a Sampler's `progress` callback after each chunk of steps.

    step: response tokens chosen so far per row (of max_new_tokens); rows_done, rows: rows that produced an
    EOS, rows of the global batch (filler rows included); tokens: response tokens so far over those rows."""

    step: int
    max_new_tokens: int
    rows_done: int
    rows: int
    tokens: int


class Sampler:
    """Samples `config.n` responses per prompt from a CausalLM given as (graphdef, params).

        graphdef, params = nnx.split(model)
        sampler = Sampler(graphdef, SamplingConfig(n=8, max_new_tokens=4096, temperature=0.7, eos_ids=(...)))
        rollout = sampler(params, prompts, jax.random.key(0))   # prompts: list of token-id lists
    """

    def __init__(self, graphdef: nnx.GraphDef, config: SamplingConfig, hosts=None, layout: DecodeLayout | None = None,
                 progress: Callable[[BatchProgress], None] | None = None, progress_steps: int = 64):
        """hosts: a `multihost.HostRows` to sample on a mesh: each process passes its own prompts, the bucket
        fits the longest prompt of all processes, the programs run on global arrays split over the batch
        axes, and the Rollout holds this process's rows (numpy). None: one device, arrays as given.

        layout: sample in a decode layout: every call first copies the params it is given into the layout
        (cast and resharded once), runs both programs on that copy under the layout's rules (rows split over
        its batch axes, HostRows of its mesh; `hosts` is then not used) and drops the copy before returning.
        None: the params are used where they are, under the caller's activation rules.

        progress: report while a batch decodes (`rlmt-jax generate`; None, the default and the trainer's, runs
        each batch's decode as one program). The decode then runs in chunks of `progress_steps` steps, one
        call of one program each (rlmt_jax.rollout.decode.decode_steps; the same tokens and log-probs), and
        after each chunk `progress` gets a BatchProgress (on every process; all processes run the same
        chunks)."""
        if progress_steps < 1:
            raise UserError(f"sampling progress_steps: must be >= 1, got {progress_steps}")
        self.graphdef = graphdef
        self.config = config
        self.layout = layout
        self.hosts = hosts if layout is None else HostRows(layout.mesh)
        self.progress = progress
        self.progress_steps = progress_steps
        self._copy = None  # the layout's copier, made at the first call (it needs the params' tree)
        self._prefill = jax.jit(functools.partial(prefill, graphdef, config))
        self._decode = jax.jit(functools.partial(decode, graphdef, config), donate_argnums=(1,))
        self._chunked = None if progress is None else (
            jax.jit(functools.partial(decode_start, config), donate_argnums=(0,)),
            jax.jit(functools.partial(decode_steps, graphdef, config), donate_argnums=(1,)),
            jax.jit(functools.partial(decode_finish, config)),
        )

    @classmethod
    def for_model(cls, model: nnx.Module, config: SamplingConfig) -> tuple[Sampler, nnx.State]:
        """A sampler for `model` and the params to call it with."""
        graphdef, params = nnx.split(model)
        return cls(graphdef, config), params

    def __call__(self, params: nnx.State, prompts: Sequence[Sequence[int]], key: jax.Array) -> Rollout:
        """prompts: token-id lists (at least one token each, any lengths up to the largest bucket)."""
        ids, mask, count = self._padded(prompts)
        with self._in_layout():
            params = self.rollout_params(params)  # the layout's copy lives until this block ends
            cache, first, first_logprobs, positions = self._prefill(params, ids, mask, key)
            if self._chunked is None:
                arrays, _ = self._decode(params, cache, first, first_logprobs, positions, ids, mask, key)
            else:
                arrays = self._decode_in_chunks(params, cache, first, first_logprobs, positions, ids, mask, key)
            del params, cache
        if self.hosts is not None:
            arrays = tuple(rows[: count * self.config.n] for rows in self.hosts.take(arrays))
        return Rollout(*arrays, prompt_len=ids.shape[1], group_size=self.config.n)

    def _decode_in_chunks(self, params, cache, first, first_logprobs, positions, ids, mask, key) -> tuple:
        """The decode loop `progress_steps` steps at a time, reporting after each chunk.  -> the Rollout's arrays"""
        start, steps, finish = self._chunked
        state = start(cache, first, first_logprobs, positions)
        rows, new, step = first.shape[0], self.config.max_new_tokens, 1
        while True:
            until = min(step + self.progress_steps, new)
            state, where = steps(params, state, positions, ids, key, np.int32(until))
            step, rows_done, tokens = (int(_local_scalar(x)) for x in where)
            self.progress(BatchProgress(step, new, rows_done, rows, tokens))
            if step >= new or rows_done == rows:
                break
        return finish(state, ids, mask)

    def compiled_decode_text(self, params: nnx.State, prompts: Sequence[Sequence[int]], key: jax.Array) -> str:
        """The optimised HLO of the decode program for these prompts (runs the prefill, not the decode): what
        its loop moves between devices per generated token can be read from it (collectives in the while body)."""
        ids, mask, _ = self._padded(prompts)
        with self._in_layout():
            params = self.rollout_params(params)
            cache, first, first_logprobs, positions = self._prefill(params, ids, mask, key)
            lowered = self._decode.lower(params, cache, first, first_logprobs, positions, ids, mask, key)
            return lowered.compile().as_text()

    def _padded(self, prompts: Sequence[Sequence[int]]) -> tuple[jax.Array, jax.Array, int]:
        """padded_prompts of this sampler's config and hosts."""
        return padded_prompts(prompts, self.config, self.hosts)

    def rollout_params(self, params: nnx.State) -> nnx.State:
        """`params` as the programs take them: the layout's copy (a new copy at every call), or as given."""
        if self.layout is None:
            return params
        if self._copy is None:
            self._copy = self.layout.copier(params)
        return self._copy(params)

    def _in_layout(self):
        """The layout's activation rules (models.sharding.constrain), or the caller's when there is no layout."""
        return contextlib.nullcontext() if self.layout is None else self.layout.activation_sharding()

    def compiled_programs(self) -> int:
        """How many programs prefill and decode have compiled so far (one each per prompt count and bucket; with
        `progress`, the chunked decode's three instead of decode's one)."""
        chunked = sum(program._cache_size() for program in self._chunked or ())
        return self._prefill._cache_size() + self._decode._cache_size() + chunked


def _local_scalar(value: jax.Array) -> np.ndarray:
    """A replicated scalar of a program's result, read from this process's copy (no collective)."""
    return np.asarray(value.addressable_shards[0].data)


__all__ = [
    "AUTO_DECODE_WINDOWS", "CACHE_DTYPES", "KEY_CACHE_AXES", "MIN_TOKENS_FOR_WINDOWS", "STOP_EOS", "STOP_LENGTH",
    "STOP_REASONS", "VALUE_CACHE_AXES", "BatchProgress", "DecodeLayout", "Rollout", "Sampler", "SamplingConfig",
    "bucket_length", "cache_axes", "cache_block_widths", "default_prompt_buckets", "left_pad", "padded_prompts",
    "token_positions",
]
