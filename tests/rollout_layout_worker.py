"""The decode layout on 8 simulated CPU devices; prints one JSON line of observations.

tests/test_rollout_layout.py runs this file in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8.
For the training meshes fsdp=8 (1x8x1) and 2x2x2, scanned layers, and 2x2x2 unscanned (CASES):
  hlo       what the compiled decode program's while loops move per generated token (bfloat16 compute), when
            sampling in the training layout (params where the trainer keeps them) and in the decode layouts
            rollout.mesh tensor=1 (and tensor=2), counted from the HLO by tests/hlo_collectives.py
  copy      the layout's copy of the params: dtype, and how many devices hold each leaf's elements
  greedy    float32 greedy samples in the decode layouts == the one-device sampler's
  logprobs  float32 sampled log-probs in the decode layouts - a teacher-forced forward of the training params
            on the training mesh
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MESHES = {"1x8x1": (1, 8, 1), "2x2x2": (2, 2, 2)}
PROMPTS = [[3, 17, 9, 44], [8, 100, 2], [5, 6, 7, 300, 11], [9]]
# (scanned layers, training mesh, layouts whose decode program is compiled in bfloat16, layouts sampled in float32)
CASES = [
    (True, "1x8x1", ("training", "tensor1"), ("tensor1",)),
    (True, "2x2x2", ("training", "tensor1", "tensor2"), ("tensor2",)),
    (False, "2x2x2", ("tensor1", "tensor2"), ("tensor2",)),
]


def main() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from hlo_collectives import while_loop_collectives
    from models import ModelConfig, build_model
    from rlmt_jax.scale import mesh as mesh_lib
    from rlmt_jax.settings.config import RolloutMeshConfig
    from rlmt_jax.scale.multihost import HostRows
    from rlmt_jax.rollout.sampling import DecodeLayout, Sampler, SamplingConfig

    def model(scan: bool, dtype: str):
        # the tiny default's shapes: vocab 768, embed 64, mlp 192, 4 heads of 16 with 2 kv heads, 2 layers
        cfg = ModelConfig(vocab_size=768, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, scan_layers=scan, remat="full", dtype=dtype)
        return nnx.split(build_model(cfg, nnx.Rngs(0)), nnx.Param)

    def layout(mesh, dtype, name):
        return None if name == "training" else DecodeLayout.of(mesh, RolloutMeshConfig(tensor=int(name[-1])), dtype)

    greedy = SamplingConfig(n=2, max_new_tokens=6, temperature=0.0, eos_ids=(5,), pad_id=0, prompt_buckets=(8,),
                            decode_windows=2)
    sampled = SamplingConfig(n=2, max_new_tokens=6, temperature=1.0, pad_id=0, prompt_buckets=(8,))
    observed: dict = {"device_count": jax.device_count(), "meshes": {}}
    for scan, label, compiled, run in CASES:
        graphdef32, params32 = model(scan, "float32")
        reference = Sampler(graphdef32, greedy)(params32, PROMPTS, jax.random.key(0))
        graphdef16, params16 = model(scan, "bfloat16")
        policy_bytes = sum(x.size * 2 for x in jax.tree.leaves(params16))  # the bfloat16 copy's bytes
        mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(*MESHES[label]))
        out = observed["meshes"].setdefault(f"{label}/{'scan' if scan else 'unscanned'}", {})
        with mesh_lib.activation_sharding(mesh):
            placed16 = mesh_lib.shard_params(params16, mesh)
            for name in compiled:
                sampler = Sampler(graphdef16, greedy, hosts=HostRows(mesh), layout=layout(mesh, "bfloat16", name))
                loops = while_loop_collectives(sampler.compiled_decode_text(placed16, PROMPTS, jax.random.key(0)))
                out[f"hlo/{name}"] = {
                    "loops": len(loops),
                    "all_gathers": max(loop.count("all-gather") for loop in loops),
                    "bytes_fraction": max(loop.bytes_per_iteration for loop in loops) / policy_bytes,
                }
                if sampler.layout is not None:
                    copy = sampler.rollout_params(placed16)
                    out[f"copy/{name}"] = {
                        "dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(copy)}),
                        "max_split": max(len({str(s.index) for s in x.addressable_shards})
                                         for x in jax.tree.leaves(copy)),
                        "equal": all(np.array_equal(np.asarray(a), np.asarray(b).astype(a.dtype)) for a, b in
                                     zip(jax.tree.leaves(copy), jax.tree.leaves(params16), strict=True)),
                        "mesh": dict(sampler.layout.mesh.shape),
                    }

            placed32 = mesh_lib.shard_params(params32, mesh)
            forward = jax.jit(lambda p, ids, mask, pos: nnx.merge(graphdef32, p)(ids, mask, pos))
            for name in run:
                decode_layout = layout(mesh, "float32", name)
                rollout = Sampler(graphdef32, greedy, layout=decode_layout)(placed32, PROMPTS, jax.random.key(0))
                out[f"greedy_equal/{name}"] = bool(np.array_equal(rollout.tokens, reference.tokens))
                rollout = Sampler(graphdef32, sampled, layout=decode_layout)(placed32, PROMPTS, jax.random.key(1))
                batch = mesh_lib.shard_batch({"tokens": np.asarray(rollout.tokens),
                                              "mask": np.asarray(rollout.attention_mask),
                                              "positions": np.asarray(rollout.positions)}, mesh)
                logits = forward(placed32, batch["tokens"], batch["mask"], batch["positions"])
                logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
                teacher = jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], axis=-1)[..., 0]
                teacher = np.pad(np.asarray(teacher), ((0, 0), (1, 0)))
                mask = np.asarray(rollout.response_mask)
                out[f"logprob_gap/{name}"] = float(np.max(np.abs(teacher - np.asarray(rollout.logprobs))[mask]))
                out[f"response_tokens/{name}"] = int(mask.sum())
    return observed


if __name__ == "__main__":
    print(json.dumps(main()))
