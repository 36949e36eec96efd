"""SlotSampler: rollouts through a fixed number of decode slots, refilled between chunks (rollout.engine: slots).

The static Sampler decodes all R rows of a batch together until its longest row stops, so every row pays for
the longest row's steps. The slot engine keeps S slots per call (S = slots per data-parallel replica x the
replicas); each holds one row with its own KV cache from position 0 and its own length. Rows stream through
them: the free slots take the next rows' prompts (prefilled in buckets of powers of two, so compiles stay
few), every slot decodes in jitted chunks of `chunk_tokens` steps (a chunk also ends once enough rows stop that
refilling pays), and between chunks the rows that stopped hand back their tokens and log-probs. The call
returns when every row is done, with the Rollout the static sampler returns (the same layout, the same
tokens for the same key: each row's random stream is its own, rlmt_jax.rollout.decode.row_uniforms).

Cost: each chunk runs its steps on all S slots, stopped or not, so a step's work is set by S, not by the R rows
of the batch, and the KV cache holds S rows, not R. Each chunk attends to the cache blocks its rows can reach
(the static sampler's decode windows, one program per window).

Multi-host: every process runs the same programs in lockstep on global slot arrays split over the mesh's
batch axes; each process streams its own rows through its own share of the slots and the processes agree on
each call's sizes (admission bucket, window, whether anything is left).
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from rlmt_jax.core.errors import UserError
from rlmt_jax.rollout.decode import STOP_EOS, STOP_LENGTH
from rlmt_jax.rollout.decode_layout import DecodeLayout
from rlmt_jax.rollout.sampling import BatchProgress, Rollout, Sampler, bucket_length, left_pad
from rlmt_jax.rollout.sampling_config import SamplingConfig
from rlmt_jax.rollout.slot_programs import admit, decode_chunk, empty_slots, prefill_prompts, slot_widths
from rlmt_jax.scale import mesh as mesh_lib

# A chunk returns early once this fraction of the slots has stopped in it (and rows wait for slots).
REFILL_FRACTION = 0.0625


class SlotSampler(Sampler):
    """A Sampler whose decode streams the rows through `slots` slots per data-parallel replica.

        sampler = SlotSampler(graphdef, SamplingConfig(n=8, ...), slots=64, chunk_tokens=64)
        rollout = sampler(params, prompts, key)   # the static Sampler's Rollout
    """

    def __init__(self, graphdef: nnx.GraphDef, config: SamplingConfig, slots: int, chunk_tokens: int = 64,
                 hosts=None, layout: DecodeLayout | None = None,
                 progress: Callable[[BatchProgress], None] | None = None):
        """slots: per data-parallel replica of the rollout mesh (the layout's, else the hosts' mesh; one
        replica without either). chunk_tokens: decode steps per jitted chunk, at most. progress: called after
        each chunk with a BatchProgress over all processes' rows (its step: the most tokens a row has so
        far); hosts, layout: as the Sampler's."""
        if slots < 1:
            raise UserError(f"rollout slots: must be >= 1, got {slots}")
        if chunk_tokens < 1:
            raise UserError(f"rollout chunk_tokens: must be >= 1, got {chunk_tokens}")
        super().__init__(graphdef, config, hosts=hosts, layout=layout)
        mesh = None if self.hosts is None else self.hosts.mesh
        self.replicas = 1 if mesh is None else mesh_lib.batch_split(mesh)
        self.slots = slots * self.replicas  # S, over all processes
        processes = 1 if self.hosts is None else self.hosts.process_count
        if self.slots % processes:
            raise UserError(f"rollout slots: {self.slots} slots do not split over {processes} processes")
        self.local_slots = self.slots // processes
        self.chunk_tokens = chunk_tokens
        self.progress = progress
        self.model_config = None  # the policy's, read at the first call
        self._empty = {}  # longest prompt bucket -> jitted empty_slots
        self._prefill_prompts = jax.jit(functools.partial(prefill_prompts, graphdef, config))
        self._admit = None  # jitted admit, made at the first call (it needs the model config)
        self._chunks = {}  # (longest prompt bucket, window) -> jitted decode_chunk

    def __call__(self, params: nnx.State, prompts: Sequence[Sequence[int]], key: jax.Array) -> Rollout:
        """prompts: token-id lists (at least one token each, any lengths up to the largest bucket)."""
        count, prompt_len, first_row = self._agree_on(prompts)
        n, new = self.config.n, self.config.max_new_tokens
        rows = _RowsOut(count * n, new, self.config.pad_id)
        with self._in_layout():
            params = self.rollout_params(params)
            self._know_model(params)
            state = self._empty_state(prompt_len)
            cache = self._prompt_cache(params, prompts, prompt_len)
            pending = collections.deque(range(count * n))
            slot_row = np.full(self.local_slots, -1)  # the local row each local slot holds, -1: free
            while True:
                state = self._refill(cache, state, pending, slot_row, first_row, key)
                if not self._agree_max(int((slot_row >= 0).any())):
                    break
                window = self._window(prompt_len, prompts, slot_row, rows)
                refill_at = self._refill_at(len(pending))
                state, summary = self._chunk(prompt_len, window)(params, state, key, np.int32(refill_at))
                active, counts = self._local(summary)
                rows.counts[slot_row[slot_row >= 0]] = counts[slot_row >= 0]
                stopped = np.flatnonzero((slot_row >= 0) & ~active)
                if len(stopped):
                    tokens, logprobs = self._local((state.tokens, state.logprobs))
                    rows.take(slot_row[stopped], tokens[stopped], logprobs[stopped], counts[stopped])
                    slot_row[stopped] = -1
                if self.progress is not None:
                    self.progress(self._where(rows))
            del params, state, cache
        return rows.rollout(prompts, prompt_len, n, self.config)

    # ------------------------------------------------------------------------------------------ the calls
    def _prompt_cache(self, params, prompts, prompt_len: int):
        """Every prompt of the call prefilled once (with hosts: every process's, filler copies making the
        prompts split over the mesh, as the static sampler's)."""
        if self.hosts is not None:
            prompts = [*prompts, *[prompts[-1]] * (-len(prompts) % self.hosts.rows_multiple)]
        ids, _ = _right_pad(prompts, prompt_len, self.config.pad_id, len(prompts))
        lengths = np.asarray([len(p) for p in prompts], np.int32)
        return self._prefill_prompts(params, *self._put((ids, lengths)))

    def _refill(self, cache, state, pending, slot_row, first_row, key):
        """The next pending rows into the free local slots (every process calls the same program)."""
        free = np.flatnonzero(slot_row < 0)
        admitted = [pending.popleft() for _ in range(min(len(free), len(pending)))]
        bucket = self._agree_max(_admission_bucket(len(admitted), self.local_slots, self._rows_multiple()))
        if bucket == 0:
            return state
        n = self.config.n
        slot_offset, prompt_offset = 0, 0
        if self.hosts is not None:
            slot_offset = jax.process_index() * self.local_slots
            prompt_offset = first_row // n  # this process's first prompt in the global prompt cache
        source = np.zeros(bucket, np.int32)
        source[:len(admitted)] = prompt_offset + np.asarray(admitted, np.int32) // n
        slot_ids = np.full(bucket, self.slots, np.int32)  # past the last slot: a filler row admits nothing
        slot_ids[:len(admitted)] = slot_offset + free[:len(admitted)]
        row_ids = np.zeros(bucket, np.int32)
        row_ids[:len(admitted)] = first_row + np.asarray(admitted, np.int32)
        slot_row[free[:len(admitted)]] = admitted
        if self._admit is None:
            self._admit = jax.jit(functools.partial(admit, self.config, self.model_config), donate_argnums=(0,))
        return self._admit(state, cache, *self._put((source, slot_ids, row_ids)), key)

    def _window(self, prompt_len: int, prompts, slot_row: np.ndarray, rows: _RowsOut) -> int:
        """The first cache window whose blocks hold every active slot's next chunk_tokens slots."""
        busy = slot_row[slot_row >= 0]
        n = self.config.n
        # a row's next slot is its prompt length + tokens so far - 1 (a row just admitted has its first token)
        local = max((len(prompts[r // n]) + max(int(rows.counts[r]), 1) - 1 for r in busy), default=0)
        reach = self._agree_max(local) + self.chunk_tokens
        attended = 0
        widths = slot_widths(self.config, self.model_config, prompt_len)
        for window, width in enumerate(widths):
            attended += width
            if attended >= reach:
                return window
        return len(widths) - 1

    def _refill_at(self, pending: int) -> int:
        """How many rows must stop in a chunk before it returns (more than S: never, when no row waits)."""
        if not self._agree_max(pending):
            return self.slots + 1
        return max(1, int(self.slots * REFILL_FRACTION))

    def _chunk(self, prompt_len: int, window: int):
        if (prompt_len, window) not in self._chunks:
            program = functools.partial(decode_chunk, self.graphdef, self.config, prompt_len, self.chunk_tokens,
                                        window)
            self._chunks[prompt_len, window] = jax.jit(program, donate_argnums=(1,))
        return self._chunks[prompt_len, window]

    def _empty_state(self, prompt_len: int):
        if prompt_len not in self._empty:
            self._empty[prompt_len] = jax.jit(functools.partial(
                empty_slots, self.model_config, self.config, self.slots, prompt_len))
        return self._empty[prompt_len]()

    def _where(self, rows: _RowsOut) -> BatchProgress:
        """Where the call stands over every process's rows (a collective with several processes)."""
        done, tokens, furthest = int(rows.done.sum()), int(rows.counts.sum()), int(rows.counts.max())
        processes = 1
        if self.hosts is not None and self.hosts.process_count > 1:
            every = self.hosts.gather(np.asarray([done, tokens, furthest], np.int64))
            done, tokens, furthest = int(every[:, 0].sum()), int(every[:, 1].sum()), int(every[:, 2].max())
            processes = self.hosts.process_count
        return BatchProgress(furthest, self.config.max_new_tokens, done, len(rows.counts) * processes, tokens)

    # ---------------------------------------------------------------------------- agreement between hosts
    def _know_model(self, params) -> None:
        """The policy's ModelConfig (the cache's shapes and windows), read once from the model."""
        if self.model_config is None:
            self.model_config = nnx.merge(self.graphdef, params).config

    def _agree_on(self, prompts: Sequence[Sequence[int]]) -> tuple[int, int, int]:
        """(this process's prompts, the bucket of the longest prompt of all processes, the id of this process's
        first row: the row numbering of the static sampler, whose global batch pads each process's prompts)."""
        if not prompts:
            raise UserError("sampling: no prompts given")
        for row, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise UserError(f"sampling: prompt {row} is empty (a prompt needs at least one token)")
        longest, count = max(len(p) for p in prompts), len(prompts)
        first_row = 0
        if self.hosts is not None:
            agreed = self.hosts.gather(np.asarray([longest, count], np.int64))
            if len(set(agreed[:, 1].tolist())) > 1:
                raise ValueError(f"sampling: the processes passed different numbers of prompts {agreed[:, 1]}")
            longest = int(agreed[:, 0].max())
            padded = count + (-count % self.hosts.rows_multiple)
            first_row = jax.process_index() * padded * self.config.n
        return count, bucket_length(longest, self.config.prompt_buckets), first_row

    def _agree_max(self, value: int) -> int:
        if self.hosts is None or self.hosts.process_count == 1:
            return value
        return int(self.hosts.gather(np.asarray([value], np.int64)).max())

    def _rows_multiple(self) -> int:
        return 1 if self.hosts is None else self.hosts.rows_multiple

    def _put(self, arrays):
        return tuple(jax.numpy.asarray(a) for a in arrays) if self.hosts is None else self.hosts.put(arrays)

    def _local(self, arrays):
        return tuple(np.asarray(a) for a in arrays) if self.hosts is None else self.hosts.take(arrays)

    def compiled_decode_text(self, params: nnx.State, prompts: Sequence[Sequence[int]], key: jax.Array) -> str:
        """The optimised HLO of the first window's decode chunk for these prompts (after one admission)."""
        count, prompt_len, first_row = self._agree_on(prompts)
        with self._in_layout():
            params = self.rollout_params(params)
            self._know_model(params)
            cache = self._prompt_cache(params, prompts, prompt_len)
            state = self._refill(cache, self._empty_state(prompt_len), collections.deque(range(count * self.config.n)),
                                 np.full(self.local_slots, -1), first_row, key)
            lowered = self._chunk(prompt_len, 0).lower(params, state, key, np.int32(self.slots + 1))
            return lowered.compile().as_text()

    def compiled_programs(self) -> int:
        """Programs compiled so far: prefills (one per prompt count and bucket), admissions (one per bucket),
        chunks (one per window), empty states."""
        admit_programs = 0 if self._admit is None else self._admit._cache_size()
        return (self._prefill_prompts._cache_size() + admit_programs + sum(p._cache_size() for p in self._chunks.values())
                + sum(p._cache_size() for p in self._empty.values()))


def _admission_bucket(admitted: int, local_slots: int, multiple: int) -> int:
    """Rows an admission program takes: the next power of two, a multiple of `multiple`, at most the slots."""
    if admitted == 0:
        return 0
    bucket = 1 << (admitted - 1).bit_length()
    bucket = -(-bucket // multiple) * multiple
    return min(bucket, max(local_slots, multiple))


def _right_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts from column 0 in `rows` x `length` (filler rows: one pad token).  -> (ids, mask)"""
    ids = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), bool)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = prompt
        mask[row, :len(prompt)] = True
    return ids, mask


class _RowsOut:
    """This process's finished rows, gathered on the host as the slots hand them back."""

    def __init__(self, rows: int, new: int, pad_id: int):
        self.tokens = np.full((rows, new), pad_id, np.int32)
        self.logprobs = np.zeros((rows, new), np.float32)
        self.counts = np.zeros(rows, np.int32)
        self.done = np.zeros(rows, bool)

    def take(self, row_ids, tokens, logprobs, counts) -> None:
        self.tokens[row_ids] = tokens
        self.logprobs[row_ids] = logprobs
        self.counts[row_ids] = counts
        self.done[row_ids] = True

    def rollout(self, prompts, prompt_len: int, n: int, config: SamplingConfig) -> Rollout:
        """The static sampler's layout: prompts left-padded to `prompt_len`, then the responses."""
        assert self.done.all(), "a row was never handed back"
        rows = len(self.counts)
        ids, mask = left_pad([prompts[r // n] for r in range(rows)], prompt_len, config.pad_id)
        eos_ids = config.eos_ids
        new = self.tokens.shape[1]
        response = np.arange(new)[None, :] < self.counts[:, None]
        last = self.tokens[np.arange(rows), np.maximum(self.counts - 1, 0)]
        stop = np.where(np.isin(last, np.asarray(eos_ids, np.int32)), STOP_EOS, STOP_LENGTH).astype(np.int32)
        return Rollout(
            tokens=np.concatenate([ids, self.tokens], axis=1),
            prompt_mask=np.concatenate([mask, np.zeros_like(response)], axis=1),
            response_mask=np.concatenate([np.zeros_like(mask), response], axis=1),
            logprobs=np.concatenate([np.zeros(mask.shape, np.float32), self.logprobs], axis=1),
            prompt_lengths=mask.sum(axis=1).astype(np.int32),
            response_lengths=self.counts.copy(),
            stop_reason=stop,
            prompt_len=prompt_len,
            group_size=n,
        )
