"""JSON-lines files written atomically (a new file renamed into place) and read back."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from rlmt_jax.errors import UserError
from rlmt_jax.files import atomic_write


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Writes one JSON object per line to `path`; a crash leaves the old file (or none), never half of one.
    The file gets the process umask's permissions (rlmt_jax.files.atomic_write)."""
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_jsonl_objects(path: str | os.PathLike, label: str = "") -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a UserError names the first line that is not a JSON
    object (`label` prefixes the path in messages, e.g. "data file")."""
    name = f"{label} '{path}'" if label else str(path)
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{name} line {number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{name} line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, row))
    return rows
