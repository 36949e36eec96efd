"""Sharded = unsharded, run on 8 simulated CPU devices; prints one JSON line of observations.

tests/test_sharded_equality.py runs this file in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (JAX fixes its device count when it starts) and asserts
on what it prints. Each computation runs once on one device with no mesh (the reference) and once per mesh,
with params placed by `mesh.shard_params`, batches by `mesh.shard_batch`, under `mesh.activation_sharding`:
  forward     CausalLM logits of left-padded rows (scanned layers, full remat)
  reward      RewardScorer.score_ids on rows of different lengths (right padding, unscanned layers)
  grpo_step   one train_step with PolicyObjective(AlgorithmConfig()), 2 micro-batches, logits in chunks
  greedy      Sampler at temperature 0, two decode windows
and a checkpoint is loaded onto the (1, 8, 1) mesh with load_pretrained(place=make_placer(mesh)).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import types

MESHES = {"8x1x1": (8, 1, 1), "1x8x1": (1, 8, 1), "2x2x2": (2, 2, 2)}
ROWS, SEQ, PROMPT = 16, 12, 5


def main() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from models import ModelConfig, build_model, load_pretrained, save_pretrained
    from rlmt_jax.scale import mesh as mesh_lib
    from rlmt_jax.algorithms import AlgorithmConfig
    from rlmt_jax.scale.multihost import HostRows
    from rlmt_jax.algorithms.objectives import PolicyObjective
    from rlmt_jax.training.optim import AdamWConfig
    from rlmt_jax.rollout.rewards import RewardScorer, RewardSettings
    from rlmt_jax.training.train_step import init_optimizer_state, train_step

    # vocab 128, embed 32, 4 heads of 8 with 2 kv heads, mlp 64: every dim splits 2, 4 and 8 ways
    policy_cfg = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, scan_layers=True, remat="full")
    reward_cfg = policy_cfg.replace(architecture="LlamaForSequenceClassification", scan_layers=False, remat="none",
                                    pad_token_id=0)
    policy = build_model(policy_cfg, nnx.Rngs(0))
    graphdef, params = nnx.split(policy, nnx.Param)
    reward_model = build_model(reward_cfg, nnx.Rngs(1))

    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 128, (ROWS, SEQ)).astype(np.int32)
    prompt_lengths = rng.integers(2, PROMPT + 1, ROWS)
    response_lengths = rng.integers(1, SEQ - PROMPT + 1, ROWS)
    columns = np.arange(SEQ)[None, :]
    prompt_mask = columns >= PROMPT - prompt_lengths[:, None]
    response_mask = (columns >= PROMPT) & (columns < PROMPT + response_lengths[:, None])
    attention_mask = (prompt_mask & (columns < PROMPT)) | response_mask
    old_logprobs = np.where(response_mask, rng.normal(-4.0, 0.5, (ROWS, SEQ)), 0.0).astype(np.float32)
    batch = {
        "tokens": tokens,
        "attention_mask": attention_mask.astype(np.int32),
        "response_mask": response_mask.astype(np.int32),
        "old_logprobs": old_logprobs,
        "ref_logprobs": (old_logprobs + np.where(response_mask, rng.normal(0, 0.1, (ROWS, SEQ)), 0)).astype(np.float32),
        "advantages": rng.normal(0, 1, ROWS).astype(np.float32),
    }
    reward_rows = [list(rng.integers(1, 128, length)) for length in (3, 7, 12, 5, 9, 1, 12, 4)]
    objective = PolicyObjective(AlgorithmConfig(), temperature=0.7, logits_chunk_size=4)
    optimizer = AdamWConfig(lr=1e-3, eps=1e-6)
    tokenizer = types.SimpleNamespace(chat_template="{{ messages }}", pad_token_id=0, eos_token_id=None)

    # one program each (not one per leaf): jax.clear_caches() below makes every eager op compile again
    copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))

    def run_all(mesh) -> dict:
        """Every computation, on `mesh` (None: one device, no mesh)."""
        jax.clear_caches()  # a trace keeps the activation constraints of the mesh it was made under
        # copies: train_step donates what it is given, and device_put may reuse the original buffers
        place = (lambda p: copy(p)) if mesh is None else (lambda p: mesh_lib.shard_params(copy(p), mesh))
        place_batch = (lambda b: jax.tree.map(jnp.asarray, b)) if mesh is None else (
            lambda b: mesh_lib.shard_batch(b, mesh))
        sharding = mesh_lib.activation_sharding(mesh) if mesh is not None else contextlib.nullcontext()
        out: dict = {}
        with sharding:
            placed = place(params)
            forward = jax.jit(lambda p, ids, mask: nnx.merge(graphdef, p)(ids, mask, _positions(mask)))
            inputs = place_batch({"ids": tokens[:, :PROMPT], "mask": prompt_mask[:, :PROMPT].astype(np.int32)})
            logits = forward(placed, inputs["ids"], inputs["mask"])
            out["logits"] = np.asarray(logits)
            out["logits_spec"] = str(logits.sharding.spec) if mesh is not None else None

            hosts = None if mesh is None else HostRows(mesh)  # rows split over the batch axes, as the trainer does
            scorer = RewardScorer(reward_model, tokenizer, RewardSettings(batch_size=8, buckets=(12,), max_length=12),
                                  hosts=hosts)
            scorer.state = place(scorer.state)
            out["rewards"] = scorer.score_ids(reward_rows)

            opt_state = jax.jit(lambda p: init_optimizer_state(p, optimizer))(placed)
            new_params, _, metrics = train_step(graphdef, placed, opt_state, place_batch(batch), objective=objective,
                                                optimizer=optimizer, num_micro_batches=2)
            out["params"] = {_name(path): np.asarray(leaf)
                             for path, leaf in jax.tree_util.tree_leaves_with_path(new_params)}
            out["metrics"] = {k: float(v) for k, v in metrics.items()}
            if mesh is not None:
                rules = mesh_lib.param_shardings(new_params, mesh)
                out["params_keep_rule_shardings"] = all(
                    leaf.sharding.is_equivalent_to(rule, leaf.ndim)
                    for leaf, rule in zip(jax.tree.leaves(new_params), jax.tree.leaves(rules), strict=True))
            out["greedy"] = _greedy(policy, place)
        return out

    reference = run_all(None)
    observed: dict = {"device_count": jax.device_count(), "meshes": {}}
    for label, sizes in MESHES.items():
        mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(*sizes))
        sharded = run_all(mesh)
        observed["meshes"][label] = {
            "logits_max_abs_diff": _diff(sharded["logits"], reference["logits"]),
            "logits_spec": sharded["logits_spec"],
            "rewards_max_abs_diff": _diff(sharded["rewards"], reference["rewards"]),
            "params_max_abs_diff": max(_diff(sharded["params"][k], v) for k, v in reference["params"].items()),
            "metrics_max_abs_diff": {k: abs(sharded["metrics"][k] - v) for k, v in reference["metrics"].items()},
            "params_keep_rule_shardings": sharded["params_keep_rule_shardings"],
            "greedy_equal": sharded["greedy"] == reference["greedy"],
        }
    observed["reference"] = {
        "logits_abs_mean": float(np.mean(np.abs(reference["logits"]))),
        "rewards": [float(r) for r in reference["rewards"]],
        "param_change_max": max(_diff(reference["params"][_name(path)], leaf)
                                for path, leaf in jax.tree_util.tree_leaves_with_path(params)),
        "metrics": reference["metrics"],
        "greedy": reference["greedy"],
    }
    observed["load"] = _load_onto_fsdp_mesh(policy, save_pretrained, load_pretrained, mesh_lib)
    return observed


def _positions(mask):
    import jax.numpy as jnp

    return jnp.clip(jnp.cumsum(mask, axis=-1) - 1, 0)


def _name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _diff(a, b) -> float:
    import numpy as np

    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _greedy(policy, place) -> list:
    """Greedy samples (tokens, response lengths) of two prompts, 2 rows each."""
    import jax
    import numpy as np

    from rlmt_jax.rollout.sampling import Sampler, SamplingConfig

    # two decode windows: the cache blocks are placed on the mesh like the single cache
    config = SamplingConfig(n=2, max_new_tokens=6, temperature=0.0, eos_ids=(5,), pad_id=0, prompt_buckets=(8,),
                            decode_windows=2)
    sampler, state = Sampler.for_model(policy, config)
    rollout = sampler(place(state), [[3, 17, 9, 44], [8, 100, 2]], jax.random.key(0))
    return [np.asarray(rollout.tokens).tolist(), np.asarray(rollout.response_lengths).tolist()]


def _load_onto_fsdp_mesh(policy, save_pretrained, load_pretrained, mesh_lib) -> dict:
    """Save the policy, load it onto (1, 8, 1) shard by shard; per-device shapes and values of every leaf."""
    import jax
    import numpy as np
    from flax import nnx

    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(1, 8, 1))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "policy")
        save_pretrained(policy, path)
        loaded = load_pretrained(path, scan_layers=True, place=mesh_lib.make_placer(mesh))
    leaves = {}
    original = {_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(policy, nnx.Param))}
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(loaded, nnx.Param)):
        shards = leaf.addressable_shards
        name = _name(key_path)
        leaves[name] = {
            "shape": list(leaf.shape),
            "shard_shapes": sorted({tuple(s.data.shape) for s in shards}),
            "devices": len(shards),
            "equal": bool(np.array_equal(np.asarray(leaf), np.asarray(original[name]))),
        }
    return leaves


if __name__ == "__main__":
    print(json.dumps(main()))
