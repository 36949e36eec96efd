"""Resuming a run dir with the config it was started with: the saved config.yaml against the new one.

Keys that say how to start rather than what to train are not compared: `distributed.*` (each process has
its own id), `checkpoint.restore_step` (a one-time rollback), and `run.output_dir` and `checkpoint.dir` (where
the run lives, which may have been moved or copied). Nor are those that say how a run is watched and kept
(`logging.*`, how often and how many checkpoints are saved, the export at the end), nor `run.total_steps` while
the learning rate is constant without warmup in both configs (the recipe's GRPO/PPO): a run is extended by
resuming it with a larger `run.total_steps`, and its steps so far are the same as those of a run started with it.
A cosine or warmup schedule reads `run.total_steps`, so there it is compared. A checkpoint also holds the config it was saved with,
so a checkpoint dir kept apart from the run dir (gs://, on a fresh VM), or a run dir whose config.yaml is gone,
is checked the same way: `check_checkpoint_config` compares the config of the checkpoint the resume would start
from before the trainer writes anything, so a refused start leaves the run dir as it was.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import yaml

from rlmt_jax.core.errors import UserError
from rlmt_jax.run.checkpoint import CheckpointStore
from rlmt_jax.settings.config import RESOLVED_CONFIG_NAME, SCHEMA, RunConfig, load_resolved

log = logging.getLogger(__name__)
NOT_COMPARED = ("distributed.", "checkpoint.restore_step", "run.output_dir", "checkpoint.dir", "logging.",
                "checkpoint.save_every", "checkpoint.keep", "checkpoint.async_save", "run.export_at_end")


def _reads_total_steps(flat: dict[str, Any]) -> bool:
    """Whether the learning-rate schedule of a flattened config depends on run.total_steps."""
    return flat.get("optimizer.schedule", "constant") != "constant" or flat.get("optimizer.warmup_ratio", 0) != 0


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def config_changes(run_dir: str | os.PathLike, cfg: RunConfig) -> list[str]:
    """'key: saved -> new' for every compared key whose value differs from the run dir's config.yaml
    (none when the run dir has no config.yaml)."""
    path = os.path.join(os.fspath(run_dir), RESOLVED_CONFIG_NAME)
    if not os.path.isfile(path):
        return []
    try:
        saved = SCHEMA.to_dict(load_resolved(run_dir))
    except UserError:  # written by another version (a key since removed): compare what it says
        with open(path) as f:
            saved = yaml.safe_load(f) or {}
    return config_diff(saved, cfg)


def config_diff(saved_config: dict[str, Any], cfg: RunConfig) -> list[str]:
    """'key: saved -> new' for every compared key whose value differs between a saved config dict (nested, as
    SCHEMA.to_dict gives it) and `cfg`."""
    saved = _flat(yaml.safe_load(yaml.safe_dump(saved_config)))  # tuples and lists alike
    new = _flat(yaml.safe_load(yaml.safe_dump(SCHEMA.to_dict(cfg))))
    skipped = NOT_COMPARED if _reads_total_steps(saved) or _reads_total_steps(new) else (*NOT_COMPARED,
                                                                                         "run.total_steps")
    changes = []
    for key in sorted(saved.keys() | new.keys()):
        if key.startswith(skipped) or saved.get(key, "(absent)") == new.get(key, "(absent)"):
            continue
        changes.append(f"{key}: {saved.get(key, '(absent)')!r} -> {new.get(key, '(absent)')!r}")
    return changes


def check_config_unchanged(run_dir: str | os.PathLike, cfg: RunConfig, allow_change: bool,
                           saved_config: dict[str, Any] | None = None, what: str = "") -> None:
    """UserError listing the changed keys when `cfg` differs from the run dir's saved config (or from
    `saved_config`, the config a checkpoint was saved with, named by `what`), unless `allow_change` (then a
    warning lists them)."""
    changes = config_changes(run_dir, cfg) if saved_config is None else config_diff(saved_config, cfg)
    if not changes:
        return
    source = what or f"run dir {run_dir}"
    if not allow_change:
        raise UserError(f"{source} was started with another config ({'; '.join(changes)}); use another "
                        "run.output_dir, or pass --allow-config-change to resume with the new settings")
    log.warning("resuming %s with a changed config: %s", source, "; ".join(changes))


def checkpoint_config(directory: str | os.PathLike, restore_step: int | None = None) -> tuple[int, dict] | None:
    """(step, the config it was saved with) of the checkpoint a resume would start from, read without writing
    anything: checkpoint `restore_step` while a rollback to it is still to come (the newest checkpoint does not
    say it rolled back to it), else the newest committed one whose metadata reads. None when there is none (or
    its metadata holds no config)."""
    with CheckpointStore(directory, read_only=True) as store:
        steps = store.all_steps()
        if not steps:
            return None
        candidates = steps[::-1]
        if restore_step is not None and _meta(store, steps[-1]).get("rolled_back_to") != restore_step:
            candidates = [restore_step] if restore_step in steps else []
        for step in candidates:
            meta = _meta(store, step)
            if meta:
                config = meta.get("config")
                return None if config is None else (step, config)
    return None


def _meta(store: CheckpointStore, step: int) -> dict[str, Any]:
    """The metadata of checkpoint `step`, or {} when it cannot be read (a damaged step: the restore, which skips
    it, says so)."""
    try:
        return store.meta(step) or {}
    except Exception:  # noqa: BLE001 (orbax raises many kinds; the restore reports them)
        return {}


def check_checkpoint_config(cfg: RunConfig, allow_change: bool) -> None:
    """UserError listing the changed keys when `cfg` differs from the config of the checkpoint in
    cfg.checkpoint_dir a resume would start from (`checkpoint_config`); nothing when allow_change (the resume
    warns about the restored checkpoint's changes) or there is no checkpoint."""
    if allow_change:
        return
    found = checkpoint_config(cfg.checkpoint_dir, cfg.checkpoint.restore_step)
    if found is not None:
        step, saved = found
        check_config_unchanged(cfg.run.output_dir, cfg, False, saved,
                               what=f"the checkpoint of step {step} in {cfg.checkpoint_dir}")
