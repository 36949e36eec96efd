"""The sections of a run config, each a frozen dataclass that checks its own fields, and `RunConfig`, their root.

    cfg.rollout.check()                     # UserError "config key 'rollout.top_p' must be in (0, 1], got 2.0"
    check_algorithm(cfg.algorithm)          # the `algorithm:` section's dataclasses live in rlmt_jax.algorithms

A section's `check` sees only its own fields; rules that read several sections are in rlmt_jax.settings.rules.
Defaults follow the paper's main run (GRPO, Llama-3.1-8B-Instruct, think/strict).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from rlmt_jax.algorithms.settings import AlgorithmConfig  # the `algorithm:` section, also the loss config
from rlmt_jax.algorithms.specs import Check  # check(condition, key, message) raises a UserError naming the key
from rlmt_jax.core.errors import UserError
from rlmt_jax.settings.builtins import BUILTIN_DATA, BUILTIN_MODELS, builtin_list, builtin_name

DType = Literal["float32", "bfloat16"]


def require(condition: bool, key: str, message: str) -> None:
    """The one error of validation: `config key '<key>' <message>`, a UserError, unless `condition` holds."""
    if not condition:
        raise UserError(f"config key '{key}' {message}")


def keyed(section: str) -> Check:
    """`require` for the keys of one section: keyed('rollout')(ok, 'n', message) names `rollout.n`."""
    return lambda condition, name, message: require(condition, f"{section}.{name}", message)


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

    def check(self, section: str = "model") -> None:
        """A `builtin:` path names a built-in model. (Which models a run needs: rlmt_jax.settings.rules.)"""
        check = keyed(section)
        for key in ("policy", "reference", "reward_model", "critic", "tokenizer"):
            path = getattr(self, key)
            name = builtin_name(path)
            check(name is None or name in BUILTIN_MODELS, key,
                  f"names an unknown built-in model {path!r}; built-ins: {builtin_list(BUILTIN_MODELS)}")


@dataclass(frozen=True)
class TemplateConfig:
    """How prompts are rendered and how a plan is split from the answer."""

    mode: Literal["think", "zero", "none"] = "think"
    strict: bool = False  # a missing delimiter turns the answer into "[NULL]"
    format_penalty: float | None = None  # a fixed reward for malformed output; None: the RM scores it
    zero_family: Literal["llama", "qwen"] | None = None  # picks the EOS text of the zero template

    def check(self, section: str = "template") -> None:
        check = keyed(section)
        if self.mode == "zero":
            check(self.zero_family is not None, "zero_family",
                  "is required with template.mode=zero: llama or qwen (it picks the EOS text)")
        else:
            check(self.zero_family is None, "zero_family",
                  f"is only used with template.mode=zero (mode is {self.mode}): remove it")
        if self.mode == "none":
            check(not self.strict, "strict", "needs a plan to check: set it false with template.mode=none")
            check(self.format_penalty is None, "format_penalty",
                  "needs a format to check: leave it null with template.mode=none")


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

    def check(self, section: str = "data") -> None:
        check = keyed(section)
        name = builtin_name(self.train_path)
        check(name is None or name in BUILTIN_DATA, "train_path",
              f"names an unknown built-in data set {self.train_path!r}; built-ins: {builtin_list(BUILTIN_DATA)}")
        check(self.max_prompt_tokens >= 1, "max_prompt_tokens", "must be >= 1")
        check(self.epochs >= 1, "epochs", "must be >= 1")
        check(self.prompt_column != "", "prompt_column", "must be a column name or null")


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

    def check(self, section: str = "rollout.mesh") -> None:
        check = keyed(section)
        for name in ("data", "tensor"):
            size = getattr(self, name)
            check(size == -1 or size >= 1, name, f"must be >= 1 or -1 (fill), got {size}")
        check(self.data != -1 or self.tensor != -1, "tensor",
              "cannot be -1 too: one of rollout.mesh.data and rollout.mesh.tensor only may fill the rest")


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
    # How a batch's rows are decoded (rlmt_jax.rollout): static, all rows together until the longest stops
    # (rollout.sampling.Sampler); slots, a fixed number of slots per data-parallel replica of the rollout mesh,
    # each with its own KV cache, refilled with the next rows between jitted chunks of chunk_tokens steps
    # (rollout.slot_sampler.SlotSampler). Both give the same tokens for the same key.
    engine: Literal["static", "slots"] = "static"
    slots: int = 64  # per data-parallel replica (engine: slots); the KV cache holds this many rows, not all
    chunk_tokens: int = 64  # decode steps per jitted chunk (engine: slots); stopped rows are handed back between
    # Partial rollouts (engine: slots): k >= 1 lets slots freed in a step's tail start the rows of the next k
    # steps with the current policy; a row finishes by the end of its own step, so no token is older than k
    # versions; each token is recorded with the policy version that chose it, and the update corrects for
    # them (algorithm.rollout_correction). 0: on-policy, every row in its step.
    max_staleness: int = 0
    # What the rows still decoding when a step's own are done take past the update (max_staleness >= 1):
    # recompute, their caches computed again with the new weights (exact behaviour log-probs, exact resume);
    # keep, their slots' caches as they are (no prefill; the cache stays resident through the update; a resumed
    # run recomputes them). rlmt_jax.rollout.slot_sampler.CARRIED_CACHE
    carried_cache: Literal["recompute", "keep"] = "recompute"
    mesh: RolloutMeshConfig = field(default_factory=RolloutMeshConfig)
    # Placement of the decode engine. 0: colocated, the engine on every device, paused while the update runs.
    # d >= 1: split, each host's last d devices decode while its other devices train (rollout.mesh then
    # regroups those d per host); the engine samples step t + 1's rows with the weights before update t while
    # update t runs, so every token is one version old (needs max_staleness 1 and a rollout correction), and
    # the new weights are pushed host-locally after each update (rlmt_jax.rollout.split_engine).
    devices: int = 0
    # DAPO's dynamic sampling: a registered group filter (rlmt_jax.algorithms.group_filters; `varied` drops the
    # groups whose rewards are all equal) and more rounds of prompts_per_step prompts until prompts_per_step
    # groups are kept, at most max_sampling_rounds rounds (then dropped groups fill the step). null: off
    group_filter: str | None = None
    max_sampling_rounds: int = 10

    def check(self, section: str = "rollout") -> None:
        """The sampling settings; group_filter and max_sampling_rounds are checked with the algorithm
        (rlmt_jax.algorithms.specs.check_variants)."""
        check = keyed(section)
        check(self.n >= 1, "n", "must be >= 1")
        check(self.prompts_per_step >= 1, "prompts_per_step", "must be >= 1")
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        check(self.temperature > 0, "temperature", "must be > 0 (log-probs are taken from logits / temperature)")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.top_k is None or self.top_k >= 1, "top_k", "must be >= 1 or null (off)")
        check(self.decode_windows is None or self.decode_windows >= 1, "decode_windows",
              "must be >= 1 or null (automatic)")
        check(self.slots >= 1, "slots", f"must be >= 1, got {self.slots}")
        check(self.chunk_tokens >= 1, "chunk_tokens", f"must be >= 1, got {self.chunk_tokens}")
        check(isinstance(self.max_staleness, int) and self.max_staleness >= 0, "max_staleness",
              f"must be an int >= 0 (0: on-policy; k: rows may start up to k steps ahead), got {self.max_staleness}")
        check(isinstance(self.devices, int) and self.devices >= 0, "devices",
              f"must be an int >= 0 (0: colocated; d: each host's last d devices decode), got {self.devices}")
        self.mesh.check(f"{section}.mesh")
        buckets = self.prompt_buckets
        check(all(b >= 1 for b in buckets), "prompt_buckets", "must hold positive lengths")
        check(list(buckets) == sorted(set(buckets)), "prompt_buckets", "must be strictly increasing")


@dataclass(frozen=True)
class RewardConfig:
    """How the reward model is fed (it re-renders prompt + answer with its own tokenizer and template)."""

    max_length: int = 8192  # longer inputs are cut (counted in the metrics)
    truncation_side: Literal["right", "left"] = "right"
    batch_size: int = 8  # rows per jitted scoring call
    label: str | None = None  # the reward model's label that is the reward (a name or index); None: it has one

    def check(self, section: str = "reward") -> None:
        check = keyed(section)
        check(self.max_length >= 1, "max_length", "must be >= 1")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")


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

    def check(self, section: str = "optimizer") -> None:
        """The AdamW settings; whether micro_batch_size divides the update batch: rlmt_jax.settings.rules."""
        check = keyed(section)
        check(self.lr > 0, "lr", "must be > 0")
        check(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(all(0 <= b < 1 for b in self.betas), "betas", "must both be in [0, 1)")
        check(self.eps > 0, "eps", "must be > 0")
        check(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "must be > 0 or null (off)")
        check(self.micro_batch_size >= 1, "micro_batch_size", "must be >= 1")


@dataclass(frozen=True)
class RuntimeConfig:
    """How the models compute."""

    dtype: DType = "bfloat16"
    param_dtype: DType = "float32"
    remat: Literal["none", "full", "dots"] = "full"
    # scan the decoder layers (one compiled block); "auto": from models.config.SCAN_LAYERS_FROM (10) layers on
    scan_layers: bool | Literal["auto"] = True
    # full-sequence attention (training, log-probs, prefill, reward scoring), models/attention.py: auto = splash
    # on TPU, cuDNN flash on GPU (bfloat16), xla (the blocked path written for CPU) elsewhere
    attention: Literal["auto", "xla", "splash", "cudnn"] = "auto"


def frozen_param_dtype(runtime: RuntimeConfig) -> str:
    """The dtype the frozen models (reference, reward model) are stored in: runtime.dtype when it is bfloat16
    (every matmul casts its weights to it anyway, so their results do not change), else runtime.param_dtype."""
    return "bfloat16" if runtime.dtype == "bfloat16" else runtime.param_dtype


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

    def check(self, section: str = "mesh") -> None:
        """Sizes >= 1 or one -1 per group (whether they fit the devices is checked when the mesh is made)."""
        check = keyed(section)
        for part, names in (("ICI", ("data", "fsdp", "tensor")), ("DCN", ("dcn_data", "dcn_fsdp", "dcn_tensor"))):
            for name in names:
                size = getattr(self, name)
                check(size == -1 or size >= 1, name, f"must be >= 1 or -1 (fill), got {size}")
            fills = [name for name in names if getattr(self, name) == -1]
            check(len(fills) <= 1, (fills or names)[-1],
                  f"cannot be -1 too: one {part} size only may fill the rest (-1 on {', '.join(fills)})")


@dataclass(frozen=True)
class DistributedConfig:
    """Multi-host start. All null: found from the environment (TPU VM, SLURM, JAX_* variables), or one host."""

    coordinator_address: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None

    def check(self, section: str = "distributed") -> None:
        if self.num_processes is None:
            return
        check = keyed(section)
        check(self.num_processes >= 1, "num_processes", "must be >= 1")
        if self.num_processes > 1:
            check(self.coordinator_address is not None, "coordinator_address",
                  "is required with distributed.num_processes > 1: host:port of process 0")
            check(self.process_id is not None and 0 <= self.process_id < self.num_processes, "process_id",
                  f"must be in [0, {self.num_processes}) (distributed.num_processes)")


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str | None = None  # None: <run.output_dir>/checkpoints
    save_every: int = 50  # steps; also at the end
    keep: int = 3  # the newest checkpoints kept, plus the best one
    best_metric: str | None = None  # a metrics.jsonl key; None: no best kept
    best_mode: Literal["max", "min"] = "max"
    async_save: bool = True
    restore_step: int | None = None  # resume from this older step (newer ones are set aside); None: the newest

    def check(self, section: str = "checkpoint") -> None:
        check = keyed(section)
        check(self.save_every >= 1, "save_every", "must be >= 1")
        check(self.keep >= 1, "keep", "must be >= 1")
        check(self.best_metric != "", "best_metric", "must be a metric name or null")


@dataclass(frozen=True)
class LoggingConfig:
    every: int = 1  # steps between metric lines
    samples_per_step: int = 4  # rollouts written to samples.jsonl
    tensorboard: bool = True
    wandb_project: str | None = None

    def check(self, section: str = "logging") -> None:
        check = keyed(section)
        check(self.every >= 1, "every", "must be >= 1")
        check(self.samples_per_step >= 0, "samples_per_step", "must be >= 0")


@dataclass(frozen=True)
class RunSettings:
    output_dir: str = "runs/default"
    seed: int = 0
    total_steps: int | None = None  # None: every batch of data.epochs passes
    export_at_end: bool = True

    def check(self, section: str = "run") -> None:
        check = keyed(section)
        check(bool(self.output_dir), "output_dir", "must be a directory path")
        check(self.total_steps is None or self.total_steps >= 1, "total_steps", "must be >= 1 or null")


@dataclass(frozen=True)
class RunConfig:
    """A whole run: its sections, in the order a config file lists them."""

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


# ---------------------------------------------------------------------------------------------------------
# The `algorithm:` section: its dataclasses are the loss config (rlmt_jax.algorithms.settings), its own checks
# are here. Which registered names it may pick, and what each algorithm needs: rlmt_jax.algorithms.specs.


def check_algorithm(algo: AlgorithmConfig, section: str = "algorithm") -> None:
    """The clip, KL, entropy and update settings, then each algorithm's subsection; algorithm.overlong_buffer,
    which is bounded by rollout.max_new_tokens, is checked in rlmt_jax.settings.rules."""
    check = keyed(section)
    check(0 < algo.clip_low <= 1, "clip_low", "must be in (0, 1] (1: no lower bound)")
    check(algo.clip_high > 0, "clip_high", "must be > 0")
    check(algo.dual_clip is None or algo.dual_clip > 1, "dual_clip", "must be > 1 or null (off)")
    check(algo.kl_coef >= 0, "kl_coef", "must be >= 0")
    check(algo.entropy_coef >= 0, "entropy_coef", "must be >= 0")
    check(algo.update_epochs >= 1, "update_epochs", "must be >= 1")
    check(algo.overlong_penalty >= 0, "overlong_penalty", "must be >= 0")
    corr = algo.rollout_correction
    check(corr.weight_cap >= 1, "rollout_correction.weight_cap", "must be >= 1")
    check(0 <= corr.mask_low <= 1 <= corr.mask_high, "rollout_correction.mask_low",
          f"and mask_high must hold 1 between them (0 <= low <= 1 <= high), got {corr.mask_low}, {corr.mask_high}")
    check(not corr.bypass or (corr.weights == "off" and corr.mask == "off"), "rollout_correction.bypass",
          "leaves nothing to correct (the sampler's log-probs are the old ones): set weights and mask to off")
    _check_algorithm_subsections(algo, check)


def _check_algorithm_subsections(algo: AlgorithmConfig, check: Check) -> None:
    """algorithm.grpo, .ppo, .dpo, .sft (each checked whichever algorithm runs: a config file states them all)."""
    check(algo.grpo.eps > 0, "grpo.eps", "must be > 0")
    ppo = algo.ppo
    check(0 <= ppo.gamma <= 1, "ppo.gamma", "must be in [0, 1]")
    check(0 <= ppo.gae_lambda <= 1, "ppo.gae_lambda", "must be in [0, 1]")
    check(ppo.value_clip is None or ppo.value_clip > 0, "ppo.value_clip", "must be > 0 or null (off)")
    check(ppo.value_coef > 0, "ppo.value_coef", "must be > 0")
    check(ppo.critic_lr > 0, "ppo.critic_lr", "must be > 0")
    dpo = algo.dpo
    check(dpo.beta > 0, "dpo.beta", "must be > 0")
    check(0 <= dpo.label_smoothing < 0.5, "dpo.label_smoothing", "must be in [0, 0.5)")
    check(dpo.max_pair_tokens >= 2, "dpo.max_pair_tokens", "must be >= 2")
    check(dpo.epochs >= 1, "dpo.epochs", "must be >= 1")
    check(dpo.batch_size >= 1, "dpo.batch_size", "must be >= 1")
    sft = algo.sft
    check(sft.epochs >= 1, "sft.epochs", "must be >= 1")
    check(sft.batch_size >= 1, "sft.batch_size", "must be >= 1")
    check(sft.max_seq_tokens >= 2, "sft.max_seq_tokens", "must be >= 2")
