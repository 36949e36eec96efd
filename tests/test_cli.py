"""The `rlmt-jax` command line as a user runs it: train (the default), export, convert, errors (generate: in
tests/test_generate_cli.py)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

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


def tree_of(folder):
    """{relative path: bytes} of every file under `folder`."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_refuses_a_folder_of_other_files_the_current_folder_and_the_run_dir(short_run, tmp_path, capsys,
                                                                                   monkeypatch):
    run_dir, _ = short_run
    foreign, here = tmp_path / "mine", tmp_path / "here"
    for folder in (foreign, here):
        folder.mkdir()
        (folder / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(here)
    run_before = tree_of(run_dir)
    for out, message in [(foreign, "not an rlmt-jax export"), (".", "the current folder"),
                         (run_dir, "is the run dir"), (run_dir.parent, "holds it"),
                         (run_dir / "checkpoints", "not an rlmt-jax export"), (foreign / "thesis.tex", "not a folder")]:
        assert main(["export", str(run_dir), "--out", str(out)]) == 2, out
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert tree_of(foreign) == tree_of(here) == {"thesis.tex": b"years of work"}
    assert tree_of(run_dir) == run_before
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_export_replaces_an_earlier_export_of_its_own_and_removes_leftovers_of_an_interrupted_one(short_run, tmp_path):
    run_dir, _ = short_run
    out = tmp_path / "exported"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    first = tree_of(out)
    marker = json.loads(first[".rlmt-jax-export"])
    assert "model.safetensors" in marker["files"] and "config.json" in marker["files"]
    # what an export killed mid-write leaves: its temporary folder (writer gone) and a replaced one
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for leftover in (tmp_path / ".exported.tmp-abc", tmp_path / ".exported.old-def"):
        leftover.mkdir()
        (leftover / "model.safetensors").write_bytes(b"x" * 100)
        (leftover / ".rlmt-jax-export").write_text(json.dumps(
            {"files": ["model.safetensors"], "pid": int(dead.stdout), "host": socket.gethostname()}))
    assert main(["export", str(run_dir), "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert len(tree_of(out)["model.safetensors"]) < len(first["model.safetensors"])  # the bfloat16 copy replaced it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]
    (out / "notes.txt").write_text("my eval notes")  # a file the export did not write: no longer replaced
    assert main(["export", str(run_dir), "--out", str(out)]) == 2
    assert (out / "notes.txt").read_text() == "my eval notes"


REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("how", ["console_script", "python_m_without_relaunch"])
def test_a_models_package_in_the_current_folder_is_never_imported(short_run, tmp_path, how):
    run_dir, _ = short_run
    here, ran = tmp_path / "here", tmp_path / "IMPORTED"
    (here / "models").mkdir(parents=True)
    (here / "models" / "__init__.py").write_text(f"open({str(ran)!r}, 'w').write('code from the current folder')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "RLMT_JAX_HOST_MEMORY")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    if how == "console_script":  # the installed `rlmt-jax` (it restarts itself with glibc settings on Linux)
        script = Path(sys.executable).parent / "rlmt-jax"
        if not script.is_file():
            pytest.skip(f"no rlmt-jax console script beside {sys.executable}")
        command = [str(script)]
    else:
        command, env["RLMT_JAX_HOST_MEMORY"] = [sys.executable, "-m", "rlmt_jax.cli"], "default"
    out = tmp_path / "exported"
    result = subprocess.run([*command, "export", str(run_dir), "--out", str(out)], cwd=here, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not ran.exists()
    assert (out / "model.safetensors").is_file()


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
