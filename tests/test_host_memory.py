"""The relaunch that makes glibc keep XLA:CPU's freed host memory for the next step."""

import os
import subprocess
import sys

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
    result = subprocess.run([sys.executable, "-m", "rlmt_jax.cli", "plan", "--help"], env=clean_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: rlmt-jax plan" in result.stdout
