"""The decode layout (rollout.mesh): the policy copied once per sampling call into a data x tensor mesh in the
compute dtype, so the decode loop moves no weights between devices.

The 8-device observations come from tests/rollout_layout_worker.py (a subprocess with 8 simulated CPU devices);
what a loop moves is counted in the compiled HLO (tests/hlo_collectives.py), never timed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from clusters import simulated_devices

from rlmt_jax.scale import mesh as mesh_lib
from rlmt_jax.settings.config import RolloutMeshConfig, resolve
from rlmt_jax.core.errors import UserError
from tests.hlo_collectives import while_loop_collectives

ROOT = Path(__file__).resolve().parents[1]
LOGPROB_TOLERANCE = 1e-5  # as the one-device sampler tests


@pytest.fixture(scope="module")
def observed() -> dict:
    env = simulated_devices(8)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "rollout_layout_worker.py")],
                            env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Involuntary full rematerialization" not in result.stderr  # the copy gathers, then slices
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_training_layout_gathers_every_layer_inside_the_decode_loop(observed):
    # the problem the layout solves: FSDP params are all-gathered at every generated token (scanned layers)
    for mesh in ("1x8x1/scan", "2x2x2/scan"):
        training = observed["meshes"][mesh]["hlo/training"]
        assert training["loops"] == 2  # one while loop per decode window
        assert training["all_gathers"] == 8  # 4 kernels (qkv, o, gate/up, down) x 2 layers
        assert training["bytes_fraction"] > 0.4


@pytest.mark.parametrize("mesh, layout", [("1x8x1/scan", "tensor1"), ("2x2x2/scan", "tensor1"),
                                          ("2x2x2/scan", "tensor2"), ("2x2x2/unscanned", "tensor1"),
                                          ("2x2x2/unscanned", "tensor2")])
def test_decode_layout_loop_moves_no_weights_and_under_one_percent_of_the_policy(observed, mesh, layout):
    hlo = observed["meshes"][mesh][f"hlo/{layout}"]
    assert hlo["loops"] == 2 and hlo["all_gathers"] == 0
    assert hlo["bytes_fraction"] < 0.01
    if layout == "tensor1":  # whole copies: only the loop condition's all-reduce of the rows' done flags
        assert hlo["bytes_fraction"] < 1e-5


@pytest.mark.parametrize("mesh, layout, split, shape", [
    ("1x8x1/scan", "tensor1", 1, {"data": 8, "fsdp": 1, "tensor": 1}),
    ("2x2x2/scan", "tensor2", 2, {"data": 4, "fsdp": 1, "tensor": 2})])
def test_the_copy_is_bfloat16_whole_or_tensor_split_with_the_params_values(observed, mesh, layout, split, shape):
    copy = observed["meshes"][mesh][f"copy/{layout}"]
    assert copy["dtypes"] == ["bfloat16"] and copy["equal"] and copy["mesh"] == shape
    assert copy["max_split"] == split  # tensor 1: every device holds every weight whole


@pytest.mark.parametrize("mesh, layout", [("1x8x1/scan", "tensor1"), ("2x2x2/scan", "tensor2"),
                                          ("2x2x2/unscanned", "tensor2")])
def test_decode_layout_samples_equal_one_device_and_the_teacher_forced_forward(observed, mesh, layout):
    out = observed["meshes"][mesh]
    assert out[f"greedy_equal/{layout}"]
    assert out[f"response_tokens/{layout}"] == 48  # 4 prompts x 2 samples x 6 tokens, no EOS at temperature 1
    assert out[f"logprob_gap/{layout}"] <= LOGPROB_TOLERANCE


# ------------------------------------------------------------------------------------ one device


def test_rollout_mesh_regroups_the_training_devices_in_their_order():
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig())
    rollout = mesh_lib.rollout_mesh(mesh, RolloutMeshConfig(data=-1, tensor=1))
    assert dict(rollout.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert list(rollout.devices.reshape(-1)) == list(mesh.devices.reshape(-1))
    assert mesh_lib.resolve_rollout_shape(RolloutMeshConfig(data=-1, tensor=4), 32) == (8, 4)
    assert mesh_lib.resolve_rollout_shape(RolloutMeshConfig(data=2, tensor=-1), 8) == (2, 4)
    with pytest.raises(UserError, match="rollout.mesh.tensor=3"):
        mesh_lib.resolve_rollout_shape(RolloutMeshConfig(data=-1, tensor=3), 8)


def test_rollout_rules_never_split_a_param_over_fsdp():
    from jax.sharding import AbstractMesh

    mesh = AbstractMesh((1, 4, 2), mesh_lib.MESH_AXES)
    spec = mesh_lib.logical_to_spec(("embed", "heads", "head_dim"), (64, 4, 16), mesh, "param",
                                    mesh_lib.ROLLOUT_RULES)
    assert tuple(spec) == (None, "tensor", None)
    assert tuple(mesh_lib.logical_to_spec(("embed", "heads", "head_dim"), (64, 4, 16), mesh)) == (
        "fsdp", "tensor", None)


@pytest.mark.parametrize("override, message", [("rollout.mesh.tensor=0", "rollout.mesh.tensor"),
                                               ("rollout.mesh.tensor=-1", "rollout.mesh.tensor")])
def test_bad_rollout_mesh_sizes_name_the_key(override, message):
    with pytest.raises(UserError, match=message):
        resolve(None, [override])


def test_hlo_helper_counts_a_scan_inside_a_loop_times_its_trip_count():
    hlo = """HloModule m

%inner_body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]{0}) parameter(0)
  %ag = f32[16]{0} all-gather(f32[4]{0} %x), dimensions={0}
  ROOT %t = (s32[], f32[4]{0}) tuple(%i, %x)
}

%outer_body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]{0}) parameter(0)
  %w = (s32[], f32[4]{0}) while(%p), condition=%cond, body=%inner_body, backend_config={"known_trip_count":{"n":"3"}}
  %ar = bf16[8]{0} all-reduce(bf16[8]{0} %y), to_apply=%add
  ROOT %t = (s32[], f32[4]{0}) tuple(%i, %x)
}

%cond (p: (s32[], f32[4])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %w = (s32[], f32[4]{0}) while(%t), condition=%cond, body=%outer_body
  ROOT %r = f32[4]{0} get-tuple-element(%w), index=1
}
"""
    (loop,) = while_loop_collectives(hlo)
    assert loop.count("all-gather") == 3 and loop.count("all-reduce") == 1
    assert loop.bytes_per_iteration == 3 * 16 * 4 + 8 * 2


def test_sampler_in_a_one_device_layout_copies_params_into_the_compute_dtype(tmp_path):
    from flax import nnx

    from models import ModelConfig, build_model
    from rlmt_jax.rollout.sampling import DecodeLayout, Sampler, SamplingConfig

    cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, dtype="bfloat16")
    graphdef, params = nnx.split(build_model(cfg, nnx.Rngs(0)), nnx.Param)
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig())
    layout = DecodeLayout.of(mesh, RolloutMeshConfig(), "bfloat16")
    sampler = Sampler(graphdef, SamplingConfig(max_new_tokens=3, temperature=0.0, prompt_buckets=(4,)), layout=layout)
    copy = sampler.rollout_params(params)
    assert {x.dtype for x in jax.tree.leaves(copy)} == {np.dtype("bfloat16")}
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("float32")}  # the trainer's params untouched
    plain = Sampler(graphdef, SamplingConfig(max_new_tokens=3, temperature=0.0, prompt_buckets=(4,)))
    a = sampler(params, [[1, 2, 3]], jax.random.key(0))
    b = plain(params, [[1, 2, 3]], jax.random.key(0))  # float32 params cast at every matmul: the same values
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)


# ------------------------------------------------------------------------------------ frozen models


def _bfloat16_copy(params):
    return jax.tree.map(lambda x: x.astype("bfloat16"), params)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_frozen_reference_in_bfloat16_gives_bit_identical_logprobs(scan_layers):
    from flax import nnx

    from models import ModelConfig, build_model
    from rlmt_jax.training.train_step import compute_logprobs

    cfg = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, dtype="bfloat16", scan_layers=scan_layers, qkv_bias=True)
    graphdef, params = nnx.split(build_model(cfg, nnx.Rngs(3)), nnx.Param)
    rng = np.random.default_rng(0)
    mask = np.ones((4, 12), np.int32)
    mask[1, :3] = 0
    batch = {"tokens": rng.integers(1, 96, (4, 12)).astype(np.int32), "attention_mask": mask,
             "positions": np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)}
    stored32 = compute_logprobs(graphdef, params, batch, temperature=0.7)
    stored16 = compute_logprobs(graphdef, _bfloat16_copy(params), batch, temperature=0.7)
    assert float(np.abs(np.asarray(stored32)).max()) > 1.0
    np.testing.assert_array_equal(np.asarray(stored16), np.asarray(stored32))


def test_frozen_reward_model_in_bfloat16_gives_bit_identical_scores():
    import types

    from flax import nnx

    from models import ModelConfig, build_model
    from rlmt_jax.rollout.rewards import RewardScorer, RewardSettings

    cfg = ModelConfig(architecture="LlamaForSequenceClassification", vocab_size=96, hidden_size=32,
                      intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      dtype="bfloat16", pad_token_id=0)
    model = build_model(cfg, nnx.Rngs(5))
    tokenizer = types.SimpleNamespace(chat_template="{{ messages }}", pad_token_id=0, eos_token_id=None)
    scorer = RewardScorer(model, tokenizer, RewardSettings(batch_size=4, buckets=(12,), max_length=12))
    rows = [[5, 9, 14], [7] * 12, [30, 31, 32, 33, 34], [2]]
    stored32 = scorer.score_ids(rows)
    scorer.state = _bfloat16_copy(scorer.state)
    stored16 = scorer.score_ids(rows)
    assert len(set(np.round(stored32, 5).tolist())) == 4
    np.testing.assert_array_equal(stored16, stored32)


def test_trainer_stores_frozen_models_in_bfloat16_and_samples_from_a_decode_layout(tmp_path, tiny_cache):
    from rlmt_jax.trainer.loop import Trainer

    trainer = Trainer(resolve(None, ["runtime.dtype=bfloat16", f"run.output_dir={tmp_path}"]))
    assert {x.dtype.name for x in jax.tree.leaves(trainer.ref_params)} == {"bfloat16"}
    assert {x.dtype.name for x in jax.tree.leaves(trainer.scorer.state)} == {"bfloat16"}
    assert {x.dtype.name for x in jax.tree.leaves(trainer.params)} == {"float32"}  # trained in float32
    assert trainer.sampler.layout is not None and trainer.sampler.layout.dtype == "bfloat16"
    off = Trainer(resolve(None, ["rollout.mesh.reshard=false", f"run.output_dir={tmp_path / 'off'}"]))
    assert off.sampler.layout is None
