"""Worker processes that form one JAX cluster on this machine (simulated CPU devices), for multi-host tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def simulated_devices(count: int) -> dict[str, str]:
    """The environment of a test subprocess whose JAX sees `count` CPU devices: this session's environment with
    its XLA_FLAGS (tests/conftest.py) and the device count."""
    kept = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
            if not flag.startswith("--xla_force_host_platform_device_count")]
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=" ".join([*kept, f"--xla_force_host_platform_device_count={count}"]))


def start_cluster(worker: str, processes: int, devices_per_process: int, payload: dict) -> list[subprocess.Popen]:
    """`processes` runs of tests/<worker> forming one cluster; each gets `payload` with its process_id,
    num_processes and the coordinator's port as its one JSON argument."""
    env = simulated_devices(devices_per_process)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    port = free_port()
    return [
        subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / worker),
             json.dumps({**payload, "process_id": i, "num_processes": processes, "port": port})],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(processes)
    ]


def finish_all(workers: list[subprocess.Popen], timeout_s: float) -> dict[subprocess.Popen, tuple[str, str]]:
    """Each worker's (stdout, stderr). A worker that fails, or workers still running after `timeout_s` (a
    process stuck in a collective never exits by itself), fail the test, every worker still running killed."""
    deadline, outputs = time.monotonic() + timeout_s, {}
    try:
        for worker in workers:
            outputs[worker] = worker.communicate(timeout=max(deadline - time.monotonic(), 1))
            assert worker.returncode == 0, outputs[worker][1][-4000:]
    except subprocess.TimeoutExpired:
        pytest.fail(f"the workers did not finish in {timeout_s} s (a deadlock between the processes?)")
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.communicate()
    return outputs


def last_json_line(text: str) -> dict:
    """A worker's summary: the last line it printed."""
    return json.loads(text.strip().splitlines()[-1])
