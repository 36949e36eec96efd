"""Text files written whole, with the permissions of any file the user makes.

    with atomic_write("runs/x/config.yaml") as f:
        f.write(text)

The text goes into a new file beside the target, renamed into place when the block ends, so a reader (or a
crash) sees the old file or the new one, never half of one; an error in the block leaves the old file. The
new file is created as `open(path, "w")` creates one: mode 0o666 less the process umask (0644 under umask
022, 0600 under 077). tempfile.mkstemp's files are 0600, which colleagues on a shared cluster cannot read.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from typing import TextIO


def temp_path_beside(path: str | os.PathLike) -> str:
    """A fresh hidden name in `path`'s folder: `.NAME.<pid>-<random>.tmp`."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, encoding: str = "utf-8") -> Iterator[TextIO]:
    """A text file to write `path` through (its folder is made if needed); see the module docstring."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = temp_path_beside(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
    try:
        with os.fdopen(fd, "w", encoding=encoding) as f:
            yield f
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.filename is None:  # a full disk's ENOSPC names no file: name it
            raise OSError(err.errno, err.strerror, path) from err
        raise
