"""Rollout throughput: rlmt-jax's Sampler against transformers' PyTorch `generate` (sampling, KV cache) on the
same randomly initialised Llama, same prompts, in one run.

Model: transformers LlamaConfig with vocab 32000, hidden 512, intermediate 1408, 8 layers, 8 heads, 4 KV heads,
float32 (56.4M parameters). Work: B prompts of 64 tokens, exactly 128 new tokens each (no EOS), temperature 0.7,
top-p 1.0 (--top-p), no top-k (the recipe's rollout settings), one sample per prompt. Tokens/s = B * 128 / wall time of
the whole call (prefill, decode, results on the host), after one warm-up call of each; best of --repeats.

The machine's limit for a decode step of B rows, measured here:
    bytes = the weights the step streams (every layer, final norm, lm head; not the embedding table, of which
            it gathers B rows) + the KV cache it reads (at the mean attended length P + N/2)
    flops = 2 * B * (parameters in matmuls) + 4 * B * layers * heads * head_dim * (P + N/2)  (scores and values)
    limit tokens/s = B / max(bytes / read bandwidth, flops / matmul peak)
with the read bandwidth the best rate of a jnp.sum over 256 MB and the matmul peak the best float32 2048^3
matmul rate of jax. Prefill is not counted in the limit (it is ~1/3 of a step's weight traffic for all 64 tokens).

The script starts itself again with the host-memory settings `rlmt-jax` uses on CPU (rlmt_jax/host_memory.py;
both samplers get them; RLMT_JAX_HOST_MEMORY=default keeps glibc's).

Last lines, for scripts:  sampling B=8 ours_tok_s=... hf_tok_s=... ratio=... limit_frac=...
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from benchmarks.common import (  # noqa: E402
    HEADS, HIDDEN, INTERMEDIATE, KV_HEADS, LAYERS, VOCAB, best_seconds, make_hf_model, measure_matmul_peak,
    measure_read_bandwidth,
)
from rlmt_jax.host_memory import relaunch_with_reused_memory  # noqa: E402

PROMPT, NEW = 64, 128
TEMPERATURE = 0.7


def decode_limit(batch: int, bandwidth: float, peak: float) -> tuple[float, float, float]:
    """(limit tokens/s, seconds a step needs to stream its bytes, seconds for its flops) for a float32 step."""
    head_dim = HIDDEN // HEADS
    per_layer = HIDDEN * head_dim * (2 * HEADS + 2 * KV_HEADS) + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN
    matmul_params = LAYERS * per_layer + HIDDEN * VOCAB + HIDDEN
    attended = PROMPT + NEW / 2
    cache_bytes = 2 * LAYERS * batch * KV_HEADS * head_dim * attended * 4
    flops = 2 * batch * matmul_params + 4 * batch * LAYERS * HEADS * head_dim * attended
    memory_s = (4 * matmul_params + cache_bytes) / bandwidth
    compute_s = flops / peak
    return batch / max(memory_s, compute_s), memory_s, compute_s


def bench_ours(model_dir: str, prompts: list[list[int]], repeats: int, cache_dtype: str, top_p: float) -> float:
    import models
    from rlmt_jax.sampling import Sampler, SamplingConfig

    model = models.load_pretrained(model_dir)
    config = SamplingConfig(
        n=1, max_new_tokens=NEW, temperature=TEMPERATURE, top_p=top_p, eos_ids=(), prompt_buckets=(PROMPT,),
        cache_dtype=cache_dtype,
    )
    sampler, params = Sampler.for_model(model, config)

    def run(seed):
        rollout = sampler(params, prompts, jax.random.key(seed))
        tokens = np.asarray(rollout.tokens)
        assert tokens.shape == (len(prompts), PROMPT + NEW) and np.all(np.asarray(rollout.response_lengths) == NEW)

    run(0)  # compile + warm-up
    seconds = best_seconds(lambda: run(1), repeats)
    assert sampler.compiled_programs() == 2
    return len(prompts) * NEW / seconds


def bench_hf(model, prompts: list[list[int]], repeats: int, top_p: float) -> float:
    import torch

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
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()
    # Both samplers run in this one process with the host-memory settings `rlmt-jax` uses on CPU.
    relaunch_with_reused_memory([os.path.abspath(__file__), *sys.argv[1:]])

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    bandwidth, peak = measure_read_bandwidth(), measure_matmul_peak()
    print(f"machine: read bandwidth {bandwidth / 1e9:.1f} GB/s, float32 matmul peak {peak / 1e9:.0f} GFLOP/s")

    rng = np.random.default_rng(0)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        hf_model = make_hf_model(tmp)
        for batch in args.batches:
            prompts = rng.integers(3, VOCAB, size=(batch, PROMPT)).tolist()
            ours = bench_ours(tmp, prompts, args.repeats, args.cache_dtype, args.top_p)
            hf = float("nan") if args.skip_hf else bench_hf(hf_model, prompts, args.repeats, args.top_p)
            limit, memory_s, compute_s = decode_limit(batch, bandwidth, peak)
            print(f"B={batch}: ours {ours:.0f} tok/s, transformers {hf:.0f} tok/s, ratio {ours / hf:.2f}; "
                  f"limit {limit:.0f} tok/s (step: {memory_s * 1e3:.2f} ms of reads, {compute_s * 1e3:.2f} ms of "
                  f"matmul), ours = {ours / limit:.0%} of it; load average {os.getloadavg()[0]:.2f}")
            lines.append(f"sampling B={batch} ours_tok_s={ours:.0f} hf_tok_s={hf:.0f} ratio={ours / hf:.2f} "
                         f"limit_frac={ours / limit:.2f}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
