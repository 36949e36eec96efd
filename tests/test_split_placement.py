"""Split placement (rollout.devices): the last devices of each host decode step t + 1's rows while the others
run step t's update.

The runs are in subprocesses (tests/split_worker.py) with simulated CPU devices: one process with 4 devices (2
train, 2 decode), run straight and stopped after step 2 then resumed; and two processes with 2 devices each
(1 trains, 1 decodes), whose run must equal the one-process run (the same global batch, meshes of the same
shapes) and must not deadlock while the engine's thread and the update run at once.
"""

from __future__ import annotations

import json
import logging
import os
import types

import jax

import numpy as np
import pytest
from safetensors.numpy import load_file

from clusters import finish_all, last_json_line, start_cluster
from rlmt_jax.core.errors import UserError
from rlmt_jax.rollout.sampling import DecodeLayout, Sampler
from rlmt_jax.rollout.split_engine import SplitEngine
from rlmt_jax.scale.mesh import MeshConfig, make_mesh, split_devices
from rlmt_jax.settings.config import RolloutMeshConfig, resolve
from tests.test_sampling import PROMPTS, _loaded, llama  # noqa: F401  (fixtures)
from tests.test_slot_engine import FIELDS, MORE_PROMPTS, assert_same_rollout, config

TIMEOUT_S = 420
SPLIT = [
    "rollout.n=2", "rollout.prompts_per_step=4", "rollout.max_new_tokens=10", "rollout.prompt_buckets=[]",
    "data.max_prompt_tokens=96", "run.total_steps=3", "checkpoint.save_every=1", "checkpoint.async_save=false",
    "logging.tensorboard=false", "optimizer.micro_batch_size=4", "template.format_penalty=null",
    "reward.batch_size=8", "rollout.max_staleness=1", "algorithm.rollout_correction.weights=token",
    "rollout.engine=slots", "rollout.slots=2", "rollout.chunk_tokens=4", "mesh.data=1", "mesh.fsdp=-1",
]
# AdamW divides each gradient by its running scale: a float32 reduction-order difference between the meshes
# moves a tiny-gradient param by up to ~lr x 1e-2 (as in tests/test_multihost.py)
PARAMS_TOLERANCE = 3e-5
COMPARED = ("reward_mean", "response_tokens_mean", "loss", "grad_norm", "stale_token_fraction", "staleness_max",
            "logprob_diff_max")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_cache):
    """{"one": the one-process worker's summary, "two": both processes' summaries, "root": their run dirs}."""
    root = tmp_path_factory.mktemp("split")
    one = start_cluster("split_worker.py", 1, 4, {"root": str(root / "one"), "resume": True,
                                                   "overrides": [*SPLIT, "rollout.devices=2"]})
    two = start_cluster("split_worker.py", 2, 2, {"root": str(root / "two"),
                                                   "overrides": [*SPLIT, "rollout.devices=1"]})
    outputs = finish_all([*one, *two], TIMEOUT_S)
    return {"one": last_json_line(outputs[one[0]][0]), "two": [last_json_line(outputs[w][0]) for w in two],
            "root": root}


def test_the_engine_samples_the_next_step_in_its_own_thread_before_the_update_on_its_own_devices(runs):
    events = [tuple(e[:3]) if e[0] == "sample" else tuple(e) for e in runs["one"]["events"]]
    # step 1's rows are sampled before anything else (nothing ran ahead), then each step's update comes after
    # the engine started the next step's rows with the weights the update starts from; the last step starts none
    assert events == [("sample", "MainThread", 0), ("sample", "rollout-engine_0", 0), ("update", "MainThread"),
                      ("sample", "rollout-engine_0", 1), ("update", "MainThread"), ("update", "MainThread")]
    assert {tuple(e[3]) for e in runs["one"]["events"] if e[0] == "sample"} == {(2, 3)}  # the last 2 decode
    assert runs["one"]["update_devices"] == [[0, 1]] * 3  # the first 2 train


def test_every_trained_token_was_sampled_one_version_back_with_that_versions_log_probs(runs):
    history = runs["one"]["history"]
    assert history[0]["stale_token_fraction"] == 0.0 and history[0]["staleness_max"] == 0.0
    assert all(h["stale_token_fraction"] == 1.0 and h["staleness_max"] == 1.0 for h in history[1:])
    for gap in runs["one"]["gaps"]:  # steps 2..3: teacher-forced by version t - 2 (sampled) and t - 1 (trains)
        assert gap["behaviour"] < 1e-5
        assert gap["current"] > 1e-2  # the versions differ: the check above could tell them apart


def test_a_run_stopped_and_resumed_equals_the_straight_run(runs):
    straight, resumed = runs["one"]["history"], runs["one"]["resumed_history"]
    assert [h["step"] for h in resumed] == [3]
    for key in COMPARED:
        assert [h[key] for h in resumed] == [h[key] for h in straight[2:]], key
    root = runs["root"] / "one"
    a = load_file(os.path.join(root, "straight", "export", "model.safetensors"))
    b = load_file(os.path.join(root, "resumed", "export", "model.safetensors"))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_two_processes_equal_one(runs):
    for process in runs["two"]:
        # CPU device ids: process 0's from 0, process 1's from 2048; each process's second device decodes
        assert {tuple(e[3]) for e in process["events"] if e[0] == "sample"} == {(1, 2049)}
        assert process["update_devices"] == [[0, 2048]] * 3
        for mine, single in zip(process["history"], runs["one"]["history"], strict=True):
            for key in COMPARED:
                assert mine[key] == pytest.approx(single[key], rel=1e-4, abs=1e-5), key
    a = load_file(os.path.join(runs["root"] / "one", "straight", "export", "model.safetensors"))
    b = load_file(os.path.join(runs["root"] / "two", "straight", "export", "model.safetensors"))
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=PARAMS_TOLERANCE, err_msg=name)


def _device(process: int, ident: int):
    return types.SimpleNamespace(process_index=process, id=ident)


def test_split_devices_gives_each_hosts_last_devices_to_the_engine():
    devices = [_device(p, 4 * p + i) for p in (1, 0) for i in (3, 1, 2, 0)]  # any order in
    training, engine = split_devices(1, devices)
    assert [d.id for d in training] == [0, 1, 2, 4, 5, 6] and [d.id for d in engine] == [3, 7]
    training, engine = split_devices(3, devices)
    assert [d.id for d in training] == [0, 4] and [d.id for d in engine] == [1, 2, 3, 5, 6, 7]
    assert split_devices(0, devices) == (sorted(devices, key=lambda d: (d.process_index, d.id)), [])
    for bad in (4, 5):
        with pytest.raises(UserError, match=f"rollout.devices={bad}: each process has 4 devices"):
            split_devices(bad, devices)


@pytest.mark.parametrize("extra, message", [
    (["rollout.max_staleness=0"], "rollout.devices.*needs rollout.max_staleness=1, got 0"),
    (["rollout.max_staleness=2"], "rollout.devices.*needs rollout.max_staleness=1, got 2"),
    (["rollout.mesh.reshard=false"], "rollout.devices.*rollout.mesh.reshard=true"),
    (["rollout.carried_cache=keep"], "rollout.carried_cache.*no rows to keep with split placement"),
    (["rollout.devices=-1"], "rollout.devices.*must be an int >= 0"),
])
def test_split_placement_settings_that_cannot_work_are_refused(tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        resolve(None, [*SPLIT, "rollout.devices=1", f"run.output_dir={tmp_path}", *extra])


def test_the_engine_returns_the_rows_it_started_with_the_weights_it_was_given(llama, caplog):
    # in this process, on its one device: a call returns its step's rows and starts the next step's with the
    # weights it was given; the next call, with newer weights, gets those rows (the static sampler's for the
    # older weights), each token recorded with the older version
    graphdef, params = _loaded(llama[0], False)
    cfg = config(n=2, temperature=1.0, max_new_tokens=8)
    layout = DecodeLayout.of(make_mesh(MeshConfig()), RolloutMeshConfig(), "float32")
    engine, static = SplitEngine(Sampler(graphdef, cfg, layout=layout)), Sampler(graphdef, cfg)
    later = jax.tree.map(lambda x: x * 1.05, params)
    k1, k2, k3 = (jax.random.key(i) for i in (1, 2, 3))
    a = engine(params, PROMPTS, k1, version=0, ahead=[(MORE_PROMPTS, k2)])
    b = engine(later, MORE_PROMPTS, k2, version=1)
    assert_same_rollout(static(params, PROMPTS, k1), a)
    assert_same_rollout(static(params, MORE_PROMPTS, k2), b)
    assert np.all(b.versions[b.response_mask] == 0) and np.all(b.versions[~b.response_mask] == -1)
    # a step whose key is not the one its rows were started with samples them again, with its own weights
    engine(params, PROMPTS, k1, version=1, ahead=[(MORE_PROMPTS, k2)])
    with caplog.at_level(logging.WARNING):
        c = engine(later, MORE_PROMPTS, k3, version=2)
    assert "were for other prompts or another key" in caplog.text
    assert_same_rollout(static(later, MORE_PROMPTS, k3), c)
    assert np.all(c.versions[c.response_mask] == 2)
    # saved with a checkpoint (JSON) and restored: the resumed engine's next call returns the very same rows
    engine(params, PROMPTS, k1, version=0, ahead=[(MORE_PROMPTS, k2)])
    saved = json.loads(json.dumps(engine.carry_state()))
    resumed = SplitEngine(Sampler(graphdef, cfg, layout=layout))
    resumed.restore_carry(saved)
    d = resumed(later, MORE_PROMPTS, k2, version=1)
    for field in (*FIELDS, "logprobs", "versions"):
        np.testing.assert_array_equal(getattr(d, field), getattr(b, field), err_msg=field)
    assert engine.carry_state() is not None and SplitEngine(engine.sampler).carry_state() is None
