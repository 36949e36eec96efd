"""The slot engine on 8 simulated CPU devices; prints one JSON line of observations.

tests/test_slot_engine_mesh.py runs this file in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8.
On the training mesh 2x2x2 with the decode layouts rollout.mesh tensor=1 (8 data replicas) and tensor=2 (4):
  hlo       what the compiled decode chunk's while loop moves per step (bfloat16), tests/hlo_collectives.py
  same      float32 seeded samples of the slot engine (2 slots per replica, fewer than the rows) == the
            one-device static sampler's
  paged     the same with attention splash on tensor=2: each device's rows and kv heads through the paged
            kernel (TPU interpret mode)
  packed    the same with 4 slots a replica on tensor=2: the tail packed into 1 slot a device; the packing
            program's collectives
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PROMPTS = [[3, 17, 9, 44], [8, 100, 2], [5, 6, 7, 300, 11], [9], [4, 4, 4, 4, 4, 4], [12, 13]]


def main() -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from hlo_collectives import while_loop_collectives
    from models import ModelConfig, build_model
    from rlmt_jax.rollout.sampling import DecodeLayout, Sampler, SamplingConfig
    from rlmt_jax.rollout.slot_sampler import SlotSampler
    from rlmt_jax.scale import mesh as mesh_lib
    from rlmt_jax.settings.config import RolloutMeshConfig

    def model(dtype: str, attention: str = "xla"):
        cfg = ModelConfig(vocab_size=768, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, scan_layers=True, remat="full", dtype=dtype,
                          attention=attention)
        return nnx.split(build_model(cfg, nnx.Rngs(0)), nnx.Param)

    # EOS ids common enough that rows stop apart at temperature 1 (a random model spreads its mass)
    sampling = SamplingConfig(n=4, max_new_tokens=10, temperature=1.0, eos_ids=tuple(range(1, 60)), pad_id=0,
                              prompt_buckets=(8,), decode_windows=2)
    observed: dict = {"device_count": jax.device_count()}
    graphdef32, params32 = model("float32")
    reference = Sampler(graphdef32, sampling)(params32, PROMPTS, jax.random.key(0))
    observed["lengths"] = np.asarray(reference.response_lengths).tolist()
    graphdef16, params16 = model("bfloat16")
    policy_bytes = sum(x.size * 2 for x in jax.tree.leaves(params16))
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(2, 2, 2))
    with mesh_lib.activation_sharding(mesh):
        placed16 = mesh_lib.shard_params(params16, mesh)
        placed32 = mesh_lib.shard_params(params32, mesh)
        for tensor in (1, 2):
            layout16 = DecodeLayout.of(mesh, RolloutMeshConfig(tensor=tensor), "bfloat16")
            engine = SlotSampler(graphdef16, sampling, slots=2, chunk_tokens=3, layout=layout16)
            loops = while_loop_collectives(engine.compiled_decode_text(placed16, PROMPTS, jax.random.key(0)))
            observed[f"hlo/tensor{tensor}"] = {
                "loops": len(loops), "all_gathers": max(loop.count("all-gather") for loop in loops),
                "bytes_fraction": max(loop.bytes_per_iteration for loop in loops) / policy_bytes,
                "slots": engine.slots,
            }
            layout32 = DecodeLayout.of(mesh, RolloutMeshConfig(tensor=tensor), "float32")
            engine = SlotSampler(graphdef32, sampling, slots=2, chunk_tokens=3, layout=layout32)
            rollout = engine(placed32, PROMPTS, jax.random.key(0))
            observed[f"same/tensor{tensor}"] = {
                "tokens": bool(np.array_equal(rollout.tokens, np.asarray(reference.tokens))),
                "lengths": bool(np.array_equal(rollout.response_lengths, np.asarray(reference.response_lengths))),
                "logprob_gap": float(np.max(np.abs(rollout.logprobs - np.asarray(reference.logprobs)))),
                "slots": engine.slots,
            }
        # 8 slots a replica (32 in all) for the 24 rows: the tail packs into 2 or 1 a device, each device's rows
        # from its own slots (the packing program moves nothing between devices)
        longer = dataclasses.replace(sampling, max_new_tokens=40)  # rows run long apart: a tail to pack
        expected = Sampler(graphdef32, longer)(params32, PROMPTS, jax.random.key(0))
        engine = SlotSampler(graphdef32, longer, slots=8, chunk_tokens=2, layout=layout32)
        rollout = engine(placed32, PROMPTS, jax.random.key(0))
        with layout32.activation_sharding():
            state = engine._empty_state(engine._cache_prompt_len(8))
            text = engine._take.lower(state, *engine._put((np.zeros((4, 1), np.int32),))).compile().as_text()
        observed["packed/tensor2"] = {
            "tokens": bool(np.array_equal(rollout.tokens, np.asarray(expected.tokens))),
            "logprob_gap": float(np.max(np.abs(rollout.logprobs - np.asarray(expected.logprobs)))),
            "lengths": np.asarray(expected.response_lengths).tolist(),
            "packings": engine._take._cache_size(),
            "collectives": sum(text.count(op) for op in ("all-gather", "all-to-all", "collective-permute",
                                                         "all-reduce", "reduce-scatter")),
        }
        graphdef_paged, _ = model("float32", "splash")  # the same params; its decode steps take the paged kernel
        engine = SlotSampler(graphdef_paged, sampling, slots=2, chunk_tokens=3, layout=layout32)
        rollout = engine(placed32, PROMPTS, jax.random.key(0))
        observed["paged/tensor2"] = {
            "tokens": bool(np.array_equal(rollout.tokens, np.asarray(reference.tokens))),
            "logprob_gap": float(np.max(np.abs(rollout.logprobs - np.asarray(reference.logprobs)))),
        }
    return observed


if __name__ == "__main__":
    print(json.dumps(main()))
