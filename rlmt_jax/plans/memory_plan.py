"""Per-device memory of a run on its device mesh, computed before launch without allocating anything.

    device = DeviceSpec.parse("v5p", devices=32)
    plan = memory_plan(resolve("configs/grpo_llama31_8b_instruct.yaml"), device)
    plan.peak_bytes, plan.fits, plan.largest.name

Weights and optimizer state are exact: each model is built abstractly (nnx.eval_shape) from its
checkpoint's config.json (or, for a published model not on disk, from rlmt_jax.plans.known_models), the AdamW
state by jax.eval_shape of the real optimizer, and every leaf is placed by the real partition rules
(`mesh.param_shardings`) on an abstract mesh of the run's shape. A leaf costs prod(shard shape) x itemsize
on each device (a replicated leaf costs its whole size on every device). Activations, the KV cache and the
logits chunk are estimates from the same shapes, split by the activation rules, with the formulas in the
docstrings below.

Not everything is alive at once, so memory is counted by phase:
  resident       policy params, optimizer state, reference, reward model, critic and its optimizer state
  rollout        the policy's copy in the decode layout (rollout.mesh), the KV cache of the whole rollout
                 batch (rollout.engine static) or of its slots (slots: rollout.slots rows per data-parallel
                 replica, + their token and log-prob buffers), one layer of the prompts' prefill: all split by
                 the decode layout
Frozen models (reference, reward model) are counted in the dtype the trainer stores them in
(config.frozen_param_dtype: bfloat16 when runtime.dtype is).
  reward         one layer of the reward model's forward on a scoring batch
  update         gradients (+ their accumulator over micro-batches), activations of one micro-batch, a
                 logits chunk
  critic update  (PPO) the same for the critic
peak = resident + the largest phase. XLA's own temporaries and fragmentation are not counted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding

from models import ModelConfig, build_model
from models.attention import resolve_attention
from models.config import ConfigError
from rlmt_jax.scale import mesh as mesh_lib
from rlmt_jax.algorithms.specs import spec_of
from rlmt_jax.settings.config import RunConfig, builtin_name, frozen_param_dtype
from rlmt_jax.core.errors import UserError
from rlmt_jax.plans.known_models import KNOWN_MODELS, known_model

GIB = 2**30

# Memory of one device (HBM; cpu: this machine's RAM).
DEVICE_HBM_GIB = {"v5p": 95, "v5e": 16, "v6e": 32, "v4": 32, "h100": 80, "h200": 141, "a100": 80}
DEVICE_ALIASES = {"v5litepod": "v5e"}  # the accelerator type Cloud TPU gives v5e slices (v5litepod-16)
# A TPU slice name counts TensorCores on v4 and v5p (two per chip, and JAX shows each chip as one
# device), and chips on v5e and v6e: a v5p-64 is 32 devices, a v5e-64 is 64.
TPU_CORES_PER_DEVICE = {"v5p": 2, "v4": 2, "v5e": 1, "v6e": 1}
DEFAULT_DEVICE_COUNT = {"h100": 8, "h200": 8, "a100": 8, "cpu": 1}  # one GPU host; TPU kinds need a count
# Devices (as JAX counts them) of one host: a TPU VM of a multi-host slice has 4 chips (v5e and v6e slices of up
# to 8 chips are one host of 8), a GPU host 8.
DEVICES_PER_HOST = {"v4": 4, "v5p": 4, "v5e": 4, "v6e": 4, "h100": 8, "h200": 8, "a100": 8, "cpu": 1}
SINGLE_HOST_TPU_CHIPS = {"v5e": 8, "v6e": 8}
ENGINE_PHASE = "engine"  # split placement: what the engine's devices hold while they sample (rollout.devices)
DEVICE_KINDS = (*DEVICE_HBM_GIB, "cpu")

LOGITS_CHUNK = 1024  # positions per logits chunk in the update step (objectives.PolicyObjective default)
REMAT_POLICIES = ("none", "dots", "full")
ATTENTION_IMPLEMENTATIONS = ("xla", "splash", "cudnn")  # models/attention.py
DEVICE_PLATFORMS = {"v5p": "tpu", "v5e": "tpu", "v6e": "tpu", "v4": "tpu", "h100": "gpu", "h200": "gpu", "a100": "gpu",
                    "cpu": "cpu"}
SPLASH_LANES = 128  # splash pads sequences to a multiple of this


# ---------------------------------------------------------------------------------------------- devices
def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """The devices a run gets: kind, how many (as JAX counts them), memory of each, TPU slices."""

    kind: str
    count: int
    hbm_bytes: int
    slices: int = 1

    @classmethod
    def parse(cls, kind: str, devices: int | None = None, slices: int = 1) -> DeviceSpec:
        """kind: v5p | v5e (v5litepod) | v6e | v4 | h100 | h200 | a100 | cpu, or a TPU slice type such as
        v5p-64 or v5litepod-16 (which sets the count).

        devices: the number of devices; default 8 for h100/h200/a100 (one host), 1 for cpu; a TPU kind needs
        it or a slice type.
        """
        name = kind.strip().lower()
        for alias, canonical in DEVICE_ALIASES.items():
            name = re.sub(rf"^{alias}\b", canonical, name)
        match = re.fullmatch(r"(v5p|v5e|v6e|v4)-(\d+)", name)
        if match:
            name, cores = match.group(1), int(match.group(2))
            per_slice = cores // TPU_CORES_PER_DEVICE[name]
            if per_slice < 1 or cores % TPU_CORES_PER_DEVICE[name]:
                raise UserError(f"--device-kind {kind}: {cores} is not a whole number of {name} chips")
            implied = per_slice * slices
            if devices is not None and devices != implied:
                raise UserError(f"--devices {devices} contradicts --device-kind {kind} x {slices} slice(s): "
                                f"{implied} devices (a {name} chip is one JAX device)")
            devices = implied
        if name not in DEVICE_KINDS:
            raise UserError(f"--device-kind {kind!r}: expected one of {', '.join(DEVICE_KINDS)} "
                            "or a TPU slice type such as v5p-64")
        if devices is None:
            if name not in DEFAULT_DEVICE_COUNT:
                raise UserError(f"--device-kind {name} needs --devices N (chips) or a slice type such as "
                                f"{name}-64")
            devices = DEFAULT_DEVICE_COUNT[name]
        if devices < 1:
            raise UserError(f"--devices {devices}: must be at least 1")
        if slices < 1 or devices % slices:
            raise UserError(f"--slices {slices}: must be at least 1 and divide the {devices} devices")
        hbm = host_memory_bytes() if name == "cpu" else DEVICE_HBM_GIB[name] * GIB
        return cls(kind=name, count=devices, hbm_bytes=hbm, slices=slices)


    @property
    def per_host(self) -> int:
        """Devices of one host."""
        if self.count <= SINGLE_HOST_TPU_CHIPS.get(self.kind, 0):
            return self.count
        return min(DEVICES_PER_HOST[self.kind], self.count)

    @property
    def hosts(self) -> int:
        return max(self.count // self.per_host, 1)


def split_placement(cfg: RunConfig, device: DeviceSpec) -> tuple[DeviceSpec, DeviceSpec | None]:
    """(the training devices, the engine's) of split placement (rollout.devices d: each host's last d devices
    decode); colocated (d = 0): (device, None)."""
    engine = cfg.rollout.devices
    if not engine:
        return device, None
    if engine >= device.per_host:
        raise UserError(f"rollout.devices={engine}: a {device.kind} host has {device.per_host} devices; the engine "
                        f"takes between 1 and {device.per_host - 1} of them")
    engine_count = engine * device.hosts
    return (dataclasses.replace(device, count=device.count - engine_count),
            dataclasses.replace(device, count=engine_count))


def plan_mesh(cfg: RunConfig, device: DeviceSpec) -> AbstractMesh:
    """The run's (data, fsdp, tensor) mesh as an AbstractMesh: the shape `make_mesh` would build."""
    ici, dcn = mesh_lib.resolve_mesh_shape(cfg.mesh, device.count, device.slices)
    return AbstractMesh(tuple(i * d for i, d in zip(ici, dcn)), mesh_lib.MESH_AXES)


def plan_rollout_mesh(cfg: RunConfig, device: DeviceSpec) -> tuple[AbstractMesh, dict]:
    """(mesh, rules) the sampler runs on: the decode layout (rollout.mesh, `mesh.rollout_mesh`), or the
    training mesh and rules with rollout.mesh.reshard false."""
    if not cfg.rollout.mesh.reshard:
        return plan_mesh(cfg, device), mesh_lib.RULES
    data, tensor = mesh_lib.resolve_rollout_shape(cfg.rollout.mesh, device.count)
    return AbstractMesh((data, 1, tensor), mesh_lib.MESH_AXES), mesh_lib.ROLLOUT_RULES


# ---------------------------------------------------------------------------------------------- models
@dataclasses.dataclass(frozen=True)
class ModelShapes:
    """One model of the run, built abstractly: its config, where that came from, its Param shapes."""

    role: str  # policy | reference | reward model | critic
    config: ModelConfig
    source: str
    module: nnx.Module  # abstract: its arrays are ShapeDtypeStructs

    @property
    def params(self) -> nnx.State:
        return nnx.state(self.module, nnx.Param)

    @property
    def num_params(self) -> int:
        return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(self.params))


def model_architecture(path: str, key: str, **runtime) -> tuple[ModelConfig, str]:
    """(ModelConfig, where it came from) for the model at `path` (config key `key`, for errors).

    A directory with config.json is read; `builtin:` models are made (once, cached on the host); a
    published model that is not on disk comes from rlmt_jax.plans.known_models.
    """
    if builtin_name(path) is not None:
        from rlmt_jax.inputs.tiny import resolve_model_path

        path = resolve_model_path(path)
    config_file = os.path.join(path, "config.json")
    try:
        if os.path.isfile(config_file):
            with open(config_file) as f:
                return ModelConfig.from_hf_config(json.load(f), **runtime), config_file
        known = known_model(path)
        if known is not None:
            hub_id, hf_config = known
            return ModelConfig.from_hf_config(hf_config, **runtime), f"built-in config of {hub_id}"
    except (ConfigError, OSError, ValueError, KeyError) as err:
        raise UserError(f"config key '{key}' ({path}): {err}") from None
    raise UserError(
        f"config key '{key}' ({path}): no config.json there, and it is not one of the published models "
        f"whose shapes are built in ({', '.join(KNOWN_MODELS)}); point it at a Hugging Face directory"
    )


def abstract_model(config: ModelConfig, task: str | None = None) -> nnx.Module:
    """The model for `config` with ShapeDtypeStructs for arrays (nothing allocated)."""
    return nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0), task=task))


def run_models(cfg: RunConfig) -> dict[str, ModelShapes]:
    """The models the run's algorithm keeps on the mesh, by role."""
    runtime = dict(dtype=cfg.runtime.dtype, param_dtype=cfg.runtime.param_dtype, remat=cfg.runtime.remat,
                   scan_layers=cfg.runtime.scan_layers)
    spec = spec_of(cfg)
    paths = {"policy": ("model.policy", cfg.model.policy, None)}
    if spec.needs_reference(cfg.algorithm):
        key = "model.reference" if cfg.model.reference else "model.policy"
        paths["reference"] = (key, cfg.model.reference_path, None)
    if spec.reward_model:
        paths["reward model"] = ("model.reward_model", cfg.model.reward_model, None)
    if spec.critic:
        key = "model.critic" if cfg.model.critic else "model.policy"
        paths["critic"] = (key, cfg.model.critic_path, "value")
    shapes = {}
    for role, (key, path, task) in paths.items():
        config, source = model_architecture(path, key, **runtime)
        expected = "seq_cls" if role == "reward model" else "causal_lm"
        if task is None and config.kind != expected:
            kinds = {"seq_cls": "*ForSequenceClassification", "causal_lm": "*ForCausalLM"}
            raise UserError(f"config key '{key}' ({path}): is a {config.architecture}, the {role} must be a "
                            f"{kinds[expected]} model")
        shapes[role] = ModelShapes(role, config, source, abstract_model(config, task))
    return shapes


# ---------------------------------------------------------------------------------------------- bytes
def itemsize(dtype) -> int:
    return jnp.dtype(dtype).itemsize


def global_bytes(tree) -> int:
    """sum over leaves of prod(shape) x itemsize."""
    return sum(math.prod(leaf.shape) * itemsize(leaf.dtype) for leaf in jax.tree.leaves(tree))


def per_device_bytes(tree, mesh: AbstractMesh, as_dtype=None, rules=mesh_lib.RULES) -> int:
    """Bytes of `tree` (ShapeDtypeStructs of Params or optimizer state) on one device, placed by the rules.

    as_dtype: count every leaf in this dtype instead of its own (gradients are float32).
    """
    shardings = jax.tree.leaves(mesh_lib.param_shardings(tree, mesh, rules))
    leaves = jax.tree.leaves(tree)
    return sum(
        math.prod(sharding.shard_shape(leaf.shape)) * itemsize(as_dtype or leaf.dtype)
        for leaf, sharding in zip(leaves, shardings, strict=True)
    )


def local_shape(shape: Sequence[int], axes: Sequence[str | None], mesh: AbstractMesh) -> tuple[int, ...]:
    """The per-device shape of an activation of `shape` with logical `axes`, split by the activation rules."""
    spec = mesh_lib.logical_to_spec(axes, shape, mesh, "activation")
    return tuple(NamedSharding(mesh, spec).shard_shape(tuple(shape)))


@dataclasses.dataclass(frozen=True)
class LocalDims:
    """Sizes one device holds of a micro-batch: rows, and the model dims after tensor parallelism."""

    rows: int
    embed: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    vocab: int
    layers: int

    @classmethod
    def of(cls, config: ModelConfig, rows: int, mesh: AbstractMesh) -> LocalDims:
        rows_local, _, heads, head_dim = local_shape(
            (rows, 1, config.num_attention_heads, config.head_dim), ("batch", "seq", "heads", "head_dim"), mesh)
        kv_heads = local_shape((rows, 1, config.num_key_value_heads, config.head_dim),
                               ("batch", "seq", "kv_heads", "head_dim"), mesh)[2]
        mlp = local_shape((rows, 1, config.intermediate_size), ("batch", "seq", "mlp"), mesh)[2]
        vocab = local_shape((rows, 1, config.vocab_size), ("batch", "seq", "vocab"), mesh)[2]
        embed = local_shape((rows, 1, config.hidden_size), ("batch", "seq", "embed"), mesh)[2]
        return cls(rows_local, embed, heads, kv_heads, head_dim, mlp, vocab, config.num_hidden_layers)


# ---------------------------------------------------------------------------------------------- formulas
def attention_bytes(d: LocalDims, seq: int, act: int, attention: str = "xla") -> int:
    """Bytes one layer's attention keeps for its backward (beyond q, k, v and its output), on one device, by
    implementation (models/attention.py). Symbols as in layer_activation_bytes:
      xla:     B*H*T^2*(4 + b)           the probabilities in float32 and their compute-dtype copy
      splash:  B*H*T'*4 + B*T'*(H+2K)*Dh*b   logsumexp per row and head (float32), and q, k, v as the kernel
                                        takes them (heads-major, padded to T' = T rounded up to 128)
      cudnn:   B*H*T*4 + B*T*(H+2K)*Dh*b    logsumexp per row and head (float32), and q, k, v rotated so each
                                        row's real tokens come first
    The kernels keep no [T, T] scores: they rebuild them block by block in the backward.
    """
    B, T, H, K, Dh, b = d.rows, seq, d.heads, d.kv_heads, d.head_dim, act
    if attention == "xla":
        return B * H * T * T * (4 + b)
    if attention == "splash":
        T = -(-T // SPLASH_LANES) * SPLASH_LANES
    elif attention != "cudnn":
        raise ValueError(f"attention {attention!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
    return B * H * T * 4 + B * T * (H + 2 * K) * Dh * b


def layer_activation_bytes(d: LocalDims, seq: int, act: int, attention: str = "xla") -> dict[str, int]:
    """Bytes one decoder layer keeps for the backward pass, per remat policy, on one device.

    b = bytes of the compute dtype (`act`), B = rows, T = seq, D = embed, H / K = query / kv heads,
    Dh = head_dim, F = mlp (all per device):
      none: B*T*D*(4b + 8)          block input, attention-norm output, residual, MLP-norm output (b each)
                                    and the two norms' float32 inputs
            + B*T*(H + 2K)*Dh*b     q, k, v
            + attention_bytes       xla: B*H*T^2*(4 + b), the probabilities; kernels: no [T, T] term
            + B*T*H*Dh*b            attention output
            + B*T*F*4b              gate, up, silu(gate), their product
      dots: B*T*(3D + (H + 2K)*Dh + 2F)*b   block input and the outputs of the matmuls without batch
                                    dimensions (q, k, v, o, gate, up, down); scores are rebuilt
      full: B*T*D*b                 block input only; everything else is rebuilt
    """
    B, T, D, H, K, Dh, F, b = d.rows, seq, d.embed, d.heads, d.kv_heads, d.head_dim, d.mlp, act
    none = (B * T * D * (4 * b + 8) + B * T * (H + 2 * K) * Dh * b + attention_bytes(d, seq, act, attention)
            + B * T * H * Dh * b + B * T * F * 4 * b)
    dots = B * T * (3 * D + (H + 2 * K) * Dh + 2 * F) * b
    full = B * T * D * b
    return {"none": none, "dots": dots, "full": full}


def activation_bytes(d: LocalDims, seq: int, act: int, remat: str, attention: str = "xla") -> int:
    """Activations of one micro-batch through the decoder on one device:

        L * kept(remat) + [remat != none] * kept(none)   (one layer rebuilt at a time in the backward)
        + B*T*D*(2b + 4)                                  embedding output, final norm (float32 input)
        + B*T^2 (xla) or B*T (kernels)                    the boolean attention mask, or its row of real tokens
    """
    per_layer = layer_activation_bytes(d, seq, act, attention)
    rebuilt = per_layer["none"] if remat != "none" else 0
    mask = d.rows * seq * (seq if attention == "xla" else 1)
    return d.layers * per_layer[remat] + rebuilt + d.rows * seq * d.embed * (2 * act + 4) + mask


def logits_chunk_bytes(d: LocalDims, chunk: int, act: int) -> int:
    """One chunk of logits in the loss: B*C*V*(2b + 8): logits and their gradient in the compute dtype,
    log-softmax and probabilities in float32 (C = positions per chunk, V = vocab per device)."""
    return d.rows * chunk * d.vocab * (2 * act + 8)


def kv_cache_bytes(model: nnx.Module, rows: int, slots: int, cache_dtype, mesh: AbstractMesh) -> int:
    """The sampler's KV cache for `rows` rows of `slots` slots, on one device: k and v (L layers, R rows,
    S slots, K kv heads, Dh) in the cache dtype and the valid mask [R, S], split as the sampler constrains
    them: 2 * L * R * S * K * Dh * c + R * S. Shapes come from `model.init_cache` (jax.eval_shape)."""
    from rlmt_jax.rollout.decode_cache import cache_axes  # the sampler's layout of k and v

    cache = jax.eval_shape(lambda: model.init_cache(rows, slots, jnp.dtype(cache_dtype)))
    key_axes, value_axes = cache_axes(model.config)
    kv = sum(math.prod(local_shape(x.shape, axes, mesh)) * itemsize(x.dtype)
             for x, axes in ((cache.k, key_axes), (cache.v, value_axes)))
    return kv + math.prod(local_shape(cache.valid.shape, ("batch", "cache_seq"), mesh))


# ---------------------------------------------------------------------------------------------- the plan
@dataclasses.dataclass(frozen=True)
class Item:
    """One line of the plan: bytes on one device, the phase it is alive in, how it was computed."""

    name: str
    phase: str
    bytes: int
    how: str


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    role: str
    architecture: str
    source: str
    num_params: int
    param_dtype: str
    global_bytes: int


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    config_source: str
    device: DeviceSpec
    mesh_shape: dict[str, int]
    models: tuple[ModelSummary, ...]
    items: tuple[Item, ...]
    remat: str
    activations_by_remat: dict[str, int]  # the update's micro-batch activations under each remat policy
    shapes: dict[str, int]  # the lengths and batch sizes the estimates used
    notes: tuple[str, ...] = ()  # batches that do not split over the mesh, and what to set instead
    attention: str = "xla"  # the implementation runtime.attention resolves to on this device
    attention_by_implementation: dict[str, int] = dataclasses.field(default_factory=dict)  # one layer's
    # attention_bytes of an update micro-batch under each implementation
    engine_device: DeviceSpec | None = None  # split placement: the engine's devices (`device`: the training ones)

    def phase_bytes(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for item in self.items:
            totals[item.phase] = totals.get(item.phase, 0) + item.bytes
        return totals

    @property
    def resident_bytes(self) -> int:
        return self.phase_bytes().get("resident", 0)

    @property
    def peak_phase(self) -> str | None:
        """The training devices' fullest phase (not the engine's: other devices)."""
        phases = {k: v for k, v in self.phase_bytes().items() if k not in ("resident", ENGINE_PHASE)}
        return max(phases, key=phases.get) if phases else None

    @property
    def engine_bytes(self) -> int:
        """Split placement: what each engine device holds while it samples (nothing of the training)."""
        return self.phase_bytes().get(ENGINE_PHASE, 0)

    @property
    def peak_bytes(self) -> int:
        phase = self.peak_phase
        return self.resident_bytes + (self.phase_bytes()[phase] if phase else 0)

    @property
    def fits(self) -> bool:
        return max(self.peak_bytes, self.engine_bytes) <= self.device.hbm_bytes

    @property
    def largest(self) -> Item:
        return max(self.items, key=lambda item: item.bytes)

    def item(self, name: str) -> Item:
        for item in self.items:
            if item.name == name:
                return item
        raise KeyError(f"no item {name!r}; items: {[i.name for i in self.items]}")

    def to_dict(self) -> dict:
        return {
            "config": self.config_source,
            "device": dataclasses.asdict(self.device),
            "mesh": self.mesh_shape,
            "models": [dataclasses.asdict(m) for m in self.models],
            "items": [dataclasses.asdict(i) for i in self.items],
            "phases": self.phase_bytes(),
            "remat": self.remat,
            "activations_by_remat": self.activations_by_remat,
            "attention": self.attention,
            "attention_by_implementation": self.attention_by_implementation,
            "shapes": self.shapes,
            "peak_phase": self.peak_phase,
            "peak_bytes": self.peak_bytes,
            "hbm_bytes": self.device.hbm_bytes,
            "fits": self.fits,
            "engine_device": None if self.engine_device is None else dataclasses.asdict(self.engine_device),
            "engine_bytes": self.engine_bytes,
            "largest": self.largest.name,
            "notes": list(self.notes),
        }


def _optimizer_state(params: nnx.State, cfg: RunConfig, lr: float):
    from rlmt_jax.training.optim import AdamWConfig
    from rlmt_jax.training.train_step import init_optimizer_state

    o = cfg.optimizer
    optimizer = AdamWConfig(lr=lr, schedule=o.schedule, warmup_ratio=o.warmup_ratio,
                            total_steps=max(cfg.run.total_steps or 1, 1), weight_decay=o.weight_decay,
                            betas=tuple(o.betas), eps=o.eps, grad_clip=o.grad_clip)
    return jax.eval_shape(lambda p: init_optimizer_state(p, optimizer), params)


def update_shape(cfg: RunConfig) -> tuple[int, int, int]:
    """(sequences per micro-batch, their length, micro-batches per update) of the algorithm's update."""
    batch = spec_of(cfg).update_batch(cfg)  # DPO: micro_batch_size counts pairs, each two sequences
    micro = min(cfg.optimizer.micro_batch_size, batch.rows)
    return micro * batch.sequences_per_row, batch.seq, max(batch.rows // micro, 1)


def _reward_length(cfg: RunConfig, response_seq: int) -> tuple[int, int]:
    """(rows per scoring call, padded length) of the reward model's largest bucket for this run."""
    from rlmt_jax.rollout.rewards import RewardSettings, bucket_for

    reward = getattr(cfg, "reward", None)
    settings = RewardSettings() if reward is None else RewardSettings(max_length=reward.max_length,
                                                                      batch_size=reward.batch_size)
    length = bucket_for(min(response_seq, settings.max_length), settings.bucket_lengths())
    return settings.batch_size, length


DECODE_COPIED_PARAMS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")


def _params_item(shapes: ModelShapes, mesh: AbstractMesh, name: str, dtype: str | None = None) -> Item:
    """The model's params on one device, in `dtype` (default: the param dtype), placed by the rules."""
    dtype = dtype or shapes.config.param_dtype
    split = per_device_bytes(shapes.params, mesh, as_dtype=jnp.dtype(dtype))
    return Item(name, "resident", split,
                f"{shapes.num_params:,} params x {itemsize(dtype)} B ({dtype}) = "
                f"{shapes.num_params * itemsize(dtype) / GIB:.2f} GiB, split by the rules")


def memory_plan(cfg: RunConfig, device: DeviceSpec, config_source: str = "") -> MemoryPlan:
    """The per-device memory of `cfg` on `device`, by phase (see the module docstring)."""
    device, engine = split_placement(cfg, device)
    mesh = plan_mesh(cfg, device)
    models = run_models(cfg)
    act = itemsize(cfg.runtime.dtype)
    attention = resolve_attention(cfg.runtime.attention, cfg.runtime.dtype, DEVICE_PLATFORMS[device.kind])
    items = _resident_items(cfg, models, mesh)
    rows, seq, micro_batches = update_shape(cfg)
    shapes = dict(micro_batch_rows=rows, update_seq=seq, micro_batches=micro_batches)
    if "reward model" in models:
        rollout_items, rollout_shapes = _rollout_and_reward_items(cfg, device, models, mesh, attention, engine)
        items += rollout_items
        shapes.update(rollout_shapes)

    dims = LocalDims.of(models["policy"].config, rows, mesh)
    by_remat = {remat: activation_bytes(dims, seq, act, remat, attention) for remat in REMAT_POLICIES}
    items += _update_items(cfg, models["policy"], mesh, dims, by_remat[cfg.runtime.remat], attention)
    shapes.update(logits_chunk=min(LOGITS_CHUNK, seq))
    if "critic" in models:
        items += _critic_update_items(cfg, models["critic"], mesh, attention)

    by_attention = {name: attention_bytes(dims, seq, act, name) for name in ATTENTION_IMPLEMENTATIONS}
    return MemoryPlan(config_source, device, dict(mesh.shape), _model_summaries(cfg, models), tuple(items),
                      cfg.runtime.remat, by_remat, shapes, batch_split_notes(cfg, shapes, mesh), attention,
                      by_attention, engine)


def _resident_items(cfg: RunConfig, models: dict[str, ModelShapes], mesh: AbstractMesh) -> list[Item]:
    """Weights and optimizer state, alive through the whole run (exact)."""
    policy = models["policy"]
    items = [_params_item(policy, mesh, "policy params")]
    opt_state = _optimizer_state(policy.params, cfg, cfg.optimizer.lr)
    items.append(Item("optimizer state", "resident", per_device_bytes(opt_state, mesh),
                      "AdamW mu and nu like the params (jax.eval_shape of the real optimizer), + step scalars"))
    frozen = frozen_param_dtype(cfg.runtime)  # the reference and the reward model are stored in it
    for role in ("reference", "reward model"):
        if role in models:
            items.append(_params_item(models[role], mesh, f"{role} params", frozen))
    if "critic" in models:
        critic = models["critic"]
        items.append(_params_item(critic, mesh, "critic params"))
        critic_opt = _optimizer_state(critic.params, cfg, cfg.algorithm.ppo.critic_lr)
        items.append(Item("critic optimizer state", "resident", per_device_bytes(critic_opt, mesh),
                          "AdamW mu and nu of the critic"))
    return items


def _rollout_and_reward_items(cfg: RunConfig, device: DeviceSpec, models: dict[str, ModelShapes],
                              mesh: AbstractMesh, attention: str,
                              engine: DeviceSpec | None = None) -> tuple[list[Item], dict[str, int]]:
    """The rollout phase on the decode layout (the policy's copy, the KV cache of every row at once, the
    decode weight copies, one layer of the prefill) and the reward phase on the training mesh. With split
    placement (`engine`: the engine's devices) the rollout items are the engine's (ENGINE_PHASE), and the
    training devices hold the push's whole copy for a moment. -> (items, the lengths and batch sizes they used)"""
    policy = models["policy"]
    if engine is not None:
        items, shapes = _rollout_and_reward_items(cfg, engine, models, mesh, attention)
        rollout = [dataclasses.replace(item, phase=ENGINE_PHASE) for item in items if item.phase == "rollout"]
        whole = policy.num_params * itemsize(cfg.runtime.dtype)
        push = Item("rollout push", "rollout", whole,
                    f"the policy whole in {cfg.runtime.dtype} on each training device ({whole / GIB:.2f} GiB), "
                    "copied from there to its host's engine devices (rollout.devices)")
        return [push, *rollout, *(item for item in items if item.phase != "rollout")], shapes
    rollout_mesh, rollout_rules = plan_rollout_mesh(cfg, device)
    items = [_rollout_copy_item(cfg, policy, rollout_mesh, rollout_rules)] if cfg.rollout.mesh.reshard else []
    items += _kv_cache_items(cfg, policy, rollout_mesh)
    if cfg.rollout.engine == "slots":
        items.append(_slot_buffers_item(cfg, rollout_mesh))
    items += [_decode_copies_item(policy, rollout_mesh, rollout_rules),
              _prefill_item(cfg, policy, rollout_mesh, attention)]
    reward_rows, reward_len = _reward_length(cfg, cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens)
    items.append(_reward_forward_item(cfg, models["reward model"], mesh, reward_rows, reward_len, attention))
    shapes = dict(rollout_rows=cfg.rollout.prompts_per_step * cfg.rollout.n, cache_rows=_cache_rows(cfg, rollout_mesh),
                  cache_slots=_cache_slots(cfg), reward_rows=reward_rows, reward_seq=reward_len,
                  rollout_data=rollout_replicas(rollout_mesh), rollout_tensor=rollout_mesh.shape["tensor"])
    return items, shapes


def steps_carried(cfg: RunConfig) -> int:
    """How many later steps' rows the slots start in a step's tail: rollout.max_staleness, colocated (split
    placement samples whole steps ahead instead, none carried)."""
    return 0 if cfg.rollout.devices else cfg.rollout.max_staleness


def rollout_replicas(rollout_mesh: AbstractMesh) -> int:
    """Data-parallel replicas of the rollout mesh: the devices its rows split over (data x fsdp)."""
    return rollout_mesh.shape["data"] * rollout_mesh.shape["fsdp"]


def _cache_rows(cfg: RunConfig, rollout_mesh: AbstractMesh) -> int:
    """Rows the sampler's KV cache holds: every row of the step (rollout.engine static), or rollout.slots per
    data-parallel replica of the rollout mesh (slots), however many rows the step has."""
    if cfg.rollout.engine == "slots":
        return cfg.rollout.slots * rollout_replicas(rollout_mesh)
    return cfg.rollout.prompts_per_step * cfg.rollout.n


def _cache_slots(cfg: RunConfig) -> int:
    """Slots of a row's KV cache: the prompt and every response token but the last (never fed back)."""
    return cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens - 1


def _rollout_copy_item(cfg: RunConfig, policy: ModelShapes, rollout_mesh: AbstractMesh, rules) -> Item:
    """The policy's copy in the compute dtype on the decode layout (rollout.mesh.reshard)."""
    layout = " x ".join(f"{axis}={size}" for axis, size in rollout_mesh.shape.items() if axis != "fsdp")
    return Item("rollout params copy", "rollout",
                per_device_bytes(policy.params, rollout_mesh, jnp.dtype(cfg.runtime.dtype), rules),
                f"the policy in {cfg.runtime.dtype} on the decode layout ({layout}): made before sampling, "
                "dropped after")


def _kv_cache_items(cfg: RunConfig, policy: ModelShapes, rollout_mesh: AbstractMesh) -> list[Item]:
    """The sampler's KV cache and the prefill's cache while it is copied into it.

    static: every rollout row at once, + the prompts' cache (one row a prompt) while it is copied to their samples.
    slots: rollout.slots rows per data-parallel replica (S in all) whatever the step's rows, + the prompts' cache
    (one row a prompt; with partial rollouts (max_staleness k) the next k steps' prompts' too), kept while their
    rows are admitted;
    with partial rollouts also the carried rows' caches computed again (up to S rows of all the slots) while they
    are copied into the slots; with rollout.carried_cache keep the slots' cache instead stays resident (through
    the reward and update phases) and nothing is recomputed. Each row holds _cache_slots slots."""
    prompts, n = cfg.rollout.prompts_per_step, cfg.rollout.n
    prompt_len, new = cfg.data.max_prompt_tokens, cfg.rollout.max_new_tokens
    slots = _cache_slots(cfg)
    cache_dtype = cfg.rollout.cache_dtype or cfg.runtime.dtype
    rows = _cache_rows(cfg, rollout_mesh)
    rows_local = local_shape((rows,), ("batch",), rollout_mesh)[0]
    decode_cache = kv_cache_bytes(policy.module, rows, slots, cache_dtype, rollout_mesh)
    shape = f"x {slots} slots (prompt {prompt_len} + {new} new - 1), {cache_dtype}"
    if cfg.rollout.engine == "slots":
        ahead = steps_carried(cfg)
        held = prompts * (1 + ahead)
        prompt_cache = kv_cache_bytes(policy.module, held, prompt_len, cache_dtype, rollout_mesh)
        steps = f" of this step and the next {ahead}" if ahead else ""
        how = (f"slots engine: {cfg.rollout.slots} slots x {rollout_replicas(rollout_mesh)} replicas = {rows} "
               f"rows ({rows_local} per device; the step's {prompts * n} rows stream through them) {shape}, "
               f"+ the prompts' cache ({held} prompts{steps} x {prompt_len})")
        if ahead and cfg.rollout.carried_cache == "keep":
            return [Item("kept KV cache", "resident", decode_cache,
                         f"the slots' cache ({rows} rows, {rows_local} per device) {shape}: the carried rows keep "
                         "it through the update (rollout.carried_cache keep)"),
                    Item("KV cache", "rollout", prompt_cache, f"the prompts' cache ({held} prompts{steps} x "
                         f"{prompt_len}, {cache_dtype}); the slots' own is kept (resident)")]
        if ahead:
            decode_cache *= 2
            how += ", + the carried rows' caches computed again (up to every slot) while they are copied in"
        return [Item("KV cache", "rollout", decode_cache + prompt_cache, how)]
    prompt_cache = kv_cache_bytes(policy.module, prompts, prompt_len, cache_dtype, rollout_mesh)
    return [Item("KV cache", "rollout", decode_cache + prompt_cache,
                 f"{prompts} prompts x {n} = {rows} rows ({rows_local} per device) {shape}, + the prompts' cache "
                 "while it is copied to their samples")]


def _slot_buffers_item(cfg: RunConfig, rollout_mesh: AbstractMesh) -> Item:
    """The slot engine's per-slot responses (rollout.slot_programs.SlotState): tokens [S, N] int32, their
    log-probs [S, N] float32 and policy versions [S, N] int32, rows split over the rollout mesh's batch axes:
    S * N * (4 + 4 + 4)."""
    rows, new = _cache_rows(cfg, rollout_mesh), cfg.rollout.max_new_tokens
    local_rows, local_new = local_shape((rows, new), ("batch", None), rollout_mesh)
    return Item("slot buffers", "rollout", local_rows * local_new * (4 + 4 + 4),
                f"{rows} slots ({local_rows} per device) x {new} tokens: int32 tokens, float32 log-probs, int32 "
                "policy versions")


def _decode_copies_item(policy: ModelShapes, rollout_mesh: AbstractMesh, rules) -> Item:
    """Sampling lays the q/k/v and gate/up kernels side by side and the lm head vocab-major, once per call
    (models.layers Attention._project_fused and MLP fused, rlmt_jax.rollout.decode.vocab_major_head): copies of
    them in the compute dtype live through the decode loop."""
    copied = nnx.filter_state(policy.params, lambda path, _: str(path[-1]) in DECODE_COPIED_PARAMS)
    return Item("decode weight copies", "rollout",
                per_device_bytes(copied, rollout_mesh, jnp.dtype(policy.config.dtype), rules),
                f"{', '.join(DECODE_COPIED_PARAMS)} in {policy.config.dtype}, split like the sampled params")


def _prefill_item(cfg: RunConfig, policy: ModelShapes, rollout_mesh: AbstractMesh, attention: str) -> Item:
    """One layer's forward on every prompt of the step at its longest (both engines); with partial rollouts
    the larger of that and the carried rows' forward (up to every slot, prompt + response so far: at most
    the cache's slots)."""
    prompt_len = cfg.data.max_prompt_tokens
    prefill = LocalDims.of(policy.config, cfg.rollout.prompts_per_step, rollout_mesh)
    dtype = itemsize(cfg.runtime.dtype)
    candidates = [(layer_activation_bytes(prefill, prompt_len, dtype, attention)["none"],
                   f"one layer's forward on {prefill.rows} prompts x {prompt_len} tokens per device")]
    if cfg.rollout.engine == "slots" and steps_carried(cfg) and cfg.rollout.carried_cache == "recompute":
        carried, length = LocalDims.of(policy.config, _cache_rows(cfg, rollout_mesh), rollout_mesh), _cache_slots(cfg)
        candidates.append((layer_activation_bytes(carried, length, dtype, attention)["none"],
                           f"one layer's forward on {carried.rows} carried rows x {length} tokens per device"))
    size, how = max(candidates)
    return Item("prefill activations", "rollout", size, how)


def _reward_forward_item(cfg: RunConfig, reward_model: ModelShapes, mesh: AbstractMesh, rows: int, length: int,
                         attention: str) -> Item:
    """One layer of the reward model's forward on one scoring batch of `rows` at its longest bucket `length`."""
    dims = LocalDims.of(reward_model.config, rows, mesh)
    return Item("reward forward", "reward",
                layer_activation_bytes(dims, length, itemsize(cfg.runtime.dtype), attention)["none"],
                f"one layer on {rows} rows ({dims.rows} per device) x {length} tokens "
                "(the bucket that holds prompt + response)")


def _update_items(cfg: RunConfig, policy: ModelShapes, mesh: AbstractMesh, dims: LocalDims, activations: int,
                  attention: str) -> list[Item]:
    """The update phase: gradients (+ their accumulator), the `activations` of one micro-batch whose per-device
    sizes are `dims`, one logits chunk."""
    rows, seq, micro_batches = update_shape(cfg)
    grads = per_device_bytes(policy.params, mesh, as_dtype=jnp.float32)
    items = [Item("gradients", "update", grads, "float32, split like the params")]
    if micro_batches > 1:
        items.append(Item("gradient accumulator", "update", grads,
                          f"float32 sum over the {micro_batches} micro-batches"))
    items.append(Item(f"activations (remat={cfg.runtime.remat})", "update", activations,
                      f"{rows} sequences ({dims.rows} per device) x {seq} tokens, {policy.config.num_hidden_layers} "
                      f"layers, {attention} attention"))
    chunk = min(LOGITS_CHUNK, seq)
    items.append(Item("logits chunk", "update", logits_chunk_bytes(dims, chunk, itemsize(cfg.runtime.dtype)),
                      f"{dims.rows} rows x {chunk} positions x {dims.vocab} vocab per device"))
    return items


def _critic_update_items(cfg: RunConfig, critic: ModelShapes, mesh: AbstractMesh, attention: str) -> list[Item]:
    """PPO's critic update: its gradients (+ their accumulator) and the activations of one micro-batch."""
    rows, seq, micro_batches = update_shape(cfg)
    critic_grads = per_device_bytes(critic.params, mesh, as_dtype=jnp.float32)
    critic_dims = LocalDims.of(critic.config, rows, mesh)
    remat = cfg.runtime.remat
    return [
        Item("critic gradients", "critic update", critic_grads * (2 if micro_batches > 1 else 1),
             "float32" + (" + their accumulator" if micro_batches > 1 else "")),
        Item(f"critic activations (remat={remat})", "critic update",
             activation_bytes(critic_dims, seq, itemsize(cfg.runtime.dtype), remat, attention),
             f"as the policy's, {rows} sequences"),
    ]


def _model_summaries(cfg: RunConfig, models: dict[str, ModelShapes]) -> tuple[ModelSummary, ...]:
    """Each model's architecture, size and the dtype it is stored in (frozen models: the frozen dtype)."""
    frozen = frozen_param_dtype(cfg.runtime)
    stored = {role: (frozen if role in ("reference", "reward model") else m.config.param_dtype)
              for role, m in models.items()}
    return tuple(
        ModelSummary(m.role, m.config.architecture, m.source, m.num_params, stored[role],
                     m.num_params * itemsize(stored[role]))
        for role, m in models.items()
    )


def batch_split_notes(cfg: RunConfig, shapes: dict[str, int], mesh: AbstractMesh) -> tuple[str, ...]:
    """A note for each batch whose rows do not split evenly over the data x fsdp devices: the rules then
    keep every row on every device (each device does the whole batch's work and holds its activations)."""
    split = mesh_lib.batch_split(mesh)
    checks = [("optimizer.micro_batch_size", "micro_batch_rows", "sequences per micro-batch")]
    if "reward_rows" in shapes:
        checks += [("rollout.prompts_per_step x rollout.n", "rollout_rows", "rollout rows"),
                   ("reward.batch_size", "reward_rows", "reward-model rows per call")]
    notes = []
    for key, field, what in checks:
        rows = shapes[field]
        if rows % split:
            better = -(-rows // split) * split
            notes.append(f"{key}: {rows} {what} do not split over the {split} data x fsdp devices, so every "
                         f"device holds all {rows}; a multiple of {split} (e.g. {better}) splits them")
    return tuple(notes)


__all__ = [
    "DEVICE_HBM_GIB", "DEVICE_KINDS", "DeviceSpec", "Item", "LocalDims", "MemoryPlan", "ModelShapes",
    "abstract_model", "activation_bytes", "attention_bytes", "global_bytes", "kv_cache_bytes",
    "layer_activation_bytes", "local_shape", "logits_chunk_bytes", "memory_plan", "model_architecture",
    "per_device_bytes", "plan_mesh", "plan_rollout_mesh", "rollout_replicas", "run_models", "update_shape",
]
