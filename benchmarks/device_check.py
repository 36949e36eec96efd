"""Device check: MFU of the update step and rollout tokens/s on whatever accelerator JAX finds, in one run.

    python benchmarks/device_check.py            # on a TPU or GPU host (under 8 minutes on one H100/H200)
    python benchmarks/device_check.py --smoke    # a tiny model and tiny shapes, on any device (CPU: tests)
    python benchmarks/device_check.py --model PATH   # a Hugging Face Llama/Qwen checkpoint instead

Model: a Llama of ~1.2B parameters with Llama-3.2-1B's shape (transformers LlamaConfig: vocab 128256, hidden
2048, intermediate 8192, 16 layers, 32 heads, 8 kv heads, tied embeddings), random weights, built directly by
our models from that config; or --model PATH, a Hugging Face Llama/Qwen directory (our models.load_pretrained,
transformers' AutoModelForCausalLM). Attention: runtime.attention (--attention, default auto: splash on TPU, cuDNN
flash on GPU).

Figures, one line each: `device_check what=... value=... reference=... ratio=value/reference [notes]`
  update_tokens_per_s   the GRPO update step (train_step: forward, backward, AdamW) on --update-batch sequences of
                        --update-seq tokens (float32 master weights, bfloat16 compute, remat --remat).
                        reference: the tokens/s the chip's peak allows, peak / FLOPs per token, so ratio = MFU.
                        FLOPs per token = 6 * (layer matmul params) + 6 * (lm head) * (share of positions with
                        logits) + 12 * layers * seq * hidden (the full seq x seq attention, as PaLM counts it).
  sampler_tokens_per_s  our Sampler (prefill + decode loop, bfloat16 weights and cache, temperature 1, no EOS:
                        every row writes all --new tokens) at batch 64 and 256, --prompt-token prompts.
                        reference: the roofline, rows * new / (prefill FLOPs / peak + sum over decode steps of
                        (bfloat16 weights + the KV cache attended so far) / HBM bandwidth).
  slot_engine_tokens_per_s   the slot engine (rollout.engine: slots, --slots slots, chunks of 64 steps) on
                        --slot-rows rows whose lengths are skewed (mean ~--new / 4: a random model draws nearly
                        uniformly, and vocab * 4 / --new EOS ids stop a row with probability ~4 / --new a token),
                        useful (non-pad) tokens/s; reference: the static Sampler's useful tokens/s on the same rows
                        and key, so ratio = the slot engine's speed-up.
  transformers_generate_tokens_per_s   transformers' PyTorch `generate` on the same device (same config,
                        bfloat16, the same batch and lengths, sampling, no EOS); reference: ours, so ratio < 1
                        means we are ahead. Skipped (one line saying so) where torch has no CUDA device (TPU).
                        On CPU (--smoke) torch is timed at every thread count in 1..cores (--torch-threads) and
                        the fastest kept (benchmarks/fair_timing.py); on a GPU threads do not matter.
Compile time is excluded from every figure and printed on its line, and so is the load average then
(load=1min,5min,15min). Peaks (dense bfloat16) and HBM bandwidth are
the published figures in CHIPS; with --smoke on CPU both are measured here instead (float32 matmul, a sum).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

# JAX must leave room on a GPU for torch's generate in the same process (set before JAX starts).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float  # dense bfloat16, FLOP/s
    hbm_bytes_per_s: float


# (substring of jax's device_kind, lower case) -> published figures; the first match wins.
CHIPS = (
    ("h200", Chip("H200 SXM: 989 TFLOP/s bf16 dense, 4.8 TB/s", 989e12, 4.8e12)),
    ("h100 pcie", Chip("H100 PCIe: 756 TFLOP/s bf16 dense, 2.0 TB/s", 756e12, 2.0e12)),
    ("h100", Chip("H100 SXM: 989 TFLOP/s bf16 dense, 3.35 TB/s", 989e12, 3.35e12)),
    ("a100", Chip("A100 SXM 80GB: 312 TFLOP/s bf16 dense, 2.0 TB/s", 312e12, 2.0e12)),
    ("v6", Chip("TPU v6e: 918 TFLOP/s bf16, 1.64 TB/s", 918e12, 1.64e12)),
    ("v5 lite", Chip("TPU v5e: 197 TFLOP/s bf16, 0.82 TB/s", 197e12, 0.819e12)),
    ("v5e", Chip("TPU v5e: 197 TFLOP/s bf16, 0.82 TB/s", 197e12, 0.819e12)),
    ("v5", Chip("TPU v5p: 459 TFLOP/s bf16, 2.77 TB/s", 459e12, 2.765e12)),
    ("v4", Chip("TPU v4: 275 TFLOP/s bf16, 1.2 TB/s", 275e12, 1.2e12)),
)

# Llama-3.2-1B's shape, and the tiny one of --smoke
FULL_MODEL = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True)
SMOKE_MODEL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)


def report(what: str, value: float, reference: float | None, notes: str = "") -> None:
    from benchmarks.fair_timing import load_field

    ratio = value / reference if reference else float("nan")
    ref = f"{reference:.1f}" if reference else "unknown"
    print(f"device_check what={what} value={value:.1f} reference={ref} ratio={ratio:.3f}"
          + (f" {notes}" if notes else "") + f" {load_field()}", flush=True)


def our_model(cfg, args, seed: int):
    """Our model of `cfg`: random weights (seed), or --model's checkpoint read with cfg's runtime settings."""
    from flax import nnx

    from models import build_model, load_pretrained

    if args.model:
        return load_pretrained(args.model, dtype=cfg.dtype, param_dtype=cfg.param_dtype, remat=cfg.remat,
                               scan_layers=cfg.scan_layers, attention=cfg.attention)
    return nnx.jit(lambda: build_model(cfg, nnx.Rngs(seed)))()


def hf_llama_config(shape: dict):
    import transformers

    return transformers.LlamaConfig(**shape, max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=1,
                                    eos_token_id=2, pad_token_id=0)


def find_chip():
    """(platform, Chip) of JAX's first device; on CPU (--smoke only) the figures are measured here."""
    import jax

    from benchmarks.common import measure_matmul_peak, measure_read_bandwidth

    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform).lower()
    if device.platform == "cpu":
        return "cpu", Chip("this CPU, measured: float32 matmul peak and read bandwidth",
                           measure_matmul_peak(256, 3), measure_read_bandwidth(16, 3))
    for key, chip in CHIPS:
        if key in kind:
            return device.platform, chip
    return device.platform, Chip(f"{device.device_kind}: no published figures here", 0.0, 0.0)


def layer_matmul_params(c) -> int:
    """Parameters of one decoder layer's matmuls (q, k, v, o, gate, up, down)."""
    return c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads) \
        + 3 * c.hidden_size * c.intermediate_size


def check_update_step(model_config, chip, args) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from rlmt_jax.algorithms import AlgorithmConfig
    from rlmt_jax.algorithms.objectives import PolicyObjective
    from rlmt_jax.training.optim import AdamWConfig
    from rlmt_jax.training.train_step import init_optimizer_state, train_step

    cfg = model_config.replace(dtype=args.dtype, param_dtype="float32", remat=args.remat, scan_layers=True)
    graphdef, params = nnx.split(our_model(cfg, args, 0), nnx.Param)
    rows, seq, prompt = args.update_batch, args.update_seq, args.update_prompt
    rng = np.random.default_rng(0)
    attention_mask = np.ones((rows, seq), np.int32)
    for row in range(rows):
        attention_mask[row, : rng.integers(0, 17)] = 0  # left-padded prompts
    response_mask = np.zeros((rows, seq), np.float32)
    response_mask[:, prompt:] = 1
    batch = {
        "tokens": jnp.asarray(rng.integers(3, cfg.vocab_size, (rows, seq)), jnp.int32),
        "attention_mask": jnp.asarray(attention_mask),
        "positions": jnp.asarray(np.clip(np.cumsum(attention_mask, 1) - 1, 0, None), jnp.int32),
        "response_mask": jnp.asarray(response_mask),
        "old_logprobs": jnp.asarray(rng.normal(-3, 0.1, (rows, seq)), jnp.float32) * response_mask,
        "ref_logprobs": jnp.asarray(rng.normal(-3, 0.1, (rows, seq)), jnp.float32) * response_mask,
        "advantages": jnp.asarray(rng.normal(size=rows), jnp.float32),
    }
    optimizer = AdamWConfig(lr=1e-6)
    objective = PolicyObjective(AlgorithmConfig(), logits_chunk_size=512, response_start=prompt)
    state = [params, jax.jit(lambda p: init_optimizer_state(p, optimizer))(params)]

    def step():
        state[0], state[1], metrics = train_step(graphdef, state[0], state[1], batch, objective=objective,
                                                 optimizer=optimizer, num_micro_batches=1)
        jax.block_until_ready(state[0])
        return metrics

    begin = time.perf_counter()
    step()
    compile_s = time.perf_counter() - begin
    times = []
    for _ in range(args.steps):
        begin = time.perf_counter()
        step()
        times.append(time.perf_counter() - begin)
    seconds = float(np.median(times))
    logit_share = (seq - prompt + 1) / seq
    flops_per_token = (6 * cfg.num_hidden_layers * layer_matmul_params(cfg) + 6 * cfg.vocab_size * cfg.hidden_size
                       * logit_share + 12 * cfg.num_hidden_layers * seq * cfg.hidden_size)
    tokens_per_s = rows * seq / seconds
    report("update_tokens_per_s", tokens_per_s, chip.peak_flops / flops_per_token if chip.peak_flops else None,
           f"batch={rows}x{seq} step_s={seconds:.3f} compile_s={compile_s:.1f} remat={args.remat} "
           f"attention={resolved_attention(cfg)} model_tflop_per_s={tokens_per_s * flops_per_token / 1e12:.2f}")


def resolved_attention(cfg) -> str:
    from models.attention import resolve_attention

    return resolve_attention(cfg.attention, cfg.dtype)


def sampler_roofline(cfg, chip, rows: int, prompt: int, new: int) -> float | None:
    """Tokens/s at the roofline (module docstring), bfloat16 weights and cache."""
    if not chip.peak_flops:
        return None
    weights = 2 * (cfg.num_hidden_layers * layer_matmul_params(cfg) + cfg.vocab_size * cfg.hidden_size)
    slot_bytes = 2 * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim  # k and v, bfloat16
    prefill_s = 2 * rows * prompt * (cfg.num_hidden_layers * layer_matmul_params(cfg)) / chip.peak_flops
    decode_bytes = sum(weights + rows * (prompt + step) * slot_bytes for step in range(new - 1))
    return rows * new / (prefill_s + decode_bytes / chip.hbm_bytes_per_s)


def check_sampler(model_config, chip, args) -> dict[int, float]:
    """Our sampler's tokens/s at each batch size; returns them for the transformers comparison."""
    import jax
    import numpy as np
    from flax import nnx

    from rlmt_jax.rollout.sampling import Sampler, SamplingConfig

    cfg = model_config.replace(dtype=args.dtype, param_dtype=args.dtype, scan_layers=True)
    graphdef, params = nnx.split(our_model(cfg, args, 1))
    sampler = Sampler(graphdef, SamplingConfig(
        n=1, max_new_tokens=args.new, temperature=1.0, eos_ids=(), pad_id=0, prompt_buckets=(args.prompt,),
        cache_dtype=args.dtype))
    ours = {}
    for rows in args.sampler_batches:
        prompts = np.random.default_rng(rows).integers(3, cfg.vocab_size, (rows, args.prompt)).tolist()
        begin = time.perf_counter()
        sampler(params, prompts, jax.random.key(0))
        first_s = time.perf_counter() - begin
        begin = time.perf_counter()
        rollout = sampler(params, prompts, jax.random.key(1))
        seconds = time.perf_counter() - begin
        assert int(np.asarray(rollout.response_lengths).min()) == args.new  # every row wrote every token
        ours[rows] = rows * args.new / seconds
        report(f"sampler_tokens_per_s_b{rows}", ours[rows], sampler_roofline(cfg, chip, rows, args.prompt, args.new),
               f"prompt={args.prompt} new={args.new} run_s={seconds:.2f} compile_s={max(first_s - seconds, 0):.1f} "
               f"attention={resolved_attention(cfg)}")
    return ours


def check_slot_engine(model_config, args) -> None:
    """The slot engine's useful tokens/s against the static sampler's on skewed lengths (module docstring)."""
    import jax
    import numpy as np
    from flax import nnx

    from rlmt_jax.rollout.sampling import Sampler, SamplingConfig
    from rlmt_jax.rollout.slot_sampler import SlotSampler

    cfg = model_config.replace(dtype=args.dtype, param_dtype=args.dtype, scan_layers=True)
    graphdef, params = nnx.split(our_model(cfg, args, 1))
    stops = max(1, cfg.vocab_size * 4 // args.new)
    config = SamplingConfig(n=1, max_new_tokens=args.new, temperature=1.0, pad_id=0, prompt_buckets=(args.prompt,),
                            cache_dtype=args.dtype, eos_ids=tuple(range(3, cfg.vocab_size, cfg.vocab_size // stops))[:stops])
    prompts = np.random.default_rng(7).integers(3, cfg.vocab_size, (args.slot_rows, args.prompt)).tolist()
    timed = {}
    for name, sampler in (("static", Sampler(graphdef, config)),
                          ("slots", SlotSampler(graphdef, config, slots=args.slots, chunk_tokens=args.chunk))):
        sampler(params, prompts, jax.random.key(0))  # compiles
        begin = time.perf_counter()
        rollout = sampler(params, prompts, jax.random.key(1))
        timed[name] = (time.perf_counter() - begin, np.asarray(rollout.response_lengths))
    (static_s, static_lengths), (slots_s, lengths) = timed["static"], timed["slots"]
    report("slot_engine_tokens_per_s", lengths.sum() / slots_s, static_lengths.sum() / static_s,
           f"rows={args.slot_rows} slots={args.slots} mean_len={lengths.mean():.0f} max_len={lengths.max()} "
           f"cap={args.new} slots_s={slots_s:.2f} static_s={static_s:.2f} attention={resolved_attention(cfg)}")


def check_transformers(model_config, platform, ours: dict[int, float], args) -> None:
    import numpy as np
    import torch
    import transformers

    if platform == "gpu" and torch.cuda.is_available():
        device = "cuda"
    elif platform == "cpu":
        device = "cpu"
    else:
        for rows in ours:
            print(f"device_check what=transformers_generate_tokens_per_s_b{rows} skipped: torch has no CUDA "
                  f"device here ({platform})", flush=True)
        return
    from benchmarks.common import load_hf_model
    from benchmarks.fair_timing import format_search, search_torch_threads, thread_counts

    torch.manual_seed(0)
    threads_before = torch.get_num_threads()  # the thread search leaves torch at its best count: put it back after
    if args.model:
        model = load_hf_model(args.model).to(device=device, dtype=torch.bfloat16)
    else:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(hf_llama_config(model_config_shape(model_config))).to(torch.bfloat16)
    model.eval()

    def generate(ids, new):
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()

    for rows, our_tokens_per_s in ours.items():
        ids = torch.from_numpy(np.random.default_rng(rows).integers(3, model_config.vocab_size, (rows, args.prompt)))
        ids = ids.to(device)
        with torch.inference_mode():
            begin = time.perf_counter()
            generate(ids, 2)  # warm-up: kernels chosen, allocator grown
            warm_s = time.perf_counter() - begin

            def timed_run():
                begin = time.perf_counter()
                generate(ids, args.new)
                return time.perf_counter() - begin

            def warm_then_timed_run():
                generate(ids, 2)  # a short warm-up at this thread count
                return timed_run()

            threads = ""
            if device == "cpu":  # torch at its best thread count
                best, by_count = search_torch_threads(warm_then_timed_run, args.torch_threads or thread_counts())
                seconds, threads = by_count[best], f" torch_{format_search(best, by_count)}"
            else:  # on a GPU torch's CPU threads do not matter
                seconds = timed_run()
        report(f"transformers_generate_tokens_per_s_b{rows}", rows * args.new / seconds, our_tokens_per_s,
               f"device={device} run_s={seconds:.2f} warmup_s={warm_s:.1f}{threads} (reference: ours)")
    del model
    torch.set_num_threads(threads_before)
    if device == "cuda":
        torch.cuda.empty_cache()


def model_config_shape(model_config) -> dict:
    return dict(vocab_size=model_config.vocab_size, hidden_size=model_config.hidden_size,
                intermediate_size=model_config.intermediate_size, num_hidden_layers=model_config.num_hidden_layers,
                num_attention_heads=model_config.num_attention_heads,
                num_key_value_heads=model_config.num_key_value_heads, head_dim=model_config.head_dim,
                tie_word_embeddings=model_config.tie_word_embeddings)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model and shapes (runs on CPU; for tests)")
    parser.add_argument("--attention", default="auto", choices=["auto", "xla", "splash", "cudnn"])
    parser.add_argument("--remat", default="dots", choices=["none", "dots", "full"])
    parser.add_argument("--steps", type=int, default=3, help="timed update steps (after one that compiles)")
    parser.add_argument("--update-batch", type=int, default=8)
    parser.add_argument("--update-seq", type=int, default=2048)
    parser.add_argument("--update-prompt", type=int, default=512)
    parser.add_argument("--sampler-batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=1024)
    parser.add_argument("--slot-rows", type=int, default=256, help="rows of the slot engine's check")
    parser.add_argument("--slots", type=int, default=64, help="the slot engine's slots")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="a Hugging Face Llama/Qwen directory (default: random weights of Llama-3.2-1B's shape, "
                             "or the tiny shape with --smoke)")
    parser.add_argument("--torch-threads", type=int, nargs="+", default=None, metavar="K",
                        help="on CPU, torch thread counts to try for transformers (default: 1..cores; fastest kept)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.update_batch, args.update_seq, args.update_prompt = 2, 64, 16
        args.sampler_batches, args.prompt, args.new, args.steps = [4, 8], 16, 8, 1
        args.slot_rows, args.slots = 8, 2
    args.chunk = 4 if args.smoke else 64

    import jax

    from models.config import ModelConfig

    if jax.devices()[0].platform == "cpu" and not args.smoke:
        print("device_check: JAX sees no accelerator (cpu only); run it on a TPU or GPU host, or with --smoke for "
              "a tiny run here", file=sys.stderr)
        return 2
    platform, chip = find_chip()
    args.dtype = "float32" if platform == "cpu" else "bfloat16"  # XLA:CPU has no bfloat16 dot into float32
    if args.model:
        model_config = ModelConfig.from_pretrained(args.model, attention=args.attention)
    else:
        hf = hf_llama_config(SMOKE_MODEL if args.smoke else FULL_MODEL)
        model_config = ModelConfig.from_hf_config({**hf.to_dict(), "architectures": ["LlamaForCausalLM"]},
                                                  attention=args.attention)
    layers = model_config.num_hidden_layers
    params = layers * layer_matmul_params(model_config) + model_config.vocab_size * model_config.hidden_size \
        + (2 * layers + 1) * model_config.hidden_size
    print(f"device_check: {len(jax.devices())} x {jax.devices()[0].device_kind} ({platform}), peak figures: "
          f"{chip.name}; model {args.model + ', ' if args.model else ''}{params / 1e6:.1f}M params, "
          f"compute in {args.dtype}", flush=True)
    if platform == "cpu":
        from benchmarks.fair_timing import xla_threads_note

        print(f"device_check: {xla_threads_note()}", flush=True)
    check_update_step(model_config, chip, args)
    try:
        ours = check_sampler(model_config, chip, args)
    except Exception as err:  # noqa: BLE001  a kernel this device cannot compile: say so, time the xla path
        if resolved_attention(model_config) == "xla":
            raise
        print(f"device_check what=sampler_failed attention={resolved_attention(model_config)} "
              f"error={type(err).__name__}: {' '.join(str(err).split())[:400]}; again with attention=xla", flush=True)
        model_config = model_config.replace(attention="xla")
        ours = check_sampler(model_config, chip, args)
    check_slot_engine(model_config, args)
    if args.skip_transformers:
        print("device_check what=transformers_generate skipped: --skip-transformers", flush=True)
    else:
        check_transformers(model_config, platform, ours, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
