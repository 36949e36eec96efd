"""Host memory reuse between XLA:CPU executions (Linux, glibc).

XLA:CPU allocates each execution's temporary buffers with malloc and frees them at its end. glibc serves
large blocks of its worker threads' arenas with fresh mmap'd pages and gives them back on free, so every
training step page-faults its whole working set again: about a million faults (4 GB zeroed by the kernel,
~15% of a benchmark update step's CPU time, benchmarks/update_step.py) per step. With one arena, no mmap
for large blocks and no trimming, the second step reuses the first one's pages: no faults at all.

These settings are read by glibc when a process starts, so `rlmt-jax` starts itself again with them
(`relaunch_with_reused_memory`) when JAX will run on the CPU: once its arguments are read, so that `--help` and
argument errors answer from the first process, which imports no JAX. Set RLMT_JAX_HOST_MEMORY=default to keep
glibc's defaults; a GLIBC_TUNABLES already in the environment is left as it is.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Mapping, Sequence

GLIBC_TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776"
OPT_OUT = "RLMT_JAX_HOST_MEMORY"
# Distributions that give JAX an accelerator: with one installed (and JAX_PLATFORMS not pinning the CPU)
# device memory is what matters and the host settings are left alone.
ACCELERATOR_PLUGINS = ("libtpu", "libtpu-nightly", "jax-cuda12-plugin", "jax-cuda13-plugin", "jax-rocm7-plugin",
                       "jax-rocm60-plugin")


def runs_on_cpu(environ: Mapping[str, str], installed: Sequence[str]) -> bool:
    """Whether JAX will use its CPU backend: JAX_PLATFORMS says cpu, or no accelerator plugin is installed."""
    platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return platforms[0] == "cpu"
    names = {name.lower().replace("_", "-") for name in installed}
    return not names.intersection(ACCELERATOR_PLUGINS)


def wants_relaunch(environ: Mapping[str, str], platform: str, installed: Sequence[str]) -> bool:
    """True when this process should start again with GLIBC_TUNABLES set (see the module docstring)."""
    return (
        platform.startswith("linux")
        and "GLIBC_TUNABLES" not in environ
        and environ.get(OPT_OUT, "") != "default"
        and runs_on_cpu(environ, installed)
    )


def installed_distributions() -> list[str]:
    return [d.metadata["Name"] or "" for d in importlib.metadata.distributions()]


def module_command(module: str, args: Sequence[str]) -> list[str]:
    """The interpreter arguments that run `module` as `python -m` does, but with no module importable from the
    current folder: `-P` (Python >= 3.11) keeps it off sys.path; PYTHONPATH still counts."""
    if sys.version_info >= (3, 11):
        return ["-P", "-m", module, *args]
    code = (f"import runpy, sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
    return ["-c", code, *args]


def relaunch_with_reused_memory(python_args: Sequence[str]) -> None:
    """Replaces this process by `python *python_args` (e.g. `module_command("rlmt_jax.cli", ["train"])`)
    with GLIBC_TUNABLES set, when `wants_relaunch`.

    Returns (doing nothing) otherwise. Call it before any work is done: the process is replaced."""
    if not wants_relaunch(os.environ, sys.platform, installed_distributions()):
        return
    environ = {**os.environ, "GLIBC_TUNABLES": GLIBC_TUNABLES}
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *python_args], environ)
    except OSError:  # cannot start again (no interpreter path): run as we are, only slower
        return
