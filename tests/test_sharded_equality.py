"""Sharded results equal unsharded ones on meshes (8,1,1), (1,8,1), (2,2,2) of 8 simulated CPU devices.

The computations run in tests/sharded_equality_worker.py, in a subprocess started with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (other test modules start JAX with one device, and JAX
fixes its device count when it starts). Float32 everywhere; sharding changes only the order of sums.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from clusters import simulated_devices

MESHES = ("8x1x1", "1x8x1", "2x2x2")
TOLERANCE = 1e-5
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def observed() -> dict:
    env = simulated_devices(8)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "sharded_equality_worker.py")],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Involuntary full rematerialization" not in result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_worker_sees_eight_devices(observed):
    assert observed["device_count"] == 8


@pytest.mark.parametrize("mesh", MESHES)
def test_forward_logits_equal_one_device(observed, mesh):
    assert observed["meshes"][mesh]["logits_max_abs_diff"] <= TOLERANCE
    assert observed["reference"]["logits_abs_mean"] > 0.01  # the logits are not all ~0


def test_logits_come_out_split_over_the_batch_axes_and_vocab_over_tensor(observed):
    assert observed["meshes"]["8x1x1"]["logits_spec"] == "P('data',)"
    assert observed["meshes"]["1x8x1"]["logits_spec"] == "P('fsdp',)"
    assert observed["meshes"]["2x2x2"]["logits_spec"] == "P(('data', 'fsdp'), None, 'tensor')"


@pytest.mark.parametrize("mesh", MESHES)
def test_reward_scores_of_padded_rows_equal_one_device(observed, mesh):
    assert observed["meshes"][mesh]["rewards_max_abs_diff"] <= TOLERANCE
    rewards = observed["reference"]["rewards"]
    assert len(rewards) == 8 and len({round(r, 6) for r in rewards}) == 8  # 8 different rows, 8 scores


@pytest.mark.parametrize("mesh", MESHES)
def test_grpo_update_step_equals_one_device(observed, mesh):
    sharded = observed["meshes"][mesh]
    assert sharded["params_max_abs_diff"] <= TOLERANCE
    assert max(sharded["metrics_max_abs_diff"].values()) <= TOLERANCE
    reference = observed["reference"]
    assert reference["param_change_max"] > 100 * TOLERANCE  # the step moved the params by far more than that
    assert reference["metrics"]["finite"] == 1.0
    assert reference["metrics"]["pg_clipfrac"] > 0  # the clipped branch was exercised


@pytest.mark.parametrize("mesh", MESHES)
def test_updated_params_keep_the_shardings_of_the_rules(observed, mesh):
    assert observed["meshes"][mesh]["params_keep_rule_shardings"]


@pytest.mark.parametrize("mesh", MESHES)
def test_greedy_samples_equal_one_device(observed, mesh):
    assert observed["meshes"][mesh]["greedy_equal"]
    tokens, lengths = observed["reference"]["greedy"]
    assert lengths == [6, 6, 6, 6]
    assert tokens[0] == tokens[1] and tokens[2] == tokens[3]  # greedy: a prompt's two samples agree
    assert tokens[0][4:8] == [3, 17, 9, 44] and tokens[2][5:8] == [8, 100, 2]  # prompts left-padded to 8


def test_checkpoint_loaded_onto_fsdp_mesh_never_puts_a_whole_matrix_on_one_device(observed):
    load = observed["load"]
    # 2 scanned layers; embed 32 split 8 ways (fsdp on 'embed'); norm scales replicated by the rules
    assert load["model.embed..value"]["shard_shapes"] == [[128, 4]]
    assert load["lm_head..value"]["shard_shapes"] == [[4, 128]]
    assert load["model.layers.attn.q_proj..value"]["shard_shapes"] == [[2, 4, 4, 8]]
    assert load["model.layers.attn.o_proj..value"]["shard_shapes"] == [[2, 4, 8, 4]]
    assert load["model.layers.mlp.down_proj..value"]["shard_shapes"] == [[2, 64, 4]]
    assert load["model.final_norm.scale..value"]["shard_shapes"] == [[32]]
    for name, leaf in load.items():
        assert leaf["devices"] == 8 and leaf["equal"], name
        if "norm" not in name:  # every matrix: each device holds 1/8 of it
            whole = 1
            for size in leaf["shape"]:
                whole *= size
            for shard in leaf["shard_shapes"]:
                held = 1
                for size in shard:
                    held *= size
                assert held * 8 == whole, name
