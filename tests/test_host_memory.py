"""The relaunch that makes glibc keep XLA:CPU's freed host memory for the next step."""

import json
import os
import subprocess
import sys

import pytest

from rlmt_jax.scale.host_memory import GLIBC_TUNABLES, runs_on_cpu, wants_relaunch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cpu_is_detected_from_jax_platforms_first_then_from_installed_plugins():
    assert runs_on_cpu({"JAX_PLATFORMS": "cpu"}, ["jax-cuda12-plugin"])
    assert not runs_on_cpu({"JAX_PLATFORMS": "tpu,cpu"}, [])
    assert runs_on_cpu({}, ["jax", "jaxlib", "numpy"])
    assert not runs_on_cpu({}, ["jax", "jax_cuda12_plugin"])
    assert not runs_on_cpu({}, ["libtpu"])


def test_relaunch_only_on_linux_cpu_without_tunables_or_opt_out():
    assert wants_relaunch({}, "linux", ["jax"])
    assert not wants_relaunch({}, "darwin", ["jax"])
    assert not wants_relaunch({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "linux", ["jax"])
    assert not wants_relaunch({"RLMT_JAX_HOST_MEMORY": "default"}, "linux", ["jax"])
    assert not wants_relaunch({}, "linux", ["jax", "libtpu"])


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "RLMT_JAX_HOST_MEMORY")}
    return {**env, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", **extra}


def test_a_relaunched_script_runs_once_with_the_tunables(tmp_path):
    script = tmp_path / "report.py"
    script.write_text(
        "import os, sys\n"
        "from rlmt_jax.scale.host_memory import relaunch_with_reused_memory\n"
        "print('start', flush=True)\n"
        "relaunch_with_reused_memory([__file__, *sys.argv[1:]])\n"
        "print('args', sys.argv[1:], 'tunables', os.environ.get('GLIBC_TUNABLES'))\n"
    )
    out = subprocess.run([sys.executable, str(script), "a", "b=1"], env=clean_env(), capture_output=True, text=True,
                         check=True, timeout=60).stdout.splitlines()
    if sys.platform.startswith("linux"):
        assert out == ["start", "start", f"args ['a', 'b=1'] tunables {GLIBC_TUNABLES}"]
    out = subprocess.run([sys.executable, str(script)], env=clean_env(RLMT_JAX_HOST_MEMORY="default"),
                         capture_output=True, text=True, check=True, timeout=60).stdout.splitlines()
    assert out == ["start", "args [] tunables None"]


def test_the_cli_entry_point_relaunches_and_runs_the_command():
    result = subprocess.run([sys.executable, "-m", "rlmt_jax.cli", "plot", "/no/such/run"], env=clean_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == "rlmt-jax plot: error: run directory /no/such/run: no such directory"
    result = subprocess.run([sys.executable, "-m", "rlmt_jax.cli", "plan", "--help"], env=clean_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: rlmt-jax plan" in result.stdout


# `rlmt-jax ARGS` through the console script's entry(), with os.execve recorded instead of run: whether the process
# would start again, and what it had imported by then.
ENTRY_PROBE = """
import json, os, sys
starts = []

def execve(path, args, env):
    starts.append(args)
    raise SystemExit(99)

os.execve = execve
sys.argv = ["rlmt-jax", *json.loads(sys.argv[1])]
from rlmt_jax import cli
try:
    cli.entry()
except SystemExit as stop:
    code = stop.code
heavy = sorted(m for m in ("jax", "jaxlib", "flax", "transformers", "orbax", "torch") if m in sys.modules)
print(json.dumps({"code": code, "relaunched": bool(starts), "heavy": heavy}))
"""


def through_entry(*args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", ENTRY_PROBE, json.dumps(args)], env=clean_env(),
                            capture_output=True, text=True, timeout=120)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("args", "code"), [
    (["--help"], 0), (["train", "--help"], 0), (["score", "--help"], 0), ([], 2), (["nosuch"], 2),
    (["train", "--bogus"], 2), (["train", "--rollout.n=2"], 2), (["score"], 2),
])
def test_help_and_argument_errors_answer_before_jax_is_imported_or_the_process_starts_again(args, code):
    """`rlmt-jax --help` took ~13 s: JAX was imported before the arguments were read, and again after the
    relaunch."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the relaunch is for Linux")
    assert through_entry(*args) == {"code": code, "relaunched": False, "heavy": []}


def test_a_command_to_run_starts_again_once_its_arguments_are_read():
    if not sys.platform.startswith("linux"):
        pytest.skip("the relaunch is for Linux")
    assert through_entry("plot", "/no/such/run") == {"code": 99, "relaunched": True, "heavy": []}
