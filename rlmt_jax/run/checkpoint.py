"""Training checkpoints with orbax: save every N steps, keep the last k and the best, resume, read params.

A checkpoint is one step directory under `RUN_DIR/checkpoints/` holding named items: the arrays of the policy,
its optimizer and critic, the rng keys, a metadata dict and each process's data iterator state
(`checkpoint_items`). `CheckpointStore`, what the trainer uses, joins two parts:

- `checkpoint_io`: writing and reading step dirs through orbax. Only a committed step counts, leftovers of a
  stopped write are removed, a read-only or full disk ends in one CheckpointWriteError line.
- `checkpoint_steps`: which steps are kept (the last k and the best by a metric) and which one a run resumes
  from: a damaged newest step is skipped with a warning and renamed `<step>.unusable`.

`params_only` reads the policy params of a run for export.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from etils import epath

from rlmt_jax.core.errors import UserError
from rlmt_jax.run import checkpoint_items, checkpoint_steps
from rlmt_jax.run.checkpoint_io import COMMIT_MARKER, TMP_MARKER, CheckpointFiles, CheckpointWriteError
from rlmt_jax.run.checkpoint_items import ARRAY_ITEMS, JSON_ITEMS, NonFiniteError, rng_from_json, rng_to_json
from rlmt_jax.run.checkpoint_steps import ROLLED_BACK_SUFFIX, UNUSABLE_SUFFIX, Restored

# the names of the checkpoint modules, importable from here as before they were split
__all__ = [
    "ARRAY_ITEMS", "CHECKPOINT_SUBDIR", "COMMIT_MARKER", "JSON_ITEMS", "ROLLED_BACK_SUFFIX", "SPACE_MARGIN",
    "TMP_MARKER", "UNUSABLE_SUFFIX", "CheckpointStore", "CheckpointWriteError", "NonFiniteError", "Restored",
    "checkpoint_dir", "params_only", "rng_from_json", "rng_to_json",
]

CHECKPOINT_SUBDIR = "checkpoints"
SPACE_MARGIN = 1.05  # a save needs its arrays' bytes (uncompressed) free, and a little more


def checkpoint_dir(run_dir: str | os.PathLike) -> epath.Path:
    """Where a run keeps its checkpoints: RUN_DIR/checkpoints (a local path or a gs:// one)."""
    return _epath(run_dir) / CHECKPOINT_SUBDIR


def _epath(path: str | os.PathLike) -> epath.Path:
    text = os.fspath(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))


class CheckpointStore:
    """The checkpoints of one run directory (`RUN_DIR/checkpoints/<step>/`).

    save_every: `save` writes when step % save_every == 0, and always when `final=True`.
    keep: the last `keep` checkpoints are kept; with `best_metric` the best one by that metric
        (`best_mode` 'max' or 'min') is kept as well, however old.
    async_save: orbax copies the arrays to host before `save` returns and writes in a background
        thread; call `wait_until_finished()` (or `close()`) before the process exits.
    read_only: for readers (export): never writes, renames or cleans anything.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_every: int = 100,
        keep: int = 2,
        best_metric: str | None = None,
        best_mode: str = "max",
        async_save: bool = True,
        read_only: bool = False,
    ):
        if save_every < 1:
            raise UserError(f"checkpoint save_every must be >= 1, got {save_every}")
        if keep < 1:
            raise UserError(f"checkpoint keep must be >= 1 (the newest is needed to resume), got {keep}")
        if best_mode not in ("max", "min"):
            raise UserError(f"checkpoint best_mode must be 'max' or 'min', got {best_mode!r}")
        self.directory = _epath(directory)
        self.save_every = save_every
        self.best_metric = best_metric
        self.read_only = read_only
        self._files = CheckpointFiles(self.directory, checkpoint_steps.keep_options(keep, best_metric, best_mode),
                                      async_save=async_save, read_only=read_only)

    @classmethod
    def for_run(cls, run_dir: str | os.PathLike, **settings: Any) -> CheckpointStore:
        """The store of RUN_DIR/checkpoints (settings as in the constructor)."""
        return cls(checkpoint_dir(run_dir), **settings)

    # ------------------------------------------------------------------------------------ queries

    def all_steps(self) -> list[int]:
        """Committed steps, oldest first (a step dir without orbax's commit marker is not one)."""
        return self._files.committed_steps()

    def latest_step(self) -> int | None:
        """The newest committed step, or None. `restore` may still fall back if its files are damaged."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The best committed step by `best_metric` (the latest when no metric is set)."""
        best = self._files.best_step()
        return best if best is not None and self._files.is_committed(best) else self.latest_step()

    def should_save(self, step: int, *, final: bool = False) -> bool:
        """True on every `save_every`-th step and on the final step, unless that step is saved or saving."""
        if self.read_only or self._files.failed or self._files.has_step(step):  # includes a write in flight
            return False
        return final or step % self.save_every == 0

    def meta(self, step: int) -> dict[str, Any]:
        """The metadata dict saved with checkpoint `step`."""
        return self._files.meta(step)

    # ------------------------------------------------------------------------------------- saving

    def save(
        self,
        step: int,
        items: Mapping[str, Any],
        metrics: Mapping[str, float] | None = None,
        *,
        final: bool = False,
    ) -> bool:
        """Writes `items` as checkpoint `step` when `should_save(step, final=final)`; True if it did.

        items: names from ARRAY_ITEMS (pytrees of arrays or nnx.State) and JSON_ITEMS ('data_iter': a
            JSON dict, 'rng': a key or pytree of keys, 'meta': a JSON dict); None values are skipped.
        metrics: scalars of this step; `best_metric` must be among them when it is set.
        Arrays with NaN or inf raise NonFiniteError; a write that cannot happen, CheckpointWriteError.
        """
        if not self.should_save(step, final=final):
            return False
        args, nbytes = checkpoint_items.save_args(step, items)
        ranked = checkpoint_steps.metrics_to_rank(self.best_metric, metrics)
        self._files.write(step, args, ranked, needed_bytes=nbytes * SPACE_MARGIN)
        return True

    def wait_until_finished(self) -> None:
        """Blocks until background writes are committed (and old checkpoints pruned); CheckpointWriteError
        when one failed."""
        self._files.wait_until_finished()

    def close(self) -> None:
        """Waits for background writes, then releases orbax's threads (after a failed write: neither)."""
        self._files.close()

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------ restoring

    def restore(self, abstract_items: Mapping[str, Any], step: int | None = None) -> Restored | None:
        """Restores the named items of checkpoint `step`, or of the newest usable one; None if none exist.

        abstract_items: item name -> target. For an array item the target is a pytree (or nnx.State)
            of jax.ShapeDtypeStruct / jax.Array leaves: each leaf is read straight onto that leaf's
            sharding, so a run on a mesh restores sharded, never a full replica per device (a leaf
            without a sharding goes to the first device); a target of None reads numpy arrays into
            host memory. The result has the target's kind (pure dict or nnx.State). JSON items take
            None; 'rng' comes back as keys.
        A newest checkpoint that fails to read is skipped with a warning naming its step; once an
        older one restores, the skipped ones are renamed `<step>.unusable` (unless read-only) so the
        run can write those steps again. When every checkpoint fails: UserError listing each step's
        reason, nothing renamed. Targets whose items, tensors or shapes differ from the checkpoint
        raise UserError naming them, without falling back.
        """
        unknown = set(abstract_items) - set(ARRAY_ITEMS + JSON_ITEMS)
        if unknown:
            raise ValueError(f"unknown checkpoint items {sorted(unknown)}; known: {ARRAY_ITEMS + JSON_ITEMS}")
        self.wait_until_finished()
        return checkpoint_steps.restore_usable(self._files, abstract_items, step)

    def set_aside_after(self, step: int) -> list[int]:
        """Renames every committed step newer than `step` to `<step>.rolled-back` (a rollback to `step`: the
        run writes those steps again); returns them."""
        return checkpoint_steps.set_aside_after(self._files, step)


# ------------------------------------------------------------------------------------------- export


def params_only(path: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """The policy params of a run's newest usable checkpoint, as a pure nested dict of numpy arrays.

    path: a run dir (RUN_DIR/checkpoints is read), a checkpoints dir, or one step dir
        (RUN_DIR/checkpoints/<step>, which fixes the step). List indices come back as int keys, so
        `nnx.replace_by_pure_dict(nnx.state(model, nnx.Param), params)` loads them into a model.
    """
    path = _epath(path)
    if not path.is_dir():
        raise UserError(f"checkpoint path {path} is not a directory")
    if path.name.isdigit() and (path / "params").is_dir():
        directory, step = path.parent, int(path.name) if step is None else step
    elif (path / CHECKPOINT_SUBDIR).is_dir():
        directory = path / CHECKPOINT_SUBDIR
    else:
        directory = path
    store = CheckpointStore(directory, read_only=True)
    restored = store.restore({"params": None}, step=step)
    if restored is None:
        raise UserError(f"no checkpoints in {directory} (expected step dirs such as {directory / '100'})")
    return restored.items["params"]
