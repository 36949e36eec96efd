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
of the batch, and the KV cache holds S rows, not R. A call's tail (no row waits, only its own rows decode) is
packed into PACK_FACTOR times fewer slots a device whenever its rows fit (take_slots: each device's from its
own), so the few long rows at the end run on a small program instead of S mostly idle slots. Each chunk
attends to the cache blocks its rows can reach (the static sampler's decode windows, one program per window).

Multi-host: every process runs the same programs in lockstep on global slot arrays split over the mesh's
batch axes; each process streams its own rows through its own share of the slots and the processes agree on
each call's sizes (admission bucket, window, whether anything is left).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from rlmt_jax.core.errors import UserError
from rlmt_jax.rollout.decode import STOP_EOS, STOP_LENGTH
from rlmt_jax.rollout.decode_layout import DecodeLayout
from rlmt_jax.rollout.sampling import (BatchProgress, Rollout, Sampler, agreed_prompt_sizes, bucket_length,
                                       left_pad)
from rlmt_jax.rollout.sampling_config import SamplingConfig
from rlmt_jax.rollout.slot_programs import (admit, decode_chunk, empty_slots, prefill_prompts, readmit, slot_widths,
                                            take_slots)
from rlmt_jax.scale import mesh as mesh_lib

log = logging.getLogger(__name__)

# A chunk returns early once this fraction of the slots has stopped in it (and rows wait for slots).
REFILL_FRACTION = 0.0625
# A call's tail: once no row waits for a slot, the rows still decoding are packed into this many times fewer
# slots (a power of two a device, each device's from its own), and again as they stop: each decode step of the
# tail then runs on the rows left, not on all the slots.
PACK_FACTOR = 4
# What rows still decoding at the end of a call (partial rollouts) take into the next call, after the update:
#   recompute  their caches computed again with the new params (one prefill of prompt + tokens so far), so each
#              token's log-prob is its version's teacher-forced one; nothing stays on the devices in between.
#   keep       their slots as they are (PipelineRL's in-flight update): later tokens attend to keys and values
#              the previous params computed. No prefill, but the slots' cache stays resident through the
#              update, and a token's recorded log-prob is not quite any one version's. A resumed run
#              recomputes them (the caches are not saved with a checkpoint), so it is not bit-exact.
CARRIED_CACHE = ("recompute", "keep")


class SlotSampler(Sampler):
    """A Sampler whose decode streams the rows through `slots` slots per data-parallel replica.

        sampler = SlotSampler(graphdef, SamplingConfig(n=8, ...), slots=64, chunk_tokens=64)
        rollout = sampler(params, prompts, key)   # the static Sampler's Rollout
    """

    def __init__(self, graphdef: nnx.GraphDef, config: SamplingConfig, slots: int, chunk_tokens: int = 64,
                 hosts=None, layout: DecodeLayout | None = None,
                 progress: Callable[[BatchProgress], None] | None = None, max_staleness: int = 0,
                 carried_cache: str = "recompute"):
        """slots: per data-parallel replica of the rollout mesh (the layout's, else the hosts' mesh; one
        replica without either). chunk_tokens: decode steps per jitted chunk, at most. progress: called after
        each chunk with a BatchProgress over all processes' rows (its step: the most tokens a row has so
        far); hosts, layout: as the Sampler's. max_staleness: k >= 0, how many later calls' rows (`ahead`) a
        call may start. carried_cache: what the rows still decoding at the end of a call take into the next:
        "recompute" their caches with its params, or "keep" them in their slots, caches and all (CARRIED_CACHE)."""
        if carried_cache not in CARRIED_CACHE:
            raise UserError(f"rollout carried_cache: one of {CARRIED_CACHE}, got {carried_cache!r}")
        if not isinstance(max_staleness, int) or max_staleness < 0:
            raise UserError(f"rollout max_staleness: an int >= 0 (how many steps ahead rows may start), got "
                            f"{max_staleness!r}")
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
        self.max_staleness = max_staleness
        self.carried_cache = carried_cache
        self._kept = None  # carried_cache keep: (state, slot_row, slot_batch) of the last call's end
        self._carry: list[_Batch] = []  # the next calls' rows started by this one (call t + 1, t + 2, ...)
        self.model_config = None  # the policy's, read at the first call
        self._empty = {}  # longest prompt bucket -> jitted empty_slots
        self._prefill_prompts = jax.jit(functools.partial(prefill_prompts, graphdef, config))
        self._admit = None  # jitted admit, made at the first call (it needs the model config)
        self._take = None  # jitted take_slots (_pack_tail), likewise
        self._readmit_program = jax.jit(functools.partial(readmit, graphdef, config), donate_argnums=(1,))
        self._chunks = {}  # (longest prompt bucket, window) -> jitted decode_chunk

    def __call__(self, params: nnx.State, prompts: Sequence[Sequence[int]], key: jax.Array, version: int = 0,
                 ahead: Sequence[tuple[Sequence[Sequence[int]], jax.Array]] = ()) -> Rollout:
        """prompts: token-id lists (at least one token each, any lengths up to the largest bucket).

        Partial rollouts (max_staleness k): `ahead` = [(the prompts of call t + j, its key) for j = 1 .. <= k]
        lets slots that free up once this call's rows are all admitted start those calls' rows in order, with
        these params (policy `version`). The call returns when its own rows are done; the later calls' rows
        that are still decoding then are carried, and the next call (with the next version, and those prompts
        and keys as its own and its `ahead`) takes them back first: their caches computed again with its params
        (one prefill of prompt and tokens so far), or with carried_cache keep, decoding on in their slots. A
        row of call t + j is done by the end of that call, so no token it trains on is older than j <= k
        versions."""
        if len(ahead) > self.max_staleness:
            raise UserError(f"sampling: rows of {len(ahead)} steps ahead, more than rollout.max_staleness "
                            f"{self.max_staleness}")
        carry = self._carry
        batches = self._carried([(prompts, key), *ahead])
        current = batches[0]
        kept, self._kept = self._kept, None
        with self._in_layout():
            params = self.rollout_params(params)
            self._know_model(params)
            go_on = kept is not None and self._kept_rows_go_on(carry, batches)
            if self.carried_cache == "keep" and not self._agree_max(int(not go_on)):
                state, slot_row, slot_batch = kept  # the carried rows decode on in their slots
                slot_batch = np.maximum(slot_batch - 1, 0)  # call t + j is now this call + (j - 1)
                for batch in batches:
                    batch.readmit = []
            else:
                del kept
                slot_row = np.full(self.local_slots, -1)  # the local row each local slot holds, -1: free
                slot_batch = np.zeros(self.local_slots, np.int32)  # and whose: j for call t + j (0: this call's)
                state = self._empty_state(self._cache_prompt_len(current.prompt_len))
                for tag, batch in enumerate(batches):
                    state = self._readmit(params, state, batch, tag, slot_row, slot_batch, version)
            while True:
                for tag, batch in enumerate(batches):
                    state = self._refill(params, state, batch, tag, slot_row, slot_batch, version)
                mine = (slot_row >= 0) & (slot_batch == 0)
                if not self._agree_max(int(mine.any() or bool(current.pending))):
                    break
                if len(batches) == 1 and not self._agree_max(len(current.pending)):
                    state, slot_row, slot_batch = self._pack_tail(state, slot_row, slot_batch)
                window = self._window(current.prompt_len, batches, slot_row, slot_batch)
                refill_at = self._refill_at(sum(len(b.pending) for b in batches))
                state, summary = self._chunk(self._cache_prompt_len(current.prompt_len), window)(
                    params, state, np.int32(version), np.int32(refill_at))
                active, counts = self._local(summary)
                busy = slot_row >= 0
                for tag, batch in enumerate(batches):
                    held = busy & (slot_batch == tag)
                    batch.out.counts[slot_row[held]] = counts[held]
                stopped = np.flatnonzero(busy & ~active)
                if len(stopped):
                    self._hand_back(state, batches, stopped, slot_row, slot_batch, counts)
                if self.progress is not None:
                    self.progress(self._where(current.out))
            self._carry_over(state, batches, slot_row, slot_batch)
            if self.carried_cache == "keep" and self._agree_max(int(any(b.readmit for b in batches[1:]))):
                self._kept = (state, slot_row, slot_batch)
            del params, state
            current.cache = None
        return current.out.rollout(current.prompts, current.prompt_len, self.config.n, self.config)

    def carry_state(self) -> list[dict]:
        """The rows started for the next calls (max_staleness), JSON-able, one entry per call: what they sampled
        so far, by which versions, and the rows still to start; saved with a checkpoint so that a resumed run
        goes on as an uninterrupted one: exactly with carried_cache recompute (a resumed run's next call
        computes their caches as the straight run's does); with keep, the resumed run recomputes what the
        straight run kept."""
        states = []
        for c in self._carry:
            out = c.out
            states.append({
                "prompts": c.prompts, "prompt_len": c.prompt_len, "first_row": c.first_row,
                "key": np.asarray(jax.random.key_data(c.key)).tolist(), "pending": list(c.pending),
                "readmit": list(c.readmit), "tokens": out.tokens.tolist(), "logprobs": out.logprobs.tolist(),
                "versions": out.versions.tolist(), "counts": out.counts.tolist(), "done": out.done.tolist()})
        return states

    def restore_carry(self, states: list[dict] | dict | None) -> None:
        """The rows of a `carry_state()` back, for the next calls (a single dict or None: an older checkpoint's,
        saved when at most one call was carried)."""
        if states is None:
            states = []
        elif isinstance(states, dict):
            states = [states]
        self._carry = []
        for state in states:
            out = _RowsOut(len(state["counts"]), self.config.max_new_tokens, self.config.pad_id)
            out.tokens[:] = np.asarray(state["tokens"], np.int32)
            out.logprobs[:] = np.asarray(state["logprobs"], np.float32)
            out.versions[:] = np.asarray(state["versions"], np.int32)
            out.counts[:] = np.asarray(state["counts"], np.int32)
            out.done[:] = np.asarray(state["done"], bool)
            key = jax.random.wrap_key_data(np.asarray(state["key"], np.uint32))
            self._carry.append(_Batch(state["prompts"], int(state["prompt_len"]), int(state["first_row"]), key,
                                      out, collections.deque(state["pending"]), list(state["readmit"])))

    # ------------------------------------------------------------------------------------------ the calls
    def _batch(self, prompts, key) -> _Batch:
        """A call's rows, none sampled yet."""
        count, prompt_len, first_row = self._agree_on(prompts)
        rows = count * self.config.n
        return _Batch([list(p) for p in prompts], prompt_len, first_row, key,
                      _RowsOut(rows, self.config.max_new_tokens, self.config.pad_id), collections.deque(range(rows)))

    def _carried(self, calls) -> list[_Batch]:
        """The rows of these calls ((prompts, key) each: this one, then those ahead): the ones earlier calls
        started for them (carried), or none sampled yet. Carried rows are taken only for the call they were
        started for: other prompts or another key in its place, and they are sampled again from scratch."""
        carry, self._carry = self._carry, []
        batches = []
        for j, (prompts, key) in enumerate(calls):
            started = carry[j] if j < len(carry) else None
            if started is not None:
                same_key = np.array_equal(np.asarray(jax.random.key_data(started.key)),
                                          np.asarray(jax.random.key_data(key)))
                if started.prompts == [list(p) for p in prompts] and same_key:
                    batches.append(started)
                    continue
                log.warning("sampling: the rows started ahead for %s were for other prompts or another key; "
                            "sampled again", "this step" if j == 0 else f"step +{j}")
            batches.append(self._batch(prompts, key))
        return batches

    def _cache_prompt_len(self, prompt_len: int) -> int:
        """The prompt slots of the cache: the call's bucket, or with rows of two calls the largest bucket."""
        return self.config.prompt_buckets[-1] if self.max_staleness else prompt_len

    def _prompt_cache(self, params, prompts, prompt_len: int):
        """Every prompt of the call prefilled once (with hosts: every process's, filler copies making the
        prompts split over the mesh, as the static sampler's)."""
        if self.hosts is not None:
            prompts = [*prompts, *[prompts[-1]] * (-len(prompts) % self.hosts.rows_multiple)]
        ids, _ = _right_pad(prompts, prompt_len, self.config.pad_id, len(prompts))
        lengths = np.asarray([len(p) for p in prompts], np.int32)
        return self._prefill_prompts(params, *self._put((ids, lengths)))

    def _refill(self, params, state, batch: _Batch, tag: int, slot_row, slot_batch, version: int):
        """The batch's next pending rows into the free local slots (every process calls the same programs). Its
        prompts are prefilled when its first row is admitted (rows of a call ahead may never be)."""
        free = np.flatnonzero(slot_row < 0)
        admitted = [batch.pending.popleft() for _ in range(min(len(free), len(batch.pending)))]
        bucket = self._agree_max(_admission_bucket(len(admitted), self.local_slots, self._rows_multiple()))
        if bucket == 0:
            return state
        if batch.cache is None:
            batch.cache = self._prompt_cache(params, batch.prompts, batch.prompt_len)
        n = self.config.n
        source = np.zeros(bucket, np.int32)
        source[:len(admitted)] = batch.first_row // n + np.asarray(admitted, np.int32) // n
        slot_ids, row_ids = self._slots_and_rows(bucket, free[:len(admitted)], batch, admitted)
        slot_row[free[:len(admitted)]] = admitted
        slot_batch[free[:len(admitted)]] = tag
        if self._admit is None:
            self._admit = jax.jit(functools.partial(admit, self.config, self.model_config), donate_argnums=(0,))
        return self._admit(state, batch.cache, *self._put((source, slot_ids, row_ids)), batch.key, np.int32(version))

    def _slots_and_rows(self, bucket: int, slots, batch: _Batch, rows) -> tuple[np.ndarray, np.ndarray]:
        """Global slot ids (filler: past the last slot, admitting nothing) and row ids of admitted rows."""
        offset = 0 if self.hosts is None else jax.process_index() * self.local_slots
        slot_ids = np.full(bucket, self.slots, np.int32)
        slot_ids[:len(slots)] = offset + np.asarray(slots, np.int32)
        row_ids = np.zeros(bucket, np.int32)
        row_ids[:len(rows)] = batch.first_row + np.asarray(rows, np.int32)
        return slot_ids, row_ids

    def _readmit(self, params, state, batch: _Batch, tag: int, slot_row, slot_batch, version: int):
        """The rows earlier calls started for the batch (of call t + tag) back into slots, caches computed with
        `params`."""
        rows = batch.readmit
        batch.readmit = []
        out, n = batch.out, self.config.n
        fed = [len(batch.prompts[r // n]) + int(out.counts[r]) - 1 for r in rows]  # all but the last token
        length = self._agree_max(max(fed, default=0))
        bucket = self._agree_max(_admission_bucket(len(rows), self.local_slots, self._rows_multiple()))
        if bucket == 0:
            return state
        cache_slots = sum(slot_widths(self.config, self.model_config, self._cache_prompt_len(batch.prompt_len)))
        length = min(1 << max(length - 1, 0).bit_length(), cache_slots)  # a power of two (few programs) or all
        ids = np.full((bucket, length), self.config.pad_id, np.int32)
        lengths, last, count = (np.ones(bucket, np.int32) for _ in range(3))
        new = self.config.max_new_tokens
        tokens = np.full((bucket, new), self.config.pad_id, np.int32)
        logprobs, versions = np.zeros((bucket, new), np.float32), np.full((bucket, new), -1, np.int32)
        for i, (r, width) in enumerate(zip(rows, fed)):
            c = int(out.counts[r])
            ids[i, :width] = [*batch.prompts[r // n], *out.tokens[r, :c - 1]]
            lengths[i], last[i], count[i] = width, out.tokens[r, c - 1], c
            tokens[i], logprobs[i], versions[i] = out.tokens[r], out.logprobs[r], out.versions[r]
        free = np.flatnonzero(slot_row < 0)[:len(rows)]
        slot_ids, row_ids = self._slots_and_rows(bucket, free, batch, rows)
        slot_row[free] = rows
        slot_batch[free] = tag
        arrays = self._put((ids, lengths, slot_ids, row_ids, last, count, tokens, logprobs, versions))
        return self._readmit_program(params, state, *arrays[:4], batch.key, *arrays[4:])

    def _hand_back(self, state, batches, stopped, slot_row, slot_batch, counts) -> None:
        """The stopped rows' tokens, log-probs and versions to their batches; their slots freed."""
        tokens, logprobs, versions = self._local((state.tokens, state.logprobs, state.versions))
        for tag, batch in enumerate(batches):
            mine = stopped[slot_batch[stopped] == tag]
            batch.out.take(slot_row[mine], tokens[mine], logprobs[mine], versions[mine], counts[mine])
        slot_row[stopped] = -1

    def _carry_over(self, state, batches: list[_Batch], slot_row, slot_batch) -> None:
        """The later calls' rows still decoding: what they have so far, kept for those calls, their slots
        freed (carried_cache recompute: the next call computes their caches again with its params) or kept
        (keep: they decode on in them)."""
        if len(batches) > 1:
            tokens, logprobs, versions, counts, active = self._local(
                (state.tokens, state.logprobs, state.versions, state.count, state.active))
        for tag, batch in enumerate(batches[1:], start=1):
            held = np.flatnonzero((slot_row >= 0) & (slot_batch == tag))
            # rows the last admission started may have stopped there (a first token that is an EOS): done
            done = held[~active[held]]
            batch.out.take(slot_row[done], tokens[done], logprobs[done], versions[done], counts[done])
            going = held[active[held]]
            rows = slot_row[going]
            batch.out.tokens[rows], batch.out.logprobs[rows] = tokens[going], logprobs[going]
            batch.out.versions[rows], batch.out.counts[rows] = versions[going], counts[going]
            batch.readmit = [int(r) for r in rows]
            batch.cache = None
            slot_row[done if self.carried_cache == "keep" else held] = -1
        self._carry = batches[1:]

    def _pack_tail(self, state, slot_row, slot_batch):
        """The rows still decoding packed into PACK_FACTOR or more times fewer slots per device (a power of two,
        agreed between the processes), when they fit; else the state as it is. -> (state, slot_row, slot_batch)"""
        blocks = self.replicas // (1 if self.hosts is None else self.hosts.process_count)  # this process's devices
        per_block = len(slot_row) // blocks
        busy = (slot_row >= 0).reshape(blocks, per_block)
        need = self._agree_max(int(busy.sum(axis=1).max()))
        bucket = 1 << max(need - 1, 0).bit_length()
        if bucket * PACK_FACTOR > per_block:
            return state, slot_row, slot_batch
        keep = np.zeros((blocks, bucket), np.int32)
        for block, taken in enumerate(busy):
            used, free = np.flatnonzero(taken), np.flatnonzero(~taken)
            keep[block] = np.concatenate([used, free[:bucket - len(used)]])
        if self._take is None:
            self._take = jax.jit(functools.partial(take_slots, self.model_config))  # smaller: nothing to donate to
        state = self._take(state, *self._put((keep,)))
        kept = (np.arange(blocks)[:, None] * per_block + keep).reshape(-1)
        return state, slot_row[kept], slot_batch[kept]

    def _kept_rows_go_on(self, carry: list[_Batch], batches: list[_Batch]) -> bool:
        """Whether every call whose rows are kept in slots is one of this call's (its prompts and key came
        back, so _carried took the same rows): then they decode on; else every carried row is readmitted."""
        return all(batches[j] is batch for j, batch in enumerate(carry) if j < len(batches) and batch.readmit) \
            and not any(batch.readmit for batch in carry[len(batches):])

    def _window(self, prompt_len: int, batches, slot_row: np.ndarray, slot_batch: np.ndarray) -> int:
        """The first cache window whose blocks hold every active slot's next chunk_tokens slots."""
        n, local = self.config.n, 0
        for slot in np.flatnonzero(slot_row >= 0):
            batch, row = batches[slot_batch[slot]], slot_row[slot]
            # a row's next slot is its prompt length + tokens so far - 1 (a row just admitted has its first token)
            local = max(local, len(batch.prompts[row // n]) + max(int(batch.out.counts[row]), 1) - 1)
        reach = self._agree_max(local) + self.chunk_tokens
        attended = 0
        widths = slot_widths(self.config, self.model_config, self._cache_prompt_len(prompt_len))
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
        longest, count = agreed_prompt_sizes(prompts, self.hosts)
        first_row = 0
        if self.hosts is not None:
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
        batch = self._batch(prompts, key)
        with self._in_layout():
            params = self.rollout_params(params)
            self._know_model(params)
            prompt_len = self._cache_prompt_len(batch.prompt_len)
            state = self._refill(params, self._empty_state(prompt_len), batch, 0, np.full(self.local_slots, -1),
                                 np.zeros(self.local_slots, np.int32), 0)
            lowered = self._chunk(prompt_len, 0).lower(params, state, np.int32(0), np.int32(self.slots + 1))
            return lowered.compile().as_text()

    def compiled_programs(self) -> int:
        """Programs compiled so far: prefills (one per prompt count and bucket), admissions (one per bucket),
        readmissions, packings of the tail (one per slots bucket), chunks (one per window and slots bucket),
        empty states."""
        programs = [self._prefill_prompts, self._admit, self._take, self._readmit_program, *self._chunks.values(),
                    *self._empty.values()]
        return sum(p._cache_size() for p in programs if p is not None)


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


@dataclasses.dataclass
class _Batch:
    """One call's rows on this process: its prompts, the bucket of its longest prompt (its Rollout's prompt
    columns), its first row id and key (its rows' streams), what its rows have sampled, the rows not yet in
    a slot, the rows to readmit (started by the previous call), and its prompts prefilled (during a call)."""

    prompts: list
    prompt_len: int
    first_row: int
    key: jax.Array
    out: _RowsOut
    pending: collections.deque
    readmit: list = dataclasses.field(default_factory=list)
    cache: Any = None


class _RowsOut:
    """This process's finished rows, gathered on the host as the slots hand them back."""

    def __init__(self, rows: int, new: int, pad_id: int):
        self.tokens = np.full((rows, new), pad_id, np.int32)
        self.logprobs = np.zeros((rows, new), np.float32)
        self.versions = np.full((rows, new), -1, np.int32)
        self.counts = np.zeros(rows, np.int32)
        self.done = np.zeros(rows, bool)

    def take(self, row_ids, tokens, logprobs, versions, counts) -> None:
        self.tokens[row_ids] = tokens
        self.logprobs[row_ids] = logprobs
        self.versions[row_ids] = versions
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
            versions=np.concatenate([np.full(mask.shape, -1, np.int32), self.versions], axis=1),
        )
