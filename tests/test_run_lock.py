"""The run dir lock: refused while its owner lives, taken over when the owner is gone or its lock is stale."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from rlmt_jax.core.errors import UserError
from rlmt_jax.run.lock import LOCK_NAME, STALE_AFTER_S, RunLock


def write_lock(run_dir, **record):
    run_dir.mkdir(exist_ok=True)
    (run_dir / LOCK_NAME).write_text(json.dumps({"since": "earlier", **record}))


def test_a_live_owner_on_this_host_is_refused_and_its_lock_kept(tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path, pid=owner.pid, host=socket.gethostname())
        with pytest.raises(UserError, match=f"is in use by process {owner.pid} on this host"):
            RunLock(tmp_path).acquire()
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == owner.pid
    finally:
        owner.kill()
        owner.wait()
    lock = RunLock(tmp_path)  # the owner is gone: taken over
    lock.acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process start times come from /proc")
def test_a_reused_pid_is_told_apart_by_its_start_time(tmp_path):
    write_lock(tmp_path, pid=os.getppid(), host=socket.gethostname(), start="1")  # alive, but started at tick 1
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.release()


def test_another_hosts_lock_is_refused_until_it_is_stale(tmp_path):
    write_lock(tmp_path, pid=1234, host="other-worker")
    with pytest.raises(UserError, match=r"in use by process 1234 on host other-worker .*delete .*run.lock"):
        RunLock(tmp_path).acquire()
    old = time.time() - STALE_AFTER_S - 1
    os.utime(tmp_path / LOCK_NAME, (old, old))
    lock = RunLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == socket.gethostname()
    lock.release()
