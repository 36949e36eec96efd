"""`rlmt-jax plot`: PNG curves from metrics.jsonl, tolerant of missing keys and nulls, clear errors."""

import json
import math
import sys

import numpy as np
import pytest

from rlmt_jax.cli import main
from rlmt_jax.commands.plot import moving_average, read_metrics


def write_metrics(run_dir, records):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def grpo_records(steps=40):
    records = []
    for step in range(1, steps + 1):
        records.append({
            "step": step, "time": 1.7e9 + step,
            "reward_mean": -1.0 + 1.5 * (1 - math.exp(-step / 10)), "reward_std": 0.3,
            "kl": None if step == 20 else 1e-3 * step, "entropy": 2.0 - 0.02 * step,
            "format_valid_rate": min(1.0, 0.1 + step / 30), "response_tokens_mean": 40 - step / 4,
            "plan_tokens_mean": 10 + step / 8, "answer_tokens_mean": 20.0, "loss": math.sin(step),
            **({"nonfinite": ["kl"]} if step == 20 else {}),
        })
    return records


def png_pixels(path):
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(path).convert("RGB"))


def test_moving_average_is_a_trailing_mean_over_finite_values():
    values = np.array([1.0, 2.0, 3.0, np.nan, 5.0, 6.0])
    # windows of 3: [1], [1,2], [1,2,3], gap, [3,5] (NaN skipped), [5,6]
    np.testing.assert_allclose(moving_average(values, 3), [1.0, 1.5, 2.0, np.nan, 4.0, 5.5])
    np.testing.assert_allclose(moving_average(values, 1), values)
    np.testing.assert_allclose(moving_average(np.array([2.0, 4.0]), 10), [2.0, 3.0])


def test_read_metrics_sorts_steps_keeps_the_last_duplicate_and_reads_null_as_nan(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2, "kl": null, "loss": 2.0, "nonfinite": ["kl"]}\n'
                    '{"step": 1, "kl": 0.5, "loss": 1.0}\n'
                    '{"step": 2, "kl": 0.25, "loss": 3.0, "entropy": 1.5}\n'
                    '{"step": 3, "kl": 0.1')  # being written by the run
    steps, series = read_metrics(path)
    assert steps.tolist() == [1, 2]
    assert sorted(series) == ["entropy", "kl", "loss"]
    np.testing.assert_array_equal(series["kl"], [0.5, 0.25])
    np.testing.assert_array_equal(series["loss"], [1.0, 3.0])
    np.testing.assert_array_equal(series["entropy"], [np.nan, 1.5])
    assert "line 4 is incomplete; skipped" in capsys.readouterr().err


def test_plot_writes_one_png_per_panel_and_a_summary_grid(tmp_path, capsys):
    write_metrics(tmp_path / "run", grpo_records())
    assert main(["plot", str(tmp_path / "run"), "--keys", "loss", "kl"]) == 0
    names = ["reward", "kl", "entropy", "lengths", "format_valid_rate", "loss", "summary"]
    out = capsys.readouterr().out.split()
    assert out == [str(tmp_path / "run" / "plots" / f"{name}.png") for name in names]
    reward = png_pixels(tmp_path / "run" / "plots" / "reward.png")
    assert reward.shape == (396, 660, 3)  # 6 x 3.6 inches at 110 dpi
    # the curve is drawn in matplotlib's first colour, C0 = #1f77b4
    assert (np.abs(reward.astype(int) - [0x1F, 0x77, 0xB4]).sum(axis=-1) < 30).sum() > 500
    summary = png_pixels(tmp_path / "run" / "plots" / "summary.png")
    assert summary.shape[1] > summary.shape[0]  # a 3 x 2 grid is wider than tall


def test_plot_skips_default_metrics_the_run_did_not_log_with_a_note(tmp_path, capsys):
    records = [{"step": s, "reward_mean": s / 10, "loss": 1.0 / s, "plan_tokens_mean": None} for s in range(1, 6)]
    write_metrics(tmp_path / "run", records)
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "png"), "--smooth", "2"]) == 0
    captured = capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["reward.png", "summary.png"]
    assert "no values of kl in metrics.jsonl; panel skipped" in captured.err
    assert ("no values of response_tokens_mean, plan_tokens_mean, answer_tokens_mean in metrics.jsonl; "
            "panel skipped") in captured.err
    assert not (tmp_path / "run" / "plots").exists()


def test_plot_of_a_single_step_draws_a_point(tmp_path):
    write_metrics(tmp_path / "run", [{"step": 1, "reward_mean": 0.5, "reward_std": None}])
    assert main(["plot", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "plots" / "reward.png").stat().st_size > 0


@pytest.mark.parametrize("setup, message", [
    (lambda run: None, "run directory {run}: no such directory"),
    (lambda run: run.mkdir(), "{run}/metrics.jsonl: no such file (has the run logged a step yet?)"),
    (lambda run: write_metrics(run, []), "{run}/metrics.jsonl: is empty, the run has logged no steps yet"),
    (lambda run: (run.mkdir(), (run / "metrics.jsonl").write_text('{"loss": 1}\n{"step": 2}\n')),
     "{run}/metrics.jsonl line 1: not a metrics record with a step"),
    (lambda run: write_metrics(run, [{"step": 1, "loss": 1.0}]),
     "none of the default metrics has values in metrics.jsonl; pick some with --keys (its metrics are: loss)"),
], ids=["no-run-dir", "no-metrics-file", "empty-metrics-file", "record-without-step", "no-default-metric"])
def test_plot_errors_name_what_is_wrong(tmp_path, capsys, setup, message):
    run = tmp_path / "run"
    setup(run)
    assert main(["plot", str(run)]) == 2
    assert message.format(run=run) in capsys.readouterr().err


def test_plot_of_a_key_the_run_did_not_log_lists_the_keys_it_has(tmp_path, capsys):
    write_metrics(tmp_path / "run", [{"step": 1, "reward_mean": 0.5, "loss": 1.0}])
    assert main(["plot", str(tmp_path / "run"), "--keys", "grad_norm", "loss"]) == 2
    assert ("metric 'grad_norm' is not in metrics.jsonl; its metrics are: loss, reward_mean"
            in capsys.readouterr().err)
    assert not (tmp_path / "run" / "plots").exists()


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    write_metrics(tmp_path / "run", grpo_records(3))
    assert main(["plot", str(tmp_path / "run")]) == 2
    assert "plotting needs matplotlib, which is not installed: pip install 'rlmt-jax[plot]'" in (
        capsys.readouterr().err)


def test_every_panel_names_its_y_axis(tmp_path):
    from matplotlib.figure import Figure

    from rlmt_jax.commands.plot import Run, all_series, draw_panel, panels_to_draw

    write_metrics(tmp_path / "run", grpo_records(5))
    steps, series = read_metrics(tmp_path / "run" / "metrics.jsonl")
    runs = [Run("run", steps, series)]
    panels, _ = panels_to_draw(all_series(runs), ["loss"])
    labels = {}
    for panel in panels:
        ax = Figure().add_subplot()
        draw_panel(ax, runs, panel, window=1)
        labels[panel.name] = ax.get_ylabel()
    assert labels == {"reward": "reward", "kl": "KL per token", "entropy": "entropy (nats per token)",
                      "lengths": "tokens", "format_valid_rate": "fraction of outputs", "loss": "loss"}


def test_plot_of_several_runs_overlays_them_on_the_same_axes_with_a_legend(tmp_path, capsys, monkeypatch):
    from matplotlib.figure import Figure

    write_metrics(tmp_path / "runs" / "a", grpo_records(10))
    # run b is shorter and never logged the lengths
    write_metrics(tmp_path / "runs" / "b", [{k: v for k, v in r.items() if "tokens" not in k}
                                            for r in grpo_records(6)])
    axes, add_subplot = [], Figure.add_subplot

    def keep_axes(fig, *args):
        axes.append(add_subplot(fig, *args))
        return axes[-1]

    monkeypatch.setattr(Figure, "add_subplot", keep_axes)
    monkeypatch.chdir(tmp_path)
    assert main(["plot", "runs/a", "runs/b", "--smooth", "1"]) == 0
    out = capsys.readouterr().out.split()
    assert out[0] == "plots/reward.png" and out[-1] == "plots/summary.png"
    reward, lengths = axes[0], axes[3]  # panels drawn alone: reward, kl, entropy, lengths, format_valid_rate
    assert [text.get_text() for text in reward.get_legend().get_texts()] == ["runs/a", "runs/b"]
    a, b = reward.get_lines()
    assert (a.get_xdata().tolist(), b.get_xdata().tolist()) == (list(range(1, 11)), list(range(1, 7)))
    np.testing.assert_allclose(b.get_ydata(), [r["reward_mean"] for r in grpo_records(6)])
    assert (a.get_color(), b.get_color()) == ("C0", "C1")
    assert [text.get_text() for text in lengths.get_legend().get_texts()] == [
        "runs/a response_tokens_mean", "runs/a plan_tokens_mean", "runs/a answer_tokens_mean"]
    assert png_pixels(tmp_path / "plots" / "reward.png").shape == (396, 660, 3)
