"""The step dirs of a checkpoints dir, written and read through orbax: commits, leftovers, failed writes.

Orbax writes a step into `<step>.orbax-checkpoint-tmp*`, writes `commit_success.txt` into it and then
renames it to `<step>`, so a step directory without the marker, or a tmp directory, is never taken as a
checkpoint. A writing store removes such a step dir when it opens, so that step is saved again. Step dirs
that are symbolic links are refused when it opens (pruning would fail on them).

A write that cannot happen (a read-only or full disk) ends in one CheckpointWriteError line within seconds;
the earlier steps stay intact.

Orbax runs each read and write in an asyncio loop of its own, closed as soon as the first array fails (a
damaged file, a disk turned read-only): the reads and writes still in flight then complete into a closed loop,
and each printed `RuntimeError: Event loop is closed` (intermittently, dozens of tracebacks). The store has
orbax close such a loop only after what runs in it is done (`_close_loops_after_their_tasks`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from rlmt_jax.core.errors import UserError
from rlmt_jax.run.checkpoint_items import (
    ARRAY_ITEMS,
    item_handlers,
    leaf_shapes,
    process_file_name,
    pure,
    restore_args,
    restored_items,
)
from rlmt_jax.scale import multihost

log = logging.getLogger("rlmt_jax.run.checkpoint")  # the store's warnings keep the name users filter on

COMMIT_MARKER = "commit_success.txt"  # written by orbax 0.12 into a step dir just before it is committed
TMP_MARKER = ".orbax-checkpoint-tmp"


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (read-only or full disk, ...); the earlier ones are intact."""


class _OrbaxErrorFilter(logging.Filter):
    """Drops orbax's own error records (a traceback per background thread): the store reports one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


_ORBAX_ERROR_FILTER = _OrbaxErrorFilter()


IN_FLIGHT_TIMEOUT_S = 120.0  # the longest a failed read or write waits for the others it started


def _run_sync_closing_after_its_tasks(coro):
    """orbax's `_run_sync_via_new_loop` (a coroutine run to its end in a fresh event loop), except that when it
    fails, the tasks it started and left running (the other arrays' reads or writes: tensorstore completes them
    into the loop from its own threads) finish before the loop is closed. Orbax closed it at once, and each late
    completion printed `RuntimeError: Event loop is closed`."""
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(coro)
    except Exception:  # not on Ctrl-C: that stops at once
        pending = asyncio.all_tasks(loop)
        if pending:
            loop.run_until_complete(asyncio.wait(pending, timeout=IN_FLIGHT_TIMEOUT_S))
            for task in pending:  # their errors are the same failure, reported once by the caller
                if task.done() and not task.cancelled():
                    task.exception()
        raise
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def _close_loops_after_their_tasks() -> None:
    """Has orbax run its reads and writes with `_run_sync_closing_after_its_tasks`; an orbax without that helper
    (another version) is left as it is."""
    from orbax.checkpoint._src import asyncio_utils

    if callable(getattr(asyncio_utils, "_run_sync_via_new_loop", None)):
        asyncio_utils._run_sync_via_new_loop = _run_sync_closing_after_its_tasks


def _first_line(err: BaseException) -> str:
    """The error's first line, its middle left out when long (the cause, e.g. the OS error, is at its end)."""
    text = str(err).strip().splitlines()
    if not text:
        return type(err).__name__
    return text[0] if len(text[0]) <= 400 else f"{text[0][:150]} ... {text[0][-250:]}"


def _step_of_tmp_dir(name: str) -> str:
    return name.split(TMP_MARKER, 1)[0]


class CheckpointFiles:
    """The step dirs of `directory`, through one orbax CheckpointManager.

    keep_options: the CheckpointManagerOptions fields that choose which steps orbax keeps.
    async_save: orbax writes in a background thread (`wait_until_finished` blocks until it is done).
    read_only: never writes, renames or cleans anything; without `directory` there are no steps.
    """

    def __init__(self, directory: epath.Path, keep_options: Mapping[str, Any], *, async_save: bool,
                 read_only: bool):
        self.directory = directory
        self.read_only = read_only
        self.failed = False  # a write failed: nothing more is written
        self._writing: int | None = None  # the step of a save in flight
        self._closed = False
        _close_loops_after_their_tasks()
        self._warn_about_unfinished_writes()
        if not read_only:
            self._refuse_symlinked_steps()
            self._remove_uncommitted_steps()
            logging.getLogger("absl").addFilter(_ORBAX_ERROR_FILTER)
        options = ocp.CheckpointManagerOptions(
            **keep_options,
            enable_async_checkpointing=async_save and not read_only,
            create=not read_only,
            cleanup_tmp_directories=not read_only,
        )
        self._manager = (
            ocp.CheckpointManager(directory, options=options, item_handlers=item_handlers())
            if directory.is_dir() or not read_only
            else None
        )
        # orbax removes old temporary folders in a thread of its own; a run that stops right after (bad data
        # found while setting up) would end the interpreter under it, and the thread print a 40-line trace
        wait_for_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
        if wait_for_cleanup is not None:
            wait_for_cleanup()

    # ------------------------------------------------------------------------------------ steps

    def committed_steps(self) -> list[int]:
        """Committed steps, oldest first (a step dir without orbax's commit marker is not one)."""
        if self._manager is None:
            return []
        return [s for s in self._manager.all_steps() if self.is_committed(s)]

    def is_committed(self, step: int) -> bool:
        return (self.directory / str(step) / COMMIT_MARKER).is_file()

    def has_step(self, step: int) -> bool:
        """Whether orbax holds `step`, committed or still being written."""
        return self._manager is not None and step in self._manager.all_steps()

    def best_step(self) -> int | None:
        """Orbax's best step by the metrics saved with each step (it may be uncommitted), or None."""
        return None if self._manager is None else self._manager.best_step()

    def reload(self) -> None:
        """Reads the step dirs again (after some were renamed)."""
        self._manager.reload()

    # ------------------------------------------------------------------------------------ writing

    def write(self, step: int, args: ocp.args.Composite, metrics: Mapping[str, float] | None,
              needed_bytes: float) -> None:
        """Saves step `step` once the writes in flight are done, or CheckpointWriteError (every process alike)
        when the dir is not writable or, on a local disk, has fewer than `needed_bytes` free."""
        self.wait_until_finished()
        self._check_writable(step, needed_bytes)
        self._writing = step
        try:
            self._manager.save(step, args=args, metrics=metrics, force=True)
        except Exception as err:  # noqa: BLE001 - any failure to write becomes one line
            self._write_failed(err)

    def _check_writable(self, step: int, needed_bytes: float) -> None:
        problem = ""
        probe = self.directory / f".write-probe-{jax.process_index()}-{os.getpid()}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            problem = err.strerror or _first_line(err)
        if not problem and "://" not in os.fspath(self.directory):
            free = shutil.disk_usage(os.fspath(self.directory)).free
            if free < needed_bytes:
                problem = f"{free / 2**20:.0f} MiB free, {needed_bytes / 2**20:.0f} MiB needed"
        if multihost.global_max_int(int(bool(problem))):
            self.failed = True
            raise CheckpointWriteError(
                f"cannot write checkpoint step {step} in {self.directory}: {problem or 'failed on another process'}"
                f"; {self._intact_text()}")

    def _write_failed(self, err: BaseException) -> None:
        step, self._writing, self.failed = self._writing, None, True
        raise CheckpointWriteError(f"writing checkpoint step {step} in {self.directory} failed: {_first_line(err)}; "
                                   f"{self._intact_text()}") from None

    def _intact_text(self) -> str:
        steps = self.committed_steps()
        return f"the checkpoints of steps {steps} are intact" if steps else "no earlier checkpoint exists"

    def wait_until_finished(self) -> None:
        """Blocks until background writes are committed (and old checkpoints pruned); CheckpointWriteError
        when one failed."""
        if self._manager is None:
            return
        try:
            self._manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001 - any failure to write becomes one line
            if self._writing is None:
                raise
            self._write_failed(err)
        self._writing = None

    def close(self) -> None:
        """Waits for background writes, then releases orbax's threads (after a failed write: neither)."""
        if self._manager is not None and not self.failed and not self._closed:
            self.wait_until_finished()
            self._manager.close()
            self._closed = True

    # ------------------------------------------------------------------------------------ reading

    def read(self, step: int, abstract_items: Mapping[str, Any]) -> dict[str, Any]:
        """The named items of committed step `step` (targets as in `CheckpointStore.restore`): UserError when
        the targets do not match what the step holds, any other error when its files cannot be read."""
        self._check_targets(step, abstract_items)
        args = restore_args(abstract_items, lambda name: self._saved_tree(step, name))
        return restored_items(step, abstract_items, self._manager.restore(step, args=args))

    def meta(self, step: int) -> dict[str, Any]:
        """The metadata dict saved with step `step`."""
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def _check_targets(self, step: int, abstract_items: Mapping[str, Any]) -> None:
        """Every tensor of each array target is in the checkpoint with the same shape, and no more."""
        step_dir = self.directory / str(step)
        missing = [name for name in abstract_items if not (step_dir / name).is_dir()]
        if missing:  # orbax commits all items at once, so this checkpoint was saved without them
            present = sorted(p.name for p in step_dir.iterdir() if p.is_dir())
            raise UserError(
                f"checkpoint {step_dir} has no {missing} (it holds {present}); was it saved by a run with "
                "another algorithm or without a critic?"
            )
        if "data_iter" in abstract_items and not (step_dir / "data_iter" / process_file_name()).is_file():
            saved = sorted(p.name for p in (step_dir / "data_iter").iterdir())
            raise UserError(
                f"checkpoint {step_dir} has data iterator states {saved}, none for this process "
                f"({process_file_name()}): resume with the same number of processes"
            )
        for name, target in abstract_items.items():
            if name not in ARRAY_ITEMS or target is None:
                continue
            saved = leaf_shapes(self._saved_tree(step, name))
            wanted = leaf_shapes(pure(target))
            if saved.keys() != wanted.keys():
                absent = sorted(wanted.keys() - saved.keys())
                extra = sorted(saved.keys() - wanted.keys())
                raise UserError(
                    f"checkpoint {step_dir} item {name!r} does not match the model: tensors not in the "
                    f"checkpoint {absent[:5]}, tensors only in the checkpoint {extra[:5]}"
                )
            for tensor, shape in wanted.items():
                if saved[tensor] != shape:
                    raise UserError(
                        f"checkpoint {step_dir} tensor {name}.{tensor} has shape {saved[tensor]}, "
                        f"the model expects {shape}"
                    )

    def _saved_tree(self, step: int, name: str) -> Any:
        """Array item `name` of step `step` as saved: a tree of orbax's array metadata (shape, dtype)."""
        metadata = self._manager.item_metadata(step)[name]
        if metadata is None:
            raise FileNotFoundError(f"no readable metadata for item {name!r} of step {step}")
        return metadata.tree

    # --------------------------------------------------------------------------------- leftovers

    def _warn_about_unfinished_writes(self) -> None:
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.iterdir()):
            if TMP_MARKER in path.name:
                log.warning(
                    "ignoring unfinished checkpoint write of step %s at %s (a writer was stopped before its "
                    "commit)%s",
                    _step_of_tmp_dir(path.name),
                    path,
                    "" if self.read_only else "; it will be removed",
                )
            elif self.read_only and path.is_dir() and path.name.isdigit() and not (path / COMMIT_MARKER).is_file():
                log.warning(
                    "ignoring checkpoint step %s at %s: it has no commit marker %s (a partial copy or write)",
                    path.name,
                    path,
                    COMMIT_MARKER,
                )

    def _refuse_symlinked_steps(self) -> None:
        if not self.directory.is_dir():
            return
        for path in self.directory.iterdir():
            if path.name.split(".", 1)[0].isdigit() and os.path.islink(os.fspath(path)):
                raise CheckpointWriteError(
                    f"checkpoint step dir {path} is a symbolic link; the run prunes old steps itself and cannot "
                    "remove a link: replace it by a copy of its target, or move it out")

    def _remove_uncommitted_steps(self) -> None:
        """Deletes step dirs without orbax's commit marker (a write that was stopped): that step is saved again."""
        if not self.directory.is_dir():
            return
        stale = sorted(p for p in self.directory.iterdir()
                       if p.name.isdigit() and p.is_dir() and not (p / COMMIT_MARKER).is_file())
        if jax.process_index() == 0:
            for path in stale:
                shutil.rmtree(os.fspath(path)) if "://" not in os.fspath(path) else path.rmtree()
                log.warning("removed the uncommitted checkpoint step dir %s; the run saves that step again", path)
        if stale:
            ocp.multihost.sync_global_processes("rlmt_checkpoint_remove_uncommitted")
