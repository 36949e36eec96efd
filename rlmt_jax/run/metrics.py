"""Where a run's numbers go: metrics.jsonl, samples.jsonl, TensorBoard, W&B, and a progress line on stderr.

    logger = MetricsLogger(run_dir, next_step=restored_step + 1, total_steps=cfg.run.total_steps,
                           tensorboard=cfg.logging.tensorboard, wandb_project=cfg.logging.wandb_project)
    logger.log(step, {"reward_mean": 0.41, "kl": 2e-3, ...})      # one JSON line, TB scalars, W&B, progress
    logger.samples(step, [{"prompt": ..., "plan": ..., "answer": ..., "reward": ...}])
    logger.close()

RUN_DIR/metrics.jsonl holds one object per logged step, `{"step": 12, "time": <unix s>, <key>: <float>}`,
flushed line by line. A non-finite value is written as `null` (NaN is not JSON), the record lists the
affected keys under `"nonfinite"`, a note says so on stderr, and TensorBoard and W&B skip the value.
On resume, lines with a step >= `next_step` are dropped from both JSONL files first, so they agree with
the checkpoint the run continues from; TensorBoard is told the same with its purge step. Only process 0
writes anything; on other processes every method does nothing.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import warnings
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from rlmt_jax.core.files import atomic_write

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"
RECORD_KEYS = ("step", "time", "nonfinite")  # what a metrics.jsonl line holds besides the metrics
ETA_WINDOW = 20  # recent step intervals the ETA takes the median of


# ---------------------------------------------------------------------------------------------------------
# JSON values


def scalar(value: Any) -> float:
    """A scalar (Python, numpy or jax; any shape with one element) as a Python float.

    A float32 or bfloat16 value keeps its shortest decimal form (0.1, not 0.10000000149011612).
    """
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"has shape {array.shape}, not one value")
    item = array.reshape(())[()]
    return float(str(item)) if array.dtype.kind == "f" else float(item)


def jsonable(value: Any) -> Any:
    """`value` with numpy / jax scalars and arrays made plain Python, and non-finite floats made None."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, bool)) or value is None:
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if hasattr(value, "dtype") and getattr(value, "size", 0) == 1 and value.dtype.kind == "f":
        return jsonable(scalar(value))
    if hasattr(value, "tolist"):  # numpy and jax arrays and scalars
        return jsonable(value.tolist())
    return str(value)


def truncate_jsonl(path: Path, next_step: int) -> int:
    """Drops the lines of a JSONL file whose `step` is >= `next_step`, and unreadable (torn) lines.

    The file is rewritten through a temporary file and a rename, so a kill leaves the old or the new
    file, never half of one. Returns how many lines were dropped; a missing file drops nothing.
    """
    if not path.exists():
        return 0
    kept, dropped = [], 0
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                step = json.loads(line)["step"]
            except (json.JSONDecodeError, KeyError, TypeError):
                dropped += 1  # a line cut short when the previous run was killed mid-write
                continue
            if isinstance(step, int) and step < next_step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        with atomic_write(path) as out:
            out.writelines(kept)
    return dropped


def _is_process_zero() -> bool:
    import jax

    return jax.process_index() == 0


# ---------------------------------------------------------------------------------------------------------
# The progress line


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def _number(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"


def progress_line(
    step: int,
    total_steps: int | None,
    metrics: Mapping[str, float],
    seconds_per_step: float | None,
    bar_width: int = 0,
) -> str:
    """One compact line: step/total, a bar (bar_width > 0), reward, KL, tokens/s, time split, ETA.

    Keys absent from `metrics` are left out of the line.
    """
    parts = []
    if total_steps:
        frac = min(max(step / total_steps, 0.0), 1.0)
        width = len(str(total_steps))
        head = f"step {step:>{width}}/{total_steps} {frac:4.0%}"
        if bar_width > 0:
            filled = int(frac * bar_width)
            head += " [" + "#" * filled + "-" * (bar_width - filled) + "]"
        parts.append(head)
    else:
        parts.append(f"step {step}")
    scores = [f"{label} {_number(metrics[key])}" for label, key in
              (("reward", "reward_mean"), ("kl", "kl"), ("valid", "format_valid_rate"), ("loss", "loss"))
              if key in metrics and not (key == "loss" and "reward_mean" in metrics)]
    if scores:
        parts.append(" ".join(scores))
    if "tokens_per_s" in metrics and math.isfinite(metrics["tokens_per_s"]):
        parts.append(f"{metrics['tokens_per_s']:,.0f} tok/s")
    split = [f"{label} {metrics[key]:.1f}s" for label, key in
             (("sample", "time_sample_s"), ("engine", "time_engine_sample_s"), ("score", "time_score_s"),
              ("update", "time_update_s"))
             if key in metrics and math.isfinite(metrics[key])]
    if split:
        parts.append(" ".join(split))
    if total_steps and seconds_per_step is not None and step < total_steps:
        parts.append(f"ETA {_duration(seconds_per_step * (total_steps - step))}")
    return " | ".join(parts)


class Progress:
    """Prints `progress_line` for each step to `stream`.

    On a terminal the line redraws itself in place (carriage return, cut to the terminal width); anywhere
    else (CI logs, files) each step is one plain line, with no carriage returns.
    """

    def __init__(self, stream: TextIO, total_steps: int | None):
        self.stream = stream
        self.total_steps = total_steps
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self._drawn = False  # a redrawable line is on screen

    def show(self, step: int, metrics: Mapping[str, float], seconds_per_step: float | None) -> None:
        if self.tty:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            line = progress_line(step, self.total_steps, metrics, seconds_per_step, bar_width=20)
            self.stream.write("\r" + line[:width].ljust(width))
            self._drawn = True
        else:
            self.stream.write(progress_line(step, self.total_steps, metrics, seconds_per_step) + "\n")
        self.stream.flush()

    def note(self, message: str) -> None:
        """A message on its own line, without breaking the progress line."""
        self.end()
        self.stream.write(message + "\n")
        self.stream.flush()

    def end(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


# ---------------------------------------------------------------------------------------------------------
# TensorBoard and W&B: each gets the finite scalars of a step


class _TensorBoard:
    """TensorBoard scalars under RUN_DIR/tensorboard."""

    def __init__(self, run_dir: Path, next_step: int):
        from tensorboardX import SummaryWriter

        # purge_step: TensorBoard hides events of an earlier run at steps >= next_step.
        self._writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=next_step, flush_secs=30)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self._writer.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        self._writer.close()


class _WandB:
    """A W&B run; its id is kept in RUN_DIR so a resumed run continues the same W&B run."""

    def __init__(self, run: Any):
        self._run = run

    @classmethod
    def start(cls, run_dir: Path, project: str, config: Mapping[str, Any] | None) -> _WandB | None:
        """The run of `project`, or None with a warning when `wandb` is not installed."""
        try:
            import wandb
        except ImportError:
            warnings.warn(
                f"W&B logging was asked for (project {project!r}) but `wandb` is not installed: "
                "`pip install wandb` to use it; logging to metrics.jsonl and TensorBoard only.",
                stacklevel=3,  # the line that made the MetricsLogger
            )
            return None
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
        id_file.write_text(run_id + "\n")
        return cls(wandb.init(
            project=project, id=run_id, resume="allow", dir=str(run_dir),
            name=run_dir.name, config=dict(config or {}),
        ))

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self._run.log(values, step=step)

    def close(self) -> None:
        self._run.finish()


# ---------------------------------------------------------------------------------------------------------
# The logger


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The metrics as Python floats; ValueError for a reserved name, TypeError for a value that is not one number."""
    values = {}
    for key, value in metrics.items():
        if key in RECORD_KEYS:
            raise ValueError(f"metric name {key!r} is reserved for the record itself ({', '.join(RECORD_KEYS)})")
        try:
            values[key] = scalar(value)
        except (TypeError, ValueError) as err:
            raise TypeError(f"metric {key!r} is not a scalar number: {err}") from err
    return values


def _record(step: int, values: Mapping[str, float]) -> dict[str, Any]:
    """The metrics.jsonl line of a step: non-finite values as None, their keys listed under "nonfinite"."""
    nonfinite = [key for key, value in values.items() if not math.isfinite(value)]
    record: dict[str, Any] = {"step": step, "time": round(time.time(), 3)}
    record.update({key: (None if key in nonfinite else value) for key, value in values.items()})
    if nonfinite:
        record["nonfinite"] = nonfinite
    return record


class MetricsLogger:
    """The metric sinks of one run directory; see the module docstring.

    run_dir: where metrics.jsonl, samples.jsonl and tensorboard/ go (created if needed).
    next_step: the first step this run logs: lines of an earlier run with step >= next_step are dropped
        (1 on a fresh run with 1-based steps, restored step + 1 on resume).
    total_steps: for the progress line's fraction and ETA; None shows the step alone.
    tensorboard: write TensorBoard scalars under RUN_DIR/tensorboard.
    wandb_project: log to W&B too (when `wandb` is installed; a warning otherwise); `wandb_config` is
        the run's resolved config for the W&B run page. The W&B run id is kept in RUN_DIR so a resumed
        run continues the same W&B run.
    progress: print a progress line per logged step to `stream` (stderr by default).
    is_writer: whether this process writes; default: jax.process_index() == 0.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        next_step: int,
        total_steps: int | None = None,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        wandb_config: Mapping[str, Any] | None = None,
        progress: bool = True,
        stream: TextIO | None = None,
        is_writer: bool | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.enabled = _is_process_zero() if is_writer is None else is_writer
        self._last_step: int | None = None
        self._last_time = time.monotonic()
        self._intervals: deque[float] = deque(maxlen=ETA_WINDOW)
        self._intervals_seen = 0
        self._metrics_file: TextIO | None = None
        self._samples_file: TextIO | None = None
        self._scalar_sinks: list[_TensorBoard | _WandB] = []
        self._progress = Progress(stream or sys.stderr, total_steps) if progress and self.enabled else None
        if not self.enabled:
            return

        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name in (METRICS_FILE, SAMPLES_FILE):
            truncate_jsonl(self.run_dir / name, next_step)
        self._metrics_file = (self.run_dir / METRICS_FILE).open("a", encoding="utf-8")
        self._samples_file = (self.run_dir / SAMPLES_FILE).open("a", encoding="utf-8")
        if tensorboard:
            self._scalar_sinks.append(_TensorBoard(self.run_dir, next_step))
        if wandb_project:
            wandb_run = _WandB.start(self.run_dir, wandb_project, wandb_config)
            if wandb_run is not None:
                self._scalar_sinks.append(wandb_run)

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Writes the step's scalars everywhere and shows the progress line. Returns the JSON record.

        metrics: name -> scalar (float, int, numpy or jax scalar). Steps must increase.
        """
        if not self.enabled:
            return {}
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"metrics step {step} is not after the last logged step {self._last_step}")
        values = _scalars(metrics)
        record = _record(step, values)
        nonfinite = record.get("nonfinite", [])
        self._metrics_file.write(json.dumps(record, allow_nan=False) + "\n")
        self._metrics_file.flush()

        finite = {key: value for key, value in values.items() if key not in nonfinite}  # flagged above
        for sink in self._scalar_sinks:
            sink.log(step, finite)

        self._time_step(step)
        if nonfinite:
            self.note(f"step {step}: non-finite {', '.join(nonfinite)} (written as null in {METRICS_FILE})")
        if self._progress is not None:
            self._progress.show(step, values, self.seconds_per_step)
        return record

    def _time_step(self, step: int) -> None:
        now = time.monotonic()
        steps = step - self._last_step if self._last_step is not None else 1
        self._intervals.append((now - self._last_time) / max(steps, 1))
        self._intervals_seen += 1
        self._last_time, self._last_step = now, step

    @property
    def seconds_per_step(self) -> float | None:
        """The median of the recent step intervals, without the first one of this start (it compiles the
        programs: 17 s of the tiny default's 0.5 s steps); None until there is another. The median passes over a
        later step that compiles (a new prompt bucket) or saves a checkpoint."""
        intervals = list(self._intervals)
        if self._intervals_seen == len(intervals):  # the first interval is still in the window
            intervals = intervals[1:]
        return float(np.median(intervals)) if intervals else None

    def samples(self, step: int, rows: Iterable[Mapping[str, Any]]) -> None:
        """Appends rollouts (prompt, plan, answer, reward, ...) to samples.jsonl, each with its step."""
        if not self.enabled:
            return
        for row in rows:
            record = {"step": step, **jsonable(dict(row))}
            self._samples_file.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
        self._samples_file.flush()

    def note(self, message: str) -> None:
        """A message on stderr (process 0 only) that does not break the progress line."""
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.note(message)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        """Flushes and closes every sink; the logger does nothing afterwards. Safe to call twice."""
        if not self.enabled:
            return
        self.enabled = False
        for file in (self._metrics_file, self._samples_file):
            file.close()
        for sink in self._scalar_sinks:
            sink.close()
        if self._progress is not None:
            self._progress.end()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
