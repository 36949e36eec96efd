"""Rollout throughput: rlmt-jax's Sampler against transformers' PyTorch `generate` (sampling, KV cache) on the
same randomly initialised Llama, same prompts, in one run.

Model: transformers LlamaConfig with vocab 32000, hidden 512, intermediate 1408, 8 layers, 8 heads, 4 KV heads,
float32 (56.4M parameters); or --model PATH, a Hugging Face Llama/Qwen directory (our models.load_pretrained
on our side, transformers' AutoModelForCausalLM on theirs, float32; the limit and matmul floor use its shape).
Work: B prompts of 64 tokens, exactly 128 new tokens each (no EOS), temperature 0.7,
top-p 1.0 (--top-p), no top-k (the recipe's rollout settings), one sample per prompt. Tokens/s = B * 128 / wall time of
the whole call (prefill, decode, results on the host), after one warm-up call of each; best of --repeats.
transformers runs at its best thread count: every count in 1..cores (--torch-threads) is timed (a short warm-up
call, then best of --repeats) and the fastest kept (benchmarks/fair_timing.py; on a busy machine torch on every
core can be several times slower than on one). Our side runs as XLA starts (its CPU thread pool is sized once,
at process start). Every line with a figure ends with the load average then (load=1min,5min,15min).
Our sampler runs with its defaults: a float32 cache (--cache-dtype) and its automatic decode windows, 4 at 128
new tokens (--decode-windows 1 reads the whole cache every step).

The machine's limit for a decode step of B rows, measured here:
    bytes = the weights the step streams (every layer, final norm, lm head; not the embedding table, of which
            it gathers B rows) + the KV cache it reads (at the mean attended length P + N/2)
    flops = 2 * B * (parameters in matmuls) + 4 * B * layers * heads * head_dim * (P + N/2)  (scores and values)
    limit tokens/s = B / max(bytes / read bandwidth, flops / matmul peak)
with the read bandwidth the best rate of a jnp.sum over 256 MB and the matmul peak the best float32 2048^3
matmul rate of jax. Prefill is not counted in the limit (it is ~1/3 of a step's weight traffic for all 64 tokens).

Where a step's time goes, measured in the same run: the step's weight matmuls alone (`step_matmul_seconds`: every
layer's projections and the lm head at B rows, 128 steps in a row so that the weights stream from memory as in
decode, nothing else), timed with jax (our layouts: q|k|v and gate|up fused, vocab-major head) and with torch
(transformers' layouts: seven nn.Linear per layer). On this 2-core CPU both libraries' matmul kernels stream
the weights at well under the read bandwidth above, so this floor, not the limit, is what a sampler built on
them can approach; the gap between it and our step is attention, sampling and per-op overhead.

The script starts itself again with the host-memory settings `rlmt-jax` uses on CPU (rlmt_jax/scale/host_memory.py;
both samplers get them; RLMT_JAX_HOST_MEMORY=default keeps glibc's).

bfloat16 rows (--dtypes, default both): our sampler as the trainer runs it with runtime.dtype=bfloat16 (the float32
params copied into the decode layout in bfloat16 at every call, a bfloat16 cache) against transformers with the
model cast to bfloat16, same prompts; the limit printed stays the float32 one.

Last lines, for scripts:
    sampling B=8 ours_tok_s=... hf_tok_s=... ratio=... limit_frac=... dtype=float32 hf_threads=... load=...
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from benchmarks.common import (  # noqa: E402
    BENCHMARK_SHAPE, LlamaShape, best_seconds, decode_weight_shapes, load_hf_model, make_hf_model, model_shape,
    measure_matmul_peak, measure_read_bandwidth,
)
from benchmarks.fair_timing import (  # noqa: E402
    format_search, load_field, search_torch_threads, thread_counts, xla_threads_note,
)
from rlmt_jax.scale.host_memory import relaunch_with_reused_memory  # noqa: E402

PROMPT, NEW = 64, 128
TEMPERATURE = 0.7


def step_weight_params(shape: LlamaShape = BENCHMARK_SHAPE) -> int:
    """Parameters a decode step streams through matmuls: every layer's projections and the lm head."""
    return sum(n_in * n_out for n_in, n_out in decode_weight_shapes(shape))


def decode_limit(batch: int, bandwidth: float, peak: float,
                 shape: LlamaShape = BENCHMARK_SHAPE) -> tuple[float, float, float]:
    """(limit tokens/s, seconds a step needs to stream its bytes, seconds for its flops) for a float32 step."""
    s = shape
    matmul_params = step_weight_params(s) + (2 * s.layers + 1) * s.hidden  # and the norms' scales
    attended = PROMPT + NEW / 2
    cache_bytes = 2 * s.layers * batch * s.kv_heads * s.head_dim * attended * 4
    flops = 2 * batch * matmul_params + 4 * batch * s.layers * s.heads * s.head_dim * attended
    memory_s = (4 * matmul_params + cache_bytes) / bandwidth
    compute_s = flops / peak
    return batch / max(memory_s, compute_s), memory_s, compute_s


def step_matmul_seconds(batch: int, steps: int = NEW, repeats: int = 3, dtype: str = "float32",
                        shape: LlamaShape = BENCHMARK_SHAPE,
                        torch_threads: list[int] | None = None) -> tuple[float, float, int]:
    """(jax, torch) seconds per decode step spent in the weight matmuls alone, at `batch` rows, and the torch
    thread count (the fastest of `torch_threads`, default 1..cores) its figure was timed at.

    Each step chains its matmuls (every output feeds the next input) through distinct per-layer weights, so
    nothing is hoisted out of the loop and the weights stream from memory as in a real decode loop."""
    import torch

    hidden, intermediate, heads, kv_heads = shape.hidden, shape.intermediate, shape.heads, shape.kv_heads
    head_dim = shape.head_dim
    qkv_width = (heads + 2 * kv_heads) * head_dim
    rng = np.random.default_rng(0)

    def weights(*dims):
        return (0.02 * rng.standard_normal(dims)).astype(np.float32)

    layers = [(weights(hidden, qkv_width), weights(heads * head_dim, hidden), weights(hidden, 2 * intermediate),
               weights(intermediate, hidden)) for _ in range(shape.layers)]
    head = weights(shape.vocab, hidden)

    def jax_steps(layers, head, x):
        def step(_, x):
            for w_qkv, w_o, w_gate_up, w_down in layers:
                x = x + 1e-3 * ((x @ w_qkv)[:, : heads * head_dim] @ w_o)
                x = x + 1e-3 * ((x @ w_gate_up)[:, :intermediate] @ w_down)
            return x + 1e-3 * jnp.einsum("bd,vd->bv", x, head)[:, :hidden]  # (vocab >= hidden)
        return jax.lax.fori_loop(0, steps, step, x)

    run = jax.jit(jax_steps)
    cast = lambda w: jnp.asarray(w, dtype)  # noqa: E731
    args = (jax.tree.map(cast, layers), cast(head), jnp.ones((batch, hidden), dtype))
    run(*args).block_until_ready()
    jax_seconds = best_seconds(lambda: run(*args).block_until_ready(), repeats) / steps

    # transformers' Llama: q, k, v, o, gate, up, down as nn.Linear weights [out, in]
    torch_dtype = getattr(torch, dtype)
    torch_layers = [[torch.from_numpy(np.ascontiguousarray(w.T)).to(torch_dtype) for w in (
        w_qkv[:, : heads * head_dim], w_qkv[:, heads * head_dim: (heads + kv_heads) * head_dim],
        w_qkv[:, (heads + kv_heads) * head_dim:], w_o, w_gate_up[:, :intermediate], w_gate_up[:, intermediate:],
        w_down)] for w_qkv, w_o, w_gate_up, w_down in layers]
    torch_head = torch.from_numpy(head).to(torch_dtype)
    linear = torch.nn.functional.linear

    def torch_steps():
        x = torch.ones(batch, hidden, dtype=torch_dtype)
        with torch.no_grad():
            for _ in range(steps):
                for w_q, w_k, w_v, w_o, w_gate, w_up, w_down in torch_layers:
                    q, _, _ = linear(x, w_q), linear(x, w_k), linear(x, w_v)  # eager: k and v are computed
                    x = x + 1e-3 * linear(q, w_o)
                    x = x + 1e-3 * linear(linear(x, w_gate) * linear(x, w_up), w_down)
                x = x + 1e-3 * linear(x, torch_head)[:, :hidden]
        return x

    torch_steps()
    threads, seconds = search_torch_threads(lambda: best_seconds(torch_steps, repeats),
                                            torch_threads or thread_counts())
    return jax_seconds, seconds[threads] / steps, threads


def bench_ours(model_dir: str, prompts: list[list[int]], repeats: int, cache_dtype: str, top_p: float,
               decode_windows: int | None, dtype: str = "float32") -> float:
    """float32: the sampler on the float32 params. bfloat16: as the trainer samples with runtime.dtype=bfloat16,
    float32 params copied into the decode layout (one device) in bfloat16 at every call, a bfloat16 cache."""
    import models
    from rlmt_jax.scale import mesh as mesh_lib
    from rlmt_jax.settings.config import RolloutMeshConfig
    from rlmt_jax.rollout.sampling import DecodeLayout, Sampler, SamplingConfig

    model = models.load_pretrained(model_dir, dtype=dtype)
    config = SamplingConfig(
        n=1, max_new_tokens=NEW, temperature=TEMPERATURE, top_p=top_p, eos_ids=(), prompt_buckets=(PROMPT,),
        cache_dtype=cache_dtype if dtype == "float32" else "bfloat16", decode_windows=decode_windows,
    )
    graphdef, params = nnx.split(model)
    layout = None
    if dtype != "float32":
        layout = DecodeLayout.of(mesh_lib.make_mesh(mesh_lib.MeshConfig()), RolloutMeshConfig(), dtype)
    sampler = Sampler(graphdef, config, layout=layout)

    def run(seed):
        rollout = sampler(params, prompts, jax.random.key(seed))
        tokens = np.asarray(rollout.tokens)
        assert tokens.shape == (len(prompts), PROMPT + NEW) and np.all(np.asarray(rollout.response_lengths) == NEW)

    run(0)  # compile + warm-up
    seconds = best_seconds(lambda: run(1), repeats)
    assert sampler.compiled_programs() == 2
    return len(prompts) * NEW / seconds


def bench_hf(model, prompts: list[list[int]], repeats: int, top_p: float, dtype: str = "float32",
             torch_threads: list[int] | None = None) -> tuple[float, int, dict[int, float]]:
    """(tokens/s at the best thread count, that count, {count: seconds of the call}) of transformers' generate:
    at each count of `torch_threads` (default 1..cores) a short warm-up call, then the best of `repeats`."""
    import torch

    model = model.to(getattr(torch, dtype))

    ids = torch.tensor(prompts, dtype=torch.long)
    mask = torch.ones_like(ids)

    def run(new: int = NEW):
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=TEMPERATURE, top_p=top_p, top_k=0,
                max_new_tokens=new, min_new_tokens=new, pad_token_id=0, use_cache=True,
            )
        assert out.shape == (len(prompts), PROMPT + new)

    run()  # warm-up: kernels chosen, allocator grown

    def time_at_count():
        run(2)  # warm-up at this thread count
        return best_seconds(run, repeats)

    threads, seconds = search_torch_threads(time_at_count, torch_threads or thread_counts())
    return len(prompts) * NEW / seconds[threads], threads, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cache-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--top-p", type=float, default=1.0, help="both samplers (the recipe: 1.0, some runs 0.95)")
    parser.add_argument("--decode-windows", type=int, default=None,
                        help="our sampler's decode windows (default: its automatic choice, 4 for 128 new tokens)")
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="a Hugging Face Llama/Qwen directory for both sides (default: the benchmark Llama, "
                             "random weights from a fixed seed)")
    parser.add_argument("--torch-threads", type=int, nargs="+", default=None, metavar="K",
                        help="torch thread counts to try (default: every count in 1..cores); the fastest is kept")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"],
                        help="compute dtypes to run, both samplers in each (bfloat16: our decode-layout copy)")
    args = parser.parse_args()
    # Both samplers run in this one process with the host-memory settings `rlmt-jax` uses on CPU.
    relaunch_with_reused_memory([os.path.abspath(__file__), *sys.argv[1:]])

    import torch

    counts = args.torch_threads or thread_counts()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} (threads searched: "
          f"{','.join(map(str, counts))}), {os.cpu_count()} cores; {load_field()}")
    if jax.devices()[0].platform == "cpu":
        print(xla_threads_note())
    bandwidth, peak = measure_read_bandwidth(), measure_matmul_peak()
    from rlmt_jax.rollout.sampling import SamplingConfig

    windows = SamplingConfig(max_new_tokens=NEW, decode_windows=args.decode_windows).windows
    print(f"our sampler: {windows} decode window(s), {args.cache_dtype} cache")
    print(f"machine: read bandwidth {bandwidth / 1e9:.1f} GB/s, float32 matmul peak {peak / 1e9:.0f} GFLOP/s")

    rng = np.random.default_rng(0)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model_dir, shape = args.model, model_shape(args.model)
            hf_model = None if args.skip_hf else load_hf_model(args.model)
            print(f"model: {args.model} ({shape.describe()})")
        else:
            model_dir, shape = tmp, BENCHMARK_SHAPE
            hf_model = make_hf_model(tmp)
        for dtype in args.dtypes:
            for batch in args.batches:
                prompts = rng.integers(3, shape.vocab, size=(batch, PROMPT)).tolist()
                ours = bench_ours(model_dir, prompts, args.repeats, args.cache_dtype, args.top_p, args.decode_windows,
                                  dtype)
                if args.skip_hf:
                    hf, hf_threads, searched = float("nan"), 0, "skipped"
                else:
                    hf, hf_threads, hf_seconds = bench_hf(hf_model, prompts, args.repeats, args.top_p, dtype, counts)
                    searched = format_search(hf_threads, hf_seconds)
                limit, memory_s, compute_s = decode_limit(batch, bandwidth, peak, shape)
                jax_matmuls_s, torch_matmuls_s, matmul_threads = step_matmul_seconds(batch, dtype=dtype, shape=shape,
                                                                                     torch_threads=counts)
                ours_step_s = batch / ours  # the call's time per decode step, prefill included
                weight_bytes = jnp.dtype(dtype).itemsize * step_weight_params(shape)
                print(f"{dtype} B={batch}: ours {ours:.0f} tok/s, transformers {hf:.0f} tok/s at {hf_threads} "
                      f"thread(s), ratio {ours / hf:.2f}; float32 limit {limit:.0f} tok/s (step: {memory_s * 1e3:.2f} "
                      f"ms of reads, {compute_s * 1e3:.2f} ms of matmul), ours = {ours / limit:.0%} of it; "
                      f"{load_field()}")
                print(f"  transformers generate, seconds per call by torch thread count: {searched}")
                print(f"  per decode step: ours {ours_step_s * 1e3:.2f} ms; its weight matmuls alone take "
                      f"{jax_matmuls_s * 1e3:.2f} ms in jax, {torch_matmuls_s * 1e3:.2f} ms in torch at "
                      f"{matmul_threads} thread(s) (their weight streaming: {weight_bytes / jax_matmuls_s / 1e9:.1f} "
                      f"and {weight_bytes / torch_matmuls_s / 1e9:.1f} GB/s); {load_field()}")
                lines.append(f"sampling B={batch} ours_tok_s={ours:.0f} hf_tok_s={hf:.0f} ratio={ours / hf:.2f} "
                             f"limit_frac={ours / limit:.2f} dtype={dtype} hf_threads={hf_threads} {load_field()}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
