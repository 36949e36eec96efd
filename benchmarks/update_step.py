"""GRPO update step throughput: rlmt-jax's jitted train_step against the same loss written in PyTorch on
transformers' LlamaForCausalLM (forward + backward + AdamW), same weights, same batch, one run.

Model (the sampler benchmark's): vocab 32000, hidden 512, intermediate 1408, 8 layers, 8 heads, 4 KV heads,
float32; or --model PATH, a Hugging Face Llama/Qwen directory (our models.load_pretrained, transformers'
AutoModelForCausalLM, both float32; the FLOP count uses its shape).
Batch: 8 sequences x 512 tokens (prompt 128, left-padded by up to 16, response 384).
The loss on both sides is the recipe's GRPO loss: clipped surrogate (0.2/0.2, dual clip 3), k3 KL to a
reference (0.001), entropy bonus (0.001), token mean within each sequence then mean over sequences, log-probs
at temperature 0.7; AdamW (wd 0.01, betas 0.9/0.999), global-norm clip 1.0.

Both sides make logits only for the positions that predict response tokens (our PolicyObjective's
response_start, transformers' logits_to_keep); --no-skip-prompt-logits makes them everywhere.

MFU = model FLOPs / time / matmul peak, with model FLOPs per token = 6 * N + 12 * layers * seq * hidden
(N = parameters in matmuls, embedding excluded; the lm head counted only on the positions whose logits
are made; the attention term counts the full seq x seq score matrix, as PaLM's appendix does) and the
peak measured in the same run as the best float32 2048^3 matmul rate of jax (at start and end, best).
Steps of the two sides alternate, so both see the same share of a machine others may be using. Before them
torch is timed at every thread count in 1..cores (--torch-threads; best of --search-steps steps at each) and runs
at the fastest (benchmarks/fair_timing.py: on a busy machine torch on every core can be several times slower
than on one); ours runs as XLA starts (its CPU thread pool is sized once, at process start). Every line with a
figure ends with the load average then (load=1min,5min,15min). The script
starts itself again with the host-memory settings `rlmt-jax` uses on CPU (rlmt_jax/scale/host_memory.py; both sides
get them; RLMT_JAX_HOST_MEMORY=default keeps glibc's), and prints each side's page faults per step.

Last line, for scripts: update_step ours_tok_s=... torch_tok_s=... ratio=... mfu=... torch_threads=... load=...
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

# Idle OpenMP threads of torch would otherwise spin on the cores while jax runs its step (and halve it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from benchmarks.common import (  # noqa: E402
    BENCHMARK_SHAPE, load_hf_model, make_hf_model, measure_matmul_peak, model_shape,
)
from benchmarks.fair_timing import (  # noqa: E402
    format_search, load_field, search_torch_threads, thread_counts, xla_threads_note,
)
from rlmt_jax.scale.host_memory import relaunch_with_reused_memory  # noqa: E402


def make_batch(batch: int, seq: int, prompt: int, seed: int = 0,
               vocab: int = BENCHMARK_SHAPE.vocab) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, size=(batch, seq), dtype=np.int32)
    attention_mask = np.ones((batch, seq), np.int32)
    for b in range(batch):
        attention_mask[b, : rng.integers(0, 17)] = 0  # left padding of the prompt
    response_mask = np.zeros((batch, seq), np.float32)
    response_mask[:, prompt:] = 1.0
    positions = np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None).astype(np.int32)
    return dict(tokens=tokens, attention_mask=attention_mask, positions=positions, response_mask=response_mask)


def matmul_params_count(params) -> int:
    """Parameters that take part in matmuls: all but the embedding table and the norm scales."""
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        names = "/".join(str(getattr(k, "key", k)) for k in path)
        if "embed" in names.split("/")[-2:] or "norm" in names:
            continue
        total += leaf.size
    return total


TEMPERATURE = 0.7  # the recipes' rollout.temperature

def bench_ours(model_dir, batch_np, args, grpo_config):
    """Returns (step, compile_s, matmul param count, first-step metrics, the batch's RL arrays)."""
    from flax import nnx

    from models import load_pretrained
    from rlmt_jax.algorithms.objectives import PolicyObjective
    from rlmt_jax.training.optim import AdamWConfig
    from rlmt_jax.training.train_step import compute_logprobs, init_optimizer_state, train_step

    model = load_pretrained(model_dir, remat=args.remat, scan_layers=args.scan_layers)
    graphdef, params = nnx.split(model, nnx.Param)
    n_matmul = matmul_params_count(params)
    batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
    start = args.prompt if args.skip_prompt_logits else 0
    current = compute_logprobs(graphdef, params, batch, temperature=TEMPERATURE)
    rng = np.random.default_rng(1)
    noise = jnp.asarray(rng.normal(size=current.shape).astype(np.float32) * 0.05)
    batch["old_logprobs"] = current + noise
    batch["ref_logprobs"] = current - noise
    batch["advantages"] = jnp.asarray(rng.normal(size=current.shape[0]).astype(np.float32))
    optimizer = AdamWConfig(lr=1e-6)
    objective = PolicyObjective(grpo_config, temperature=TEMPERATURE, logits_chunk_size=args.chunk,
                                response_start=start)
    state = {"params": params, "opt": init_optimizer_state(params, optimizer)}
    first = {}

    def step():
        state["params"], state["opt"], metrics = train_step(
            graphdef, state["params"], state["opt"], batch,
            objective=objective, optimizer=optimizer, num_micro_batches=args.micro_batches,
        )
        jax.block_until_ready(state["params"])
        first.setdefault("metrics", {k: float(v) for k, v in metrics.items()})

    begin = time.perf_counter()
    step()
    compile_s = time.perf_counter() - begin
    extras = {k: np.asarray(batch[k]) for k in ("old_logprobs", "ref_logprobs", "advantages")}
    return step, compile_s, n_matmul, first["metrics"], extras


def bench_torch(hf_model, batch_np, extras, args, cfg):
    """Returns (step, losses list, threads): the same GRPO loss on transformers' model, AdamW."""
    import torch

    torch.manual_seed(0)
    start = args.prompt if args.skip_prompt_logits else 1
    tokens = torch.from_numpy(batch_np["tokens"]).long()
    attention_mask = torch.from_numpy(batch_np["attention_mask"]).long()
    positions = torch.from_numpy(batch_np["positions"]).long()
    targets = tokens[:, start:]
    mask = torch.from_numpy(batch_np["response_mask"])[:, start:]
    old = torch.from_numpy(extras["old_logprobs"])[:, start:]
    ref = torch.from_numpy(extras["ref_logprobs"])[:, start:]
    adv = torch.from_numpy(extras["advantages"])[:, None]
    optimizer = torch.optim.AdamW(hf_model.parameters(), lr=1e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    hf_model.train()
    losses = []

    def loss_fn():
        # logits of the positions that predict tokens[:, start:] only (transformers' logits_to_keep)
        keep = tokens.shape[1] - start + 1
        logits = hf_model(
            input_ids=tokens, attention_mask=attention_mask, position_ids=positions, logits_to_keep=keep
        ).logits
        z = logits[:, :-1].float() / TEMPERATURE
        logp_all = torch.log_softmax(z, dim=-1)
        logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        ratio = torch.exp(torch.clamp(logp - old, -20, 20))
        pg1 = -adv * ratio
        pg2 = -adv * torch.clamp(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high)
        pg = torch.maximum(pg1, pg2)
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * cfg.dual_clip), pg)
        d = torch.clamp(ref - logp, -20, 20)
        kl = torch.clamp(torch.exp(d) - d - 1, -10, 10)
        per_token = pg + cfg.kl_coef * kl - cfg.entropy_coef * entropy
        per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # seq-mean-token-mean
        return per_seq.mean()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf_model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())

    return step, losses, torch.get_num_threads()


def timed(step, faults: list[int]) -> float:
    """Wall seconds of one step; appends the page faults it took to `faults`."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    begin = time.perf_counter()
    step()
    elapsed = time.perf_counter() - begin
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--torch-steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=0, help="extra untimed steps after the first")
    parser.add_argument("--micro-batches", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=1024, help="logits chunk (positions); >= seq: no chunking")
    parser.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    parser.add_argument("--scan-layers", action="store_true")
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="a Hugging Face Llama/Qwen directory for both sides (default: the benchmark Llama, "
                             "random weights from a fixed seed)")
    parser.add_argument("--torch-threads", type=int, nargs="+", default=None, metavar="K",
                        help="torch thread counts to try (default: every count in 1..cores); the fastest is kept")
    parser.add_argument("--search-steps", type=int, default=1,
                        help="timed torch steps at each thread count (best kept)")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--no-skip-prompt-logits", dest="skip_prompt_logits", action="store_false",
                        help="make logits for prompt positions too (both sides)")
    args = parser.parse_args()
    # Both sides run in this one process with the host-memory settings `rlmt-jax` uses (rlmt_jax/scale/host_memory.py).
    relaunch_with_reused_memory([os.path.abspath(__file__), *sys.argv[1:]])

    from rlmt_jax.algorithms import AlgorithmConfig

    cfg = AlgorithmConfig()  # the GRPO recipe's loss settings
    print(f"devices: {jax.devices()}  cpu count: {os.cpu_count()}  {load_field()}  "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')}")
    if jax.devices()[0].platform == "cpu":
        print(xla_threads_note())
    peaks = [measure_matmul_peak()]
    shape = model_shape(args.model) if args.model else BENCHMARK_SHAPE
    if args.model:
        print(f"model: {args.model} ({shape.describe()})")
    batch_np = make_batch(args.batch, args.seq, args.prompt, vocab=shape.vocab)
    tokens = args.batch * args.seq
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model_dir, hf_model = args.model, None if args.skip_torch else load_hf_model(args.model)
        else:
            model_dir, hf_model = tmp, make_hf_model(tmp)
        ours_step, compile_s, n_matmul, metrics, extras = bench_ours(model_dir, batch_np, args, cfg)
    torch_step = None
    if not args.skip_torch:
        torch_step, torch_losses, threads = bench_torch(hf_model, batch_np, extras, args, cfg)
        torch_step()  # warm-up; its loss is the first step's
        counts = args.torch_threads or thread_counts()
        threads, search_seconds = search_torch_threads(
            lambda: min(timed(torch_step, []) for _ in range(args.search_steps)), counts)
        print(f"torch step, seconds by thread count: {format_search(threads, search_seconds)}; {load_field()}")
    for _ in range(args.warmup):
        ours_step()
        if torch_step:
            torch_step()
    # Alternate the two so both see the same share of a machine that others may be using.
    ours_times, torch_times, ours_faults, torch_faults = [], [], [], []
    for _ in range(args.steps):
        ours_times.append(timed(ours_step, ours_faults))
        if torch_step:
            torch_times.append(timed(torch_step, torch_faults))
    peaks.append(measure_matmul_peak())
    peak = max(peaks)
    print(f"matmul peak (jax, f32 2048^3, best of start/end): {peak / 1e9:.1f} GFLOP/s "
          f"(start {peaks[0] / 1e9:.1f}, end {peaks[1] / 1e9:.1f}); {load_field()}")
    # lm-head FLOPs only for the positions whose logits the step makes (honest when prompts are skipped); a tied
    # head is the embedding table, which n_matmul leaves out
    head_params = shape.vocab * shape.hidden
    layer_params = n_matmul - (0 if shape.tied else head_params)
    head_positions = args.seq - args.prompt + 1 if args.skip_prompt_logits else args.seq
    flops_per_token = (
        6 * layer_params + 12 * shape.layers * args.seq * shape.hidden + 6 * head_params * head_positions / args.seq
    )
    ours_s = float(np.median(ours_times))
    ours_tok_s = tokens / ours_s
    mfu = ours_tok_s * flops_per_token / peak
    print(f"ours: {ours_s:.2f} s/step median of {[round(x, 2) for x in ours_times]} ({ours_tok_s:.0f} tok/s), "
          f"compile+first step {compile_s:.1f} s, MFU {mfu:.1%} ({n_matmul / 1e6:.1f}M matmul params, "
          f"{flops_per_token / 1e6:.0f} MFLOP/token); first-step loss {metrics['loss']:.6f}; "
          f"page faults/step {int(np.median(ours_faults))}; {load_field()}")
    torch_tok_s = float("nan")
    if torch_step:
        torch_s = float(np.median(torch_times))
        torch_tok_s = tokens / torch_s
        print(f"torch ({threads} threads): {torch_s:.2f} s/step median of {[round(x, 2) for x in torch_times]} "
              f"({torch_tok_s:.0f} tok/s), MFU {torch_tok_s * flops_per_token / peak:.1%}; "
              f"first-step loss {torch_losses[0]:.6f}; page faults/step {int(np.median(torch_faults))}; "
              f"{load_field()}")
    print(f"update_step ours_tok_s={ours_tok_s:.1f} torch_tok_s={torch_tok_s:.1f} "
          f"ratio={ours_tok_s / torch_tok_s:.2f} mfu={mfu:.3f} torch_threads={threads if torch_step else 0} "
          f"{load_field()}")


if __name__ == "__main__":
    main()
