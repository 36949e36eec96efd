"""The training loop end to end on the tiny built-in models: GRPO, PPO, online DPO and SFT runs, resume."""

import json
import logging
import os

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from rlmt_jax.settings.config import resolve
from rlmt_jax.core.errors import UserError
from rlmt_jax.trainer.loop import Trainer, train

# Small and fast: 4 prompts x 2 samples, 12 new tokens, 3 steps, a checkpoint every step.
FAST = [
    "rollout.n=2", "rollout.prompts_per_step=4", "rollout.max_new_tokens=12", "rollout.prompt_buckets=[]",
    "data.max_prompt_tokens=96", "run.total_steps=3", "checkpoint.save_every=1", "checkpoint.async_save=false",
    "logging.tensorboard=false", "optimizer.micro_batch_size=4",
]


def run_config(tmp_path, *extra):
    return resolve(None, [*FAST, f"run.output_dir={tmp_path / 'run'}", *extra])


def export_loads_in_transformers(export_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(export_dir)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def read_metrics(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def test_grpo_run_writes_metrics_checkpoints_and_an_export_transformers_loads(tmp_path, tiny_cache):
    cfg = run_config(tmp_path)
    summary = train(cfg)
    run_dir = cfg.run.output_dir
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("reward_mean", "format_valid_rate", "kl", "entropy", "logprob_diff_max", "tokens_per_s",
                "time_sample_s", "time_score_s", "time_update_s", "grad_norm", "groups_with_signal_fraction"):
        assert key in rows[-1]
    # The sampler's log-probs are the trainer's: float32, same sequences, same positions.
    assert max(r["logprob_diff_max"] for r in rows) < 1e-4
    assert rows[0]["kl"] == 0.0 and rows[-1]["kl"] > 0  # the policy moved away from the reference
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["2", "3"]  # keep=2
    samples = [json.loads(line) for line in open(os.path.join(run_dir, "samples.jsonl"))]
    assert {"prompt", "plan", "answer", "reward", "format_valid"} <= set(samples[0])
    logits = export_loads_in_transformers(summary["export"])
    assert torch.isfinite(logits).all()
    with open(os.path.join(run_dir, "config.yaml")) as f:
        assert "name: grpo" in f.read()


def test_ppo_run_trains_actor_and_critic(tmp_path, tiny_cache):
    cfg = run_config(tmp_path, "algorithm.name=ppo", "rollout.n=1", "algorithm.kl_coef=0.0")
    summary = train(cfg)
    rows = read_metrics(cfg.run.output_dir)
    assert len(rows) == 3 and "critic_vf_loss" in rows[-1] and "kl" not in rows[-1]
    assert "groups_with_signal_fraction" not in rows[-1]  # rollout.n=1: no groups
    assert rows[-1]["critic_grad_norm"] > 0
    export_loads_in_transformers(summary["export"])


def test_online_dpo_builds_pairs_then_trains(tmp_path, tiny_cache):
    cfg = run_config(tmp_path, "algorithm.name=dpo", "template.mode=none", "template.strict=false",
                     "template.format_penalty=null", "rollout.n=4", "algorithm.dpo.min_valid=2",
                     "algorithm.dpo.batch_size=4", "algorithm.dpo.epochs=1", "optimizer.lr=1e-4")
    summary = train(cfg)
    pairs = [json.loads(line) for line in open(os.path.join(cfg.run.output_dir, "dpo_pairs.process-0.jsonl"))]
    assert pairs and all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    rows = read_metrics(cfg.run.output_dir)
    assert rows and "reward_accuracy" in rows[0]
    export_loads_in_transformers(summary["export"])


def test_sft_run_on_thinking_traces(tmp_path, tiny_cache):
    data = tmp_path / "sft.jsonl"
    with open(data, "w") as f:
        for i in range(8):
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"Question {i}: why is the sky blue?"},
                {"role": "assistant", "content": f"<think>\nPlan {i}: explain scattering.\n</think>\n\nLight scatters."},
            ]}) + "\n")
    cfg = run_config(tmp_path, "algorithm.name=sft", f"data.train_path={data}", "data.epochs=1",
                     "algorithm.sft.batch_size=4",
                     "algorithm.sft.epochs=2", "run.total_steps=null", "optimizer.lr=1e-3",
                     "template.format_penalty=null")
    summary = train(cfg)
    rows = read_metrics(cfg.run.output_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["loss"] < rows[0]["loss"]  # it learns the traces
    export_loads_in_transformers(summary["export"])


class Interrupt(Exception):
    pass


def run_until_step_3_dies(cfg, monkeypatch) -> None:
    """A run of `cfg` whose third step raises Interrupt (after step 2's checkpoint)."""
    trainer = Trainer(cfg)
    original, calls = trainer._step, {"n": 0}

    def dies_at_step_3(prompts):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Interrupt()
        return original(prompts)

    monkeypatch.setattr(trainer, "_step", dies_at_step_3)
    with pytest.raises(Interrupt):
        trainer.run()


def test_resumed_run_reproduces_the_uninterrupted_one_exactly(tmp_path, tiny_cache, monkeypatch, caplog):
    straight = run_config(tmp_path / "a", "run.total_steps=4")
    train(straight)

    resumed = run_config(tmp_path / "b", "run.total_steps=4")
    run_until_step_3_dies(resumed, monkeypatch)
    assert sorted(os.listdir(os.path.join(resumed.run.output_dir, "checkpoints"))) == ["1", "2"]

    with caplog.at_level(logging.WARNING, logger="rlmt_jax.trainer.loop"):
        train(resumed)
    assert "resumed from the checkpoint of step 2" in caplog.text
    a = load_file(os.path.join(straight.run.output_dir, "export", "model.safetensors"))
    b = load_file(os.path.join(resumed.run.output_dir, "export", "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert [r["step"] for r in read_metrics(resumed.run.output_dir)] == [1, 2, 3, 4]
    rows_a, rows_b = read_metrics(straight.run.output_dir), read_metrics(resumed.run.output_dir)
    assert [r["reward_mean"] for r in rows_a] == [r["reward_mean"] for r in rows_b]


def test_truncated_newest_checkpoint_is_skipped_with_a_warning(tmp_path, tiny_cache, caplog):
    cfg = run_config(tmp_path, "run.export_at_end=false")
    train(cfg)
    newest = os.path.join(cfg.checkpoint_dir, "3", "params")
    files = [os.path.join(root, f) for root, _, names in os.walk(newest) for f in names]
    for path in files:  # cut every data file of the newest checkpoint in half
        if os.path.getsize(path) > 64 and "ocdbt" not in path and not path.endswith(".json"):
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
    longer = run_config(tmp_path, "run.export_at_end=false", "run.total_steps=4")
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(longer, allow_config_change=True)
        trainer._prepare()
    assert trainer.step == 2
    assert "3" in caplog.text


@pytest.mark.parametrize("override, message", [
    ("data.train_path={tmp}/missing.jsonl", "missing.jsonl"),
    ("model.policy={tmp}/no_model", "no_model"),
])
def test_bad_inputs_fail_before_anything_is_written(tmp_path, tiny_cache, override, message):
    cfg = run_config(tmp_path, override.format(tmp=tmp_path))
    with pytest.raises((UserError, FileNotFoundError), match=message):
        Trainer(cfg)
    assert not os.path.exists(cfg.run.output_dir)


def test_a_start_that_fails_before_its_first_step_leaves_no_run_dir(tmp_path, tiny_cache, monkeypatch):
    def first_step_fails(self, prompts):  # where a virtualenv without jinja2 stopped
        raise ImportError("apply_chat_template requires jinja2 to be installed")

    monkeypatch.setattr(Trainer, "_step", first_step_fails)
    cfg = run_config(tmp_path)
    with pytest.raises(ImportError, match="jinja2"):
        train(cfg)
    assert not os.path.exists(cfg.run.output_dir)
    # a run dir that was there before is the user's: kept, with what the failed start wrote
    os.makedirs(cfg.run.output_dir)
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(ImportError, match="jinja2"):
        train(cfg)
    assert {"notes.txt", "config.yaml"} <= set(os.listdir(cfg.run.output_dir))


def test_a_run_that_fails_after_its_first_step_keeps_its_run_dir(tmp_path, tiny_cache, monkeypatch):
    steps = []

    def second_step_fails(self, prompts):
        steps.append(len(prompts))
        if len(steps) == 2:
            raise RuntimeError("out of memory")
        return {"loss": 0.5}, []

    monkeypatch.setattr(Trainer, "_step", second_step_fails)
    cfg = run_config(tmp_path, "checkpoint.save_every=5")
    with pytest.raises(RuntimeError, match="out of memory"):
        train(cfg)
    assert [row["step"] for row in read_metrics(cfg.run.output_dir)] == [1]


def test_empty_prompt_file_names_the_file(tmp_path, tiny_cache):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="empty.jsonl"):
        Trainer(run_config(tmp_path, f"data.train_path={empty}"))


def test_a_slot_engine_run_equals_the_static_run(tmp_path, tiny_cache):
    # rollout.engine reaches the trainer's sampler: 8 rows through 3 slots sample the static engine's rows (each row
    # has its own random stream), so the runs' rewards, lengths and losses are the same
    runs = {}
    for engine in ("static", "slots"):
        cfg = resolve(None, [*FAST, f"run.output_dir={tmp_path / engine}", "run.total_steps=2",
                             f"rollout.engine={engine}", "rollout.slots=3",
                             "rollout.chunk_tokens=4"])
        train(cfg)
        runs[engine] = read_metrics(cfg.run.output_dir)
    for static, slots in zip(runs["static"], runs["slots"], strict=True):
        for key in ("reward_mean", "response_tokens_mean", "length_stop_rate", "loss", "grad_norm"):
            assert slots[key] == pytest.approx(static[key], rel=1e-5, abs=1e-6), key


AHEAD = ["rollout.engine=slots", "rollout.slots=3", "rollout.chunk_tokens=4", "rollout.max_staleness=1",
         "algorithm.rollout_correction.weights=token", "run.total_steps=4"]


def test_partial_rollouts_start_the_next_steps_rows_and_resume_exactly(tmp_path, tiny_cache, monkeypatch):
    # 8 rows through 3 slots: the slots freed in each step's tail start the next step's rows with the policy of
    # that step; a run stopped after step 2 saves them with its checkpoint and goes on as the straight run
    straight = run_config(tmp_path / "a", *AHEAD)
    train(straight)
    rows = read_metrics(straight.run.output_dir)
    assert rows[0]["stale_token_fraction"] == 0.0 and rows[0]["staleness_max"] == 0.0
    assert all(0 < r["stale_token_fraction"] < 1 and r["staleness_max"] == 1.0 for r in rows[1:])

    resumed = run_config(tmp_path / "b", *AHEAD)
    run_until_step_3_dies(resumed, monkeypatch)
    saved = os.path.join(resumed.run.output_dir, "checkpoints", "2", "data_iter", "process_0-of-1.json")
    with open(saved) as f:
        (ahead,) = json.load(f)["ahead_rows"]  # the rows started for step 3
    assert ahead["readmit"] and all(0 < c < 12 for c in np.asarray(ahead["counts"])[ahead["readmit"]])
    train(resumed)
    a = load_file(os.path.join(straight.run.output_dir, "export", "model.safetensors"))
    b = load_file(os.path.join(resumed.run.output_dir, "export", "model.safetensors"))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    again = read_metrics(resumed.run.output_dir)
    for key in ("reward_mean", "stale_token_fraction", "loss"):
        assert [r[key] for r in again] == [r[key] for r in rows], key
