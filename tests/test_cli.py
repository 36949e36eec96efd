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
    foreign, here, empty = tmp_path / "mine", tmp_path / "here", tmp_path / "empty"
    for folder in (foreign, here):
        folder.mkdir()
        (folder / "thesis.tex").write_text("years of work")
    empty.mkdir()
    (tmp_path / "link").symlink_to(empty)  # each of the last two was a DestinationError traceback
    monkeypatch.chdir(here)
    run_before = tree_of(run_dir)
    for out, message in [(foreign, "not an rlmt-jax export"), (".", "the current folder"),
                         (run_dir, "is the run dir"), (run_dir.parent, "holds it"),
                         (run_dir / "checkpoints", "not an rlmt-jax export"), (foreign / "thesis.tex", "not a folder"),
                         (tmp_path / "link", "is a symbolic link"),
                         (foreign / "thesis.tex" / "out", f"{foreign / 'thesis.tex'} is a file, not a folder")]:
        assert main(["export", str(run_dir), "--out", str(out)]) == 2, out
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert tree_of(foreign) == tree_of(here) == {"thesis.tex": b"years of work"}
    assert tree_of(run_dir) == run_before
    assert not list(tmp_path.glob(".*.tmp-*")) and os.listdir(empty) == []


def test_export_onto_a_full_disk_is_one_line_naming_the_folder_and_leaves_nothing(short_run, tmp_path, capsys,
                                                                                 monkeypatch):
    """safetensors' SafetensorError on a full disk was a 24-line traceback."""
    from models import hf_io

    def full_disk(*args, **kwargs):
        raise hf_io.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(hf_io, "save_file", full_disk)
    run_dir, _ = short_run
    out = tmp_path / "exported"
    assert main(["export", str(run_dir), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"rlmt-jax export: error: --out {out}: cannot write the export (No space left on device); nothing was written"]
    assert os.listdir(tmp_path) == []


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


def test_ctrl_c_before_the_first_step_is_one_line_and_status_130(tmp_path, capsys, monkeypatch):
    """Ctrl-C while the models loaded (before the loop's own handler) was a 44-66 line traceback, status -2."""
    import rlmt_jax.trainer.loop

    def interrupted(cfg, allow_config_change=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(rlmt_jax.trainer.loop, "train", interrupted)
    run_dir = tmp_path / "run"
    assert main(["train", *SHORT, f"run.output_dir={run_dir}"]) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "rlmt-jax train: interrupted (Ctrl-C) before the run could stop in order; start it again with the same "
        f"command: rlmt-jax train {' '.join(SHORT)} run.output_dir={run_dir}"]

    def interrupted_command(args):
        raise KeyboardInterrupt

    from rlmt_jax.commands import score

    monkeypatch.setattr(score, "run", interrupted_command)
    assert main(["score", "--reward-model", "rm", "--input", "in", "--output", "out"]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["rlmt-jax score: interrupted (Ctrl-C)"]


def test_a_full_disk_at_start_names_the_run_dir_when_the_os_names_no_file(tmp_path, capsys, monkeypatch):
    """config.yaml on a full disk printed `No space left on device` and no path (the lock: tests/test_run_lock.py)."""
    import errno

    import rlmt_jax.trainer.loop

    def full_disk(cfg, allow_config_change=False):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rlmt_jax.trainer.loop, "train", full_disk)
    run_dir = tmp_path / "run"
    assert main(["train", *SHORT, f"run.output_dir={run_dir}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"rlmt-jax train: error: cannot write in the run dir {run_dir} (No space left on device)"]


def test_the_summary_compares_first_and_last_steps_that_do_not_overlap():
    """A 3-step run printed the same three steps on both sides of its "first 3 vs last 3 steps"."""
    from rlmt_jax.commands.train import summarize

    def history(steps):
        return [{"step": s, "loss": float(s), "kl": None} for s in range(1, steps + 1)]

    assert summarize(history(3)).splitlines() == ["steps 1-3: first step vs last step",
                                                  f"  {'kl':22s} {'nan':>10s} -> {'nan':>10s}",
                                                  f"  {'loss':22s} {1.0:10.4f} -> {3.0:10.4f}"]
    assert summarize(history(7)).splitlines()[::2] == ["steps 1-7: first 3 steps vs last 3 steps",
                                                       f"  {'loss':22s} {2.0:10.4f} -> {6.0:10.4f}"]
    assert summarize(history(40)).splitlines()[::2] == ["steps 1-40: first 10 steps vs last 10 steps",
                                                        f"  {'loss':22s} {5.5:10.4f} -> {35.5:10.4f}"]
    assert summarize(history(1)).splitlines()[::2] == ["step 1:", f"  {'loss':22s} {1.0:10.4f}"]


NO_TORCH = """
import sys
sys.modules["torch"] = None  # as where PyTorch is not installed: transformers advises at import
from rlmt_jax.cli import main
sys.exit(main(["export", sys.argv[1], "--out", sys.argv[2]]))
"""


def test_transformers_advice_that_pytorch_is_missing_is_not_printed(tmp_path):
    """Every command printed "PyTorch was not found. Models won't be available ..." (rlmt-jax needs no torch)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "RLMT_JAX_HOST_MEMORY": "default"}
    result = subprocess.run([sys.executable, "-c", NO_TORCH, str(tmp_path / "no_run"), str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"rlmt-jax export: error: {tmp_path / 'no_run'}: no such run or checkpoint directory"]
    result = subprocess.run(  # transformers' other warnings are still shown
        [sys.executable, "-c", "import logging, sys; sys.modules['torch'] = None\n"
         "from rlmt_jax.cli import silence_torch_advice; silence_torch_advice()\n"
         "import transformers; logging.getLogger('transformers').warning('other advice')"],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stderr.strip().splitlines() == ["[transformers] other advice"]
