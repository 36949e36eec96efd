"""Rollout throughput: rlmt-jax's Sampler against transformers' PyTorch `generate` (sampling, KV cache) on the
same randomly initialised Llama, same prompts, in one run.

Model: transformers LlamaConfig with vocab 32000, hidden 512, intermediate 1408, 8 layers, 8 heads, 4 KV heads,
float32 (56.4M parameters). Work: B prompts of 64 tokens, exactly 128 new tokens each (no EOS), temperature 0.7,
top-p 1.0 (--top-p), no top-k (the recipe's rollout settings), one sample per prompt. Tokens/s = B * 128 / wall time of
the whole call (prefill, decode, results on the host), after one warm-up call of each; best of --repeats.
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

Last lines, for scripts:  sampling B=8 ours_tok_s=... hf_tok_s=... ratio=... limit_frac=... dtype=float32
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
    HEADS, HIDDEN, INTERMEDIATE, KV_HEADS, LAYERS, VOCAB, best_seconds, decode_weight_shapes, make_hf_model,
    measure_matmul_peak, measure_read_bandwidth,
)
from rlmt_jax.scale.host_memory import relaunch_with_reused_memory  # noqa: E402

PROMPT, NEW = 64, 128
TEMPERATURE = 0.7


def step_weight_params() -> int:
    """Parameters a decode step streams through matmuls: every layer's projections and the lm head."""
    return sum(n_in * n_out for n_in, n_out in decode_weight_shapes())


def decode_limit(batch: int, bandwidth: float, peak: float) -> tuple[float, float, float]:
    """(limit tokens/s, seconds a step needs to stream its bytes, seconds for its flops) for a float32 step."""
    head_dim = HIDDEN // HEADS
    matmul_params = step_weight_params() + (2 * LAYERS + 1) * HIDDEN  # and the norms' scales
    attended = PROMPT + NEW / 2
    cache_bytes = 2 * LAYERS * batch * KV_HEADS * head_dim * attended * 4
    flops = 2 * batch * matmul_params + 4 * batch * LAYERS * HEADS * head_dim * attended
    memory_s = (4 * matmul_params + cache_bytes) / bandwidth
    compute_s = flops / peak
    return batch / max(memory_s, compute_s), memory_s, compute_s


def step_matmul_seconds(batch: int, steps: int = NEW, repeats: int = 3, dtype: str = "float32") -> tuple[float, float]:
    """(jax, torch) seconds per decode step spent in the weight matmuls alone, at `batch` rows.

    Each step chains its matmuls (every output feeds the next input) through distinct per-layer weights, so
    nothing is hoisted out of the loop and the weights stream from memory as in a real decode loop."""
    import torch

    head_dim = HIDDEN // HEADS
    qkv_width = (HEADS + 2 * KV_HEADS) * head_dim
    rng = np.random.default_rng(0)

    def weights(*shape):
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)

    layers = [(weights(HIDDEN, qkv_width), weights(HEADS * head_dim, HIDDEN), weights(HIDDEN, 2 * INTERMEDIATE),
               weights(INTERMEDIATE, HIDDEN)) for _ in range(LAYERS)]
    head = weights(VOCAB, HIDDEN)

    def jax_steps(layers, head, x):
        def step(_, x):
            for w_qkv, w_o, w_gate_up, w_down in layers:
                x = x + 1e-3 * ((x @ w_qkv)[:, : HEADS * head_dim] @ w_o)
                x = x + 1e-3 * ((x @ w_gate_up)[:, :INTERMEDIATE] @ w_down)
            return x + 1e-3 * jnp.einsum("bd,vd->bv", x, head)[:, :HIDDEN]
        return jax.lax.fori_loop(0, steps, step, x)

    run = jax.jit(jax_steps)
    cast = lambda w: jnp.asarray(w, dtype)  # noqa: E731
    args = (jax.tree.map(cast, layers), cast(head), jnp.ones((batch, HIDDEN), dtype))
    run(*args).block_until_ready()
    jax_seconds = best_seconds(lambda: run(*args).block_until_ready(), repeats) / steps

    # transformers' Llama: q, k, v, o, gate, up, down as nn.Linear weights [out, in]
    torch_dtype = getattr(torch, dtype)
    torch_layers = [[torch.from_numpy(np.ascontiguousarray(w.T)).to(torch_dtype) for w in (
        w_qkv[:, : HEADS * head_dim], w_qkv[:, HEADS * head_dim: (HEADS + KV_HEADS) * head_dim],
        w_qkv[:, (HEADS + KV_HEADS) * head_dim:], w_o, w_gate_up[:, :INTERMEDIATE], w_gate_up[:, INTERMEDIATE:],
        w_down)] for w_qkv, w_o, w_gate_up, w_down in layers]
    torch_head = torch.from_numpy(head).to(torch_dtype)
    linear = torch.nn.functional.linear

    def torch_steps():
        x = torch.ones(batch, HIDDEN, dtype=torch_dtype)
        with torch.no_grad():
            for _ in range(steps):
                for w_q, w_k, w_v, w_o, w_gate, w_up, w_down in torch_layers:
                    q, _, _ = linear(x, w_q), linear(x, w_k), linear(x, w_v)  # eager: k and v are computed
                    x = x + 1e-3 * linear(q, w_o)
                    x = x + 1e-3 * linear(linear(x, w_gate) * linear(x, w_up), w_down)
                x = x + 1e-3 * linear(x, torch_head)[:, :HIDDEN]
        return x

    torch_steps()
    return jax_seconds, best_seconds(torch_steps, repeats) / steps


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


def bench_hf(model, prompts: list[list[int]], repeats: int, top_p: float, dtype: str = "float32") -> float:
    import torch

    model = model.to(getattr(torch, dtype))

    ids = torch.tensor(prompts, dtype=torch.long)
    mask = torch.ones_like(ids)

    def run():
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=TEMPERATURE, top_p=top_p, top_k=0,
                max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0, use_cache=True,
            )
        assert out.shape == (len(prompts), PROMPT + NEW)

    run()  # warm-up
    return len(prompts) * NEW / best_seconds(run, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cache-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--top-p", type=float, default=1.0, help="both samplers (the recipe: 1.0, some runs 0.95)")
    parser.add_argument("--decode-windows", type=int, default=None,
                        help="our sampler's decode windows (default: its automatic choice, 4 for 128 new tokens)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"],
                        help="compute dtypes to run, both samplers in each (bfloat16: our decode-layout copy)")
    args = parser.parse_args()
    # Both samplers run in this one process with the host-memory settings `rlmt-jax` uses on CPU.
    relaunch_with_reused_memory([os.path.abspath(__file__), *sys.argv[1:]])

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    bandwidth, peak = measure_read_bandwidth(), measure_matmul_peak()
    from rlmt_jax.rollout.sampling import SamplingConfig

    windows = SamplingConfig(max_new_tokens=NEW, decode_windows=args.decode_windows).windows
    print(f"our sampler: {windows} decode window(s), {args.cache_dtype} cache")
    print(f"machine: read bandwidth {bandwidth / 1e9:.1f} GB/s, float32 matmul peak {peak / 1e9:.0f} GFLOP/s")

    rng = np.random.default_rng(0)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        hf_model = make_hf_model(tmp)
        for dtype in args.dtypes:
            for batch in args.batches:
                prompts = rng.integers(3, VOCAB, size=(batch, PROMPT)).tolist()
                ours = bench_ours(tmp, prompts, args.repeats, args.cache_dtype, args.top_p, args.decode_windows, dtype)
                hf = float("nan") if args.skip_hf else bench_hf(hf_model, prompts, args.repeats, args.top_p, dtype)
                limit, memory_s, compute_s = decode_limit(batch, bandwidth, peak)
                jax_matmuls_s, torch_matmuls_s = step_matmul_seconds(batch, dtype=dtype)
                ours_step_s = batch / ours  # the call's time per decode step, prefill included
                weight_bytes = jnp.dtype(dtype).itemsize * step_weight_params()
                print(f"{dtype} B={batch}: ours {ours:.0f} tok/s, transformers {hf:.0f} tok/s, ratio {ours / hf:.2f}; "
                      f"float32 limit {limit:.0f} tok/s (step: {memory_s * 1e3:.2f} ms of reads, {compute_s * 1e3:.2f} "
                      f"ms of matmul), ours = {ours / limit:.0%} of it; load average {os.getloadavg()[0]:.2f}")
                print(f"  per decode step: ours {ours_step_s * 1e3:.2f} ms; its weight matmuls alone take "
                      f"{jax_matmuls_s * 1e3:.2f} ms in jax, {torch_matmuls_s * 1e3:.2f} ms in torch "
                      f"(their weight streaming: {weight_bytes / jax_matmuls_s / 1e9:.1f} and "
                      f"{weight_bytes / torch_matmuls_s / 1e9:.1f} GB/s)")
                lines.append(f"sampling B={batch} ours_tok_s={ours:.0f} hf_tok_s={hf:.0f} ratio={ours / hf:.2f} "
                             f"limit_frac={ours / limit:.2f} dtype={dtype}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
