"""Run configuration: typed frozen dataclasses, YAML files, `key=value` overrides, validation up front.

    cfg = resolve("configs/grpo_llama31_8b_instruct.yaml", ["rollout.temperature=0.8"])
    cfg = resolve(None, [])                  # the shipped tiny default (configs/tiny.yaml)
    text = to_yaml(cfg); load_yaml_text(text) == cfg

Every problem a user can cause (unknown key, wrong type, impossible combination) is one `UserError` that
names the dotted key. Defaults follow the paper's main run (GRPO, Llama-3.1-8B-Instruct, think/strict);
shipped recipes state every number anyway so that a config file reads as the full run.

This module reads and writes config files; the sections are in rlmt_jax.settings.sections, their validation in
rlmt_jax.settings.rules, the `builtin:NAME` paths (the tiny default's models and data) in
rlmt_jax.settings.builtins. It imports their names too, so that `from rlmt_jax.settings.config import ...` is
the one import of the run configuration.

A config file may hold `algorithm_defaults`: per algorithm name, sections that apply when a run picks that
algorithm (`algorithm.name=sft` on the tiny default also picks the tiny SFT data); the user's key=value
overrides still win.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from importlib import resources
from pathlib import Path

import yaml

from rlmt_jax.algorithms.settings import AlgorithmConfig
from rlmt_jax.algorithms.specs import spec_of
from rlmt_jax.core.errors import UserError
from rlmt_jax.core.files import atomic_write
from rlmt_jax.settings.builtins import BUILTIN_DATA, BUILTIN_MODELS, BUILTIN_PREFIX, builtin_name
from rlmt_jax.settings.rules import validate
from rlmt_jax.settings.schema import Schema
from rlmt_jax.settings.sections import (
    CheckpointConfig,
    DataConfig,
    DistributedConfig,
    DType,
    LoggingConfig,
    MeshConfig,
    ModelPaths,
    OptimizerConfig,
    RewardConfig,
    RolloutConfig,
    RolloutMeshConfig,
    RunConfig,
    RunSettings,
    RuntimeConfig,
    TemplateConfig,
    frozen_param_dtype,
)

__all__ = [
    "ALGORITHM_DEFAULTS", "BUILTIN_DATA", "BUILTIN_MODELS", "BUILTIN_PREFIX", "DEFAULT_CONFIG", "KEY_ALIASES",
    "RESOLVED_CONFIG_NAME", "SCHEMA", "AlgorithmConfig", "CheckpointConfig", "DType", "DataConfig",
    "DistributedConfig", "LoggingConfig", "MeshConfig", "ModelPaths", "OptimizerConfig", "RewardConfig",
    "RolloutConfig", "RolloutMeshConfig", "RunConfig", "RunSettings", "RuntimeConfig", "TemplateConfig",
    "builtin_name", "check_distinct_overrides", "find_config", "from_dict", "frozen_param_dtype", "load_resolved",
    "load_yaml_text", "resolve", "save_resolved", "shipped_config_dir", "shipped_configs", "to_yaml", "validate",
    "with_default_advantage",
]

DEFAULT_CONFIG = "tiny.yaml"
RESOLVED_CONFIG_NAME = "config.yaml"
ALGORITHM_DEFAULTS = "algorithm_defaults"  # a config file's per-algorithm sections

# Names other trainers use for our keys, suggested when a user writes them.
KEY_ALIASES = {
    "learning_rate": "optimizer.lr",
    "lambda": "algorithm.ppo.gae_lambda",
    "lam": "algorithm.ppo.gae_lambda",
    "std_normalize": "algorithm.advantage",  # grpo: divided by the group std; drgrpo: not
    "loss_agg_mode": "algorithm.aggregation",
    "value_loss_scale": "algorithm.ppo.value_coef",
    "num_samples": "rollout.n",
    "samples": "rollout.n",
    "samples_per_prompt": "rollout.n",
    "max_tokens": "rollout.max_new_tokens",
}
SCHEMA = Schema(RunConfig, aliases=KEY_ALIASES)


# ---------------------------------------------------------------------------------------------------------
# Files, overrides, YAML.


def shipped_config_dir() -> Path:
    """The package's copy of configs/ (rlmt_jax/configs, package data)."""
    return Path(str(resources.files("rlmt_jax") / "configs"))


def shipped_configs() -> list[str]:
    return sorted(p.name for p in shipped_config_dir().glob("*.yaml"))


def find_config(path_or_name: str) -> Path:
    """A config file by path, or by the name of a shipped config (`tiny`, `grpo_qwen25_7b_zero.yaml`)."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    name = path_or_name if path_or_name.endswith((".yaml", ".yml")) else f"{path_or_name}.yaml"
    if os.sep not in path_or_name and (shipped_config_dir() / name).is_file():
        return shipped_config_dir() / name
    raise UserError(f"config file '{path_or_name}' not found (shipped configs: {', '.join(shipped_configs())})")


def _parse_yaml(text: str, source: str) -> dict:
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"config file '{source}' is not valid YAML: {err}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"config file '{source}' must hold a mapping of sections, got {type(values).__name__}")
    return values


def _merge(base: dict, update: dict) -> None:
    """Nested dicts: `update`'s values set into `base`, section by section."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def _with_algorithm_defaults(values: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """`values` with the file's `algorithm_defaults` section for the run's algorithm (after the overrides)
    merged in, and that section removed. Every section is checked, picked or not (a misspelt algorithm or key)."""
    by_algorithm = values.pop(ALGORITHM_DEFAULTS, None)
    if by_algorithm is None:
        return values
    if not isinstance(by_algorithm, dict) or not all(isinstance(v, dict) for v in by_algorithm.values()):
        raise UserError(f"config key '{ALGORITHM_DEFAULTS}' must map algorithm names to config sections")
    for name, section in by_algorithm.items():
        checked = copy.deepcopy(values)
        _merge(checked, {**section, "algorithm": {**section.get("algorithm", {}), "name": name}})
        try:
            SCHEMA.build(checked)
        except UserError as err:
            raise UserError(f"{ALGORITHM_DEFAULTS}.{name}: {err}") from None
    chosen = copy.deepcopy(values)
    for override in overrides:
        SCHEMA.apply_override(chosen, override)
    name = (chosen.get("algorithm") or {}).get("name", AlgorithmConfig.name)
    _merge(values, by_algorithm.get(name, {}))
    return values


def check_distinct_overrides(overrides: list[str] | tuple[str, ...]) -> None:
    """A key given twice on a command line is a UserError naming it (which one was meant cannot be told).
    Programs that build override lists (base + changes, the last one winning) call `resolve` directly."""
    seen: dict[str, str] = {}
    for override in overrides:
        key = override.partition("=")[0].strip()
        if key in seen:
            raise UserError(f"config key '{key}' is set twice ({seen[key]} and {override}): keep one")
        seen[key] = override


def from_dict(values: dict, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Builds and validates a config from nested dicts (with an optional `algorithm_defaults` section) plus
    `key=value` overrides."""
    values = _with_algorithm_defaults(copy.deepcopy(values), overrides)
    for override in overrides:
        SCHEMA.apply_override(values, override)
    return validate(with_default_advantage(SCHEMA.build(values)))


def with_default_advantage(cfg: RunConfig) -> RunConfig:
    """algorithm.advantage null -> the algorithm's own estimator (grpo: grpo, ppo: gae), so the resolved
    config names what runs."""
    algo = cfg.algorithm
    default = spec_of(cfg).default_advantage
    if algo.advantage is None and default is not None:
        cfg = dataclasses.replace(cfg, algorithm=dataclasses.replace(algo, advantage=default))
    return cfg


def load_yaml_text(text: str, overrides: list[str] | tuple[str, ...] = (), source: str = "<text>") -> RunConfig:
    return from_dict(_parse_yaml(text, source), overrides)


def resolve(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The validated config of a YAML file (None: the shipped tiny default) with `key=value` overrides."""
    file = find_config(DEFAULT_CONFIG if path is None else os.fspath(path))
    try:
        text = file.read_text()
    except OSError as err:
        raise UserError(f"config file '{file}' cannot be read: {err.strerror}") from None
    return load_yaml_text(text, overrides, source=str(file))


def to_yaml(cfg: RunConfig) -> str:
    """The full config as YAML; `load_yaml_text(to_yaml(cfg)) == cfg`."""
    return yaml.safe_dump(SCHEMA.to_dict(cfg), sort_keys=False, default_flow_style=None, width=110)


def save_resolved(cfg: RunConfig, run_dir: str | os.PathLike) -> Path:
    """Writes the resolved config to `run_dir/config.yaml` atomically (no half-written file) and returns it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / RESOLVED_CONFIG_NAME
    with atomic_write(target) as f:
        f.write(to_yaml(cfg))
    return target


def load_resolved(run_dir: str | os.PathLike) -> RunConfig:
    """The config a run saved with `save_resolved`."""
    path = Path(run_dir) / RESOLVED_CONFIG_NAME
    if not path.is_file():
        raise UserError(f"'{run_dir}' is not a run dir: it has no {RESOLVED_CONFIG_NAME}")
    return load_yaml_text(path.read_text(), source=str(path))
