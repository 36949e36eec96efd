"""The time plan's model (rlmt_jax/plans/time_plan.py) against what this CPU measures, phase by phase, in one run.

The plan is fed this machine's measured float32 matmul peak, read bandwidth and the share of that bandwidth the
decode step's matmuls (8 rows x each weight of the model) reach (benchmarks/common.py) as the chip's figures
(no interconnect: one device), and predicts the phases of one GRPO step of the benchmark Llama
(vocab 32000, hidden 512, 8 layers, float32, unscanned, no remat): 4 prompts x 2 samples, prompts of 64 tokens,
64 new tokens (no EOS: every row runs to the end), one reward batch of 8 rows, one micro-batch of 8 sequences of
128 tokens. Each phase is then timed with the code the trainer runs (best of --repeats, after a warm-up call):
  rollout copy       the decode layout's cast + reshard of the params (DecodeLayout.copier)
  rollout prefill    the sampler's prefill program
  rollout decode     the sampler's decode program (prefill + decode, minus prefill)
  reward scoring     the reward model's jitted forward on the 8 rows (a RewardModel of the same shapes)
  old / reference log-probs   train_step.compute_logprobs
  update             train_step (GRPO objective, AdamW)

Last lines, one per phase:  time_plan phase=... predicted_s=... measured_s=... ratio=...   (ratio = measured/predicted)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from benchmarks.common import (  # noqa: E402
    HEADS, HIDDEN, INTERMEDIATE, KV_HEADS, LAYERS, VOCAB, best_seconds, decode_weight_shapes, measure_matmul_peak,
    measure_matmul_stream, measure_read_bandwidth,
)
from rlmt_jax.scale.host_memory import relaunch_with_reused_memory  # noqa: E402

PROMPTS, N, PROMPT, NEW, REWARD_BATCH = 4, 2, 64, 64, 8


def write_configs(root: str) -> tuple[str, str]:
    """config.json of the benchmark Llama as a policy and as a reward model (the plan reads shapes only)."""
    paths = []
    for name, architecture in (("policy", "LlamaForCausalLM"), ("reward", "LlamaForSequenceClassification")):
        path = os.path.join(root, name)
        os.makedirs(path)
        config = {"architectures": [architecture], "model_type": "llama", "vocab_size": VOCAB, "hidden_size": HIDDEN,
                  "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
                  "num_key_value_heads": KV_HEADS, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                  "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
                  "pad_token_id": 0, "num_labels": 1}
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f)
        paths.append(path)
    return paths[0], paths[1]


def run_config(policy: str, reward: str):
    from rlmt_jax.settings.config import resolve

    return resolve(None, [
        f"model.policy={policy}", f"model.reward_model={reward}", "runtime.dtype=float32", "runtime.remat=none",
        "runtime.scan_layers=false", f"rollout.prompts_per_step={PROMPTS}", f"rollout.n={N}",
        f"rollout.max_new_tokens={NEW}", f"data.max_prompt_tokens={PROMPT}", f"rollout.prompt_buckets=[{PROMPT}]",
        "rollout.decode_windows=1", "rollout.cache_dtype=float32", f"reward.batch_size={REWARD_BATCH}",
        f"reward.max_length={PROMPT + NEW}", f"optimizer.micro_batch_size={PROMPTS * N}", "algorithm.kl_coef=0.001",
    ])


def policy_sampler(cfg, dtype: str = "float32"):
    """(graphdef, float32 params, Sampler in `dtype`, prompts) of the benchmark Llama as the trainer samples it
    (one device, the decode layout's copy in `dtype`, its KV cache in `dtype`)."""
    from flax import nnx

    from models import build_model
    from models.config import ModelConfig
    from rlmt_jax.scale import mesh as mesh_lib
    from rlmt_jax.rollout.sampling import DecodeLayout, Sampler, SamplingConfig

    with open(os.path.join(cfg.model.policy, "config.json")) as f:
        policy_cfg = ModelConfig.from_hf_config(json.load(f), dtype=dtype, scan_layers=False, remat="none")
    graphdef, params = nnx.split(build_model(policy_cfg, nnx.Rngs(0)), nnx.Param)
    layout = DecodeLayout.of(mesh_lib.make_mesh(mesh_lib.MeshConfig()), cfg.rollout.mesh, dtype)
    sampler = Sampler(graphdef, SamplingConfig(n=N, max_new_tokens=NEW, temperature=0.7, prompt_buckets=(PROMPT,),
                                               decode_windows=1, cache_dtype=dtype), layout=layout)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, VOCAB, PROMPT)) for _ in range(PROMPTS)]
    return graphdef, params, sampler, prompts


def measure(cfg, repeats: int) -> dict[str, float]:
    from flax import nnx

    from models import build_model
    from models.config import ModelConfig
    from rlmt_jax.scale import mesh as mesh_lib
    from rlmt_jax.algorithms.objectives import PolicyObjective
    from rlmt_jax.training.optim import AdamWConfig
    from rlmt_jax.training.train_step import compute_logprobs, init_optimizer_state, train_step

    graphdef, params, sampler, prompts = policy_sampler(cfg)
    layout = sampler.layout
    with open(os.path.join(cfg.model.reward_model, "config.json")) as f:
        reward_cfg = ModelConfig.from_hf_config(json.load(f), dtype="float32", scan_layers=False, remat="none")
    reward_graphdef, reward_params = nnx.split(build_model(reward_cfg, nnx.Rngs(1)), nnx.Param)
    rng = np.random.default_rng(1)
    key = jax.random.key(0)
    out: dict[str, float] = {}
    with mesh_lib.activation_sharding(layout.mesh, layout.rules):
        out["rollout copy"] = best_seconds(lambda: jax.block_until_ready(sampler.rollout_params(params)), repeats)
        copy = sampler.rollout_params(params)
        ids, mask, _ = sampler._padded(prompts)

        def prefill():
            return jax.block_until_ready(sampler._prefill(copy, ids, mask, key))

        def both():
            cache, first, first_logprobs, positions = sampler._prefill(copy, ids, mask, key)
            return jax.block_until_ready(sampler._decode(copy, cache, first, first_logprobs, positions, ids, mask, key))

        prefill(), both()
        out["rollout prefill"] = best_seconds(prefill, repeats)
        out["rollout decode"] = best_seconds(both, repeats) - out["rollout prefill"]
    rollout = sampler(params, prompts, key)
    assert int(np.asarray(rollout.response_lengths).min()) == NEW  # every row ran every step

    rows, seq = PROMPTS * N, PROMPT + NEW
    tokens = jnp.asarray(rollout.tokens)
    batch = {"tokens": tokens, "attention_mask": jnp.asarray(rollout.attention_mask, jnp.int32),
             "positions": jnp.asarray(rollout.positions),
             "response_mask": jnp.asarray(rollout.response_mask, jnp.int32)}
    score = jax.jit(lambda p, ids, m: nnx.merge(reward_graphdef, p)(ids, m))
    jax.block_until_ready(score(reward_params, tokens, batch["attention_mask"]))
    out["reward scoring"] = best_seconds(
        lambda: jax.block_until_ready(score(reward_params, tokens, batch["attention_mask"])), repeats)

    logprobs = lambda: jax.block_until_ready(compute_logprobs(graphdef, params, batch, temperature=0.7))  # noqa: E731
    logprobs()
    out["old log-probs"] = out["reference log-probs"] = best_seconds(logprobs, repeats)

    batch["old_logprobs"] = batch["ref_logprobs"] = compute_logprobs(graphdef, params, batch, temperature=0.7)
    batch["advantages"] = jnp.asarray(rng.normal(size=rows), jnp.float32)
    objective = PolicyObjective(cfg.algorithm, temperature=0.7)
    optimizer = AdamWConfig(lr=1e-6)
    state = {"params": jax.tree.map(jnp.copy, params)}
    state["opt"] = init_optimizer_state(state["params"], optimizer)

    def update():
        state["params"], state["opt"], metrics = train_step(graphdef, state["params"], state["opt"], batch,
                                                           objective=objective, optimizer=optimizer)
        jax.block_until_ready(metrics)

    update()
    out["update"] = best_seconds(update, repeats)
    assert seq == tokens.shape[1]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    relaunch_with_reused_memory([os.path.abspath(__file__), *sys.argv[1:]])

    from rlmt_jax.plans.memory_plan import DeviceSpec
    from rlmt_jax.plans.time_plan import ChipFigures, time_plan

    peak, bandwidth = measure_matmul_peak(), measure_read_bandwidth()
    stream = measure_matmul_stream(PROMPTS * N, decode_weight_shapes()) / bandwidth
    print(f"this CPU: matmul peak {peak / 1e9:.0f} GFLOP/s (float32), read bandwidth {bandwidth / 1e9:.1f} GB/s, "
          f"decode matmuls read at {stream:.2f} of it")
    with tempfile.TemporaryDirectory() as root:
        cfg = run_config(*write_configs(root))
        chip = ChipFigures(peak, bandwidth, float("inf"), "this CPU, measured", stream=stream)
        plan = time_plan(cfg, DeviceSpec.parse("cpu"), chip)
        measured = measure(cfg, args.repeats)
    print(f"{'phase':22s} {'GFLOP':>9s} {'MB read':>9s} {'predicted s':>12s} {'measured s':>11s} {'ratio':>6s}")
    lines = []
    for phase in plan.phases:  # float32 on one device: no rollout copy (the sampler skips it, the plan too)
        took = measured[phase.name]
        ratio = took / phase.seconds
        print(f"{phase.name:22s} {phase.flops / 1e9:9.2f} {phase.hbm_bytes / 1e6:9.1f} {phase.seconds:12.4f} "
              f"{took:11.4f} {ratio:6.2f}")
        lines.append(f"time_plan phase={phase.name.replace(' ', '_')} predicted_s={phase.seconds:.4f} "
                     f"measured_s={took:.4f} ratio={ratio:.2f}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
