"""Which checkpoint steps a run keeps and which one it resumes from.

Orbax keeps the last `keep` steps and, with a best metric, the best step by it, however old (`keep_options`).
`restore_usable` restores the newest step that reads: a committed step that still fails to restore (a
truncated array file, or an array whose checksum differs from the one saved in its metadata) is skipped with
a warning naming the step, the one before it is used, and the skipped one is renamed `<step>.unusable`.
A rollback renames the steps after the one it goes back to `<step>.rolled-back` (`set_aside_after`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from rlmt_jax.core.errors import UserError
from rlmt_jax.run.checkpoint_io import CheckpointFiles

log = logging.getLogger("rlmt_jax.run.checkpoint")  # the store's warnings keep the name users filter on

UNUSABLE_SUFFIX = ".unusable"
ROLLED_BACK_SUFFIX = ".rolled-back"


@dataclasses.dataclass(frozen=True)
class Restored:
    """A restored checkpoint: its step and the requested items (same kinds as the targets given)."""

    step: int
    items: dict[str, Any]


# --------------------------------------------------------------------------------------------- keeping


def _metric_fn(name: str, mode: str) -> Callable[[Mapping[str, float]], float]:
    """Ranks checkpoints by metrics[name]; a missing or non-finite value ranks worst."""
    worst = -math.inf if mode == "max" else math.inf

    def metric(metrics: Mapping[str, float]) -> float:
        value = metrics.get(name) if metrics else None
        return float(value) if value is not None and math.isfinite(value) else worst

    return metric


def keep_options(keep: int, best_metric: str | None, best_mode: str) -> dict[str, Any]:
    """The orbax CheckpointManagerOptions fields that keep the last `keep` steps and the best one by
    `best_metric` (when set)."""
    policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=keep)]
    best_fn = None
    if best_metric is not None:
        best_fn = _metric_fn(best_metric, best_mode)
        policies.append(
            ocp.checkpoint_managers.BestN(
                get_metric_fn=best_fn,
                reverse=best_mode == "min",
                n=1,
                keep_checkpoints_without_metrics=False,
            )
        )
    return {
        "preservation_policy": ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        "best_fn": best_fn,
        "best_mode": best_mode,
    }


def metrics_to_rank(best_metric: str | None, metrics: Mapping[str, float] | None) -> dict[str, float] | None:
    """The step's metrics as orbax ranks them (None without a best metric); UserError when the best metric
    is not among them."""
    if best_metric is None:
        return None
    metrics = {name: float(value) for name, value in (metrics or {}).items()}
    if best_metric not in metrics:
        raise UserError(
            f"the checkpoint best_metric {best_metric!r} is not among the step's metrics "
            f"{sorted(metrics)}"
        )
    return metrics


# ------------------------------------------------------------------------------------------ resuming


def restore_usable(files: CheckpointFiles, abstract_items: Mapping[str, Any], step: int | None) -> Restored | None:
    """Restores step `step`, or the newest committed step that reads (see `CheckpointStore.restore`)."""
    steps = list(reversed(files.committed_steps()))
    if step is not None:
        if step not in steps:
            raise UserError(f"no committed checkpoint at step {step} in {files.directory}; steps: {steps[::-1]}")
        steps = [step]
    failures: list[str] = []
    skipped: list[int] = []
    for candidate in steps:
        try:
            items = files.read(candidate, abstract_items)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - any read failure of a damaged checkpoint
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            failures.append(f"step {candidate}: {reason}")
            if step is None:
                log.warning(
                    "checkpoint step %d in %s cannot be restored (%s); skipping it and falling back to the "
                    "one before it",
                    candidate,
                    files.directory,
                    reason,
                )
            skipped.append(candidate)
            continue
        # set aside only once an older step has restored, so a failure common to all steps renames nothing
        for damaged in skipped:
            set_aside(files, damaged)
        return Restored(step=candidate, items=items)
    if failures:
        raise UserError(f"no usable checkpoint in {files.directory}: " + "; ".join(failures))
    return None


def set_aside_after(files: CheckpointFiles, step: int) -> list[int]:
    """Renames every committed step newer than `step` to `<step>.rolled-back`; returns them."""
    newer = [s for s in files.committed_steps() if s > step]
    for later in newer:
        set_aside(files, later, ROLLED_BACK_SUFFIX, "rolled back past checkpoint")
    return newer


def set_aside(files: CheckpointFiles, step: int, suffix: str = UNUSABLE_SUFFIX,
              why: str = "damaged checkpoint") -> None:
    """Renames a step dir so the resumed run can write that step again; data is kept (unless read-only:
    then nothing is renamed)."""
    if files.read_only:
        return
    if jax.process_index() == 0:
        source = files.directory / str(step)
        target = source.with_name(f"{step}{suffix}")
        n = 1
        while target.exists():
            target, n = source.with_name(f"{step}{suffix}-{n}"), n + 1
        source.rename(target)
        log.warning("renamed %s %s to %s", why, source, target)
    ocp.multihost.sync_global_processes(f"rlmt_checkpoint_set_aside_{step}")
    files.reload()
