"""The `rlmt-jax` command line as a user runs it: train (the default), export, convert, errors (generate: in
tests/test_generate_cli.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

import models
from rlmt_jax.cli import main
from tests.hf_factory import make_checkpoint

SHORT = ["run.total_steps=2", "rollout.max_new_tokens=8", "rollout.prompts_per_step=4", "rollout.n=2",
         "checkpoint.async_save=false", "logging.tensorboard=false", "optimizer.micro_batch_size=8"]


def train_in_a_new_process(run_dir, tiny_cache, hash_seed: str):
    """`rlmt-jax train` with the built-in default, shortened, in a process of its own."""
    env = {**os.environ, "RLMT_JAX_CACHE": str(tiny_cache), "PYTHONHASHSEED": hash_seed}
    result = subprocess.run(
        [sys.executable, "-m", "rlmt_jax.cli", "train", *SHORT, f"run.output_dir={run_dir}"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, tiny_cache):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    return run_dir, train_in_a_new_process(run_dir, tiny_cache, hash_seed="1")


def test_train_with_no_config_runs_the_tiny_default(short_run):
    run_dir, result = short_run
    assert "step 2/2" in result.stderr
    assert "reward_mean" in result.stdout and "exported the policy to" in result.stdout
    config = (run_dir / "config.yaml").read_text()
    assert "builtin:tiny-policy" in config and "total_steps: 2" in config
    assert {"config.yaml", "metrics.jsonl", "samples.jsonl", "checkpoints", "export"} <= set(os.listdir(run_dir))


def test_a_second_process_with_the_same_config_reproduces_the_run_exactly(short_run, tiny_cache, tmp_path):
    # Another process (and another Python hash seed, so nothing may depend on set or str-hash order) samples
    # the same tokens, logs the same metrics and exports the same bytes.
    run_dir, _ = short_run
    again = tmp_path / "again"
    train_in_a_new_process(again, tiny_cache, hash_seed="2")

    def metrics(directory):
        rows = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in row.items() if not k.startswith("time") and k != "tokens_per_s"} for row in rows]

    first, second = metrics(run_dir), metrics(again)
    assert len(first) == 2 and "reward_mean" in first[0]
    assert first == second
    assert (run_dir / "samples.jsonl").read_text() == (again / "samples.jsonl").read_text()
    exported = sorted(p.name for p in (run_dir / "export").glob("*.safetensors"))
    assert exported
    for name in exported:
        assert (run_dir / "export" / name).read_bytes() == (again / "export" / name).read_bytes()


def test_export_command_writes_the_checkpoint_that_transformers_loads(short_run, tmp_path):
    run_dir, _ = short_run
    out = tmp_path / "exported"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    end_of_run = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "export", dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        np.testing.assert_array_equal(ours(input_ids=ids).logits.numpy(), end_of_run(input_ids=ids).logits.numpy())
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and "<|start_header_id|>" in tokenizer.chat_template
    # one step dir, and the same result
    assert main(["export", str(run_dir / "checkpoints" / "2"), "--out", str(tmp_path / "step2")]) == 0


def test_convert_casts_and_validates_a_checkpoint(tmp_path):
    path, reference = make_checkpoint(tmp_path / "src", "qwen25")
    assert main(["convert", path, "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    converted = models.load_pretrained(tmp_path / "bf16", param_dtype="bfloat16")
    assert converted.model.embed[...].dtype.name == "bfloat16"


def test_cli_errors_are_one_line_naming_the_problem(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    assert main(["train", "rollout.temprature=0.5"]) == 2
    assert "did you mean 'rollout.temperature'" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not inside a run dir" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["generate", "--model", str(tmp_path), "--input", str(empty), "--output", str(tmp_path / "o")]) == 2
    assert "empty" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
