"""Time of one RL step by phase, estimated before launch from the real shapes, layouts and the chip's peak figures.

    plan = time_plan(resolve("configs/grpo_llama31_8b_instruct.yaml"), DeviceSpec.parse("v5p-64"))
    plan.step_seconds, plan.phase("rollout decode").seconds

Each phase is counted on one device (the work splits evenly over the devices that share it):
  flops        matmuls 2 x params x tokens (x3 with the backward, x4 with full remat), attention scores and
               values 4 x layers x rows x queries x keys x heads x head_dim (causal: half the keys)
  hbm bytes    the weights each device reads (once per forward or decode step), the KV cache a decode step
               reads (the GPU decode kernel: each row's slots so far; the xla path: every slot of the decode
               windows so far), the optimizer's reads and writes
  link bytes   what each device receives or sends over the interconnect: FSDP all-gathers of the weights and
               reduce-scatters of the gradients, tensor-parallel all-reduces of the activations; ring
               collectives move (n-1)/n of the data
  seconds      max(flops / peak FLOP/s, hbm bytes / HBM bandwidth) + link bytes / link bandwidth
               + collectives x latency (compute and memory overlap; collectives are counted as not overlapped);
               a decode step's reads (its weights and KV cache, by matmuls of a few rows each) reach only
               `stream` of the HBM bandwidth (ChipFigures.stream)
Peak figures are the published ones (CHIPS, with sources); a real step reaches a fraction of them.

The decode phase depends on the engine (rollout.engine) and on the responses' mean length m (`response_mean`;
default rollout.max_new_tokens N: every response at the cap, the upper bound). Per data-parallel replica of the
rollout mesh, R rows, prompt p (data.max_prompt_tokens), S = rollout.slots:
  static       N decode steps, each on every row: the step's rows stop at different lengths, and under a skewed
               (long-tailed) length distribution the longest of its many rows reaches the cap; finished rows
               keep their place in the batch. Each row reads the cache as it fills (_mean_decode_keys). m does
               not change it.
  slots        max(N, ceil(R x m / S)) decode steps, each on the S slots: the S slots share out R x m tokens,
               but the longest row (at the cap) still bounds the step's rollout. Rows refill freed slots at once
               (chunk boundaries and the admissions' small programs are not counted). A running row has written
               on average E[L^2] / (2 E[L]) response slots (a slot sampled at a random time holds a row weighted
               by its length): m for exponential lengths, and at most (N + 1) / 2 for any lengths capped at N
               (every row at the cap: the static count), so the decode kernel reads p + min(m, (N + 1) / 2) slots
               (TPU's paged kernel half a 512-slot compute block more); the xla path reads the windows so far,
               as static. Each prompt is prefilled once, as static's. The engine packs a step's tail into
               fewer slots (rollout.slot_sampler.PACK_FACTOR); not counted here, so this is an upper bound.
  slots k=1    partial rollouts (rollout.max_staleness 1): the next step's rows fill the slots freed in this
               step's tail, so the cap no longer bounds the step: ceil(R x m / S) steps, each as slots'. The rows
               still decoding when a step's own are done have their caches computed again with the new weights
               at the next step: the prefill phase adds up to S rows a replica of p + m / 2 tokens.
               With k > 1 the same: once the next step's rows are all in slots, the step's tail has long
               been covered, and what more steps ahead add is not modelled.
Split placement (rollout.devices d): the engine's d devices per host sample the next step while the other
devices score and update this one, so the step takes the push (the weights cast and gathered whole on the
training devices, then copied inside each host) + max(the engine's prefill and decode on its devices, the
reward and update phases on the training devices). The engine samples whole steps (its own engine, static or
slots: no rows carried across steps), on the rollout mesh over its devices.
The step's phases use the configured engine (slots k=1 with any rollout.max_staleness >= 1); `decode_by_engine` holds
the decode phase of all three for the same m. The reward and update phases stay at prompt + N tokens a row (a batch is padded to its longest row, at the
cap); the step's token counts use m.
"""

from __future__ import annotations

import dataclasses
import json
import math

from models import ModelConfig
from models.attention import PAGED_SLOT_MULTIPLE, decodes_slots_with_paged_kernel, decodes_with_kernel
from rlmt_jax.algorithms.specs import spec_of
from rlmt_jax.core.errors import UserError
from rlmt_jax.settings.config import RunConfig, frozen_param_dtype
from rlmt_jax.plans.memory_plan import (DEVICE_PLATFORMS, DeviceSpec, itemsize, plan_mesh, plan_rollout_mesh,
                                        run_models, split_placement, update_shape)


@dataclasses.dataclass(frozen=True)
class ChipFigures:
    """Peak figures of one device (as JAX counts devices: a TPU chip, a GPU)."""

    flops: float  # dense bfloat16 matmul FLOP/s
    hbm: float  # memory bandwidth, bytes/s
    link: float  # interconnect bandwidth a collective gets, bytes/s each way
    source: str
    latency: float = 0.0  # seconds a collective takes however small (not published: an order of magnitude)
    # Share of `hbm` that memory-bound matmuls of a few rows (a decode step reading its weights and KV cache)
    # reach. Not a published figure: benchmarks/time_plan.py measures it on this CPU (~0.55),
    # benchmarks/device_check.py's sampler line on an accelerator.
    stream: float = 1.0


# Published figures. GPU: NVIDIA datasheets (H100 SXM5: 989 TFLOP/s dense BF16, 3.35 TB/s HBM3, NVLink 4 900 GB/s
# bidirectional; H200 SXM: 989 TFLOP/s, 4.8 TB/s; A100 SXM 80GB: 312 TFLOP/s, 2.039 TB/s, NVLink 3 600 GB/s).
# TPU: cloud.google.com/tpu/docs/{v4,v5p,v5e,v6e} system architecture pages, per chip (ICI Gbps / 8 = bytes/s).
# Latency of one small collective: not a published figure; ~10 us over NVLink (NCCL), ~5 us over ICI.
# stream: not published either; tuned decode kernels are reported at ~70-90% of HBM peak on GPUs and TPUs, so 0.8.
ACCELERATOR_STREAM = 0.8
NVLINK_LATENCY, ICI_LATENCY = 10e-6, 5e-6
CHIPS = {
    "h100": ChipFigures(989e12, 3.35e12, 450e9, "NVIDIA H100 SXM5 datasheet: 989 TFLOP/s BF16, 3.35 TB/s, "
                        "NVLink 900 GB/s", NVLINK_LATENCY, ACCELERATOR_STREAM),
    "h200": ChipFigures(989e12, 4.8e12, 450e9, "NVIDIA H200 SXM datasheet: 989 TFLOP/s BF16, 4.8 TB/s, "
                        "NVLink 900 GB/s", NVLINK_LATENCY, ACCELERATOR_STREAM),
    "a100": ChipFigures(312e12, 2.039e12, 300e9, "NVIDIA A100 SXM 80GB datasheet: 312 TFLOP/s BF16, 2.039 TB/s, "
                        "NVLink 600 GB/s", NVLINK_LATENCY, ACCELERATOR_STREAM),
    "v4": ChipFigures(275e12, 1.228e12, 300e9, "Cloud TPU v4 docs: 275 TFLOP/s BF16, 1228 GB/s HBM, ICI 2400 Gbps",
                      ICI_LATENCY, ACCELERATOR_STREAM),
    "v5p": ChipFigures(459e12, 2.765e12, 600e9, "Cloud TPU v5p docs: 459 TFLOP/s BF16, 2765 GB/s HBM, ICI 4800 Gbps",
                       ICI_LATENCY, ACCELERATOR_STREAM),
    "v5e": ChipFigures(197e12, 819e9, 200e9, "Cloud TPU v5e docs: 197 TFLOP/s BF16, 819 GB/s HBM, ICI 1600 Gbps",
                       ICI_LATENCY, ACCELERATOR_STREAM),
    "v6e": ChipFigures(918e12, 1.64e12, 448e9, "Cloud TPU v6e docs: 918 TFLOP/s BF16, 1640 GB/s HBM, ICI 3584 Gbps",
                       ICI_LATENCY, ACCELERATOR_STREAM),
}


@dataclasses.dataclass(frozen=True)
class PhaseTime:
    name: str
    flops: float  # per device
    hbm_bytes: float  # per device
    link_bytes: float  # per device
    seconds: float
    how: str
    beside: bool = False  # split placement: on the engine's devices, while the training devices run the others


# The decode engines the plan compares: rollout.engine's two, and partial rollouts across steps (slots with
# rollout.max_staleness 1).
ENGINES = ("static", "slots", "slots k=1")
# The metric of a run's metrics.jsonl that holds the step's mean response length (rollout.scored.length_metrics).
RESPONSE_LENGTH_METRIC = "response_tokens_mean"


@dataclasses.dataclass(frozen=True)
class TimePlan:
    device: DeviceSpec
    chip: ChipFigures
    phases: tuple[PhaseTime, ...]
    sampled_tokens: int  # response tokens a step generates (rows x the mean response length)
    sequence_tokens: int  # prompt + response tokens a step trains on
    engine: str = "static"  # rollout.engine: whose decode phase is in `phases`
    response_mean: float = 0.0  # the mean response length the decode phase assumes (tokens)
    decode_by_engine: dict[str, PhaseTime] = dataclasses.field(default_factory=dict)  # ENGINES -> decode phase
    engine_devices: int = 0  # split placement: the engine's devices (rollout.devices x hosts); 0: colocated

    @property
    def step_seconds(self) -> float:
        """The phases one after the other; with split placement the push, then the longer of the engine's
        phases and the training devices' others."""
        beside = sum(p.seconds for p in self.phases if p.beside)
        if not beside:
            return sum(p.seconds for p in self.phases)
        push = sum(p.seconds for p in self.phases if p.name == PUSH_PHASE)
        return push + max(beside, sum(p.seconds for p in self.phases if not p.beside and p.name != PUSH_PHASE))

    @property
    def tokens_per_second_per_chip(self) -> float:
        """Sequence (prompt + response) tokens per second per device, as the trainer's tokens_per_s / devices."""
        return self.sequence_tokens / self.step_seconds / self.device.count

    def phase(self, name: str) -> PhaseTime:
        return next(p for p in self.phases if p.name == name)

    def to_dict(self) -> dict:
        return {"chip": dataclasses.asdict(self.chip), "phases": [dataclasses.asdict(p) for p in self.phases],
                "step_seconds": self.step_seconds, "tokens_per_second_per_chip": self.tokens_per_second_per_chip,
                "sampled_tokens": self.sampled_tokens, "sequence_tokens": self.sequence_tokens,
                "engine": self.engine, "response_mean": self.response_mean,
                "decode_by_engine": {engine: {"seconds": p.seconds, "how": p.how}
                                     for engine, p in self.decode_by_engine.items()},
                "engine_devices": self.engine_devices}


def _phase(name: str, flops: float, hbm: float, link: float, chip: ChipFigures, how: str,
           collectives: int = 0, streamed: bool = False) -> PhaseTime:
    """streamed: the hbm bytes are read by matmuls of a few rows (a decode step), at chip.stream of the bandwidth."""
    bandwidth = chip.hbm * (chip.stream if streamed else 1.0)
    seconds = max(flops / chip.flops, hbm / bandwidth) + link / chip.link + collectives * chip.latency
    return PhaseTime(name, flops, hbm, link, seconds, how)


def _matmul_params(config) -> int:
    """Params a token's forward multiplies by (every layer's kernels and the lm head; not the embedding lookup)."""
    d, f, h, kv, hd = (config.hidden_size, config.intermediate_size, config.num_attention_heads,
                       config.num_key_value_heads, config.head_dim)
    per_layer = d * (h + 2 * kv) * hd + h * hd * d + 3 * d * f
    return config.num_hidden_layers * per_layer + d * (config.vocab_size if config.kind == "causal_lm" else 1)


def _attention_flops(config, rows: int, queries: int, keys: float) -> float:
    """Scores and values: 4 x layers x rows x queries x keys x heads x head_dim."""
    return 4 * config.num_hidden_layers * rows * queries * keys * config.num_attention_heads * config.head_dim


def _ring(n: int) -> float:
    return (n - 1) / n if n > 1 else 0.0


def time_plan(cfg: RunConfig, device: DeviceSpec, chip: ChipFigures | None = None,
              response_mean: float | None = None) -> TimePlan:
    """The estimated time of one GRPO/PPO step of `cfg` on `device` (chip: the device's figures; default CHIPS).

    response_mean: the responses' mean length in tokens (default rollout.max_new_tokens: every response at the
    cap); the decode phase of rollout.engine follows it (the module docstring's model)."""
    if spec_of(cfg).loop != "rollouts":
        raise ValueError("the time plan covers the algorithms that sample every step (grpo, ppo, ...)")
    chip = chip or CHIPS[device.kind]
    models = run_models(cfg)
    policy, rm = models["policy"].config, models["reward model"].config
    training, engine = split_placement(cfg, device)
    sizes = _StepSizes.of(cfg, training, policy, response_mean)
    decoding = engine or device  # the devices the engine samples on
    layout = _SamplerLayout.of(cfg, decoding)
    engine_sizes = dataclasses.replace(sizes, devices=decoding.count)
    by_engine = {name: _decode_phase(cfg, decoding, chip, engine_sizes, layout, name) for name in ENGINES}
    rollout = _rollout_phases(cfg, chip, engine_sizes, layout, by_engine[engine_of(cfg)])
    if engine is not None:
        rollout = [_push_phase(chip, sizes), *(dataclasses.replace(p, beside=True) for p in rollout
                                               if p.name != "rollout copy")]
    phases = [*rollout, _reward_phase(cfg, chip, rm, sizes),
              *_update_phases(cfg, chip, sizes, with_reference="reference" in models)]
    sampled = round(sizes.rows * sizes.mean)
    return TimePlan(device, chip, tuple(phases), sampled, sizes.rows * sizes.prompt_len + sampled, engine_of(cfg),
                    sizes.mean, by_engine, 0 if engine is None else engine.count)


def response_mean_of(metrics_file: str) -> float:
    """The mean of RESPONSE_LENGTH_METRIC over the lines of a run's metrics.jsonl (lines without it skipped)."""
    try:
        with open(metrics_file) as f:
            lines = [line for line in f if line.strip()]
    except OSError as err:
        raise UserError(f"--response-lengths {metrics_file}: cannot read it ({err.strerror or err})") from None
    if not lines:
        raise UserError(f"--response-lengths {metrics_file}: the file is empty")
    values = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"--response-lengths {metrics_file}: line {number} is not JSON ({err.msg})") from None
        value = record.get(RESPONSE_LENGTH_METRIC) if isinstance(record, dict) else None
        if isinstance(value, (int, float)) and math.isfinite(value):
            values.append(float(value))
    if not values:
        raise UserError(f"--response-lengths {metrics_file}: no line has the metric {RESPONSE_LENGTH_METRIC!r} "
                        "(a run's metrics.jsonl has it on every rollout step)")
    return sum(values) / len(values)


@dataclasses.dataclass(frozen=True)
class _StepSizes:
    """The sizes of a step that every phase's estimate reads."""

    policy: ModelConfig
    devices: int
    fsdp: int  # of the training mesh
    tensor: int  # of the training mesh
    act: int  # bytes of an element in the compute dtype
    param: int  # in the param dtype
    frozen: int  # in the dtype the reference and the reward model are stored in
    prompts: int  # rollout.prompts_per_step
    rows: int  # prompts x rollout.n
    prompt_len: int  # data.max_prompt_tokens
    new: int  # rollout.max_new_tokens
    weights: int  # the policy's matmul params (_matmul_params)
    mean: float  # the responses' mean length (tokens), at most `new`

    @classmethod
    def of(cls, cfg: RunConfig, device: DeviceSpec, policy: ModelConfig,
           response_mean: float | None = None) -> _StepSizes:
        mesh = plan_mesh(cfg, device)
        prompts, new = cfg.rollout.prompts_per_step, cfg.rollout.max_new_tokens
        mean = float(new if response_mean is None else response_mean)
        if not 0 < mean <= new:
            raise UserError(f"response mean {response_mean:g} tokens (--response-mean / --response-lengths): must be "
                            f"> 0 and at most rollout.max_new_tokens ({new})")
        return cls(policy, device.count, mesh.shape["fsdp"], mesh.shape["tensor"], itemsize(cfg.runtime.dtype),
                   itemsize(cfg.runtime.param_dtype), itemsize(frozen_param_dtype(cfg.runtime)), prompts,
                   prompts * cfg.rollout.n, cfg.data.max_prompt_tokens, new, _matmul_params(policy), mean)

    @property
    def seq(self) -> int:
        """Tokens of a sequence: the prompt and the whole response."""
        return self.prompt_len + self.new

    @property
    def training_shards(self) -> int:
        """Devices each weight of the training layout is split over (fsdp x tensor)."""
        return self.fsdp * self.tensor


@dataclasses.dataclass(frozen=True)
class _SamplerLayout:
    """Where the sampler runs: the policy's copy in the decode layout (rollout.mesh) when `resharded`, else the
    training layout as it is."""

    resharded: bool
    data: int  # devices the rows split over
    tensor: int  # devices each weight splits over

    @classmethod
    def of(cls, cfg: RunConfig, device: DeviceSpec) -> _SamplerLayout:
        mesh, _ = plan_rollout_mesh(cfg, device)
        return cls(cfg.rollout.mesh.reshard, mesh.shape["data"] * mesh.shape["fsdp"], mesh.shape["tensor"])

    def copies(self, sizes: _StepSizes) -> bool:
        """Whether the sampler makes a copy: it skips it when the params already lie as the layout wants them
        (same dtype, whole)."""
        return self.resharded and not (sizes.act == sizes.param and sizes.training_shards == 1 and self.tensor == 1)

    def weight_bytes(self, sizes: _StepSizes) -> float:
        """Bytes of the policy's weights each device reads per forward (a decode step: per step)."""
        return sizes.weights * sizes.act / (self.tensor if self.resharded else sizes.training_shards)

    def link_bytes(self, sizes: _StepSizes, rows: int, tokens_per_row: int) -> float:
        """Link bytes of a forward of `rows` x `tokens_per_row` tokens: tensor-parallel all-reduces, 2 per layer of
        [rows, tokens, embed]; with FSDP every layer's weights gathered."""
        policy = sizes.policy
        if self.resharded:
            local_rows = math.ceil(rows / self.data)
            activations = local_rows * tokens_per_row * policy.hidden_size * sizes.act
            return 2 * policy.num_hidden_layers * activations * 2 * _ring(self.tensor)
        layer_weights = sizes.weights - policy.hidden_size * policy.vocab_size  # what an FSDP decode loop gathers
        return layer_weights * sizes.param * _ring(sizes.fsdp)  # gathered in the param dtype (the HLO shows float32)

    def decode_collectives(self, sizes: _StepSizes) -> int:
        """Collectives of a decode step: 2 all-reduces a layer (tensor > 1), or a gather of every layer's kernels
        (4 a layer) with FSDP, + the loop condition's all-reduce."""
        layers = sizes.policy.num_hidden_layers
        return (2 * layers * (self.tensor > 1) if self.resharded else 4 * layers * (sizes.fsdp > 1)) + 1


def _rollout_phases(cfg: RunConfig, chip: ChipFigures, sizes: _StepSizes, layout: _SamplerLayout,
                    decode: PhaseTime) -> list[PhaseTime]:
    """The sampler's phases: the policy's copy into the decode layout (when one is made), the prefill, the
    `decode` phase of the configured engine."""
    phases = []
    if layout.copies(sizes):
        copy_hbm = sizes.weights * sizes.param / sizes.training_shards + layout.weight_bytes(sizes)  # read, write
        copy_link = sizes.weights * sizes.act * _ring(sizes.devices)  # gather the bfloat16 shards once
        phases.append(_phase("rollout copy", 0.0, copy_hbm, copy_link, chip,
                             "cast + all-gather the policy once into the decode layout"))
    return [*phases, _prefill_phase(cfg, chip, sizes, layout), decode]


PUSH_PHASE = "rollout push"


def _push_phase(chip: ChipFigures, sizes: _StepSizes) -> PhaseTime:
    """Split placement: the policy cast and gathered whole on every training device (one program among them),
    then copied to the engine's devices of the same host (not counted: a host-local copy, over PCIe/ICI)."""
    hbm = sizes.weights * (sizes.param / sizes.training_shards + sizes.act)  # read a shard, write it whole
    link = sizes.weights * sizes.act * _ring(sizes.devices)
    return _phase(PUSH_PHASE, 0.0, hbm, link, chip, f"cast + all-gather the policy whole on each of the "
                  f"{sizes.devices} training devices, then copied to its host's engine devices")


def _kv_bytes_per_slot(cfg: RunConfig, policy: ModelConfig) -> int:
    """Bytes of one row's k and v at one cache slot, over every layer."""
    cache = itemsize(cfg.rollout.cache_dtype or cfg.runtime.dtype)
    return 2 * policy.num_hidden_layers * policy.num_key_value_heads * policy.head_dim * cache


def _prefill_phase(cfg: RunConfig, chip: ChipFigures, sizes: _StepSizes, layout: _SamplerLayout) -> PhaseTime:
    """Every prompt once through the policy, its KV cache written; with partial rollouts (carried_cache
    recompute) also the rows carried from the previous step (up to the slots), prompt and response so far
    (m / 2 on average)."""
    policy, prompts, prompt_len = sizes.policy, sizes.prompts, sizes.prompt_len
    what = f"{prompts} prompts x {prompt_len} tokens"
    sequences = [(prompts, prompt_len)]
    if engine_of(cfg) == "slots k=1" and cfg.rollout.carried_cache == "recompute":
        carried, length = cfg.rollout.slots * layout.data, round(prompt_len + sizes.mean / 2)
        sequences.append((carried, length))
        what += f" + up to {carried} carried rows x {length} (caches computed again)"
    flops = sum(2 * sizes.weights * rows * length + _attention_flops(policy, rows, length, length)
                for rows, length in sequences) / sizes.devices
    tokens = sum(rows * length for rows, length in sequences)
    hbm = layout.weight_bytes(sizes) + tokens * _kv_bytes_per_slot(cfg, policy) / sizes.devices
    link = sum(layout.link_bytes(sizes, rows, length) for rows, length in sequences)
    return _phase("rollout prefill", flops, hbm, link, chip, what)


def engine_of(cfg: RunConfig) -> str:
    """Which of ENGINES the run's rollout settings make: static, slots, or slots k=1 (rollout.max_staleness >= 1,
    modelled as 1; with split placement the engine's own: it samples whole steps, no rows carried)."""
    if cfg.rollout.engine == "static":
        return "static"
    return "slots k=1" if cfg.rollout.max_staleness and not cfg.rollout.devices else "slots"


def _decode_phase(cfg: RunConfig, device: DeviceSpec, chip: ChipFigures, sizes: _StepSizes,
                  layout: _SamplerLayout, engine: str) -> PhaseTime:
    """The decode steps of `engine` (ENGINES; the module docstring's model): each reads every device's weights
    and the cache slots its rows attend to."""
    policy = sizes.policy
    steps, rows, mean_keys, shape = _decode_shape(cfg, device, sizes, layout, engine)
    step_flops = (2 * sizes.weights * rows + _attention_flops(policy, rows, 1, mean_keys)) / sizes.devices
    step_hbm = layout.weight_bytes(sizes) + rows * mean_keys * _kv_bytes_per_slot(cfg, policy) / sizes.devices
    step = _phase("decode step", step_flops, step_hbm, layout.link_bytes(sizes, rows, 1), chip, "",
                  layout.decode_collectives(sizes), streamed=True)
    return PhaseTime("rollout decode", step.flops * steps, step.hbm_bytes * steps, step.link_bytes * steps,
                     step.seconds * steps,
                     f"{shape}, ~{mean_keys:.0f} cache slots read per row per step, {step.seconds * 1e3:.2f} ms a step"
                     )


def _decode_shape(cfg: RunConfig, device: DeviceSpec, sizes: _StepSizes, layout: _SamplerLayout,
                  engine: str) -> tuple[int, int, float, str]:
    """(decode steps, rows each step runs over all replicas, cache slots a row reads per step, how) of `engine`.

    static: N steps x every row. slots: max(N, ceil(R m / S)) steps x S slots a replica; k=1: ceil(R m / S) steps
    (R rows a replica, m the mean response, N the cap, S = rollout.slots)."""
    new = sizes.new
    if engine == "static":
        return new, sizes.rows, _mean_decode_keys(cfg, device, sizes.policy), f"{new} steps x {sizes.rows} rows"
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is not one of {ENGINES}")
    replicas, slots = layout.data, cfg.rollout.slots
    rows = math.ceil(sizes.rows / replicas)  # R: per replica
    shared = math.ceil(rows * sizes.mean / slots)  # the steps S slots take to write R x m tokens
    steps = max(new, shared) if engine == "slots" else shared
    bound = f"max({new}, " if engine == "slots" else ""
    how = (f"{steps} steps = {bound}ceil({rows} rows x {sizes.mean:g} mean / {slots} slots){')' if bound else ''} "
           f"x {slots * replicas} rows ({slots} slots x {replicas} replicas)")
    return steps, slots * replicas, _slot_decode_keys(cfg, device, sizes), how


def _slot_decode_keys(cfg: RunConfig, device: DeviceSpec, sizes: _StepSizes) -> float:
    """Cache slots a slot's decode step reads, on average: with the decode kernel, the prompt + the response
    slots a running row has written, E[L^2] / (2 E[L]) (m for exponential lengths, at most (N + 1) / 2 under the
    cap N); the paged kernel (TPU) the same in whole compute blocks, half a block more on average; on the xla
    path the windows so far, as the static sampler (_mean_decode_keys)."""
    written = sizes.prompt_len + min(sizes.mean, (sizes.new + 1) / 2)
    if _decodes_with_kernel(cfg, device, sizes.policy):
        return written
    if decodes_slots_with_paged_kernel(_runtime_policy(cfg, sizes.policy), DEVICE_PLATFORMS[device.kind]):
        return written + PAGED_SLOT_MULTIPLE / 2
    return _mean_decode_keys(cfg, device, sizes.policy)


def _runtime_policy(cfg: RunConfig, policy: ModelConfig) -> ModelConfig:
    """The policy's ModelConfig with the run's attention and compute dtype (what picks its kernels)."""
    return dataclasses.replace(policy, attention=cfg.runtime.attention, dtype=cfg.runtime.dtype)


def _decodes_with_kernel(cfg: RunConfig, device: DeviceSpec, policy: ModelConfig) -> bool:
    return decodes_with_kernel(_runtime_policy(cfg, policy), DEVICE_PLATFORMS[device.kind])


def _mean_decode_keys(cfg: RunConfig, device: DeviceSpec, policy: ModelConfig) -> float:
    """Cache slots a row's decode step reads, on average over the response (the decode windows, if any)."""
    from rlmt_jax.rollout.sampling_config import SamplingConfig

    prompt_len, new = cfg.data.max_prompt_tokens, cfg.rollout.max_new_tokens
    if _decodes_with_kernel(cfg, device, policy):
        return prompt_len + (new + 1) / 2  # the decode kernel reads each row's slots up to the one written
    # the xla path reads every slot of the windows so far, filled or not
    blocks = SamplingConfig(max_new_tokens=new, decode_windows=cfg.rollout.decode_windows).response_blocks()
    attended, filled = 0.0, 0
    for width in blocks:
        filled += width
        attended += width * (prompt_len + filled)
    return attended / max(sum(blocks), 1)


def _reward_phase(cfg: RunConfig, chip: ChipFigures, rm: ModelConfig, sizes: _StepSizes) -> PhaseTime:
    """The reward model on the training mesh (FSDP): one forward of prompt + response per row, its weights
    gathered per call."""
    rows, reward_batch = sizes.rows, cfg.reward.batch_size
    reward_seq = min(sizes.seq, cfg.reward.max_length)
    rm_weights = _matmul_params(rm)
    calls = math.ceil(rows / reward_batch)
    flops = 2 * rm_weights * rows * reward_seq + _attention_flops(rm, rows, reward_seq, reward_seq / 2)
    flops /= sizes.devices
    gathered = calls * rm_weights * sizes.frozen
    return _phase("reward scoring", flops, gathered / sizes.training_shards, gathered * _ring(sizes.fsdp), chip,
                  f"{calls} calls of {reward_batch} rows x {reward_seq} tokens")


def _update_phases(cfg: RunConfig, chip: ChipFigures, sizes: _StepSizes, with_reference: bool) -> list[PhaseTime]:
    """The old (and reference) log-probs and the update: micro-batches of the training layout."""
    weights, rows, seq, fsdp = sizes.weights, sizes.rows, sizes.seq, sizes.fsdp
    micro_rows, _, micro = update_shape(cfg)
    forward_flops = (2 * weights * rows * seq + _attention_flops(sizes.policy, rows, seq, seq / 2)) / sizes.devices
    gather = weights * sizes.act * _ring(fsdp)  # one all-gather of the weights in the compute dtype per micro-batch
    forwards = [("old log-probs", sizes.param)] + ([("reference log-probs", sizes.frozen)] if with_reference else [])
    phases = [_phase(name, forward_flops, micro * weights * stored / sizes.training_shards, micro * gather, chip,
                     f"{micro} micro-batches of {micro_rows} rows x {seq} tokens")
              for name, stored in forwards]
    remat = {"none": 3, "dots": 3.5, "full": 4}[cfg.runtime.remat]  # forwards + backward (2x) + rebuilt forward
    shard = weights / sizes.training_shards
    epochs = cfg.algorithm.update_epochs
    phases.append(_phase(
        "update", forward_flops * remat * epochs,
        epochs * (micro * shard * (3 * sizes.param + 2 * 4) + shard * 4 * 7),
        epochs * micro * (2 * gather + weights * 4 * _ring(fsdp)), chip,
        f"{micro} micro-batches: forward, backward (x2){', rebuilt forward' if remat == 4 else ''}; weights "
        "gathered twice and float32 gradients reduce-scattered per micro-batch; AdamW on the shards"))
    return phases
