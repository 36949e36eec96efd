"""One run per run dir: a lock file `RUN_DIR/run.lock` holding the owner's pid, host and process start.

A second trainer on the same run dir is refused while the owner lives. A lock whose owner is gone is taken
over (with a warning): on this host when its pid no longer runs (or runs another program, told by the
process start time); from another host only when the lock has not been refreshed for STALE_AFTER_S
seconds (the owner touches it every REFRESH_S seconds from a thread, whatever its step takes). A lock
left by an earlier trainer of the same process (one that was never run) is taken over. A lock from another
host that is fresher is refused with a message naming that host; delete the file by hand
if that host is known to be gone.

The lock file appears complete or not at all: the record is written to a file beside it and hard-linked into
place (a link fails when the lock exists, as O_EXCL does). So a lock that is empty, not JSON or names no pid
and host (left by a start that failed half-way, e.g. on a full disk, by an older rlmt-jax) has no live owner:
it is taken over with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time

from rlmt_jax.core.errors import UserError
from rlmt_jax.core.files import temp_path_beside

log = logging.getLogger(__name__)
LOCK_NAME = "run.lock"
REFRESH_S = 60.0
STALE_AFTER_S = 600.0
# link(2) errors of a filesystem without hard links (some FUSE and network mounts): the lock is created in place.
NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV)


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux /proc), to tell a reused pid from the owner; None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return start is None or _process_start(pid) in (None, start)


class RunDirInUse(UserError):
    """Another live trainer holds the run dir."""


class RunLock:
    """The lock of one run dir; `acquire()` takes it or raises UserError, `release()` gives it back."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = os.path.join(os.fspath(run_dir), LOCK_NAME)
        self.host = socket.gethostname()
        self.record = {"pid": os.getpid(), "host": self.host, "start": _process_start(os.getpid()),
                       "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        run_dir = os.path.dirname(self.path)
        if os.path.exists(run_dir) and not os.path.isdir(run_dir):
            raise UserError(f"run.output_dir {run_dir}: exists and is not a directory")
        try:
            os.makedirs(run_dir, exist_ok=True)
        except OSError as err:
            raise UserError(f"run.output_dir {run_dir}: cannot be created ({err.strerror})") from None
        for _ in range(3):
            try:
                created = self._create()
            except OSError as err:
                raise UserError(f"cannot write {self.path} ({err.strerror}); nothing was written") from None
            if not created:
                self._take_over_if_stale()
                continue
            self._thread = threading.Thread(target=self._refresh, name="rlmt-run-lock", daemon=True)
            self._thread.start()
            return
        raise UserError(f"{self.path}: another process keeps taking this run dir's lock")

    def _create(self) -> bool:
        """Writes the lock file holding this process's record, whole or not at all (an OSError then); False
        when a lock file exists."""
        tmp = temp_path_beside(self.path)
        try:
            self._write(tmp)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return False
            except OSError as err:
                if err.errno not in NO_HARD_LINKS:
                    raise
                return self._create_in_place()
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _create_in_place(self) -> bool:
        """`_create` where hard links are not supported: O_EXCL, and the file removed again if writing fails."""
        try:
            self._write(self.path)
        except FileExistsError:
            return False
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            raise
        return True

    def _write(self, path: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(self.record, f)

    def _take_over_if_stale(self) -> None:
        try:
            seen = os.stat(self.path)
        except FileNotFoundError:
            return  # released meanwhile: try again
        except OSError as err:
            raise UserError(f"{self.path}: cannot read this run dir's lock ({err.strerror})") from None
        try:
            with open(self.path) as f:
                owner = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError):  # unreadable, empty or not JSON: it names no owner
            owner = None
        age = time.time() - seen.st_mtime
        pid, host = (owner.get("pid"), owner.get("host")) if isinstance(owner, dict) else (None, None)
        if not isinstance(pid, int) or not isinstance(host, str):
            log.warning("taking over the lock of %s, which names no owner (empty or unreadable: left by a start "
                        "that failed, e.g. on a full disk)", self.path)
        elif host == self.host and pid == os.getpid():
            log.warning("taking over the lock of %s from an earlier trainer of this process", self.path)
        elif host == self.host:
            if _alive(pid, owner.get("start")):
                raise RunDirInUse(f"run dir {os.path.dirname(self.path)} is in use by process {pid} on this host "
                                  f"(since {owner.get('since')}); wait for it to end, stop it, or use another "
                                  "run.output_dir")
            log.warning("taking over the lock of %s from process %s on %s, which is gone", self.path, pid, host)
        elif age < STALE_AFTER_S:
            raise RunDirInUse(f"run dir {os.path.dirname(self.path)} is in use by process {pid} on host {host} "
                              f"(its lock was refreshed {age:.0f} s ago); if that host is gone, wait "
                              f"{STALE_AFTER_S - age:.0f} s or delete {self.path}")
        else:
            log.warning("taking over the lock of %s from process %s on %s, which is gone", self.path, pid, host)
        try:
            if os.stat(self.path).st_ino == seen.st_ino:  # not a lock another process took meanwhile
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as err:
            raise UserError(f"{self.path}: cannot take over this stale lock ({err.strerror}); delete it") from None

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is None:
            return
        self._thread = None
        try:
            with open(self.path) as f:
                mine = json.load(f).get("pid") == os.getpid()
        except (OSError, ValueError):
            return
        if mine:
            os.unlink(self.path)
