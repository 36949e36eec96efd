"""What a run dir holds for readers (export, generate), found relative to the run dir itself.

A run dir keeps, beside config.yaml and checkpoints/, a copy of what the policy's weights need to become a
model again: RUN_DIR/policy/ holds the policy's config.json (and generation_config.json) and the tokenizer
prepared for the run (its chat template, and the zero template's EOS where the run used it). Written when the
run starts, so a run dir copied anywhere exports and generates without the original model folder. Paths
inside a run dir are taken relative to where it is now, never to the folder training started from.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from models.hf_io import process_umask
from rlmt_jax.settings.config import RunConfig, load_resolved
from rlmt_jax.core.errors import UserError

POLICY_DIR = "policy"
CHECKPOINTS_DIR = "checkpoints"
EXPORT_DIR = "export"
POLICY_CONFIG_FILES = ("config.json", "generation_config.json")


def find_run_dir(path: str | os.PathLike) -> Path | None:
    """The run dir that holds `path` (a run dir, its checkpoints dir, or a step dir): the one with config.yaml."""
    path = Path(path)
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / "config.yaml").is_file():
            return candidate
    return None


def checkpoints_of(run_dir: Path, cfg: RunConfig) -> Path:
    """The run's checkpoints: RUN_DIR/checkpoints, wherever the run dir is now; an explicit checkpoint.dir
    elsewhere is taken as written (an absolute path, or relative to the current folder)."""
    explicit = cfg.checkpoint.dir
    if explicit is None or os.path.normpath(explicit) == os.path.normpath(
            os.path.join(cfg.run.output_dir, CHECKPOINTS_DIR)):
        return run_dir / CHECKPOINTS_DIR
    return Path(explicit)


def save_policy_files(run_dir: str | os.PathLike, policy_path: str, tokenizer) -> Path:
    """Writes RUN_DIR/policy (config.json, generation_config.json, the prepared tokenizer) once: a run dir that
    has it keeps it (a resumed run must not change what its checkpoints mean). Written whole or not at all."""
    target = Path(run_dir) / POLICY_DIR
    if (target / "config.json").is_file():
        return target
    tmp = Path(tempfile.mkdtemp(prefix=f".{POLICY_DIR}.tmp-", dir=run_dir))
    tmp.chmod(0o777 & ~process_umask())  # as any folder the user makes, not mkdtemp's 0700
    try:
        for name in POLICY_CONFIG_FILES:
            if os.path.isfile(os.path.join(policy_path, name)):
                shutil.copyfile(os.path.join(policy_path, name), tmp / name)
        tokenizer.save_pretrained(str(tmp))
        if target.exists():  # an incomplete folder from an older run: replaced
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def policy_files(run_dir: Path, cfg: RunConfig) -> tuple[str, str]:
    """(folder with the policy's config.json, folder with its tokenizer): RUN_DIR/policy, or for a run dir made
    before it existed, the run's model.policy / model.tokenizer (which must still be there)."""
    from rlmt_jax.inputs.tiny import resolve_model_path

    own = run_dir / POLICY_DIR
    if (own / "config.json").is_file():
        return str(own), str(own)
    policy = resolve_model_path(cfg.model.policy)
    if not os.path.isfile(os.path.join(policy, "config.json")):
        raise UserError(f"run dir {run_dir} has no {POLICY_DIR}/ (made before rlmt-jax kept one) and its "
                        f"model.policy {cfg.model.policy} has no config.json: restore that folder to read the run")
    return policy, resolve_model_path(cfg.model.tokenizer_path)


def open_run(path: str | os.PathLike) -> tuple[Path, RunConfig]:
    """(run dir, its config) for a run dir, its checkpoints dir or one step dir; UserError otherwise."""
    run_dir = find_run_dir(path)
    if run_dir is None:
        raise UserError(f"{path}: not inside a run dir (no config.yaml in it or its two parents)")
    return run_dir, load_resolved(run_dir)


def checkpoint_policy(run_dir: Path, cfg: RunConfig, source: Path, step: int | None = None, *,
                      dtype: str | None = None, param_dtype: str | None = None, mesh=None):
    """The CausalLM of a checkpoint of the run (`source`: the run's checkpoints dir or one step dir; `step`:
    None for the newest), params cast to `param_dtype` (default the run's) and, with a mesh, placed on it."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from models import ModelConfig, build_model
    from rlmt_jax.run.checkpoint import params_only

    config_dir, _ = policy_files(run_dir, cfg)
    params = params_only(source, step)
    try:
        model_cfg = ModelConfig.from_pretrained(
            config_dir, dtype=dtype or cfg.runtime.dtype, param_dtype=param_dtype or cfg.runtime.param_dtype,
            scan_layers=cfg.runtime.scan_layers)
    except (OSError, ValueError) as err:
        raise UserError(f"policy config {config_dir}: {err}") from err
    abstract = nnx.eval_shape(lambda: build_model(model_cfg, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract, nnx.Param)
    target = np.dtype(jnp.dtype(model_cfg.param_dtype))
    params = jax.tree.map(lambda a: np.asarray(a).astype(target), params)
    try:
        nnx.replace_by_pure_dict(state, params)
    except (KeyError, ValueError) as err:
        raise UserError(f"the checkpoint in {source} does not match the policy config {config_dir}: {err}") from err
    if mesh is not None:
        from rlmt_jax.scale.mesh import place_unplaced_params

        state = place_unplaced_params(state, mesh)
    return nnx.merge(graphdef, state)
