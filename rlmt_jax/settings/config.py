"""Run configuration: typed frozen dataclasses, YAML files, `key=value` overrides, validation up front.

    cfg = resolve("configs/grpo_llama31_8b_instruct.yaml", ["rollout.temperature=0.8"])
    cfg = resolve(None, [])                  # the shipped tiny default (configs/tiny.yaml)
    text = to_yaml(cfg); load_yaml_text(text) == cfg

Every problem a user can cause (unknown key, wrong type, impossible combination) is one `UserError` that
names the dotted key. Defaults follow the paper's main run (GRPO, Llama-3.1-8B-Instruct, think/strict);
shipped recipes state every number anyway so that a config file reads as the full run.

Paths of the form `builtin:NAME` name things the package ships or makes itself (the tiny default):
`builtin:tiny-policy` and `builtin:tiny-reward` are built by the trainer from a fixed seed,
`builtin:tiny-prompts` is the prompt set in rlmt_jax/resources, `builtin:tiny-sft` 40 of its prompts with
a written plan and answer each (the SFT conversations of the tiny default).

A config file may hold `algorithm_defaults`: per algorithm name, sections that apply when a run picks that
algorithm (`algorithm.name=sft` on the tiny default also picks the tiny SFT data); the user's key=value
overrides still win.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml

from rlmt_jax.algorithms.settings import AlgorithmConfig  # the `algorithm:` section, also the loss config
from rlmt_jax.algorithms.specs import check_variants, spec_of
from rlmt_jax.core.errors import UserError
from rlmt_jax.core.files import atomic_write
from rlmt_jax.settings.schema import Schema

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = ("tiny-policy", "tiny-reward")
BUILTIN_DATA = {"tiny-prompts": "tiny_prompts.jsonl", "tiny-sft": "tiny_sft.jsonl"}
DEFAULT_CONFIG = "tiny.yaml"
RESOLVED_CONFIG_NAME = "config.yaml"
ALGORITHM_DEFAULTS = "algorithm_defaults"  # a config file's per-algorithm sections

DType = Literal["float32", "bfloat16"]


@dataclass(frozen=True)
class ModelPaths:
    """Where the models live: Hugging Face directories (a hub id-like path is a local dir you provide)."""

    policy: str | None = None
    reference: str | None = None  # None: the initial policy
    reward_model: str | None = None
    critic: str | None = None  # None: the policy checkpoint with a fresh value head (PPO)
    tokenizer: str | None = None  # None: the policy's tokenizer

    @property
    def reference_path(self) -> str | None:
        return self.reference or self.policy

    @property
    def critic_path(self) -> str | None:
        return self.critic or self.policy

    @property
    def tokenizer_path(self) -> str | None:
        return self.tokenizer or self.policy


@dataclass(frozen=True)
class TemplateConfig:
    """How prompts are rendered and how a plan is split from the answer."""

    mode: Literal["think", "zero", "none"] = "think"
    strict: bool = False  # a missing delimiter turns the answer into "[NULL]"
    format_penalty: float | None = None  # a fixed reward for malformed output; None: the RM scores it
    zero_family: Literal["llama", "qwen"] | None = None  # picks the EOS text of the zero template


@dataclass(frozen=True)
class DataConfig:
    """The prompt set (RL) or the conversations with thinking traces (SFT)."""

    train_path: str | None = None
    format: Literal["auto", "jsonl", "parquet", "datasets"] = "auto"
    prompt_column: str | None = None  # None: `messages`, else `prompt`
    max_prompt_tokens: int = 1024  # the prompt limit, in policy tokens of the rendered prompt
    # a longer prompt: cut from the left (its first tokens, BOS and chat header among them, are lost), dropped
    # from the data, or an error naming its row; the trainer logs how many there are once at the start
    overlong: Literal["truncate_left", "drop", "error"] = "truncate_left"
    shuffle_seed: int = 0
    epochs: int = 1


@dataclass(frozen=True)
class RolloutMeshConfig:
    """The decode layout: the devices of `mesh`, in its order, regrouped as data x tensor for sampling.

    Before each step's sampling the policy's params are copied once into this layout in runtime.dtype
    (tensor: 1 = a whole copy on every device, rows split data-parallel; tensor: k = tensor-parallel groups of
    k consecutive devices), so the decode loop moves no weights between devices; the copy is dropped after
    sampling. -1 fills what is left (at most one). reshard: false samples from the training params where they
    are (FSDP: every layer's weights gathered at every generated token; for comparison only).
    """

    reshard: bool = True
    data: int = -1
    tensor: int = 1


@dataclass(frozen=True)
class RolloutConfig:
    """Sampling from the policy."""

    n: int = 8  # samples per prompt
    prompts_per_step: int = 64  # over all hosts
    max_new_tokens: int = 4096
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int | None = None  # None: off
    prompt_buckets: tuple[int, ...] = ()  # padded prompt lengths; data.max_prompt_tokens is always one
    cache_dtype: DType | None = None  # None: runtime.dtype
    # Windows of the decode loop: in window j attention reads the prompt and the response slots of windows 0..j
    # only. null: 4 from max_new_tokens >= 128 on, else 1 (rlmt_jax.rollout.sampling.SamplingConfig.decode_windows).
    decode_windows: int | None = None
    mesh: RolloutMeshConfig = field(default_factory=RolloutMeshConfig)
    # DAPO's dynamic sampling: a registered group filter (rlmt_jax.algorithms.group_filters; `varied` drops the
    # groups whose rewards are all equal) and more rounds of prompts_per_step prompts until prompts_per_step
    # groups are kept, at most max_sampling_rounds rounds (then dropped groups fill the step). null: off
    group_filter: str | None = None
    max_sampling_rounds: int = 10


@dataclass(frozen=True)
class RewardConfig:
    """How the reward model is fed (it re-renders prompt + answer with its own tokenizer and template)."""

    max_length: int = 8192  # longer inputs are cut (counted in the metrics)
    truncation_side: Literal["right", "left"] = "right"
    batch_size: int = 8  # rows per jitted scoring call
    label: str | None = None  # the reward model's label that is the reward (a name or index); None: it has one


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW for the policy (the PPO critic uses the same settings with algorithm.ppo.critic_lr)."""

    lr: float = 1e-6
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # global norm; None: off
    micro_batch_size: int = 8  # sequences per forward/backward over the whole mesh; grads accumulate


@dataclass(frozen=True)
class RuntimeConfig:
    """How the models compute."""

    dtype: DType = "bfloat16"
    param_dtype: DType = "float32"
    remat: Literal["none", "full", "dots"] = "full"
    scan_layers: bool = True
    # full-sequence attention (training, log-probs, prefill, reward scoring), models/attention.py: auto = splash
    # on TPU, cuDNN flash on GPU (bfloat16), xla (the blocked path written for CPU) elsewhere
    attention: Literal["auto", "xla", "splash", "cudnn"] = "auto"


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes, as rlmt_jax.scale.mesh reads them.

    `data`, `fsdp`, `tensor` are the sizes inside one slice (ICI; on GPU: inside one host); `dcn_*` the
    sizes across slices (or hosts), linked by the slower data-centre network. A mesh axis is ici x dcn.
    -1 fills what is left: at most one -1 among the ICI sizes and one among the DCN sizes. The defaults
    shard FSDP inside a slice and replicate across slices.
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    dcn_data: int = -1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1

    @property
    def ici_sizes(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    @property
    def dcn_sizes(self) -> tuple[int, int, int]:
        return (self.dcn_data, self.dcn_fsdp, self.dcn_tensor)


@dataclass(frozen=True)
class DistributedConfig:
    """Multi-host start. All null: found from the environment (TPU VM, SLURM, JAX_* variables), or one host."""

    coordinator_address: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str | None = None  # None: <run.output_dir>/checkpoints
    save_every: int = 50  # steps; also at the end
    keep: int = 3  # the newest checkpoints kept, plus the best one
    best_metric: str | None = None  # a metrics.jsonl key; None: no best kept
    best_mode: Literal["max", "min"] = "max"
    async_save: bool = True
    restore_step: int | None = None  # resume from this older step (newer ones are set aside); None: the newest


@dataclass(frozen=True)
class LoggingConfig:
    every: int = 1  # steps between metric lines
    samples_per_step: int = 4  # rollouts written to samples.jsonl
    tensorboard: bool = True
    wandb_project: str | None = None


@dataclass(frozen=True)
class RunSettings:
    output_dir: str = "runs/default"
    seed: int = 0
    total_steps: int | None = None  # None: every batch of data.epochs passes
    export_at_end: bool = True


@dataclass(frozen=True)
class RunConfig:
    run: RunSettings = field(default_factory=RunSettings)
    model: ModelPaths = field(default_factory=ModelPaths)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def prompt_buckets(self) -> tuple[int, ...]:
        """The padded prompt lengths the sampler compiles for, ending at data.max_prompt_tokens."""
        limit = self.data.max_prompt_tokens
        return tuple(b for b in self.rollout.prompt_buckets if b < limit) + (limit,)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.run.output_dir, "checkpoints")


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
# Validation of combinations: one UserError naming the key.


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise UserError(f"config key '{key}' {message}")


def validate(cfg: RunConfig) -> RunConfig:
    """Raises one UserError naming the key for the first impossible value or combination; returns cfg."""
    algo, roll, tmpl, opt, mesh = cfg.algorithm, cfg.rollout, cfg.template, cfg.optimizer, cfg.mesh
    spec = spec_of(cfg)

    _check(cfg.model.policy is not None, "model.policy", "is required: the policy's Hugging Face directory")
    if spec.reward_model:
        _check(cfg.model.reward_model is not None, "model.reward_model",
               f"is required by algorithm.name={algo.name}")
    _check(cfg.data.train_path is not None, "data.train_path", "is required: a JSONL, Parquet or datasets dir")
    for key in ("policy", "reference", "reward_model", "critic", "tokenizer"):
        path = getattr(cfg.model, key)
        if path is not None and path.startswith(BUILTIN_PREFIX):
            name = path[len(BUILTIN_PREFIX):]
            _check(name in BUILTIN_MODELS, f"model.{key}",
                   f"names an unknown built-in model {path!r}; built-ins: "
                   + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS))
    if cfg.data.train_path and cfg.data.train_path.startswith(BUILTIN_PREFIX):
        name = cfg.data.train_path[len(BUILTIN_PREFIX):]
        _check(name in BUILTIN_DATA, "data.train_path",
               f"names an unknown built-in data set {cfg.data.train_path!r}; built-ins: "
               + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_DATA))

    # template
    if tmpl.mode == "zero":
        _check(tmpl.zero_family is not None, "template.zero_family",
               "is required with template.mode=zero: llama or qwen (it picks the EOS text)")
    else:
        _check(tmpl.zero_family is None, "template.zero_family",
               f"is only used with template.mode=zero (mode is {tmpl.mode}): remove it")
    if tmpl.mode == "none":
        _check(not tmpl.strict, "template.strict", "needs a plan to check: set it false with template.mode=none")
        _check(tmpl.format_penalty is None, "template.format_penalty",
               "needs a format to check: leave it null with template.mode=none")

    # data
    _check(cfg.data.max_prompt_tokens >= 1, "data.max_prompt_tokens", "must be >= 1")
    _check(cfg.data.epochs >= 1, "data.epochs", "must be >= 1")
    _check(cfg.data.prompt_column != "", "data.prompt_column", "must be a column name or null")

    # rollout
    _check(roll.n >= 1, "rollout.n", "must be >= 1")
    _check(roll.prompts_per_step >= 1, "rollout.prompts_per_step", "must be >= 1")
    _check(roll.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
    _check(roll.temperature > 0, "rollout.temperature",
           "must be > 0 (log-probs are taken from logits / temperature)")
    _check(0 < roll.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {roll.top_p}")
    _check(roll.top_k is None or roll.top_k >= 1, "rollout.top_k", "must be >= 1 or null (off)")
    _check(roll.decode_windows is None or roll.decode_windows >= 1, "rollout.decode_windows",
           "must be >= 1 or null (automatic)")
    for name in ("data", "tensor"):
        size = getattr(roll.mesh, name)
        _check(size == -1 or size >= 1, f"rollout.mesh.{name}", f"must be >= 1 or -1 (fill), got {size}")
    _check(roll.mesh.data != -1 or roll.mesh.tensor != -1, "rollout.mesh.tensor",
           "cannot be -1 too: one of rollout.mesh.data and rollout.mesh.tensor only may fill the rest")
    buckets = roll.prompt_buckets
    _check(all(b >= 1 for b in buckets), "rollout.prompt_buckets", "must hold positive lengths")
    _check(list(buckets) == sorted(set(buckets)), "rollout.prompt_buckets", "must be strictly increasing")
    _check(not buckets or buckets[-1] <= cfg.data.max_prompt_tokens, "rollout.prompt_buckets",
           f"must not exceed data.max_prompt_tokens ({cfg.data.max_prompt_tokens})")

    # algorithm
    spec.check(cfg, _check)
    check_variants(cfg, _check)
    _check(0 < algo.clip_low <= 1, "algorithm.clip_low", "must be in (0, 1] (1: no lower bound)")
    _check(algo.clip_high > 0, "algorithm.clip_high", "must be > 0")
    _check(algo.dual_clip is None or algo.dual_clip > 1, "algorithm.dual_clip", "must be > 1 or null (off)")
    _check(algo.kl_coef >= 0, "algorithm.kl_coef", "must be >= 0")
    _check(algo.entropy_coef >= 0, "algorithm.entropy_coef", "must be >= 0")
    _check(algo.update_epochs >= 1, "algorithm.update_epochs", "must be >= 1")
    if algo.overlong_buffer is not None:
        _check(0 < algo.overlong_buffer <= roll.max_new_tokens, "algorithm.overlong_buffer",
               f"must be in [1, rollout.max_new_tokens = {roll.max_new_tokens}] or null (off)")
    _check(algo.overlong_penalty >= 0, "algorithm.overlong_penalty", "must be >= 0")
    corr = algo.rollout_correction
    _check(corr.weight_cap >= 1, "algorithm.rollout_correction.weight_cap", "must be >= 1")
    _check(0 <= corr.mask_low <= 1 <= corr.mask_high, "algorithm.rollout_correction.mask_low",
           f"and mask_high must hold 1 between them (0 <= low <= 1 <= high), got {corr.mask_low}, {corr.mask_high}")
    _check(not corr.bypass or (corr.weights == "off" and corr.mask == "off"), "algorithm.rollout_correction.bypass",
           "leaves nothing to correct (the sampler's log-probs are the old ones): set weights and mask to off")
    _check(algo.grpo.eps > 0, "algorithm.grpo.eps", "must be > 0")
    _check(0 <= algo.ppo.gamma <= 1, "algorithm.ppo.gamma", "must be in [0, 1]")
    _check(0 <= algo.ppo.gae_lambda <= 1, "algorithm.ppo.gae_lambda", "must be in [0, 1]")
    _check(algo.ppo.value_clip is None or algo.ppo.value_clip > 0, "algorithm.ppo.value_clip",
           "must be > 0 or null (off)")
    _check(algo.ppo.value_coef > 0, "algorithm.ppo.value_coef", "must be > 0")
    _check(algo.ppo.critic_lr > 0, "algorithm.ppo.critic_lr", "must be > 0")
    _check(algo.dpo.beta > 0, "algorithm.dpo.beta", "must be > 0")
    _check(0 <= algo.dpo.label_smoothing < 0.5, "algorithm.dpo.label_smoothing", "must be in [0, 0.5)")
    _check(algo.dpo.max_pair_tokens >= 2, "algorithm.dpo.max_pair_tokens", "must be >= 2")
    _check(algo.dpo.epochs >= 1, "algorithm.dpo.epochs", "must be >= 1")
    _check(algo.dpo.batch_size >= 1, "algorithm.dpo.batch_size", "must be >= 1")
    _check(algo.sft.epochs >= 1, "algorithm.sft.epochs", "must be >= 1")
    _check(algo.sft.batch_size >= 1, "algorithm.sft.batch_size", "must be >= 1")
    _check(algo.sft.max_seq_tokens >= 2, "algorithm.sft.max_seq_tokens", "must be >= 2")

    # optimizer
    _check(opt.lr > 0, "optimizer.lr", "must be > 0")
    _check(0 <= opt.warmup_ratio < 1, "optimizer.warmup_ratio", "must be in [0, 1)")
    _check(opt.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
    _check(all(0 <= b < 1 for b in opt.betas), "optimizer.betas", "must both be in [0, 1)")
    _check(opt.eps > 0, "optimizer.eps", "must be > 0")
    _check(opt.grad_clip is None or opt.grad_clip > 0, "optimizer.grad_clip", "must be > 0 or null (off)")
    _check(opt.micro_batch_size >= 1, "optimizer.micro_batch_size", "must be >= 1")
    batch = spec.update_batch(cfg)
    _check(batch.rows % opt.micro_batch_size == 0, "optimizer.micro_batch_size",
           f"({opt.micro_batch_size}) must divide the update batch, {batch.keys} = {batch.rows}")

    # mesh (whether the sizes fit the devices is checked when the mesh is made)
    for part, names in (("ICI", ("data", "fsdp", "tensor")), ("DCN", ("dcn_data", "dcn_fsdp", "dcn_tensor"))):
        for name in names:
            size = getattr(mesh, name)
            _check(size == -1 or size >= 1, f"mesh.{name}", f"must be >= 1 or -1 (fill), got {size}")
        fills = [name for name in names if getattr(mesh, name) == -1]
        _check(len(fills) <= 1, f"mesh.{fills[-1]}" if fills else "mesh",
               f"cannot be -1 too: one {part} size only may fill the rest (-1 on {', '.join(fills)})")
    dist = cfg.distributed
    if dist.num_processes is not None:
        _check(dist.num_processes >= 1, "distributed.num_processes", "must be >= 1")
        if dist.num_processes > 1:
            _check(dist.coordinator_address is not None, "distributed.coordinator_address",
                   "is required with distributed.num_processes > 1: host:port of process 0")
            _check(dist.process_id is not None and 0 <= dist.process_id < dist.num_processes,
                   "distributed.process_id", f"must be in [0, {dist.num_processes}) (distributed.num_processes)")

    _check(cfg.reward.max_length >= 1, "reward.max_length", "must be >= 1")
    _check(cfg.reward.batch_size >= 1, "reward.batch_size", "must be >= 1")

    # checkpoint, logging, run
    ckpt = cfg.checkpoint
    _check(ckpt.save_every >= 1, "checkpoint.save_every", "must be >= 1")
    _check(ckpt.keep >= 1, "checkpoint.keep", "must be >= 1")
    _check(ckpt.best_metric != "", "checkpoint.best_metric", "must be a metric name or null")
    _check(cfg.logging.every >= 1, "logging.every", "must be >= 1")
    _check(cfg.logging.samples_per_step >= 0, "logging.samples_per_step", "must be >= 0")
    _check(bool(cfg.run.output_dir), "run.output_dir", "must be a directory path")
    _check(cfg.run.total_steps is None or cfg.run.total_steps >= 1, "run.total_steps", "must be >= 1 or null")
    return cfg


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


def builtin_name(path: str | None) -> str | None:
    """'tiny-policy' for 'builtin:tiny-policy'; None for an ordinary path."""
    if path is not None and path.startswith(BUILTIN_PREFIX):
        return path[len(BUILTIN_PREFIX):]
    return None


def frozen_param_dtype(runtime: RuntimeConfig) -> str:
    """The dtype the frozen models (reference, reward model) are stored in: runtime.dtype when it is bfloat16
    (every matmul casts its weights to it anyway, so their results do not change), else runtime.param_dtype."""
    return "bfloat16" if runtime.dtype == "bfloat16" else runtime.param_dtype
