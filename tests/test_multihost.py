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
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from clusters import finish_all, last_json_line, start_cluster
from models import ModelConfig, build_model
from rlmt_jax.settings.config import MeshConfig, resolve
from rlmt_jax.core.errors import UserError
from rlmt_jax.scale.mesh import make_mesh
from rlmt_jax.scale.multihost import HostRows, all_gather, combine_metrics, global_max_int, global_metrics
from rlmt_jax.rollout.sampling import Sampler, SamplingConfig
from rlmt_jax.inputs.tiny import tiny_assets_dir

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5
# Final params: AdamW divides each gradient by its running scale, so a float32 reduction-order difference between
# the meshes in a gradient near 0 moves that param by a fraction of lr (2e-3 in the tiny run): ~1e-5 after 3 steps.
PARAMS_TOLERANCE = 3e-5
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
    names = ["reward_mean", "reward_std", "response_tokens_max", "reward_truncated", "format_valid_rate", "x_min"]
    values = [[a.mean(), a.std(), 7, 1, 0.5, 4], [b.mean(), b.std(), 5, 2, 0.25, 9]]
    combined = combine_metrics(names, np.array([2, 4]), np.array(values), sums=("reward_truncated",))
    assert combined["reward_mean"] == pytest.approx(3.5)  # = rewards.mean()
    assert combined["reward_std"] == pytest.approx(1.707825127659933)  # = rewards.std()
    assert combined["response_tokens_max"] == 7 and combined["x_min"] == 4
    assert combined["reward_truncated"] == 3
    assert combined["format_valid_rate"] == pytest.approx((2 * 0.5 + 4 * 0.25) / 6)


def test_a_batch_that_cannot_split_between_processes_is_refused(monkeypatch):
    mesh = make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    monkeypatch.setattr(jax, "process_count", lambda: 2)  # one device cannot hold two processes' rows
    with pytest.raises(UserError, match=r"batch axes \(data x fsdp = 1\) must split every batch between the 2"):
        HostRows(mesh)


def test_trainer_refuses_prompts_per_step_that_do_not_split_between_processes(monkeypatch):
    from rlmt_jax.trainer.setup import check_multihost

    cfg = resolve(None, ["rollout.prompts_per_step=3", "optimizer.micro_batch_size=4"])
    mesh = make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(UserError, match=r"'rollout.prompts_per_step' \(3\) must be a multiple of the 2 processes"):
        check_multihost(cfg, mesh)


class FakeProcessPair:
    """HostRows as process 0 of 2 sees it: the other process reports (its longest prompt, its prompt count);
    a batch must have a multiple of `rows_multiple` rows on each process."""

    process_count = 2

    def __init__(self, other: tuple[int, int], rows_multiple: int):
        self.other, self.rows_multiple, self.put_rows = other, rows_multiple, []

    def gather(self, values):
        return np.stack([values, np.asarray(self.other, values.dtype)])

    def put(self, arrays):
        self.put_rows.append([a.shape[0] for a in arrays])
        return tuple(jnp.asarray(a) for a in arrays)

    def take(self, arrays):
        return tuple(np.asarray(a) for a in arrays)


@pytest.fixture(scope="module")
def tiny_policy():
    config = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    return nnx.split(build_model(config, nnx.Rngs(0)))


def test_sampler_on_hosts_uses_the_longest_prompt_of_all_processes_and_returns_its_own_rows(tiny_policy):
    graphdef, params = tiny_policy
    config = SamplingConfig(n=2, max_new_tokens=5, temperature=0.0, prompt_buckets=(16, 32))
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [20, 21]]  # longest 11: bucket 16
    hosts = FakeProcessPair(other=(20, 3), rows_multiple=4)  # the other process has a prompt of 20 tokens
    rollout = Sampler(graphdef, config, hosts=hosts)(params, prompts, jax.random.key(0))
    assert rollout.prompt_len == 32
    assert hosts.put_rows == [[4, 4]]  # 3 prompts + 1 filler: the rows split over the mesh
    assert rollout.tokens.shape == (6, 32 + 5) and isinstance(rollout.tokens, np.ndarray)
    alone = Sampler(graphdef, config)(params, prompts, jax.random.key(0))  # greedy: the rows must agree
    assert alone.prompt_len == 16
    np.testing.assert_array_equal(rollout.tokens[:, 32:], np.asarray(alone.tokens[:, 16:]))


def test_sampler_on_hosts_refuses_different_prompt_counts(tiny_policy):
    graphdef, params = tiny_policy
    sampler = Sampler(graphdef, SamplingConfig(max_new_tokens=2, prompt_buckets=(16,)),
                      hosts=FakeProcessPair(other=(4, 2), rows_multiple=1))
    with pytest.raises(ValueError, match="different numbers of prompts"):
        sampler(params, [[1, 2, 3]], jax.random.key(0))


# ------------------------------------------------------------------------------------ two processes


def start(processes: int, runs: list[list[str]]) -> list[subprocess.Popen]:
    """`processes` workers forming one cluster of 4 simulated devices, each training `runs` in turn."""
    return start_cluster("multihost_worker.py", processes, 4 // processes, {"runs": runs})


def finish(**clusters: list[subprocess.Popen]) -> dict[str, list[dict]]:
    """Each cluster's worker summaries (with their stderr); see clusters.finish_all."""
    outputs = finish_all([w for cluster in clusters.values() for w in cluster], TIMEOUT_S)
    return {name: [{**last_json_line(outputs[w][0]), "stderr": outputs[w][1]} for w in cluster]
            for name, cluster in clusters.items()}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_cache):
    """GRPO for 2 steps then resumed to 3 on two processes, the same GRPO run for 3 steps on one process,
    online DPO then SFT on two processes, and PPO (policy and critic updates) for 2 steps on two processes
    and on one. The workers build the tiny models themselves (all five at once
    when this test session's cache is still empty)."""
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
    # PPO also samples with two decode windows
    ppo = [*FAST, *FSDP_ACROSS_PROCESSES, "algorithm.name=ppo", "rollout.n=1", "algorithm.kl_coef=0.0",
           "rollout.decode_windows=2", "run.total_steps=2"]
    # dynamic sampling where process 1 keeps no group (tests/uneven_group_filter.py): it is short after every
    # round, so both processes sample all rounds (no deadlock), then process 1 fills its share with dropped groups
    dynamic = [*FAST, *FSDP_ACROSS_PROCESSES, f"run.output_dir={root / 'dynamic'}", "run.total_steps=1",
               "rollout.group_filter=process_zero_only", "rollout.max_sampling_rounds=2",
               f"--import={ROOT / 'tests' / 'uneven_group_filter.py'}"]
    # three clusters at once: much of a worker's time is single-threaded compiling or waiting for its peer
    two = start(2, [[*grpo, f"run.output_dir={root / 'two'}", "run.total_steps=2"],
                    [*grpo, f"run.output_dir={root / 'two'}", "run.total_steps=3"]])  # extended: no flag needed
    one = start(1, [[*grpo, f"run.output_dir={root / 'one'}", "run.total_steps=3"],
                    [*ppo, f"run.output_dir={root / 'ppo_one'}"]])
    others = start(2, [dpo, sft_run, [*ppo, f"run.output_dir={root / 'ppo_two'}"], dynamic])
    return {**finish(two=two, one=one, others=others), "root": root}


def grpo_metrics_and_params(run_dir: Path) -> tuple[list[dict], dict[str, np.ndarray]]:
    return read_jsonl(run_dir / "metrics.jsonl"), load_file(run_dir / "export" / "model.safetensors")


def assert_same_training(a_dir: Path, b_dir: Path) -> None:
    """Every logged metric of every step (but wall-clock ones) within TOLERANCE, every final param within
    PARAMS_TOLERANCE."""
    (a_rows, a_params), (b_rows, b_params) = grpo_metrics_and_params(a_dir), grpo_metrics_and_params(b_dir)
    assert [r["step"] for r in a_rows] == [r["step"] for r in b_rows]
    for a, b in zip(a_rows, b_rows):
        assert a.keys() == b.keys()
        for key in a:
            if not key.startswith(NOT_COMPARED):
                assert a[key] == pytest.approx(b[key], abs=TOLERANCE), (a["step"], key)
    assert a_params.keys() == b_params.keys()
    params_diff = max(float(np.abs(a_params[k] - b_params[k]).max()) for k in a_params)
    metrics_diff = max(abs(a[k] - b[k]) for a, b in zip(a_rows, b_rows) for k in a if not k.startswith(NOT_COMPARED))
    print(f"largest difference: params {params_diff:.2e}, metrics {metrics_diff:.2e}")
    assert params_diff <= PARAMS_TOLERANCE


def test_two_processes_form_one_cluster_of_four_devices(runs):
    print("seconds per run:", [[s["seconds"] for s in runs[k]] for k in ("two", "one", "others")])
    for cluster in ("two", "others"):
        assert [(s["process_index"], s["process_count"], s["device_count"]) for s in runs[cluster]] == [
            (0, 2, 4), (1, 2, 4)]
    assert runs["one"][0]["device_count"] == 4
    assert [s["steps"] for s in runs["two"]] == [[2, 3]] * 2  # GRPO 2 steps, the same run resumed to 3
    assert [s["steps"] for s in runs["others"]] == [[1, 1, 2, 1]] * 2  # DPO, SFT, PPO 2 steps, dynamic sampling


def test_grpo_on_two_processes_equals_one_process_step_by_step(runs):
    root = runs["root"]
    rows = read_jsonl(root / "two" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]  # written once, by process 0 (and resumed at step 3)
    assert_same_training(root / "two", root / "one")
    assert len({r["reward_mean"] for r in rows}) == 3 and all(r["reward_std"] > 0.01 for r in rows)  # real rewards
    assert rows[-1]["kl"] > 0 and rows[-1]["logprob_diff_max"] < 1e-4
    params = load_file(root / "two" / "export" / "model.safetensors")
    initial = load_file(tiny_assets_dir() / "policy" / "model.safetensors")
    assert max(float(np.abs(params[k] - initial[k]).max()) for k in params) > 1e-3  # the params did move


@pytest.mark.slow  # the same code path as the fsdp=4 run above, on the other mesh layout
def test_grpo_with_data_parallel_across_processes_equals_one_process(tmp_path, tiny_cache):
    grpo = [*FAST, *DATA_ACROSS_PROCESSES, "run.total_steps=2"]
    finish(two=start(2, [[*grpo, f"run.output_dir={tmp_path / 'two'}"]]),
           one=start(1, [[*grpo, f"run.output_dir={tmp_path / 'one'}"]]))
    assert_same_training(tmp_path / "two", tmp_path / "one")


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


def test_ppo_on_two_processes_equals_one_process_step_by_step(runs):
    root = runs["root"]
    rows = read_jsonl(root / "ppo_two" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["critic_vf_loss"] > 0 for r in rows)  # the critic was trained
    assert_same_training(root / "ppo_two", root / "ppo_one")


def test_online_dpo_and_sft_train_on_two_processes(runs):
    dpo = runs["root"] / "dpo"
    pairs = [read_jsonl(dpo / f"dpo_pairs.process-{i}.jsonl") for i in (0, 1)]
    assert all(p and all(pair["chosen_score"] > pair["rejected_score"] for pair in p) for p in pairs)
    assert [r["step"] for r in read_jsonl(dpo / "metrics.jsonl")] == [1]
    assert "reward_accuracy" in read_jsonl(dpo / "metrics.jsonl")[0]
    sft = read_jsonl(runs["root"] / "sft" / "metrics.jsonl")
    assert [r["step"] for r in sft] == [1] and np.isfinite(sft[0]["loss"])


def test_sigterm_to_one_process_stops_every_process_after_the_same_step_with_a_checkpoint(tmp_path, tiny_cache,
                                                                                          monkeypatch):
    import signal

    gate = tmp_path / "gate"
    gate.mkdir()
    monkeypatch.setenv("TEST_SAVE_GATE", str(gate))  # step 1's checkpoint commit waits for the test
    run = [*(o for o in FAST if not o.startswith("checkpoint.async_save")), *FSDP_ACROSS_PROCESSES,
           f"run.output_dir={tmp_path / 'run'}", "run.total_steps=4", "checkpoint.async_save=true"]
    workers = start(2, [run])
    deadline = time.monotonic() + TIMEOUT_S
    while not (gate / "saving").exists():
        assert time.monotonic() < deadline and all(w.poll() is None for w in workers), "no checkpoint was saved"
        time.sleep(0.05)
    workers[1].send_signal(signal.SIGTERM)  # process 1 only: process 0 learns it through the stop flag
    time.sleep(0.5)
    (gate / "go").touch()
    summaries = finish(stop=workers)["stop"]
    assert [s["steps"] for s in summaries] == [[2], [2]]
    assert [s["stopped"] for s in summaries] == [["a signal to another process"], ["SIGTERM"]]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["1", "2"]
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


def test_dynamic_sampling_keeps_the_processes_in_lockstep_when_one_is_short(runs):
    (row,) = read_jsonl(runs["root"] / "dynamic" / "metrics.jsonl")
    # 2 rounds of 2 prompts a process: process 0 kept its 4 groups (trains 2), process 1 none (fills 2)
    assert (row["sampling_rounds"], row["groups_kept_fraction"], row["groups_filled"]) == (2.0, 0.5, 2.0)
    assert np.isfinite(row["loss"])
