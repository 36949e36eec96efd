"""`rlmt-jax plot RUN_DIR [RUN_DIR ...]`: PNG curves of runs' metrics.jsonl.

Draws the reward (mean, with a band of one standard deviation), KL, entropy, the response / plan / answer
lengths and the format-valid rate, plus any `--keys`, each against the step: the raw values faint, a
trailing moving average over them bold. Several runs are overlaid on the same axes, one colour each, named
in a legend. Writes one PNG per panel and `summary.png` with all panels in a grid. Default metrics no run
logged are skipped with a note; null (non-finite) values are gaps. Needs matplotlib:
`pip install 'rlmt-jax[plot]'`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlmt_jax.core.errors import UserError
from rlmt_jax.run.metrics import METRICS_FILE, RECORD_KEYS


@dataclass(frozen=True)
class Panel:
    """One plot: its file name (no extension), title, the metrics drawn, and an optional band key (± value)."""

    name: str
    title: str
    keys: tuple[str, ...]
    band: str | None = None
    ylabel: str | None = None  # None: the metric's name


DEFAULT_PANELS = (
    Panel("reward", "reward mean", ("reward_mean",), band="reward_std", ylabel="reward"),
    Panel("kl", "KL to the reference", ("kl",), ylabel="KL per token"),
    Panel("entropy", "entropy", ("entropy",), ylabel="entropy (nats per token)"),
    Panel("lengths", "mean length (tokens)", ("response_tokens_mean", "plan_tokens_mean", "answer_tokens_mean"),
          ylabel="tokens"),
    Panel("format_valid_rate", "format-valid rate", ("format_valid_rate",), ylabel="fraction of outputs"),
)


@dataclass(frozen=True)
class Run:
    """One run's metrics: its label in legends (the path as given), steps [n] and {key: values [n]}."""

    label: str
    steps: np.ndarray
    series: dict[str, np.ndarray]


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="PNG curves of a run's metrics (reward, KL, entropy, lengths, format-valid rate)",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories holding metrics.jsonl; several are overlaid on the same axes")
    parser.add_argument("--out", metavar="DIR",
                        help="where the PNGs go (default RUN_DIR/plots for one run, ./plots for several)")
    parser.add_argument("--keys", nargs="+", default=[], metavar="KEY",
                        help="more metrics to plot, one panel each (e.g. loss grad_norm lr)")
    parser.add_argument("--smooth", type=int, default=None, metavar="N",
                        help="moving-average window in logged steps (default: about 1/20 of the run; 1: off)")
    parser.set_defaults(func=run)


# ---------------------------------------------------------------------------------------------------------
# Reading


def read_metrics(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(steps [n], {key: values [n]}) from a metrics.jsonl, sorted by step; null or absent values are NaN.

    A step logged twice keeps its last line. An unreadable last line (the run is writing it) is skipped.
    """
    if not path.is_file():
        raise UserError(f"{path}: no such file (has the run logged a step yet?)")
    lines = [(number, line) for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if line.strip()]
    if not lines:
        raise UserError(f"{path}: is empty, the run has logged no steps yet")
    records: dict[int, dict] = {}
    for index, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
            step = record["step"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            if index == len(lines) - 1 and index > 0:
                print(f"note: {path} line {number} is incomplete; skipped", file=sys.stderr)
                continue
            raise UserError(f"{path} line {number}: not a metrics record with a step ({err})") from err
        records[int(step)] = record
    steps = np.array(sorted(records), dtype=np.int64)
    keys = sorted({key for record in records.values() for key in record if key not in RECORD_KEYS})
    series = {}
    for key in keys:
        series[key] = np.array([_as_float(records[int(step)].get(key)) for step in steps], dtype=np.float64)
    return steps, series


def _as_float(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan  # null, or a value that is not a number
    return float(value)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last `window` finite values: out[i] = mean(finite values[max(0, i-w+1)..i]).

    values: [n] with NaN gaps; out: [n], NaN where values[i] is NaN or no finite value is in the window.
    """
    finite = np.isfinite(values)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])  # sums[i] = sum of values[:i]
    counts = np.concatenate([[0], np.cumsum(finite)])
    end = np.arange(1, len(values) + 1)
    start = np.maximum(end - window, 0)
    n = counts[end] - counts[start]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (sums[end] - sums[start]) / n
    return np.where(finite & (n > 0), out, np.nan)


def default_window(num_points: int) -> int:
    """A light smoothing: about 1/20 of the points, at least 1 (no smoothing)."""
    return max(1, num_points // 20)


def panels_to_draw(series: dict[str, np.ndarray], extra_keys: list[str]) -> tuple[list[Panel], list[str]]:
    """(panels with data, notes about skipped defaults). A --keys metric that is not in the run is an error.
    Several runs: `series` holds each key's values of all runs one after another."""
    present = {key for key, values in series.items() if np.isfinite(values).any()}
    missing = [key for key in extra_keys if key not in series]
    if missing:
        raise UserError(f"metric {', '.join(repr(k) for k in missing)} is not in {METRICS_FILE}; "
                        f"its metrics are: {', '.join(sorted(series)) or 'none'}")
    panels, notes = [], []
    for panel in DEFAULT_PANELS:
        keys = tuple(key for key in panel.keys if key in present)
        absent = [key for key in panel.keys if key not in present]
        if absent:
            notes.append(f"note: no values of {', '.join(absent)} in {METRICS_FILE}; "
                         + ("panel skipped" if not keys else "left out of the panel"))
        if keys:
            panels.append(Panel(panel.name, panel.title, keys, panel.band if panel.band in present else None,
                                panel.ylabel))
    drawn = {key for panel in panels for key in panel.keys}
    for key in dict.fromkeys(extra_keys):
        if key not in drawn:
            panels.append(Panel(key, key, (key,)))
            drawn.add(key)
    if not panels:
        raise UserError(f"none of the default metrics has values in {METRICS_FILE}; pick some with --keys "
                        f"(its metrics are: {', '.join(sorted(series)) or 'none'})")
    return panels, notes


def all_series(runs: list[Run]) -> dict[str, np.ndarray]:
    """Every key of any run, with the values of all runs one after another (NaN where a run lacks it)."""
    keys = sorted({key for run in runs for key in run.series})
    return {key: np.concatenate([run.series.get(key, np.full(len(run.steps), np.nan)) for run in runs])
            for key in keys}


# ---------------------------------------------------------------------------------------------------------
# Drawing


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise UserError(
            "plotting needs matplotlib, which is not installed: pip install 'rlmt-jax[plot]'"
        ) from err
    return Figure


def draw_panel(ax, runs: list[Run], panel: Panel, window: int) -> None:
    """One run: a colour per metric. Several runs: a colour per run (and a line style per metric), each run
    named in the legend; a run without a metric of the panel is left out of it."""
    styles = ("-", "--", ":", "-.")
    labelled = False
    for run_index, run in enumerate(runs):
        for key_index, key in enumerate(panel.keys):
            if key not in run.series:
                continue
            steps, values = run.steps, run.series[key]
            color = f"C{run_index if len(runs) > 1 else key_index}"
            style = styles[key_index % len(styles)] if len(runs) > 1 else "-"
            names = ([run.label] if len(runs) > 1 else []) + ([key] if len(panel.keys) > 1 else [])
            label = " ".join(names) or None
            labelled = labelled or label is not None
            if panel.band is not None and panel.band in run.series:
                spread = run.series[panel.band]
                ax.fill_between(steps, values - spread, values + spread, color=color, alpha=0.12, linewidth=0)
            if window > 1:
                ax.plot(steps, values, color=color, linestyle=style, alpha=0.3, linewidth=0.8)
                ax.plot(steps, moving_average(values, window), color=color, linestyle=style, linewidth=1.8,
                        label=label)
            else:
                ax.plot(steps, values, color=color, linestyle=style, linewidth=1.5, label=label)
            if np.isfinite(values).sum() == 1:  # a single point draws no line
                ax.plot(steps, values, "o", color=color)
    ax.set_title(panel.title + (f" ± {panel.band.removeprefix('reward_')}" if panel.band else ""), fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel or panel.keys[0])
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, alpha=0.3)
    if labelled:
        ax.legend(fontsize=8)


def read_run(run_dir: str) -> Run:
    if not Path(run_dir).is_dir():
        raise UserError(f"run directory {run_dir}: no such directory")
    steps, series = read_metrics(Path(run_dir) / METRICS_FILE)
    return Run(run_dir, steps, series)


def run(args: argparse.Namespace) -> int:
    if args.smooth is not None and args.smooth < 1:
        raise UserError(f"--smooth must be >= 1 (1: no smoothing), got {args.smooth}")
    runs = [read_run(run_dir) for run_dir in args.run_dirs]
    panels, notes = panels_to_draw(all_series(runs), args.keys)
    Figure = _figure_class()
    for note in notes:
        print(note, file=sys.stderr)
    longest = max(len(r.steps) for r in runs)
    window = args.smooth or default_window(longest)
    out_dir = Path(args.out) if args.out else Path(args.run_dirs[0]) / "plots" if len(runs) == 1 else Path("plots")
    out_dir.mkdir(parents=True, exist_ok=True)

    written = []
    for panel in panels:
        fig = Figure(figsize=(6, 3.6), layout="constrained")
        draw_panel(fig.add_subplot(), runs, panel, window)
        written.append(out_dir / f"{panel.name}.png")
        fig.savefig(written[-1], dpi=110)
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(5 * columns, 3.2 * rows), layout="constrained")
    for index, panel in enumerate(panels):
        draw_panel(fig.add_subplot(rows, columns, index + 1), runs, panel, window)
    smoothing = f", moving average over {window}" if window > 1 else ""
    if len(runs) == 1:
        title = f"{Path(runs[0].label).resolve().name}: {longest} step{'s' if longest > 1 else ''} logged"
    else:
        title = f"{len(runs)} runs: {', '.join(r.label for r in runs)}"
    fig.suptitle(title + smoothing)
    written.append(out_dir / "summary.png")
    fig.savefig(written[-1], dpi=90)
    for path in written:
        print(path)
    return 0
