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


@pytest.mark.parametrize("text", ["", '{"pid": 12', "[1, 2]", '{"since": "earlier"}', '{"pid": "x", "host": 3}'])
def test_an_empty_or_garbled_lock_names_no_live_owner_and_is_taken_over(tmp_path, text, caplog):
    """A lock left empty by a start on a full disk blocked the run dir for 10 minutes ('in use by process None on
    host None')."""
    (tmp_path / LOCK_NAME).write_text(text)
    lock = RunLock(tmp_path)
    with caplog.at_level("WARNING", logger="rlmt_jax.run.lock"):
        lock.acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert "names no owner" in caplog.text
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_lock_that_cannot_be_written_is_one_error_naming_it_and_leaves_no_empty_lock(tmp_path, monkeypatch):
    """A full disk at start: the error names the lock file, and no empty lock is left to block the next start."""
    import errno

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(json, "dump", full_disk)
    with pytest.raises(UserError) as err:
        RunLock(tmp_path).acquire()
    assert str(err.value) == f"cannot write {tmp_path / LOCK_NAME} (No space left on device); nothing was written"
    assert os.listdir(tmp_path) == []


def test_the_lock_file_is_never_seen_half_written(tmp_path, monkeypatch):
    """The record is written beside the lock and linked into place: while it is written, no run.lock exists."""
    seen = []
    dump = json.dump

    def watching_dump(record, f):
        seen.append((tmp_path / LOCK_NAME).exists())
        dump(record, f)

    monkeypatch.setattr(json, "dump", watching_dump)
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.release()
    assert seen == [False] and os.listdir(tmp_path) == []
