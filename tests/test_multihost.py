"""Training on two JAX processes (a multi-host run, simulated on CPU) equals training on one.

Each process of tests/multihost_worker.py simulates 2 CPU devices, so the two processes form a 4-device mesh
(collectives over gloo); the reference is one process with 4 simulated devices and the same mesh. Every
process reads its own half of each step's prompts, the global batch is process 0's half then process 1's,
which is the one process's batch: the sampler draws the same uniforms per global row, so the rollouts,
rewards, updates and final params must agree (float32; only the order of sums may differ).
A deadlocked pair (one process waiting in a collective the other never joins) is killed and fails the test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from rlmt_jax.multihost import all_gather, combine_metrics, global_max_int, global_metrics
from rlmt_jax.tiny import tiny_assets_dir

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5
TIMEOUT_S = 420
# 4 prompts x 2 samples a step (2 prompts a process), 8 new tokens, a checkpoint every step; the reward
# model scores every answer (no format penalty) so rewards differ from row to row.
FAST = [
    "rollout.n=2", "rollout.prompts_per_step=4", "rollout.max_new_tokens=8", "rollout.prompt_buckets=[]",
    "data.max_prompt_tokens=96", "checkpoint.save_every=1", "checkpoint.async_save=false",
    "logging.tensorboard=false", "optimizer.micro_batch_size=4", "template.format_penalty=null",
    "reward.batch_size=8",
]
FSDP_ACROSS_PROCESSES = ["mesh.data=1", "mesh.fsdp=4"]  # params split over both processes' devices
DATA_ACROSS_PROCESSES = ["mesh.data=2", "mesh.fsdp=2"]  # process 0 holds data row 0 of the mesh
NOT_COMPARED = ("time", "tokens_per_s")  # wall-clock numbers


# ------------------------------------------------------------------------------------ one process


def test_helpers_on_one_process_are_identities():
    metrics = {"reward_mean": 0.25, "reward_truncated": 3.0}
    assert global_metrics(metrics, rows=8, sums=("reward_truncated",)) == metrics
    assert global_max_int(7) == 7
    np.testing.assert_array_equal(all_gather(np.array([1.5, 2.5])), [[1.5, 2.5]])


def test_metrics_combine_as_if_computed_over_all_rows():
    rewards = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    a, b = rewards[:2], rewards[2:]  # process 0 has 2 rows, process 1 has 4
    names = ["reward_mean", "reward_std", "response_tokens_max", "reward_truncated", "format_valid_rate"]
    values = [[a.mean(), a.std(), 7, 1, 0.5], [b.mean(), b.std(), 5, 2, 0.25]]
    combined = combine_metrics(names, np.array([2, 4]), np.array(values), sums=("reward_truncated",))
    assert combined["reward_mean"] == pytest.approx(3.5)  # = rewards.mean()
    assert combined["reward_std"] == pytest.approx(1.707825127659933)  # = rewards.std()
    assert combined["response_tokens_max"] == 7
    assert combined["reward_truncated"] == 3
    assert combined["format_valid_rate"] == pytest.approx((2 * 0.5 + 4 * 0.25) / 6)


# ------------------------------------------------------------------------------------ two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(processes: int, runs: list[list[str]]) -> list[subprocess.Popen]:
    """`processes` workers forming one cluster of 4 simulated devices, each training `runs` in turn."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={4 // processes}")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    port = _free_port()
    return [
        subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "multihost_worker.py"),
             json.dumps({"process_id": i, "num_processes": processes, "port": port, "runs": runs})],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(processes)
    ]


def finish(workers: list[subprocess.Popen]) -> list[dict]:
    """Each worker's summary and stderr; a worker that fails or outlives TIMEOUT_S fails the test, and
    all of them are killed (a process stuck in a collective never exits by itself)."""
    outputs = []
    try:
        for worker in workers:
            outputs.append(worker.communicate(timeout=TIMEOUT_S))
    except subprocess.TimeoutExpired:
        for worker in workers:
            worker.kill()
        for worker in workers:
            worker.communicate()
        pytest.fail(f"the workers did not finish in {TIMEOUT_S} s (a deadlock between the processes?)")
    summaries = []
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-4000:]
        summaries.append({**json.loads(out.strip().splitlines()[-1]), "stderr": err})
    return summaries


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_cache):
    """GRPO for 2 steps then resumed to 3 on two processes, the same GRPO run for 3 steps on one process,
    and online DPO then SFT on two processes."""
    tiny_assets_dir()  # made here once; the workers only read it
    root = tmp_path_factory.mktemp("multihost")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Name a colour ({i})."}]})
                               + "\n" for i in range(8)))
    sft = root / "sft.jsonl"
    sft.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Question {i}: why is the sky blue?"},
        {"role": "assistant", "content": f"<think>\nPlan {i}: explain scattering.\n</think>\n\nLight scatters."},
    ]}) + "\n" for i in range(8)))
    grpo = [*FAST, *FSDP_ACROSS_PROCESSES]
    dpo = [*FAST, *DATA_ACROSS_PROCESSES, f"run.output_dir={root / 'dpo'}", f"data.train_path={prompts}",
           "algorithm.name=dpo", "template.mode=none", "template.strict=false", "algorithm.dpo.min_valid=2",
           "algorithm.dpo.batch_size=4", "algorithm.dpo.epochs=1", "run.total_steps=1"]
    sft_run = [*FAST, *DATA_ACROSS_PROCESSES, f"run.output_dir={root / 'sft'}", f"data.train_path={sft}",
               "algorithm.name=sft", "data.epochs=1", "algorithm.sft.batch_size=4", "run.total_steps=1"]
    # three clusters at once: much of a worker's time is single-threaded compiling or waiting for its peer
    two = start(2, [[*grpo, f"run.output_dir={root / 'two'}", "run.total_steps=2"],
                    [*grpo, f"run.output_dir={root / 'two'}", "run.total_steps=3"]])
    one = start(1, [[*grpo, f"run.output_dir={root / 'one'}", "run.total_steps=3"]])
    offline = start(2, [dpo, sft_run])
    return {"two": finish(two), "one": finish(one), "offline": finish(offline), "root": root}


def test_two_processes_form_one_cluster_of_four_devices(runs):
    print("seconds per run:", [[s["seconds"] for s in runs[k]] for k in ("two", "one", "offline")])
    for cluster in ("two", "offline"):
        assert [(s["process_index"], s["process_count"], s["device_count"]) for s in runs[cluster]] == [
            (0, 2, 4), (1, 2, 4)]
    assert runs["one"][0]["device_count"] == 4
    assert [s["steps"] for s in runs["two"]] == [[2, 3]] * 2  # GRPO 2 steps, the same run resumed to 3
    assert [s["steps"] for s in runs["offline"]] == [[1, 1]] * 2  # DPO 1 step, SFT 1 step


def test_grpo_on_two_processes_equals_one_process_step_by_step(runs):
    two = read_jsonl(runs["root"] / "two" / "metrics.jsonl")
    one = read_jsonl(runs["root"] / "one" / "metrics.jsonl")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3]  # written once, by process 0
    for a, b in zip(two, one):
        assert a.keys() == b.keys()
        for key in a:
            if not key.startswith(NOT_COMPARED):
                assert a[key] == pytest.approx(b[key], abs=TOLERANCE), (a["step"], key)
    rewards = [r["reward_mean"] for r in one]
    assert len(set(rewards)) == 3 and all(r["reward_std"] > 0.01 for r in one)  # real, varied rewards
    assert two[-1]["kl"] > 0 and two[-1]["logprob_diff_max"] < 1e-4


def test_grpo_final_params_on_two_processes_equal_one_process(runs):
    two = load_file(runs["root"] / "two" / "export" / "model.safetensors")
    one = load_file(runs["root"] / "one" / "export" / "model.safetensors")
    initial = load_file(tiny_assets_dir() / "policy" / "model.safetensors")
    assert two.keys() == one.keys()
    assert max(float(np.abs(two[k] - one[k]).max()) for k in two) <= TOLERANCE
    assert max(float(np.abs(two[k] - initial[k]).max()) for k in two) > 1e-3  # the params did move


def test_resume_on_two_processes_reads_each_process_data_state(runs):
    assert all("resumed from the checkpoint of step 2" in s["stderr"] for s in runs["two"])
    step = runs["root"] / "two" / "checkpoints" / "3"
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(step / "data_iter"))


def test_process_zero_alone_writes_samples_and_an_export_transformers_loads(runs):
    import torch
    import transformers

    samples = read_jsonl(runs["root"] / "two" / "samples.jsonl")
    assert [s["step"] for s in samples] == [1, 1, 2, 2, 3, 3]  # logging.samples_per_step=2, process 0's rows
    model = transformers.AutoModelForCausalLM.from_pretrained(runs["root"] / "two" / "export", dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_online_dpo_and_sft_train_on_two_processes(runs):
    dpo = runs["root"] / "dpo"
    pairs = [read_jsonl(dpo / f"dpo_pairs.process-{i}.jsonl") for i in (0, 1)]
    assert all(p and all(pair["chosen_score"] > pair["rejected_score"] for pair in p) for p in pairs)
    assert [r["step"] for r in read_jsonl(dpo / "metrics.jsonl")] == [1]
    assert "reward_accuracy" in read_jsonl(dpo / "metrics.jsonl")[0]
    sft = read_jsonl(runs["root"] / "sft" / "metrics.jsonl")
    assert [r["step"] for r in sft] == [1] and np.isfinite(sft[0]["loss"])
