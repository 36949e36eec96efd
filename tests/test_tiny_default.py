"""The tiny default runs every algorithm with one override (its `algorithm_defaults`), and `rlmt-jax train`
ends by naming where the run's metrics, TensorBoard events, checkpoints and export are."""

import json
import os

import pytest

from rlmt_jax.cli import main
from rlmt_jax.commands.train import where_the_run_is
from rlmt_jax.settings.config import from_dict, load_resolved, resolve
from rlmt_jax.inputs.data import load_train_records
from rlmt_jax.core.errors import UserError

SHORT = ["run.total_steps=2", "checkpoint.async_save=false", "logging.tensorboard=false"]


def test_algorithm_name_picks_the_tiny_defaults_of_that_algorithm_and_overrides_still_win():
    grpo, dpo, sft = (resolve(None, [f"algorithm.name={name}"]) for name in ("grpo", "dpo", "sft"))
    assert grpo == resolve(None)
    assert (dpo.template.mode, dpo.template.strict, dpo.template.format_penalty) == ("none", False, None)
    assert (dpo.algorithm.dpo.min_valid, dpo.algorithm.dpo.batch_size, dpo.optimizer.lr) == (2, 32, 1e-3)
    assert dpo.data.train_path == "builtin:tiny-prompts"
    assert (sft.data.train_path, sft.data.epochs) == ("builtin:tiny-sft", 1)
    assert (sft.algorithm.sft.epochs, sft.algorithm.sft.batch_size, sft.optimizer.micro_batch_size) == (10, 8, 8)
    assert (sft.template.mode, sft.optimizer.lr) == ("think", grpo.optimizer.lr)  # the rest is the tiny default
    mine = resolve(None, ["algorithm.name=sft", "algorithm.sft.batch_size=4", "optimizer.micro_batch_size=4"])
    assert (mine.algorithm.sft.batch_size, mine.algorithm.sft.epochs) == (4, 10)


@pytest.mark.parametrize("defaults, message", [
    ({"sfft": {"data": {"epochs": 1}}}, "algorithm_defaults.sfft: .*algorithm.name"),
    ({"sft": {"data": {"epoch": 1}}}, "algorithm_defaults.sft: unknown config key 'data.epoch'"),
    ({"sft": 3}, "'algorithm_defaults' must map algorithm names to config sections"),
])
def test_a_wrong_algorithm_defaults_section_is_an_error_naming_it_even_when_not_picked(defaults, message):
    values = {"model": {"policy": "p", "reward_model": "r"}, "data": {"train_path": "d.jsonl"},
              "algorithm_defaults": defaults}
    with pytest.raises(UserError, match=message):
        from_dict(values)


def test_the_tiny_sft_set_is_forty_think_then_answer_conversations():
    records = load_train_records(resolve(None, ["algorithm.name=sft"]))
    assert len(records) == 40
    for messages in records:
        assert [m["role"] for m in messages] == ["user", "assistant"]
        plan, _, answer = messages[1]["content"].partition("\n</think>\n\n")
        assert plan.startswith("<think>\n") and len(plan) > len("<think>\n") and answer.strip()


def metrics(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def test_tiny_sft_with_one_override(tmp_path, tiny_cache, capsys):
    run_dir = tmp_path / "sft"
    assert main(["train", "tiny", "algorithm.name=sft", *SHORT, f"run.output_dir={run_dir}"]) == 0
    rows = metrics(run_dir)
    assert [row["step"] for row in rows] == [1, 2]
    assert rows[1]["loss"] < rows[0]["loss"]
    assert load_resolved(run_dir).data.train_path == "builtin:tiny-sft"
    out = capsys.readouterr().out
    assert f"exported the policy to {run_dir / 'export'}" in out


def test_tiny_online_dpo_with_one_override(tmp_path, tiny_cache):
    run_dir = tmp_path / "dpo"
    assert main(["train", "tiny", "algorithm.name=dpo", *SHORT, "rollout.max_new_tokens=8",
                 f"run.output_dir={run_dir}"]) == 0
    pairs = [json.loads(line) for line in open(run_dir / "dpo_pairs.process-0.jsonl")]
    assert len(pairs) > 100 and all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    rows = metrics(run_dir)
    assert [row["step"] for row in rows] == [1, 2] and "reward_accuracy" in rows[0]


def test_the_final_message_names_metrics_tensorboard_checkpoints_and_export():
    cfg = resolve(None, ["run.output_dir=runs/a", "logging.wandb_project=rlmt"])
    assert where_the_run_is(cfg, "/abs/runs/a/export").splitlines() == [
        "run dir runs/a:",
        "  metrics      runs/a/metrics.jsonl  (plot: rlmt-jax plot runs/a)",
        "  samples      runs/a/samples.jsonl",
        "  TensorBoard  tensorboard --logdir runs/a/tensorboard",
        "  W&B          project rlmt",
        "  checkpoints  runs/a/checkpoints  (the same command again resumes from the newest)",
        "exported the policy to /abs/runs/a/export (a Hugging Face directory)",
    ]
    quiet = resolve(None, ["run.output_dir=runs/b", "logging.tensorboard=false", "checkpoint.dir=/ckpt/b"])
    lines = where_the_run_is(quiet, None).splitlines()
    assert not any("TensorBoard" in line or "W&B" in line or "exported" in line for line in lines)
    assert lines[-1] == "  checkpoints  /ckpt/b  (the same command again resumes from the newest)"
