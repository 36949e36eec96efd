"""Placement on 8 simulated CPU devices: params, optimizer state, checkpoint tensors, batches, activations.

JAX fixes its device count when it first starts, and other test modules start it with one device, so the
checks run once in a subprocess (this file run as a script with XLA_FLAGS set) that prints its
observations as JSON; the tests below assert on them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from clusters import simulated_devices

MESHES = {"8x1x1": (8, 1, 1), "1x8x1": (1, 8, 1), "2x2x2": (2, 2, 2)}

# A hand-made model with Llama-like parameter shapes: vocab 64, embed 32, 4 heads of 8, 1 kv head (MQA),
# mlp 64, and one scanned leaf with a leading 'layers' axis.
PARAMS = {
    "embed": ((64, 32), ("vocab", "embed")),
    "q_proj": ((32, 4, 8), ("embed", "heads", "head_dim")),
    "k_proj": ((32, 1, 8), ("embed", "kv_heads", "head_dim")),
    "o_proj": ((4, 8, 32), ("heads", "head_dim", "embed")),
    "q_bias": ((4, 8), ("heads", "head_dim")),
    "down_proj": ((64, 32), ("mlp", "embed")),
    "norm": ((32,), ("norm",)),
    "stacked_up_proj": ((2, 32, 64), ("layers", "embed", "mlp")),
}


def _observe() -> dict:
    """Runs in the 8-device subprocess; returns JSON-able observations."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from rlmt_jax.scale import mesh as mesh_lib
    from rlmt_jax.core.errors import UserError

    class Tiny(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            for name, (shape, axes) in PARAMS.items():
                value = jax.random.normal(rngs.params(), shape)
                setattr(self, name, nnx.Param(value, logical_axes=axes))

    def shard_shapes(array: jax.Array) -> list:
        return sorted({tuple(shard.data.shape) for shard in array.addressable_shards})

    out: dict = {"device_count": jax.device_count()}
    model = Tiny(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    abstract = nnx.state(nnx.eval_shape(lambda: Tiny(nnx.Rngs(0))), nnx.Param)
    for label, sizes in MESHES.items():
        mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(*sizes))
        placed = mesh_lib.shard_params(state, mesh)
        from_abstract = mesh_lib.param_shardings(abstract, mesh)
        out[label] = {
            name: {
                "spec": str(placed[name][...].sharding.spec),
                "shard_shapes": shard_shapes(placed[name][...]),
                "abstract_spec_equal": from_abstract[name].get_value().spec == placed[name][...].sharding.spec,
                "values_equal": bool(np.array_equal(np.asarray(placed[name][...]), np.asarray(state[name][...]))),
            }
            for name in PARAMS
        }
        out[label]["batch_spec"] = str(mesh_lib.batch_sharding(mesh).spec)

    # optax state of sharded params: moments follow the params, the step count is replicated
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(1, 8, 1))
    opt_state = optax.adamw(1e-3).init(mesh_lib.shard_params(state, mesh))
    opt_shardings = mesh_lib.param_shardings(opt_state, mesh)
    out["opt"] = {
        "mu_embed_spec": str(opt_shardings[0].mu["embed"].get_value().spec),
        "count_spec": str(opt_shardings[0].count.spec),
    }

    # checkpoint tensors placed shard by shard on (1, 8, 1): record every read
    reads: list = []

    class RecordingArray:
        def __init__(self, array: np.ndarray):
            self.array, self.shape = array, array.shape

        def __getitem__(self, index):
            piece = self.array[index]
            reads.append(list(piece.shape))
            return piece

    place = mesh_lib.make_placer(mesh)
    table = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)
    placed_table = place("model.embed_tokens.weight", RecordingArray(table), ("vocab", "embed"))
    out["placer"] = {
        "shard_shapes": shard_shapes(placed_table),
        "reads": reads,
        "values_equal": bool(np.array_equal(np.asarray(placed_table), table)),
    }
    as_bf16 = mesh_lib.make_placer(mesh, dtype=jnp.bfloat16)("w", table, ("vocab", "embed"))
    out["placer"]["bf16_dtype"] = str(as_bf16.dtype)
    try:
        place("model.norm.weight", np.ones((4, 4), np.float32), ("norm",))
    except UserError as err:
        out["placer"]["rank_error"] = str(err)

    # batches over data x fsdp on (2, 2, 2)
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(2, 2, 2))
    batch = mesh_lib.shard_batch({"input_ids": np.arange(24, dtype=np.int32).reshape(8, 3)}, mesh)
    out["batch"] = {
        "spec": str(batch["input_ids"].sharding.spec),
        "shard_shapes": shard_shapes(batch["input_ids"]),
        "first_rows_of_device_0": np.asarray(batch["input_ids"].addressable_shards[0].data).tolist(),
    }
    try:
        mesh_lib.shard_batch({"input_ids": np.zeros((6, 3), np.int32)}, mesh)
    except UserError as err:
        out["batch"]["error"] = str(err)

    # activations constrained inside jit by the rules, through models.sharding's hook
    from models import sharding as model_sharding

    x = jax.random.normal(jax.random.key(1), (8, 4, 32))
    w = jax.random.normal(jax.random.key(2), (32, 64))

    def hidden(x, w):
        return model_sharding.constrain(jnp.einsum("bsd,df->bsf", x, w), ("batch", "seq", "mlp"))

    # The constraint is fixed when a function is traced and JAX's trace cache (keyed by the Python
    # function) does not see the context: the plain version must be a different function object.
    with mesh_lib.activation_sharding(mesh):
        constrained = jax.jit(hidden)(x, w)
    plain = jax.jit(lambda x, w: hidden(x, w))(x, w)
    out["activation"] = {
        "spec": str(constrained.sharding.spec),
        "shard_shapes": shard_shapes(constrained),
        "max_abs_diff": float(jnp.max(jnp.abs(constrained - plain))),
        "plain_is_single_device": len(plain.sharding.device_set) == 1,
    }
    return out


@pytest.fixture(scope="module")
def observed() -> dict:
    env = simulated_devices(8)
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300, cwd=root
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_subprocess_sees_eight_devices(observed):
    assert observed["device_count"] == 8


def test_pure_data_parallel_mesh_replicates_every_param(observed):
    for name, (shape, _) in PARAMS.items():
        assert observed["8x1x1"][name]["shard_shapes"] == [list(shape)], name
        assert observed["8x1x1"][name]["values_equal"], name
    assert observed["8x1x1"]["batch_spec"] == "P('data',)"


def test_fsdp_mesh_splits_embed_eight_ways(observed):
    fsdp = observed["1x8x1"]
    assert fsdp["embed"]["spec"] == "P(None, 'fsdp')"
    assert fsdp["embed"]["shard_shapes"] == [[64, 4]]
    assert fsdp["q_proj"]["shard_shapes"] == [[4, 4, 8]]
    assert fsdp["o_proj"]["shard_shapes"] == [[4, 8, 4]]
    assert fsdp["down_proj"]["shard_shapes"] == [[64, 4]]
    assert fsdp["stacked_up_proj"]["shard_shapes"] == [[2, 4, 64]]  # 'layers' stays whole
    assert fsdp["q_bias"]["spec"] == "P(None, 'fsdp')"  # no embed: largest free dim (head_dim 8)
    assert fsdp["q_bias"]["shard_shapes"] == [[4, 1]]
    assert fsdp["norm"]["shard_shapes"] == [[32]]
    assert fsdp["batch_spec"] == "P('fsdp',)"
    assert all(fsdp[name]["values_equal"] for name in PARAMS)


def test_two_by_two_by_two_mesh_splits_fsdp_and_tensor_and_replicates_the_single_kv_head(observed):
    mixed = observed["2x2x2"]
    assert mixed["embed"]["spec"] == "P('tensor', 'fsdp')"
    assert mixed["embed"]["shard_shapes"] == [[32, 16]]
    assert mixed["q_proj"]["spec"] == "P('fsdp', 'tensor', None)"
    assert mixed["q_proj"]["shard_shapes"] == [[16, 2, 8]]
    assert mixed["k_proj"]["spec"] == "P('fsdp', None, None)"  # 1 kv head cannot split over tensor=2
    assert mixed["k_proj"]["shard_shapes"] == [[16, 1, 8]]
    assert mixed["q_bias"]["spec"] == "P('tensor', 'fsdp')"
    assert mixed["q_bias"]["shard_shapes"] == [[2, 4]]
    assert mixed["stacked_up_proj"]["shard_shapes"] == [[2, 16, 32]]
    assert mixed["batch_spec"] == "P(('data', 'fsdp'),)"
    assert all(mixed[name]["values_equal"] for name in PARAMS)


def test_shardings_from_an_abstract_state_equal_those_of_the_placed_state(observed):
    for label in MESHES:
        assert all(observed[label][name]["abstract_spec_equal"] for name in PARAMS), label


def test_optimizer_moments_follow_their_params_and_the_step_count_is_replicated(observed):
    assert observed["opt"] == {"mu_embed_spec": "P(None, 'fsdp')", "count_spec": "P()"}


def test_placer_reads_one_eighth_per_device_and_never_the_whole_tensor(observed):
    placer = observed["placer"]
    assert placer["shard_shapes"] == [[64, 4]]
    assert placer["reads"] == [[64, 4]] * 8
    assert placer["values_equal"]
    assert placer["bf16_dtype"] == "bfloat16"
    assert placer["rank_error"] == (
        "tensor model.norm.weight: shape (4, 4) does not have the 1 dims of its logical axes ('norm',)"
    )


def test_batch_rows_are_split_over_data_and_fsdp(observed):
    batch = observed["batch"]
    assert batch["spec"] == "P(('data', 'fsdp'),)"
    assert batch["shard_shapes"] == [[2, 3]]
    assert batch["first_rows_of_device_0"] == [[0, 1, 2], [3, 4, 5]]
    assert batch["error"] == (
        "batch array input_ids of shape (6, 3): the global batch size 6 must be a multiple of 4 "
        "(the data x fsdp mesh size)"
    )


def test_activation_constraint_shards_inside_jit_without_changing_values(observed):
    activation = observed["activation"]
    assert activation["spec"] == "P(('data', 'fsdp'), None, 'tensor')"
    assert activation["shard_shapes"] == [[2, 4, 32]]
    assert activation["max_abs_diff"] == 0.0
    assert activation["plain_is_single_device"]


if __name__ == "__main__":
    print(json.dumps(_observe()))
