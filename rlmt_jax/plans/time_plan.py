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
Decode assumes every response runs to rollout.max_new_tokens (an upper bound: real responses stop earlier).
Peak figures are the published ones (CHIPS, with sources); a real step reaches a fraction of them.
"""

from __future__ import annotations

import dataclasses
import math

from rlmt_jax.algorithms.specs import spec_of
from rlmt_jax.settings.config import RunConfig, frozen_param_dtype
from models.attention import decodes_with_kernel
from rlmt_jax.plans.memory_plan import (DEVICE_PLATFORMS, DeviceSpec, itemsize, plan_mesh, plan_rollout_mesh, run_models,
                                  update_shape)


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


@dataclasses.dataclass(frozen=True)
class TimePlan:
    device: DeviceSpec
    chip: ChipFigures
    phases: tuple[PhaseTime, ...]
    sampled_tokens: int  # response tokens a step generates (every row to max_new_tokens)
    sequence_tokens: int  # prompt + response tokens a step trains on

    @property
    def step_seconds(self) -> float:
        return sum(p.seconds for p in self.phases)

    @property
    def tokens_per_second_per_chip(self) -> float:
        """Sequence (prompt + response) tokens per second per device, as the trainer's tokens_per_s / devices."""
        return self.sequence_tokens / self.step_seconds / self.device.count

    def phase(self, name: str) -> PhaseTime:
        return next(p for p in self.phases if p.name == name)

    def to_dict(self) -> dict:
        return {"chip": dataclasses.asdict(self.chip), "phases": [dataclasses.asdict(p) for p in self.phases],
                "step_seconds": self.step_seconds, "tokens_per_second_per_chip": self.tokens_per_second_per_chip,
                "sampled_tokens": self.sampled_tokens, "sequence_tokens": self.sequence_tokens}


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


def time_plan(cfg: RunConfig, device: DeviceSpec, chip: ChipFigures | None = None) -> TimePlan:
    """The estimated time of one GRPO/PPO step of `cfg` on `device` (chip: the device's figures; default CHIPS)."""
    if spec_of(cfg).loop != "rollouts":
        raise ValueError("the time plan covers the algorithms that sample every step (grpo, ppo, ...)")
    chip = chip or CHIPS[device.kind]
    models = run_models(cfg)
    policy, rm = models["policy"].config, models["reward model"].config
    n_dev = device.count
    mesh = plan_mesh(cfg, device)
    fsdp, tensor = mesh.shape["fsdp"], mesh.shape["tensor"]
    act = itemsize(cfg.runtime.dtype)
    param = itemsize(cfg.runtime.param_dtype)
    frozen = itemsize(frozen_param_dtype(cfg.runtime))
    cache = itemsize(cfg.rollout.cache_dtype or cfg.runtime.dtype)
    prompts, n, prompt_len, new = (cfg.rollout.prompts_per_step, cfg.rollout.n, cfg.data.max_prompt_tokens,
                                   cfg.rollout.max_new_tokens)
    rows, seq = prompts * n, prompt_len + new
    weights = _matmul_params(policy)
    layer_weights = weights - policy.hidden_size * policy.vocab_size  # what an FSDP decode loop gathers per token
    phases = []

    # ---- rollout: the policy's copy in the decode layout, or the training layout as it is
    rmesh, _ = plan_rollout_mesh(cfg, device)
    r_tensor = rmesh.shape["tensor"]
    r_data = rmesh.shape["data"] * rmesh.shape["fsdp"]
    resharded = cfg.rollout.mesh.reshard
    weight_share = weights * act / r_tensor if resharded else weights * act / (fsdp * tensor)
    copy_link = weights * act * _ring(n_dev) if resharded else 0.0  # gather the bfloat16 shards once
    # the sampler skips the copy when the params already lie as the layout wants them (same dtype, whole)
    if resharded and not (act == param and fsdp * tensor == 1 and r_tensor == 1):
        copy_hbm = weights * param / (fsdp * tensor) + weight_share  # read the float32 shard, write the copy
        phases.append(_phase("rollout copy", 0.0, copy_hbm, copy_link, chip,
                             "cast + all-gather the policy once into the decode layout"))
    # tensor-parallel all-reduces: 2 per layer of [rows, tokens, embed]; FSDP: every layer's weights gathered
    def sample_link(sampled_rows: int, tokens_per_row: int) -> float:
        if resharded:
            local_rows = math.ceil(sampled_rows / r_data)
            activations = local_rows * tokens_per_row * policy.hidden_size * act
            return 2 * policy.num_hidden_layers * activations * 2 * _ring(r_tensor)
        return layer_weights * param * _ring(fsdp)  # gathered in the param dtype (the HLO shows float32)

    prefill_flops = 2 * weights * prompts * prompt_len + _attention_flops(policy, prompts, prompt_len, prompt_len)
    prefill_flops /= n_dev
    kv_per_slot = 2 * policy.num_hidden_layers * policy.num_key_value_heads * policy.head_dim * cache  # one row
    phases.append(_phase("rollout prefill", prefill_flops,
                         weight_share + prompts * prompt_len * kv_per_slot / n_dev, sample_link(prompts, prompt_len),
                         chip, f"{prompts} prompts x {prompt_len} tokens"))
    # decode: every step each device reads its weights and the cache slots its rows attend to (decode windows)
    from rlmt_jax.rollout.sampling import SamplingConfig

    if decodes_with_kernel(dataclasses.replace(policy, attention=cfg.runtime.attention, dtype=cfg.runtime.dtype),
                           DEVICE_PLATFORMS[device.kind]):
        mean_keys = prompt_len + (new + 1) / 2  # the decode kernel reads each row's slots up to the one written
    else:  # the xla path reads every slot of the windows so far, filled or not
        blocks = SamplingConfig(max_new_tokens=new, decode_windows=cfg.rollout.decode_windows).response_blocks()
        attended, filled = 0.0, 0
        for width in blocks:
            filled += width
            attended += width * (prompt_len + filled)
        mean_keys = attended / max(sum(blocks), 1)
    step_flops = (2 * weights * rows + _attention_flops(policy, rows, 1, mean_keys)) / n_dev
    step_hbm = weight_share + rows * mean_keys * kv_per_slot / n_dev
    # per step: 2 all-reduces a layer (tensor > 1), or a gather of every layer's kernels (4 a layer) with FSDP
    per_step = (2 * policy.num_hidden_layers * (r_tensor > 1) if resharded
                else 4 * policy.num_hidden_layers * (fsdp > 1)) + 1  # + the loop condition's all-reduce
    step = _phase("decode step", step_flops, step_hbm, sample_link(rows, 1), chip, "", per_step, streamed=True)
    phases.append(PhaseTime("rollout decode", step.flops * new, step.hbm_bytes * new, step.link_bytes * new,
                            step.seconds * new,
                            f"{new} steps x {rows} rows, ~{mean_keys:.0f} cache slots read per row per step, "
                            f"{step.seconds * 1e3:.2f} ms a step"))

    # ---- reward model (training mesh, FSDP): one forward of prompt + response per row, weights gathered per call
    reward_batch = cfg.reward.batch_size
    reward_seq = min(seq, cfg.reward.max_length)
    rm_weights = _matmul_params(rm)
    calls = math.ceil(rows / reward_batch)
    phases.append(_phase(
        "reward scoring",
        (2 * rm_weights * rows * reward_seq + _attention_flops(rm, rows, reward_seq, reward_seq / 2)) / n_dev,
        calls * rm_weights * frozen / (fsdp * tensor), calls * rm_weights * frozen * _ring(fsdp), chip,
        f"{calls} calls of {reward_batch} rows x {reward_seq} tokens"))

    # ---- old and reference log-probs, update: micro-batches of the training layout
    micro_rows, _, micro = update_shape(cfg)
    forward_flops = (2 * weights * rows * seq + _attention_flops(policy, rows, seq, seq / 2)) / n_dev
    gather = weights * act * _ring(fsdp)  # one all-gather of the weights in the compute dtype per micro-batch
    forwards = [("old log-probs", param)]
    if "reference" in models:
        forwards.append(("reference log-probs", frozen))
    for name, stored in forwards:
        phases.append(_phase(name, forward_flops, micro * weights * stored / (fsdp * tensor), micro * gather, chip,
                             f"{micro} micro-batches of {micro_rows} rows x {seq} tokens"))
    remat = {"none": 3, "dots": 3.5, "full": 4}[cfg.runtime.remat]  # forwards + backward (2x) + rebuilt forward
    shard = weights / (fsdp * tensor)
    phases.append(_phase(
        "update", forward_flops * remat * cfg.algorithm.update_epochs,
        cfg.algorithm.update_epochs * (micro * shard * (3 * param + 2 * 4) + shard * 4 * 7),
        cfg.algorithm.update_epochs * micro * (2 * gather + weights * 4 * _ring(fsdp)), chip,
        f"{micro} micro-batches: forward, backward (x2){', rebuilt forward' if remat == 4 else ''}; weights "
        "gathered twice and float32 gradients reduce-scattered per micro-batch; AdamW on the shards"))
    return TimePlan(device, chip, tuple(phases), rows * new, rows * seq)
