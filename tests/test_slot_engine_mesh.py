"""The slot engine on 8 simulated devices (tests/slot_engine_worker.py in a subprocess): the decode chunk moves
no weights between devices (counted in its compiled HLO), and slots split over the data replicas sample the
one-device static sampler's rollout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clusters import simulated_devices

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def observed() -> dict:
    env = simulated_devices(8)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "slot_engine_worker.py")],
                            env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("tensor, slots", [(1, 16), (2, 8)])
def test_decode_chunk_moves_no_weights(observed, tensor, slots):
    hlo = observed[f"hlo/tensor{tensor}"]
    assert observed["device_count"] == 8 and hlo["slots"] == slots  # 2 slots x the data replicas
    assert hlo["loops"] == 1
    # tensor 2: the one all-gather is a step's [rows, vocab] logits (split over vocab) for the draw, not weights
    assert hlo["all_gathers"] == (0 if tensor == 1 else 1)
    # tensor 1: the loop condition's all-reduce only; tensor 2: activations (2 all-reduces a layer of [rows,
    # embed], the logits), a few KB a step against the tiny policy's ~0.4 MB; a weight gather moves over 40%
    assert hlo["bytes_fraction"] < (1e-4 if tensor == 1 else 0.05)


@pytest.mark.parametrize("tensor", [1, 2])
def test_slots_over_the_replicas_sample_the_one_device_static_rollout(observed, tensor):
    lengths = observed["lengths"]
    assert len(set(lengths)) > 2 and max(lengths) == 10 and min(lengths) < 10  # rows stop apart
    same = observed[f"same/tensor{tensor}"]
    assert same["tokens"] and same["lengths"] and same["logprob_gap"] <= 1e-5


def test_the_paged_kernel_per_device_samples_the_one_device_static_rollout(observed):
    # rows over 4 data replicas, the 2 kv heads over tensor: each device's (row, kv head) pages in its own call;
    # interpret mode's dots round to bfloat16, hence 1e-3
    paged = observed["paged/tensor2"]
    assert paged["tokens"] and 0 < paged["logprob_gap"] <= 1e-3


def test_the_tail_packed_into_fewer_slots_per_device_samples_the_one_device_static_rollout(observed):
    # 24 rows through 4 slots on each of 4 replicas: once none waits, each device's last rows go into 1 slot
    # of its own (no collective in the packing program), and every row still gets its static tokens
    packed = observed["packed/tensor2"]
    assert packed["packings"] >= 1 and packed["collectives"] == 0
    assert packed["tokens"] and packed["logprob_gap"] <= 1e-5


def test_two_processes_stream_their_own_rows_in_lockstep_and_sample_the_static_rollout():
    from clusters import finish_all, last_json_line, start_cluster

    workers = start_cluster("slot_cluster_worker.py", 2, 1, {})
    outputs = finish_all(workers, 600)
    summaries = [last_json_line(outputs[w][0]) for w in workers]
    assert [(s["process_index"], s["process_count"]) for s in summaries] == [(0, 2), (1, 2)]
    for summary in summaries:  # each process's own 3 prompts x 2 rows, through its one slot
        assert len(summary["slots"]) == 6
        assert summary["slots"] == summary["static"] and summary["lengths"] == summary["static_lengths"]
        assert summary["logprob_gap"] <= 1e-5
        # partial rollouts in lockstep: each call's rows equal the static sampler's, the second's partly by version 0
        assert summary["ahead_first"] and summary["ahead_second"] and summary["ahead_versions"] == [0, 1]
        assert summary["keep_kept"] and summary["keep_second"]  # both processes kept their slots, in lockstep
        assert summary["packings"] >= 1 and summary["packed_same"]  # the tails packed together, rows intact
    assert sum(s["ahead_carried"] for s in summaries) > 0
    # the processes' rows differ (different prompts and row ids) and stop apart
    assert summaries[0]["slots"] != summaries[1]["slots"]
    assert sum(summaries[0]["lengths"]) != sum(summaries[1]["lengths"])
