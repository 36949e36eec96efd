"""Mesh shapes, the partition rules and the multi-host switch, on one device (abstract meshes, fake devices)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rlmt_jax.core.errors import UserError
from rlmt_jax.scale.mesh import (
    MESH_AXES,
    MeshConfig,
    device_grid,
    initialize_distributed,
    logical_to_spec,
    make_mesh,
    resolve_mesh_shape,
)
from rlmt_jax.scale.mesh import _multihost_env as multihost_env


def abstract_mesh(data: int, fsdp: int, tensor: int) -> jax.sharding.AbstractMesh:
    return jax.sharding.AbstractMesh((data, fsdp, tensor), MESH_AXES)


# ---- mesh shapes ---------------------------------------------------------------------------------------------


def test_minus_one_fills_the_devices_left_over():
    assert resolve_mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 16) == ((2, 4, 2), (1, 1, 1))
    assert resolve_mesh_shape(MeshConfig(data=-1, fsdp=1, tensor=4), 8) == ((2, 1, 4), (1, 1, 1))
    assert resolve_mesh_shape(MeshConfig(), 32) == ((1, 32, 1), (1, 1, 1))


def test_multislice_shape_splits_devices_per_slice_and_fills_dcn():
    # v5e-64 x 2 slices: 128 chips; FSDP inside each slice, data parallel across slices (default dcn_data=-1)
    assert resolve_mesh_shape(MeshConfig(tensor=4), 128, num_granules=2) == ((1, 16, 4), (2, 1, 1))
    assert resolve_mesh_shape(MeshConfig(dcn_data=1, dcn_fsdp=-1), 64, num_granules=4) == ((1, 16, 1), (1, 4, 1))


@pytest.mark.parametrize(
    ("config", "devices", "message"),
    [
        (MeshConfig(data=3, fsdp=-1), 8, "mesh.data=3 x mesh.fsdp=-1 x mesh.tensor=1: 3 does not divide the 8 devices"),
        (MeshConfig(data=2, fsdp=2, tensor=1), 8, "= 4, but there are 8 devices"),
        (MeshConfig(data=-1, fsdp=-1), 8, "only one of mesh.data, mesh.fsdp, mesh.tensor may be -1"),
        (MeshConfig(tensor=0), 8, "mesh.tensor=0: a mesh size must be a positive integer or -1"),
        (MeshConfig(dcn_data=3), 8, "mesh.dcn_data=3 x mesh.dcn_fsdp=1 x mesh.dcn_tensor=1 = 3, but there are 1 slices"),
    ],
)
def test_mesh_sizes_that_do_not_fit_the_devices_name_the_settings(config, devices, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_mesh_shape(config, devices)


def test_make_mesh_on_one_device_has_the_three_named_axes():
    mesh = make_mesh(MeshConfig())
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    id: int
    process_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"


@dataclasses.dataclass(frozen=True)
class FakeSliceDevice(FakeDevice):
    slice_index: int = 0


def device_ids(grid: np.ndarray) -> list:
    return np.vectorize(lambda device: device.id)(grid).tolist()


def test_two_slices_go_on_the_dcn_axis_and_each_slice_stays_on_ici():
    devices = [FakeSliceDevice(i, process_index=i // 2, slice_index=i // 4) for i in range(8)]
    grid = device_grid(MeshConfig(data=1, fsdp=-1, tensor=2), devices)
    # dcn_data=-1 -> 2 slices on 'data'; inside each slice fsdp=2 x tensor=2 over that slice's 4 devices
    assert device_ids(grid) == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]


def test_gpu_hosts_are_the_dcn_granule_when_devices_have_no_slices():
    devices = [FakeDevice(i, process_index=i // 4) for i in range(8)]
    grid = device_grid(MeshConfig(), devices)
    assert device_ids(grid) == [[[0], [1], [2], [3]], [[4], [5], [6], [7]]]


# ---- the rules -----------------------------------------------------------------------------------------------


def test_llama_param_specs_put_embed_on_fsdp_and_heads_mlp_vocab_on_tensor():
    mesh = abstract_mesh(2, 4, 2)
    assert logical_to_spec(("vocab", "embed"), (128256, 4096), mesh) == P("tensor", "fsdp")
    assert logical_to_spec(("vocab", "embed"), (128256, 4096), abstract_mesh(8, 1, 1)) == P(None, None)
    assert logical_to_spec(("embed", "heads", "head_dim"), (4096, 32, 128), mesh) == P("fsdp", "tensor", None)
    assert logical_to_spec(("heads", "head_dim", "embed"), (32, 128, 4096), mesh) == P("tensor", None, "fsdp")
    assert logical_to_spec(("embed", "mlp"), (4096, 14336), mesh) == P("fsdp", "tensor")
    assert logical_to_spec(("mlp", "embed"), (14336, 4096), mesh) == P("tensor", "fsdp")
    assert logical_to_spec(("norm",), (4096,), mesh) == P(None)
    assert logical_to_spec(("layers", "embed", "mlp"), (32, 4096, 14336), mesh) == P(None, "fsdp", "tensor")


def test_kv_heads_not_divisible_by_tensor_are_replicated_over_tensor():
    # Llama-3.1-8B has 8 kv heads: tensor=16 cannot split them, tensor=8 can
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (4096, 8, 128), abstract_mesh(1, 4, 16)) == P(
        "fsdp", None, None
    )
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (4096, 8, 128), abstract_mesh(1, 4, 8)) == P(
        "fsdp", "tensor", None
    )
    assert logical_to_spec(("batch", "seq", "kv_heads", "head_dim"), (8, 16, 2, 4), abstract_mesh(1, 1, 4),
                           "activation") == P(None, None, None, None)


def test_param_without_a_divisible_embed_is_fsdp_sharded_on_its_largest_free_dim():
    mesh = abstract_mesh(1, 8, 2)
    # qkv bias [heads, head_dim]: heads on tensor, head_dim 128 is the largest free dim
    assert logical_to_spec(("heads", "head_dim"), (28, 128), mesh) == P("tensor", "fsdp")
    # embed 12 is not divisible by 8 and mlp is already on tensor: no free dim, so replicated over fsdp
    assert logical_to_spec(("embed", "mlp"), (12, 64), mesh) == P(None, "tensor")
    # a 1-dim bias keeps the plain rule
    assert logical_to_spec(("labels",), (8,), mesh) == P(None)
    # 'layers' is never split, and a scanned vector is still a vector: norm scales stay replicated
    assert logical_to_spec(("layers", "norm"), (16, 64), mesh) == P(None, None)
    assert logical_to_spec(("layers", "heads", "head_dim"), (16, 28, 128), mesh) == P(None, "tensor", "fsdp")


@pytest.mark.parametrize(("axes", "shape", "mesh", "kind", "spec"), [
    # each logical axis alone on a (data 2, fsdp 4, tensor 2) mesh: the table's first choice
    (("vocab", "embed"), (64, 32), (2, 4, 2), "param", P("tensor", "fsdp")),
    (("embed", "heads", "head_dim"), (32, 8, 16), (2, 4, 2), "param", P("fsdp", "tensor", None)),
    (("embed", "kv_heads", "head_dim"), (32, 2, 16), (2, 4, 2), "param", P("fsdp", "tensor", None)),
    (("mlp", "embed"), (64, 32), (2, 4, 2), "param", P("tensor", "fsdp")),
    (("embed", "labels"), (32, 2), (2, 4, 2), "param", P("fsdp", None)),
    (("norm",), (32,), (2, 4, 2), "param", P(None)),
    (("batch", "seq", "embed"), (16, 8, 32), (2, 4, 2), "activation", P(("data", "fsdp"), None, None)),
    (("batch", "cache_seq", "kv_heads", "head_dim"), (2, 8, 2, 16), (2, 4, 2), "activation",
     P("data", None, "tensor", None)),
    # the fsdp fallback (no dimension on fsdp): the LARGEST free dimension divisible by fsdp, the first of equals
    (("heads", "head_dim"), (32, 128), (1, 4, 1), "param", P(None, "fsdp")),
    (("head_dim", "heads"), (128, 32), (1, 4, 1), "param", P("fsdp", None)),
    (("heads", "head_dim"), (64, 64), (1, 4, 1), "param", P("fsdp", None)),
    (("heads", "head_dim"), (32, 130), (1, 4, 1), "param", P("fsdp", None)),  # 130 does not divide by 4
    (("embed", "heads", "head_dim"), (6, 32, 128), (1, 4, 1), "param", P(None, None, "fsdp")),  # embed 6: not by 4
    (("embed", "mlp"), (6, 256), (1, 4, 2), "param", P(None, "tensor")),  # mlp on tensor: no free dim
    (("layers", "heads", "head_dim"), (512, 8, 16), (1, 4, 1), "param", P(None, None, "fsdp")),  # never 'layers'
    (("layers", "norm"), (512, 64), (1, 4, 1), "param", P(None, None)),  # a scanned vector stays a vector
    (("heads", "head_dim"), (32, 128), (1, 4, 1), "activation", P(None, None)),  # params only
])
def test_each_rule_and_the_fsdp_fallback_pick_these_mesh_axes(axes, shape, mesh, kind, spec):
    """Pinned choices: the fallback taking the smallest free dimension instead of the largest (max -> min) ran
    the suite past its time limit instead of failing."""
    assert logical_to_spec(axes, shape, abstract_mesh(*mesh), kind) == spec


def test_the_rollout_table_splits_no_param_on_fsdp_not_even_by_the_fallback():
    from rlmt_jax.scale.mesh import ROLLOUT_RULES

    mesh = abstract_mesh(1, 4, 2)
    assert logical_to_spec(("embed", "mlp"), (64, 256), mesh, rules=ROLLOUT_RULES) == P(None, "tensor")
    assert logical_to_spec(("heads", "head_dim"), (32, 128), abstract_mesh(1, 4, 1), rules=ROLLOUT_RULES) == P(
        None, None)


def test_batch_takes_data_then_fsdp_while_they_divide_it():
    mesh = abstract_mesh(2, 4, 2)
    assert logical_to_spec(("batch", "seq", "vocab"), (16, 7, 64), mesh, "activation") == P(("data", "fsdp"), None, "tensor")
    assert logical_to_spec(("batch", "seq", "embed"), (4, 7, 64), mesh, "activation") == P("data", None, None)
    assert logical_to_spec(("batch", "seq", "embed"), (1, 7, 64), mesh, "activation") == P(None, None, None)
    assert logical_to_spec(
        ("layers", "batch", "cache_seq", "kv_heads", "head_dim"), (2, 8, 32, 4, 16), mesh, "activation"
    ) == P(None, ("data", "fsdp"), None, "tensor", None)


def test_activation_embed_is_not_split_even_though_param_embed_is():
    mesh = abstract_mesh(1, 4, 1)
    assert logical_to_spec(("batch", "seq", "embed"), (4, 8, 64), mesh, "activation") == P("fsdp", None, None)
    assert logical_to_spec(("embed", "mlp"), (64, 8), mesh, "param") == P("fsdp", None)


def test_unknown_logical_axis_and_wrong_rank_are_errors():
    mesh = abstract_mesh(1, 1, 1)
    with pytest.raises(ValueError, match="logical axis 'hidden' has no partition rule"):
        logical_to_spec(("hidden",), (4,), mesh)
    with pytest.raises(ValueError, match=r"logical axes \('embed',\) do not match shape \(4, 4\)"):
        logical_to_spec(("embed",), (4, 4), mesh)


# ---- multi-host ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "1"},
         "JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID"),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "JAX_NUM_PROCESSES": "1"}, None),
        ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
          "SLURM_LOCALID": "0"}, "SLURM"),
        ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
          "SLURM_LOCALID": "0"}, None),
        ({"RLMT_MULTIHOST": "1"}, "RLMT_MULTIHOST"),
        ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, "TPU_WORKER_HOSTNAMES"),
        ({"TPU_WORKER_HOSTNAMES": "w0"}, None),
        ({"MEGASCALE_NUM_SLICES": "2"}, "MEGASCALE_NUM_SLICES"),
    ],
)
def test_multihost_is_detected_only_from_environments_with_several_processes(environ, expected):
    assert multihost_env(environ) == expected


def test_initialize_distributed_is_a_no_op_on_one_host():
    assert initialize_distributed(environ={}) is False
    assert initialize_distributed(num_processes=1) is False
    assert not jax.distributed.is_initialized()


def test_initialize_distributed_names_missing_or_bad_settings():
    with pytest.raises(UserError, match="distributed.num_processes=2 needs distributed.coordinator_address"):
        initialize_distributed(num_processes=2)
    with pytest.raises(UserError, match=r"distributed.process_id=2 must be in \[0, 2\)"):
        initialize_distributed("10.0.0.2:1234", num_processes=2, process_id=2)
    with pytest.raises(UserError, match="JAX_NUM_PROCESSES='four' must be an integer"):
        initialize_distributed(environ={"JAX_NUM_PROCESSES": "four"})


# ---- the models' own axes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("scan_layers", [False, True])
def test_every_param_of_every_model_head_has_a_rule_and_vectors_stay_replicated(scan_layers):
    from flax import nnx

    from models import CausalLM, ModelConfig, RewardModel, ValueModel
    from rlmt_jax.scale.mesh import param_shardings

    mesh = make_mesh()  # one device: the specs are checked on an abstract (2, 2, 2) mesh below
    abstract_222 = abstract_mesh(2, 2, 2)
    for cls, arch in ((CausalLM, "Qwen2ForCausalLM"), (RewardModel, "LlamaForSequenceClassification"),
                      (ValueModel, "LlamaForCausalLM")):
        cfg = ModelConfig(architecture=arch, qkv_bias=True, o_bias=True, scan_layers=scan_layers)
        params = nnx.state(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))), nnx.Param)
        param_shardings(params, mesh)  # raises on a Param without logical_axes
        for path, variable in nnx.to_flat_state(params):
            axes = variable.get_metadata()["logical_axes"]
            spec = logical_to_spec(axes, variable.get_value().shape, abstract_222)
            if len([axis for axis in axes if axis != "layers"]) == 1 and axes[-1] != "embed":
                assert spec == P(*([None] * len(axes))), (cls.__name__, path, spec)


def test_placer_reads_a_lazy_safetensors_slice(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from rlmt_jax.scale.mesh import make_placer

    weight = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)
    save_file({"lm_head.weight": weight}, str(tmp_path / "model.safetensors"))
    with safe_open(str(tmp_path / "model.safetensors"), "np") as checkpoint:
        placed = make_placer(make_mesh(), dtype=np.float16)(
            "lm_head.weight", checkpoint.get_slice("lm_head.weight"), ("vocab", "embed")
        )
    assert placed.dtype == np.float16
    np.testing.assert_array_equal(np.asarray(placed), weight.astype(np.float16))
