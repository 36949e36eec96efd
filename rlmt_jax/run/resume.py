"""Resuming a run dir with the config it was started with: the saved config.yaml against the new one.

Keys that say how to start rather than what to train are not compared: `distributed.*` (each process has
its own id), `checkpoint.restore_step` (a one-time rollback), and `run.output_dir` and `checkpoint.dir` (where
the run lives, which may have been moved or copied). Nor are those that say how a run is watched and kept
(`logging.*`, how often and how many checkpoints are saved, the export at the end), nor `run.total_steps` while
the learning rate is constant without warmup in both configs (the recipe's GRPO/PPO): a run is extended by
resuming it with a larger `run.total_steps`, and its steps so far are the same as those of a run started with it.
A cosine or warmup schedule reads `run.total_steps`, so there it is compared. A checkpoint also holds the config it was saved with,
so a checkpoint dir kept apart from the run dir (gs://, on a fresh VM) is checked the same way on restore.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import yaml

from rlmt_jax.settings.config import RESOLVED_CONFIG_NAME, SCHEMA, RunConfig, load_resolved
from rlmt_jax.core.errors import UserError

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
