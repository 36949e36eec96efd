"""One process of the slot engine's two-process test (tests/test_slot_engine_mesh.py starts two of these).

    python tests/slot_cluster_worker.py '{"process_id": 0, "num_processes": 2, "port": 12345}'

Each process passes its own prompts (process 0's rows run long, process 1's short: they run out of rows at
different chunks and go on in lockstep), sampled by the static sampler and by the slot engine with one slot per
process; then two calls of the slot engine with partial rollouts (the second call's rows started in the first
call's tail), carried rows' caches recomputed, and again with them kept; then a longer sampling whose tails the
processes pack into fewer slots together. Prints one JSON line with this process's rows of each.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import jax

PROMPTS = {0: [[3, 17, 9, 44], [8, 100, 2], [5, 6, 7, 300, 11]], 1: [[9], [4, 4, 4, 4, 4, 4], [12, 13]]}


def main(spec: dict) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import numpy as np
    from flax import nnx

    from models import ModelConfig, build_model
    from rlmt_jax.rollout.sampling import Sampler, SamplingConfig
    from rlmt_jax.rollout.slot_sampler import SlotSampler
    from rlmt_jax.scale import mesh as mesh_lib
    from rlmt_jax.scale.multihost import HostRows

    mesh_lib.initialize_distributed(f"localhost:{spec['port']}", spec["num_processes"], spec["process_id"])
    cfg = ModelConfig(vocab_size=768, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, scan_layers=True, dtype="float32")
    graphdef, params = nnx.split(build_model(cfg, nnx.Rngs(0)), nnx.Param)
    sampling = SamplingConfig(n=2, max_new_tokens=10, temperature=1.0, eos_ids=tuple(range(1, 60)), pad_id=0,
                              prompt_buckets=(8,), decode_windows=2)
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(2, 1, 1))
    with mesh_lib.activation_sharding(mesh):
        params = mesh_lib.shard_params(params, mesh)
        prompts = PROMPTS[jax.process_index()]
        static = Sampler(graphdef, sampling, hosts=HostRows(mesh))(params, prompts, jax.random.key(4))
        slots = SlotSampler(graphdef, sampling, slots=1, chunk_tokens=3, hosts=HostRows(mesh))(
            params, prompts, jax.random.key(4))
        # partial rollouts: the next call's rows (the other process's prompts, reversed) start in this one's tail
        following = PROMPTS[1 - jax.process_index()][::-1]
        ahead = SlotSampler(graphdef, sampling, slots=2, chunk_tokens=3, hosts=HostRows(mesh), max_staleness=1)
        first = ahead(params, prompts, jax.random.key(4), version=0, ahead=[(following, jax.random.key(5))])
        carried = len(ahead.carry_state()[0]["readmit"])
        second = ahead(params, following, jax.random.key(5), version=1)
        expected = Sampler(graphdef, sampling, hosts=HostRows(mesh))(params, following, jax.random.key(5))
        # the same with carried_cache keep: the processes agree to decode on in the kept slots (one of them
        # may have no carried row)
        keep = SlotSampler(graphdef, sampling, slots=2, chunk_tokens=3, hosts=HostRows(mesh), max_staleness=1,
                           carried_cache="keep")
        keep(params, prompts, jax.random.key(4), version=0, ahead=[(following, jax.random.key(5))])
        kept = keep._kept is not None
        kept_second = keep(params, following, jax.random.key(5), version=1)
        # 4 slots a process for its 6 rows, 40 new tokens: the processes pack their tails together (each its own
        # slots), in lockstep
        longer = dataclasses.replace(sampling, max_new_tokens=40)
        static_longer = Sampler(graphdef, longer, hosts=HostRows(mesh))(params, prompts, jax.random.key(4))
        packing = SlotSampler(graphdef, longer, slots=4, chunk_tokens=2, hosts=HostRows(mesh))
        packed = packing(params, prompts, jax.random.key(4))
    print(json.dumps({
        "packed_same": np.array_equal(packed.tokens, np.asarray(static_longer.tokens)),
        "packings": packing._take._cache_size() if packing._take is not None else 0,
        "process_index": jax.process_index(), "process_count": jax.process_count(),
        "static": np.asarray(static.tokens).tolist(), "slots": np.asarray(slots.tokens).tolist(),
        "lengths": np.asarray(slots.response_lengths).tolist(),
        "static_lengths": np.asarray(static.response_lengths).tolist(),
        "logprob_gap": float(np.max(np.abs(np.asarray(static.logprobs) - slots.logprobs))),
        "ahead_first": np.array_equal(first.tokens, np.asarray(static.tokens)),
        "ahead_second": np.array_equal(second.tokens, np.asarray(expected.tokens)),
        "ahead_carried": carried,
        "keep_kept": kept,
        "keep_second": np.array_equal(kept_second.tokens, np.asarray(expected.tokens)),
        "ahead_versions": sorted(set(second.versions[second.response_mask].tolist())),
    }))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
