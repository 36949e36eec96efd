"""JSON-lines files (and JSON lists of records) written atomically (a new file renamed into place) and read
back, with errors that name the file and line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from rlmt_jax.core.errors import UserError
from rlmt_jax.core.files import atomic_write


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Writes one JSON object per line to `path`; a crash leaves the old file (or none), never half of one.
    The file gets the process umask's permissions (rlmt_jax.core.files.atomic_write)."""
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_records_atomic(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """A JSON list of records when `path` ends in .json (what AlpacaEval reads), JSON lines otherwise; written
    as write_jsonl_atomic writes."""
    if not os.fspath(path).lower().endswith(".json"):
        write_jsonl_atomic(path, rows)
        return
    with atomic_write(path) as f:
        f.write(json.dumps(list(rows), ensure_ascii=False, indent=1) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def decode_line(raw: bytes, name: str, number: int) -> str:
    """A line of a file as text; a UserError names the file, line and first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{name} line {number}: is not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
                        f"{err.start + 1})") from None


def read_jsonl_objects(path: str | os.PathLike, label: str = "") -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a UserError names the first line that is not UTF-8 text
    or not a JSON object (`label` prefixes the path in messages, e.g. "data file")."""
    name = f"{label} '{path}'" if label else str(path)
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            line = decode_line(raw, name, number)
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


def read_records(path: str | os.PathLike, label: str = "") -> list[tuple[int, dict]]:
    """(row number, object) of a JSON list of objects (a .json file such as AlpacaEval's eval set: numbered
    from 1) or of JSON lines (numbered by line)."""
    name = f"{label} '{path}'" if label else str(path)
    with open(path, "rb") as f:
        data = f.read()
    if not data.lstrip().startswith(b"["):
        return read_jsonl_objects(path, label)
    for number, raw in enumerate(data.splitlines(), start=1):
        decode_line(raw, name, number)
    try:
        rows = json.loads(data.decode("utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{name} line {err.lineno}: not valid JSON ({err.msg})") from None
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise UserError(f"{name} row {number}: expected a JSON object, got {type(row).__name__}")
    return list(enumerate(rows, start=1))
