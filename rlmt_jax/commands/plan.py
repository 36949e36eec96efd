"""`rlmt-jax plan [CONFIG] [key=value ...]`: per-device memory and time of a run on a mesh, before launch.

Nothing is allocated and no device is needed: the models are built abstractly from their config.json
(or the built-in shapes of the published models the recipes name), placed by the real partition rules
on an abstract mesh of the run's shape, and the table says what each device holds in each phase, the
peak, whether it fits the device's memory, and the largest item. For GRPO and PPO it also estimates each
phase's time per step from its FLOPs, memory and interconnect bytes at the device's published peak figures
(rlmt_jax.plans.time_plan), the step time and the tokens per second per chip. The decode follows rollout.engine
and the responses' mean length (--response-mean, or --response-lengths a run's metrics.jsonl; default: every
response at rollout.max_new_tokens), and a line compares the decode of each engine.
"""

from __future__ import annotations

import json

GIB = 2**30
# The legend under the memory table: how the estimated items are computed (rlmt_jax.plans.memory_plan).
FORMULAS = (
    "Params and optimizer state are exact (real shapes, real shardings). Activations per layer, per device "
    "(b = compute-dtype bytes, B rows, T tokens, D embed, H/K heads, Dh head_dim, F mlp):",
    "  no remat: B*T*D*(4b+8) + B*T*(2H+2K)*Dh*b + attention + B*T*F*4b; dots: B*T*(3D+(H+2K)*Dh+2F)*b; "
    "full: B*T*D*b",
    "  attention: xla B*H*T^2*(4+b); splash and cudnn B*H*T*4 + B*T*(H+2K)*Dh*b (splash: T rounded up to 128)",
    "  total = layers x kept + one layer rebuilt (with remat) + embedding/final norm B*T*D*(2b+4) + mask B*T^2 "
    "(kernels: B*T); logits chunk B*C*V*(2b+8); KV cache 2*L*R*S*K*Dh*bytes (R: the step's rows, or with "
    "rollout.engine=slots the slots). XLA temporaries are not counted.",
)


def register(subparsers) -> None:
    from rlmt_jax.commands.train import add_import_option

    parser = subparsers.add_parser(
        "plan",
        help="per-device memory of a run on its mesh (nothing allocated)",
        description=__doc__.split("\n\n")[1] + " Example: rlmt-jax plan grpo_llama31_8b_instruct "
        "--device-kind v5p-64; rlmt-jax plan grpo_llama31_8b_instruct mesh.fsdp=8 --device-kind h100",
    )
    parser.add_argument("config", nargs="?", default=None, help="YAML file or shipped config name")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optimizer.micro_batch_size=8")
    parser.add_argument(
        "--device-kind", default="h100",
        help="v5p | v5e (v5litepod) | v6e | v4 | h100 | h200 | a100 | cpu, or a TPU slice type such as v5p-64 "
        "(default h100)",
    )
    parser.add_argument(
        "--devices", type=int, default=None,
        help="number of devices as JAX counts them (TPU v4/v5p: chips; a v5p-64 is 32); "
        "default: from the slice type, 8 for h100/h200, 1 for cpu",
    )
    parser.add_argument("--slices", type=int, default=1, help="TPU slices (multi-slice over DCN; default 1)")
    lengths = parser.add_mutually_exclusive_group()
    lengths.add_argument(
        "--response-mean", type=float, default=None, metavar="TOKENS",
        help="mean response length for the time plan's decode (default: rollout.max_new_tokens, every response "
        "at the cap)",
    )
    lengths.add_argument(
        "--response-lengths", default=None, metavar="PATH",
        help="a run's metrics.jsonl: the time plan takes the mean of its response_tokens_mean over its lines",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_import_option(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from rlmt_jax.algorithms import import_variants
    from rlmt_jax.commands.train import _split
    from rlmt_jax.settings.config import DEFAULT_CONFIG, find_config, resolve
    from rlmt_jax.plans.memory_plan import DeviceSpec, memory_plan
    from rlmt_jax.algorithms.specs import spec_of
    from rlmt_jax.plans.time_plan import CHIPS, response_mean_of, time_plan

    import_variants(args.imports)
    config, overrides = _split(args.config, args.overrides)
    device = DeviceSpec.parse(args.device_kind, args.devices, args.slices)
    cfg = resolve(config, overrides)
    source = str(find_config(config or DEFAULT_CONFIG))
    if overrides:
        source += " " + " ".join(overrides)
    response_mean = args.response_mean
    if args.response_lengths is not None:
        response_mean = response_mean_of(args.response_lengths)
    plan = memory_plan(cfg, device, source)
    timing = None
    if spec_of(cfg).loop == "rollouts" and device.kind in CHIPS:
        timing = time_plan(cfg, device, response_mean=response_mean)
    if args.json:
        print(json.dumps({**plan.to_dict(), "time": timing.to_dict() if timing else None}, indent=2))
    else:
        print(format_plan(plan, cfg.algorithm.name) + ("\n\n" + format_time_plan(timing) if timing else ""))
    return 0


def gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f}"


def format_plan(plan, algorithm: str = "") -> str:
    """The plan as a table for a terminal."""
    mesh = " x ".join(f"{axis}={size}" for axis, size in plan.mesh_shape.items())
    shapes = plan.shapes
    lines = [
        f"rlmt-jax plan: {plan.config_source}" + (f" ({algorithm})" if algorithm else ""),
        f"devices: {plan.device.count} x {plan.device.kind}, {gib(plan.device.hbm_bytes)} GiB each"
        + (f" (training; + {plan.engine_device.count} decoding beside them, rollout.devices)"
           if plan.engine_device else "")
        + (f", {plan.device.slices} slices" if plan.device.slices > 1 else "") + f"; mesh {mesh}",
        "models:",
    ]
    for m in plan.models:
        lines.append(f"  {m.role:13s} {m.architecture:31s} {m.num_params:>15,} params  {m.param_dtype:8s} "
                     f"{gib(m.global_bytes):>7s} GiB in all  ({m.source})")
    lines.append(
        f"shapes: update {shapes['micro_batch_rows']} sequences x {shapes['update_seq']} tokens per micro-batch, "
        f"{shapes['micro_batches']} micro-batches"
        + (f"; rollout {shapes['rollout_rows']} rows"
           + (f" through {shapes['cache_rows']} slots" if shapes["cache_rows"] != shapes["rollout_rows"] else "")
           + f" x {shapes['cache_slots']} cache slots; reward model {shapes['reward_rows']} rows x "
           f"{shapes['reward_seq']} tokens" if "rollout_rows" in shapes else "")
    )
    lines += ["", f"{'per device':34s} {'phase':14s} {'GiB':>8s}  how"]
    for item in plan.items:
        lines.append(f"{item.name:34s} {item.phase:14s} {gib(item.bytes):>8s}  {item.how}")
    phases = plan.phase_bytes()
    lines += [
        "",
        "phase totals: " + " | ".join(f"{phase} {gib(total)} GiB" for phase, total in phases.items()),
        "activations of one micro-batch by remat: "
        + " | ".join(f"{name} {gib(total)} GiB" for name, total in plan.activations_by_remat.items())
        + f" (configured: {plan.remat})",
        f"attention: {plan.attention} on {plan.device.kind}; one layer keeps, per micro-batch: "
        + " | ".join(f"{name} {gib(total)} GiB" for name, total in plan.attention_by_implementation.items())
        + " (xla: the [T, T] probabilities; the kernels: logsumexp per row and head and their q, k, v)",
        f"peak: {gib(plan.peak_bytes)} GiB of {gib(plan.device.hbm_bytes)} GiB (resident + {plan.peak_phase}): "
        + ("fits" if plan.fits else "does NOT fit"),
        f"largest item: {plan.largest.name} ({gib(plan.largest.bytes)} GiB, {plan.largest.phase})",
    ]
    if plan.engine_device is not None:
        lines.insert(-1, f"engine devices ({plan.engine_device.count}, split placement): {gib(plan.engine_bytes)} "
                     f"GiB each while sampling (the {plan.engine_device.count} hold nothing of the training): "
                     + ("fits" if plan.engine_bytes <= plan.device.hbm_bytes else "does NOT fit"))
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join([*lines, "", *FORMULAS])


def format_time_plan(timing) -> str:
    """The time plan as a table: each phase's per-device work, its estimated seconds, the step."""
    lines = [f"time per step (estimate at peak figures: {timing.chip.source}); rollout.engine {timing.engine}, "
             f"responses {timing.response_mean:g} tokens on average",
             f"{'phase':22s} {'TFLOP':>9s} {'HBM GB':>9s} {'link GB':>9s} {'seconds':>9s}  how"]
    for p in timing.phases:
        where = f" (on the {timing.engine_devices} engine devices, beside the update)" if p.beside else ""
        lines.append(f"{p.name:22s} {p.flops / 1e12:9.2f} {p.hbm_bytes / 1e9:9.2f} {p.link_bytes / 1e9:9.2f} "
                     f"{p.seconds:9.2f}  {p.how}{where}")
    by_engine = timing.decode_by_engine
    split = ""
    if timing.engine_devices:
        split = (f" = push + max(engine {sum(p.seconds for p in timing.phases if p.beside):.1f} s, training "
                 f"{sum(p.seconds for p in timing.phases if not p.beside and p.name != 'rollout push'):.1f} s)"
                 " (split placement)")
    lines += [
        f"step: {timing.step_seconds:.1f} s{split}; {timing.tokens_per_second_per_chip:,.0f} sequence tokens/s "
        "per chip "
        f"({timing.sequence_tokens:,} prompt + response tokens, {timing.sampled_tokens:,} sampled)",
        f"decode by engine ({timing.response_mean:g}-token mean responses, {timing.device.kind}): "
        f"static {by_engine['static'].seconds:.1f} s | slots {by_engine['slots'].seconds:.1f} s | "
        f"slots k=1 {by_engine['slots k=1'].seconds:.1f} s (rollout.max_staleness=1)",
        "per device: max(FLOPs / peak, HBM bytes / bandwidth) + link bytes / link bandwidth + collectives x latency;"
        f" a decode step reads at {timing.chip.stream:.0%} of the bandwidth; a real step reaches a fraction of the"
        " peaks",
    ]
    return "\n".join(lines)
