"""What a compiled XLA program moves between devices inside its while loops, read from its HLO text.

    loops = while_loop_collectives(compiled.as_text())
    loops[0].bytes_per_iteration, loops[0].ops   # collectives run once per iteration of that loop

A collective (all-gather, all-reduce, reduce-scatter, all-to-all, collective-permute; the async `-start` form
counted once, its `-done` not) costs the larger of its operands' and its result's bytes: what one device sends
or ends up with. Collectives in computations the body calls count too, those in a nested while loop (a scan
over layers) times its known trip count.
"""

from __future__ import annotations

import dataclasses
import math
import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
            "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_HEADER = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->\s*.*\{\s*$")
_OP = re.compile(r"=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")


def _bytes(text: str) -> int:
    """Bytes of every array type written in `text` (a shape, a tuple of shapes, operand lists)."""
    return sum(ITEMSIZE[dtype] * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in _ARRAY.findall(text))


@dataclasses.dataclass(frozen=True)
class Collective:
    op: str  # e.g. all-gather
    bytes: int  # the larger of its operands' and its result's bytes
    times: int  # per iteration of the outer loop (nested loops' trip counts)
    line: str


@dataclasses.dataclass(frozen=True)
class LoopCollectives:
    body: str
    ops: tuple[Collective, ...]

    @property
    def bytes_per_iteration(self) -> int:
        return sum(c.bytes * c.times for c in self.ops)

    def count(self, op: str) -> int:
        return sum(c.times for c in self.ops if c.op == op)


def computations(hlo: str) -> dict[str, list[str]]:
    """{computation name: its instruction lines} of an HLO module's text."""
    out: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(1)
            out[current] = []
        elif line.strip() == "}":
            current = None
        elif current is not None and line.strip():
            out[current].append(line.strip())
    return out


def _called(line: str) -> list[str]:
    """Computations an instruction calls (bodies, branches, fusions' and reductions' computations)."""
    names = re.findall(r"(?:calls|to_apply|body|condition|branch_computations|true_computation|"
                       r"false_computation)=\{?(%[\w.\-]+(?:,\s*%[\w.\-]+)*)", line)
    return [n.strip().lstrip("%") for group in names for n in group.split(",") if n.strip()]


def _trip_count(line: str) -> int:
    match = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
    return int(match.group(1)) if match else 1


def _collectives_in(name: str, comps: dict[str, list[str]], times: int, seen: frozenset) -> list[Collective]:
    out: list[Collective] = []
    for line in comps.get(name, []):
        match = _OP.search(line)
        if not match:
            continue
        result, op, rest = match.groups()
        base = op[: -len("-start")] if op.endswith("-start") else op
        if base in COLLECTIVES:
            operands = rest.split("),", 1)[0]
            out.append(Collective(base, max(_bytes(result), _bytes(operands)), times, line))
            continue
        if op.endswith("-done"):
            continue
        inner = times * (_trip_count(line) if op == "while" else 1)
        for callee in _called(line):
            if callee not in seen:
                out += _collectives_in(callee, comps, inner, seen | {callee})
    return out


def while_loop_collectives(hlo: str) -> list[LoopCollectives]:
    """For each outermost while loop of the entry computation: the collectives one iteration runs."""
    comps = computations(hlo)
    entry = next(name for name, _ in ((n, l) for n, l in comps.items()) if _is_entry(hlo, name))
    loops = []
    for line in comps[entry]:
        match = _OP.search(line)
        if match and match.group(2) == "while":
            body = re.search(r"body=%?([\w.\-]+)", line).group(1)
            condition = re.search(r"condition=%?([\w.\-]+)", line).group(1)
            ops = _collectives_in(body, comps, 1, frozenset({body})) + _collectives_in(
                condition, comps, 1, frozenset({condition}))
            loops.append(LoopCollectives(body, tuple(ops)))
    return loops


def _is_entry(hlo: str, name: str) -> bool:
    return re.search(rf"^ENTRY %?{re.escape(name)}\b", hlo, re.MULTILINE) is not None
