"""First-compile time of the update step (and of the log-prob forward) against runtime.scan_layers and
runtime.remat, on a deep narrow Llama, in one run.

    python benchmarks/compile_time.py                  # 30 layers, every (scan_layers, remat) pair below
    python benchmarks/compile_time.py --layers 12 --settings scan:none unrolled:none

Why: a 30-layer checkpoint took ~5.5 minutes to compile its first update on a 2-core CPU. Compile time grows
with the size of the program XLA sees; with runtime.scan_layers=false every layer is a copy of the block in it
(forward and backward), with true one block sits in a lax.scan body. Width barely matters to the compiler, so the
model here is the benchmark Llama's config made deep and narrow (default: 30 layers, hidden 256, intermediate 704,
4 heads, 2 KV heads, vocab 32000), and nothing is run: the programs are built from abstract shapes and timed
with jax.jit(...).lower(...) (trace + lower to StableHLO) and .compile() (XLA), as the trainer's first update
does them: `train_step` (GRPO loss, forward + backward + AdamW, one micro-batch) and `compute_logprobs` (the old
and reference log-probs' forward). The persistent compilation cache is off. A 2-layer compile first absorbs
one-time start-up costs.

Each setting is NAME:REMAT, NAME = scan (runtime.scan_layers=true) or unrolled (false), REMAT = none, full, dots.
Last lines, for scripts: compile_time layers=... scan_layers=... remat=... lower_s=... compile_s=... total_s=...
logprobs_s=... load=...
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import VOCAB  # noqa: E402
from benchmarks.fair_timing import load_field  # noqa: E402

DEFAULT_SETTINGS = ("unrolled:none", "scan:none", "unrolled:full", "scan:full", "unrolled:dots", "scan:dots")


def model_config(args, layers: int, scan_layers: bool, remat: str):
    from models.config import ModelConfig

    return ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                       tie_word_embeddings=False, dtype="float32", param_dtype="float32", remat=remat,
                       scan_layers=scan_layers, attention="xla")


def abstract_inputs(cfg, args):
    """(graphdef, params, opt_state, batch): shapes only, no arrays."""
    from flax import nnx

    from models import build_model
    from rlmt_jax.training.optim import AdamWConfig
    from rlmt_jax.training.train_step import init_optimizer_state

    graphdef, params = nnx.split(nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0))), nnx.Param)
    optimizer = AdamWConfig(lr=1e-6)
    opt_state = jax.eval_shape(lambda p: init_optimizer_state(p, optimizer), params)
    rows, seq = args.batch, args.seq
    spec = jax.ShapeDtypeStruct
    batch = {
        "tokens": spec((rows, seq), jnp.int32), "attention_mask": spec((rows, seq), jnp.int32),
        "positions": spec((rows, seq), jnp.int32), "response_mask": spec((rows, seq), jnp.float32),
        "old_logprobs": spec((rows, seq), jnp.float32), "ref_logprobs": spec((rows, seq), jnp.float32),
        "advantages": spec((rows,), jnp.float32),
    }
    return graphdef, params, opt_state, batch, optimizer


def time_compiles(cfg, args) -> dict[str, float]:
    """Seconds to trace + lower and to compile train_step, and to lower + compile compute_logprobs."""
    from rlmt_jax.algorithms import AlgorithmConfig
    from rlmt_jax.algorithms.objectives import PolicyObjective
    from rlmt_jax.training.train_step import compute_logprobs, train_step

    graphdef, params, opt_state, batch, optimizer = abstract_inputs(cfg, args)
    objective = PolicyObjective(AlgorithmConfig(), temperature=1.0, norm_length=float(args.seq - args.prompt),
                                response_start=args.prompt)
    begin = time.perf_counter()
    lowered = train_step.lower(graphdef, params, opt_state, batch, objective=objective, optimizer=optimizer,
                               num_micro_batches=1)
    lowered_at = time.perf_counter()
    lowered.compile()
    compiled_at = time.perf_counter()
    compute_logprobs.lower(graphdef, params, {k: batch[k] for k in ("tokens", "attention_mask", "positions")},
                           temperature=1.0, response_start=args.prompt).compile()
    logprobs_at = time.perf_counter()
    return {"lower_s": lowered_at - begin, "compile_s": compiled_at - lowered_at, "total_s": compiled_at - begin,
            "logprobs_s": logprobs_at - compiled_at}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=704)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--batch", type=int, default=8, help="rows of the update batch")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), metavar="NAME:REMAT",
                        help="(scan|unrolled):(none|full|dots) pairs, timed in this order")
    args = parser.parse_args()
    settings = []
    for item in args.settings:
        name, _, remat = item.partition(":")
        if name not in ("scan", "unrolled") or remat not in ("none", "full", "dots"):
            parser.error(f"--settings: {item!r} is not (scan|unrolled):(none|full|dots)")
        settings.append((name == "scan", remat))

    jax.config.update("jax_enable_compilation_cache", False)  # every compile here is a first compile
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores); model: {args.layers} "
          f"layers, hidden {args.hidden}, intermediate {args.intermediate}, {args.heads} heads, {args.kv_heads} KV "
          f"heads, vocab {args.vocab}; update batch {args.batch}x{args.seq} (prompt {args.prompt}); {load_field()}",
          flush=True)
    warm = time_compiles(model_config(args, 2, False, "none"), args)
    print(f"warm-up (2 layers, unrolled, remat none): {warm['total_s']:.1f} s; {load_field()}", flush=True)

    rows = []
    for scan_layers, remat in settings:
        times = time_compiles(model_config(args, args.layers, scan_layers, remat), args)
        rows.append((scan_layers, remat, times, load_field()))
        print(f"scan_layers={str(scan_layers).lower():5} remat={remat:4}: update step trace+lower "
              f"{times['lower_s']:6.1f} s, compile {times['compile_s']:6.1f} s, total {times['total_s']:6.1f} s; "
              f"log-prob forward {times['logprobs_s']:5.1f} s; {rows[-1][3]}", flush=True)

    base = next((times["total_s"] for scan, remat, times, _ in rows if not scan and remat == "none"), None)
    print("\n| scan_layers | remat | trace+lower s | compile s | update total s | speed-up vs unrolled/none | "
          "log-probs s |")
    print("|---|---|---|---|---|---|---|")
    for scan_layers, remat, times, _ in rows:
        speedup = f"{base / times['total_s']:.1f}x" if base else "(not timed)"
        print(f"| {str(scan_layers).lower()} | {remat} | {times['lower_s']:.1f} | {times['compile_s']:.1f} | "
              f"{times['total_s']:.1f} | {speedup} | {times['logprobs_s']:.1f} |")
    for scan_layers, remat, times, load in rows:
        print(f"compile_time layers={args.layers} scan_layers={str(scan_layers).lower()} remat={remat} "
              f"lower_s={times['lower_s']:.1f} compile_s={times['compile_s']:.1f} total_s={times['total_s']:.1f} "
              f"logprobs_s={times['logprobs_s']:.1f} {load}")


if __name__ == "__main__":
    main()
