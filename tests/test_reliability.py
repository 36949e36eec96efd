"""Runs that are stopped, doubled or restarted differently, as a user (or a spot VM) does it: real processes and
real signals. SIGTERM stops after the current step with a checkpoint and exit status 3, and the resumed run
exports the same bytes as an uninterrupted one; a second trainer on a run dir is refused; a changed config on
resume is refused with the run dir untouched."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlmt_jax.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]
SHORT = ["run.total_steps=4", "rollout.max_new_tokens=8", "rollout.prompts_per_step=4", "rollout.n=2",
         "logging.tensorboard=false", "optimizer.micro_batch_size=8", "checkpoint.save_every=1",
         "checkpoint.keep=4", "checkpoint.async_save=true"]

# `rlmt-jax train` in a process whose first checkpoint commit waits for the test (tests/save_gate.py)
GATED_TRAIN = """
import sys
from tests import save_gate

save_gate.install()
from rlmt_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start_training(run_dir, tiny_cache, gate=None, extra=()):
    env = {**os.environ, "RLMT_JAX_CACHE": str(tiny_cache), "PYTHONPATH": str(REPO_ROOT)}
    if gate is not None:
        gate.mkdir(exist_ok=True)
        env["TEST_SAVE_GATE"] = str(gate)
    return subprocess.Popen([sys.executable, "-c", GATED_TRAIN, "train", *SHORT, f"run.output_dir={run_dir}", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {path.name} appeared: {process.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def metric_steps(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def exported(run_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "export").glob("*.safetensors"))}


def tree_of(folder) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_cache):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    process = start_training(run_dir, tiny_cache)
    _, err = process.communicate(timeout=900)
    assert process.returncode == 0, err[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, tiny_cache):
    """A run sent SIGTERM while step 1's checkpoint is being written and step 2 is running."""
    root = tmp_path_factory.mktemp("interrupted")
    run_dir, gate = root / "run", root / "gate"
    process = start_training(run_dir, tiny_cache, gate)
    wait_for(gate / "saving", process)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # the handler has run: the save may complete now
    (gate / "go").touch()
    out, err = process.communicate(timeout=600)
    return run_dir, process.returncode, out, err


def test_sigterm_mid_step_and_mid_save_finishes_both_saves_and_exits_3_with_a_resume_line(interrupted):
    run_dir, returncode, _, err = interrupted
    assert returncode == 3, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("rlmt-jax train: stopped by SIGTERM after step 2 with checkpoint step 2 in ")
    assert last.endswith(f"resume with the same command: rlmt-jax train {' '.join(SHORT)} run.output_dir={run_dir}")
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["1", "2"]  # the save in flight completed, then step 2
    assert all((checkpoints / step / "commit_success.txt").is_file() for step in ("1", "2"))
    assert metric_steps(run_dir) == [1, 2]
    assert not (run_dir / "export").exists() and not (run_dir / "run.lock").exists()


def test_the_resumed_run_exports_the_same_bytes_and_a_second_trainer_meanwhile_is_refused(
        interrupted, reference, tiny_cache, tmp_path):
    run_dir, returncode, _, _ = interrupted
    assert returncode == 3
    gate = tmp_path / "gate"
    first = start_training(run_dir, tiny_cache, gate)
    wait_for(gate / "saving", first)  # resumed, step 3 trained, its checkpoint held open
    lock = json.loads((run_dir / "run.lock").read_text())
    assert lock["pid"] == first.pid
    second = start_training(run_dir, tiny_cache)
    _, err = second.communicate(timeout=600)
    assert second.returncode == 2
    assert err.strip().splitlines()[-1] == (
        f"rlmt-jax train: error: run dir {run_dir} is in use by process {first.pid} on this host (since "
        f"{lock['since']}); wait for it to end, stop it, or use another run.output_dir")
    (gate / "go").touch()
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert metric_steps(run_dir) == [1, 2, 3, 4]  # each step once: the second trainer wrote nothing
    assert exported(run_dir) and exported(run_dir) == exported(reference)
    assert not (run_dir / "run.lock").exists()


def test_a_changed_config_on_resume_is_refused_and_the_run_dir_is_untouched(reference, tiny_cache, capsys):
    before = tree_of(reference)
    code = main(["train", *SHORT, f"run.output_dir={reference}", "optimizer.lr=0.5", "rollout.temperature=0.7"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "optimizer.lr: 0.002 -> 0.5; rollout.temperature: 1.0 -> 0.7); use another run.output_dir, or " \
           "pass --allow-config-change" in err
    assert tree_of(reference) == before


def test_a_run_dir_without_config_yaml_refuses_a_changed_config_before_writing_anything(reference, tiny_cache,
                                                                                         tmp_path, capsys):
    # its checkpoints hold the config: the refusal must not write config.yaml with the new value first, which
    # would then refuse the original command too
    import shutil

    run_dir = tmp_path / "no_config"
    shutil.copytree(reference, run_dir)
    (run_dir / "config.yaml").unlink()
    before = tree_of(run_dir)
    assert main(["train", *SHORT, f"run.output_dir={run_dir}", "optimizer.lr=0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"rlmt-jax train: error: the checkpoint of step 4 in {run_dir / 'checkpoints'} was started with "
                   "another config (optimizer.lr: 0.002 -> 0.5); use another run.output_dir, or pass "
                   "--allow-config-change to resume with the new settings")
    assert tree_of(run_dir) == before
    assert main(["train", *SHORT, f"run.output_dir={run_dir}"]) == 0  # the original command resumes (step 4)
    assert (run_dir / "config.yaml").is_file() and metric_steps(run_dir) == [1, 2, 3, 4]


def test_a_run_extended_by_a_larger_total_steps_equals_one_started_with_it(reference, tiny_cache, tmp_path, caplog):
    # the tiny default's learning rate is constant without warmup: run.total_steps changes no step's update,
    # so a 2-step run resumed with run.total_steps=4 (no --allow-config-change) trains the reference's steps 3, 4
    run_dir = tmp_path / "extended"
    short = [*(o for o in SHORT if not o.startswith(("run.total_steps", "checkpoint.save_every"))),
             f"run.output_dir={run_dir}", "checkpoint.save_every=2", "logging.every=2"]
    assert main(["train", *short, "run.total_steps=2"]) == 0
    assert main(["train", *short, "run.total_steps=4"]) == 0
    assert metric_steps(run_dir) == [2, 4]
    assert exported(run_dir) == exported(reference)


def test_restore_step_rolls_back_once_and_retrains_the_same_steps(reference, tiny_cache, tmp_path, caplog):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(reference, run_dir)  # a moved run dir resumes: run.output_dir is not compared
    assert main(["train", *SHORT, f"run.output_dir={run_dir}", "checkpoint.restore_step=2"]) == 0
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["1", "2", "3", "3.rolled-back", "4", "4.rolled-back"]
    assert exported(run_dir) == exported(reference)  # steps 3 and 4 again from step 2: the same weights
    assert metric_steps(run_dir) == [1, 2, 3, 4]  # the metrics of the steps rolled back are replaced
    # the same command again (say, after a preemption) resumes from the newest step: no second rollback
    assert main(["train", *SHORT, f"run.output_dir={run_dir}", "checkpoint.restore_step=2"]) == 0
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == names
    assert metric_steps(run_dir) == [1, 2, 3, 4]


def test_a_diverging_run_stops_naming_the_newest_checkpoint_saved_from_finite_values(tiny_cache, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["train", *SHORT, f"run.output_dir={run_dir}", "optimizer.lr=1e30", "optimizer.schedule=constant",
                 "optimizer.warmup_ratio=0", "optimizer.grad_clip=null"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1, err
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir())
    assert steps and err.startswith(f"rlmt-jax train: stopped: step {steps[-1] + 1}: ")
    assert err.endswith(f"the newest checkpoint is step {steps[-1]} in {run_dir / 'checkpoints'} (saved from a step "
                        "with a finite loss, gradient and update; checkpoint.restore_step=N resumes from an older one)")


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_an_output_dir_that_is_a_file_or_read_only_is_one_line(small_disk, tmp_path, capsys, tiny_cache):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert main(["train", *SHORT, f"run.output_dir={a_file}"]) == 2
    assert capsys.readouterr().err.strip() == f"rlmt-jax train: error: run.output_dir {a_file}: exists and is not a " \
                                              "directory"
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    assert main(["train", *SHORT, f"run.output_dir={small_disk / 'run'}"]) == 2
    assert capsys.readouterr().err.strip() == (f"rlmt-jax train: error: run.output_dir {small_disk / 'run'}: cannot "
                                               "be created (Read-only file system)")
    assert a_file.read_text() == "mine"


def test_a_full_disk_ends_the_run_in_one_line_and_keeps_nothing_half_written(small_disk, tiny_cache):
    run_dir = small_disk / "run"
    process = start_training(run_dir, tiny_cache)  # the first checkpoint (a few MiB) does not fit in 1 MiB
    _, err = process.communicate(timeout=600)
    assert process.returncode == 2, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"rlmt-jax train: error: cannot write checkpoint step 1 in {run_dir / 'checkpoints'}: ")
    assert last.endswith("MiB needed; no earlier checkpoint exists")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == []
    assert not (run_dir / "run.lock").exists()


def test_a_checkpoint_dir_resumed_from_a_new_run_dir_is_checked_against_its_own_config(reference, tiny_cache,
                                                                                       tmp_path, capsys):
    # a preempted VM comes back with an empty run dir; its checkpoints live on (gs://) with their config
    before = tree_of(reference / "checkpoints")
    args = ["train", *SHORT, f"run.output_dir={tmp_path / 'fresh'}", f"checkpoint.dir={reference / 'checkpoints'}"]
    assert main([*args, "rollout.temperature=0.7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"rlmt-jax train: error: the checkpoint of step 4 in {reference / 'checkpoints'} was started with "
                   "another config (rollout.temperature: 1.0 -> 0.7); use another run.output_dir, or pass "
                   "--allow-config-change to resume with the new settings")
    assert tree_of(reference / "checkpoints") == before
