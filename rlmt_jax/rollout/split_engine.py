"""SplitEngine: split placement (rollout.devices): a sampler on devices of its own samples step t + 1's rows
while step t's update runs on the others.

    engine = SplitEngine(sampler)   # sampler: a Sampler or SlotSampler whose DecodeLayout is on the engine's devices
    rollout = engine(params, prompts, key, version, ahead=[(next_prompts, next_key)])
    # -> step t's rollout (the one started at step t - 1, or sampled now), and step t + 1's started with `params`
    ... the update ...
    engine.carry_state()            # waits: a checkpoint saves step t + 1's finished rows

Every token of a started step is chosen by the weights of one version before its update (verl's one-step
off-policy; the update corrects with algorithm.rollout_correction): rows never mix versions, and the
rollout records the version that sampled it.

Why it cannot deadlock across hosts: the weights reach the engine's devices in the caller's thread (the
DecodeLayout's host-local copy: one program on the training devices, then copies inside each host), so every
process queues the same programs on the training devices in the same order. The engine's thread then runs
only programs on its own devices, and its processes agree over those devices only (HostRows.gather), while
the caller's agree over each process's first device, a training one (multihost.all_gather).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from rlmt_jax.rollout.sampling import Rollout, Sampler
from rlmt_jax.rollout.slot_sampler import SlotSampler

log = logging.getLogger(__name__)

_ARRAYS = ("tokens", "prompt_mask", "response_mask", "logprobs", "prompt_lengths", "response_lengths",
           "stop_reason", "versions")


@dataclasses.dataclass
class _Started:
    """A step's rows being sampled (or sampled) by the engine: for which prompts and key, by which version."""

    prompts: list
    key: jax.Array
    version: int
    future: concurrent.futures.Future  # -> (Rollout, seconds the engine sampled)

    def is_for(self, prompts: Sequence[Sequence[int]], key: jax.Array) -> bool:
        return self.prompts == [list(p) for p in prompts] and np.array_equal(
            np.asarray(jax.random.key_data(self.key)), np.asarray(jax.random.key_data(key)))


class SplitEngine:
    """Samples on the engine's devices; a call returns its step's rollout and starts the next step's."""

    def __init__(self, sampler: Sampler):
        if sampler.layout is None:
            raise ValueError("split placement: the sampler needs a DecodeLayout on the engine's devices")
        self.sampler = sampler
        self.config = sampler.config
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-engine")
        self._next: _Started | None = None
        self.engine_seconds = 0.0  # how long the engine sampled the last rollout a call returned
        self.waited_seconds = 0.0  # how long that call waited for it

    def __call__(self, params, prompts: Sequence[Sequence[int]], key: jax.Array, version: int = 0,
                 ahead: Sequence[tuple[Sequence[Sequence[int]], jax.Array]] = ()) -> Rollout:
        """This step's rollout: the one the previous call started for these prompts and key (sampled with the
        weights it was given), else sampled now with `params`. Then, with `ahead` (one step: its prompts and
        key), that step's rows start in the engine's thread with `params` (policy `version`)."""
        if len(ahead) > 1:
            raise ValueError(f"split placement samples one step ahead, got {len(ahead)}")
        start = time.perf_counter()
        started, self._next = self._next, None
        if started is not None and started.is_for(prompts, key):
            rollout, self.engine_seconds = started.future.result()
        else:
            if started is not None:
                started.future.result()  # its programs finish before others are queued
                log.warning("split placement: the rows started for this step were for other prompts or another "
                            "key; sampled again")
            rollout, self.engine_seconds = self._sample(self.sampler.rollout_params(params), prompts, key, version)
        self.waited_seconds = time.perf_counter() - start
        if ahead:
            self.start(params, *ahead[0], version)
        return rollout

    def start(self, params, prompts: Sequence[Sequence[int]], key: jax.Array, version: int) -> None:
        """The weights pushed to the engine's devices now (in this thread), then the rows sampled in the engine's."""
        pushed = self.sampler.rollout_params(params)
        prompts = [list(p) for p in prompts]
        future = self._pool.submit(self._sample, pushed, prompts, key, version)
        self._next = _Started(prompts, key, version, future)

    def wait(self) -> None:
        """Until the started step's rows are done (raises what the engine raised)."""
        if self._next is not None:
            self._next.future.result()

    def _sample(self, params, prompts, key: jax.Array, version: int) -> tuple[Rollout, float]:
        start = time.perf_counter()
        if isinstance(self.sampler, SlotSampler):
            rollout = self.sampler(params, prompts, key, version=version)
        else:
            rollout = self.sampler(params, prompts, key)
        rollout = rollout._replace(**{name: np.asarray(getattr(rollout, name)) for name in _ARRAYS
                                      if getattr(rollout, name) is not None})
        if rollout.versions is None:  # the static sampler: every token by these weights
            rollout = rollout._replace(versions=np.where(rollout.response_mask, version, -1).astype(np.int32))
        return rollout, time.perf_counter() - start

    # ------------------------------------------------------------------------------------ checkpoints
    def carry_state(self) -> dict[str, Any] | None:
        """The started step's rows, finished (this waits), JSON-able: saved with a checkpoint, so a resumed
        run trains on them as the uninterrupted run does. None: none started."""
        if self._next is None:
            return None
        rollout, seconds = self._next.future.result()
        return {
            "prompts": self._next.prompts, "key": np.asarray(jax.random.key_data(self._next.key)).tolist(),
            "version": self._next.version, "seconds": seconds, "prompt_len": rollout.prompt_len,
            "group_size": rollout.group_size,
            "arrays": {name: {"dtype": str(np.asarray(getattr(rollout, name)).dtype),
                              "values": np.asarray(getattr(rollout, name)).tolist()} for name in _ARRAYS},
        }

    def restore_carry(self, state: dict[str, Any] | list | None) -> None:
        """The rows of a `carry_state()` back, for the next call (anything else: none started)."""
        self._next = None
        if not isinstance(state, dict) or "arrays" not in state:
            return
        arrays = {name: np.asarray(a["values"], a["dtype"]) for name, a in state["arrays"].items()}
        rollout = Rollout(**arrays, prompt_len=int(state["prompt_len"]), group_size=int(state["group_size"]))
        future = concurrent.futures.Future()
        future.set_result((rollout, float(state["seconds"])))
        key = jax.random.wrap_key_data(np.asarray(state["key"], np.uint32))
        self._next = _Started([list(p) for p in state["prompts"]], key, int(state["version"]), future)

    def compiled_programs(self) -> int:
        return self.sampler.compiled_programs()
