"""The run's metric sinks: metrics.jsonl and samples.jsonl content, resume truncation, non-finite values,
TensorBoard event files, W&B (present or not), the progress line, and process 0 as the only writer."""

import io
import json
import struct
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from rlmt_jax.run.metrics import MetricsLogger, jsonable, progress_line, scalar, truncate_jsonl


def read_jsonl(path):
    """Strict JSON: a NaN or Infinity token fails the test."""
    def refuse(token):
        raise AssertionError(f"invalid JSON constant {token} in {path}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def without_time(records):
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def read_tensorboard_scalars(log_dir):
    """{tag: [(step, value)]} from every event file under log_dir, read as TFRecords of Event protos."""
    scalars = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4  # length, its crc, the record, its crc
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def quiet_logger(run_dir, **kwargs):
    kwargs.setdefault("next_step", 1)
    return MetricsLogger(run_dir, progress=False, is_writer=True, **kwargs)


def test_log_appends_one_json_line_per_step_with_plain_float_values(tmp_path):
    with quiet_logger(tmp_path, tensorboard=False) as logger:
        logger.log(1, {"reward_mean": np.float32(0.1), "kl": jnp.float32(0.002), "format_valid_rate": 0.5})
        record = logger.log(2, {"reward_mean": jnp.array([0.25]), "loss": 3})
        # flushed line by line: readable before close
        assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert record["step"] == 2 and record["reward_mean"] == 0.25
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert without_time(records) == [
        {"step": 1, "reward_mean": 0.1, "kl": 0.002, "format_valid_rate": 0.5},
        {"step": 2, "reward_mean": 0.25, "loss": 3.0},
    ]
    assert records[0]["time"] <= records[1]["time"]


def test_float32_and_bfloat16_scalars_keep_their_short_decimal_form():
    assert scalar(np.float32(0.1)) == 0.1  # not 0.10000000149011612
    assert scalar(jnp.bfloat16(0.5)) == 0.5
    assert scalar(jnp.int32(7)) == 7.0
    assert scalar(np.bool_(True)) == 1.0
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        scalar(np.zeros(3))


def test_nonfinite_values_are_written_as_null_and_flagged(tmp_path):
    stream = io.StringIO()
    logger = MetricsLogger(tmp_path, next_step=1, tensorboard=False, is_writer=True, stream=stream)
    logger.log(1, {"reward_mean": 0.5, "kl": float("nan"), "loss": jnp.float32(jnp.inf), "entropy": -np.inf})
    logger.close()
    (record,) = without_time(read_jsonl(tmp_path / "metrics.jsonl"))
    assert record == {"step": 1, "reward_mean": 0.5, "kl": None, "loss": None, "entropy": None,
                      "nonfinite": ["kl", "loss", "entropy"]}
    assert "step 1: non-finite kl, loss, entropy (written as null in metrics.jsonl)" in stream.getvalue()


def test_jsonable_turns_arrays_into_lists_and_nonfinite_into_null():
    row = {"reward": np.float64(-1.5), "ok": np.bool_(True), "n": np.int64(3), "scores": np.array([1.0, np.nan]),
           "kl": jnp.float32(np.inf), "tags": ("a", 2)}
    assert jsonable(row) == {"reward": -1.5, "ok": True, "n": 3, "scores": [1.0, None], "kl": None,
                             "tags": ["a", 2]}


def test_samples_are_appended_with_their_step(tmp_path):
    with quiet_logger(tmp_path, tensorboard=False) as logger:
        logger.samples(3, [{"prompt": "Name a colour.", "plan": "pick one", "answer": "Blue.",
                            "reward": np.float32(0.75), "format_valid": True}])
        logger.samples(4, [{"prompt": "Sum 2+2.", "plan": "", "answer": "[NULL]", "reward": float("nan")},
                           {"prompt": "Hi", "plan": "greet", "answer": "Hello, ünïcode!", "reward": -1}])
    assert read_jsonl(tmp_path / "samples.jsonl") == [
        {"step": 3, "prompt": "Name a colour.", "plan": "pick one", "answer": "Blue.", "reward": 0.75,
         "format_valid": True},
        {"step": 4, "prompt": "Sum 2+2.", "plan": "", "answer": "[NULL]", "reward": None},
        {"step": 4, "prompt": "Hi", "plan": "greet", "answer": "Hello, ünïcode!", "reward": -1},
    ]


def test_resume_drops_lines_from_next_step_on_then_appends(tmp_path):
    with quiet_logger(tmp_path, tensorboard=False) as logger:
        for step in range(1, 6):
            logger.log(step, {"loss": float(step)})
            logger.samples(step, [{"answer": f"first run {step}"}])
    # the checkpoint the run resumes from holds 3 steps: steps 4 and 5 are logged again
    with quiet_logger(tmp_path, tensorboard=False, next_step=4) as logger:
        assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
        assert [r["step"] for r in read_jsonl(tmp_path / "samples.jsonl")] == [1, 2, 3]
        logger.log(4, {"loss": 40.0})
        logger.log(5, {"loss": 50.0})
        logger.samples(4, [{"answer": "resumed 4"}])
    assert [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    assert [r["answer"] for r in read_jsonl(tmp_path / "samples.jsonl")] == [
        "first run 1", "first run 2", "first run 3", "resumed 4"]


def test_fresh_run_in_an_old_run_dir_starts_an_empty_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.0}\n')
    with quiet_logger(tmp_path, tensorboard=False, next_step=1) as logger:
        logger.log(1, {"loss": 1.0})
    assert without_time(read_jsonl(tmp_path / "metrics.jsonl")) == [{"step": 1, "loss": 1.0}]


def test_truncate_drops_a_torn_last_line_and_keeps_earlier_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n{"step": 3, "lo')
    assert truncate_jsonl(path, next_step=10) == 1
    assert path.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n'
    assert truncate_jsonl(path, next_step=10) == 0
    assert truncate_jsonl(tmp_path / "absent.jsonl", next_step=1) == 0
    assert not list(tmp_path.glob(".metrics.jsonl.*"))  # no temporary file left behind


def test_tensorboard_event_file_holds_the_scalars_by_step(tmp_path):
    with quiet_logger(tmp_path) as logger:
        logger.log(1, {"reward_mean": 0.5, "kl": 0.25})
        logger.log(2, {"reward_mean": 0.75, "kl": float("nan")})  # non-finite: left out of TensorBoard
    scalars = read_tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars == {"reward_mean": [(1, 0.5), (2, 0.75)], "kl": [(1, 0.25)]}


def test_resumed_tensorboard_writer_purges_steps_from_next_step(tmp_path):
    with quiet_logger(tmp_path, next_step=7) as logger:
        logger.log(7, {"loss": 1.0})
    events = []
    for path in (tmp_path / "tensorboard").glob("events.out.tfevents.*"):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
            offset += 16 + length
    starts = [e for e in events if e.HasField("session_log")]
    assert [(e.step, e.session_log.status) for e in starts] == [(7, event_pb2.SessionLog.START)]


def test_tensorboard_off_writes_no_event_files(tmp_path):
    with quiet_logger(tmp_path, tensorboard=False) as logger:
        logger.log(1, {"loss": 1.0})
    assert not (tmp_path / "tensorboard").exists()


def test_only_process_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    stream = io.StringIO()
    logger = MetricsLogger(tmp_path / "run", next_step=1, total_steps=3, stream=stream)
    assert logger.log(1, {"loss": 1.0}) == {}
    logger.samples(1, [{"answer": "x"}])
    logger.note("hello")
    logger.close()
    assert not (tmp_path / "run").exists() and stream.getvalue() == ""

    monkeypatch.setattr(jax, "process_index", lambda: 0)
    with MetricsLogger(tmp_path / "run", next_step=1, tensorboard=False, stream=stream) as logger:
        logger.log(1, {"loss": 1.0})
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 1


def test_log_rejects_steps_that_do_not_increase_reserved_names_and_non_scalars(tmp_path):
    with quiet_logger(tmp_path, tensorboard=False) as logger:
        logger.log(2, {"loss": 1.0})
        with pytest.raises(ValueError, match="step 2 is not after the last logged step 2"):
            logger.log(2, {"loss": 1.0})
        with pytest.raises(ValueError, match="'time' is reserved"):
            logger.log(3, {"time": 1.0})
        with pytest.raises(TypeError, match="metric 'lengths' is not a scalar number"):
            logger.log(3, {"lengths": np.ones(4)})


def test_progress_line_shows_step_reward_kl_speed_time_split_and_eta():
    metrics = {"reward_mean": 0.4321, "kl": 0.00123, "format_valid_rate": 0.75, "loss": 2.0,
               "tokens_per_s": 12345.6, "time_sample_s": 1.26, "time_score_s": 0.31, "time_update_s": 0.84}
    assert progress_line(10, 50, metrics, seconds_per_step=2.0) == (
        "step 10/50  20% | reward 0.432 kl 0.00123 valid 0.75 | 12,346 tok/s"
        " | sample 1.3s score 0.3s update 0.8s | ETA 1:20")
    split = {**metrics, "time_sample_s": 0.02, "time_engine_sample_s": 1.9}  # split placement: waited, engine's
    assert "| sample 0.0s engine 1.9s score 0.3s update 0.8s |" in progress_line(10, 50, split, seconds_per_step=2.0)
    assert progress_line(3, None, {"loss": 0.5}, seconds_per_step=None) == "step 3 | loss 0.5"
    assert progress_line(50, 50, {}, seconds_per_step=1.0) == "step 50/50 100%"
    assert progress_line(1, 4, {}, seconds_per_step=3600.0, bar_width=8) == "step 1/4  25% [##------] | ETA 3:00:00"


def test_progress_in_a_log_file_is_one_plain_line_per_step(tmp_path):
    stream = io.StringIO()  # not a TTY
    with MetricsLogger(tmp_path, next_step=1, total_steps=3, tensorboard=False, is_writer=True,
                       stream=stream) as logger:
        for step in (1, 2, 3):
            logger.log(step, {"reward_mean": step / 4, "kl": 0.001})
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert [line.split(" | ")[:2] for line in lines] == [
        ["step 1/3  33%", "reward 0.25 kl 0.001"],
        ["step 2/3  67%", "reward 0.5 kl 0.001"],
        ["step 3/3 100%", "reward 0.75 kl 0.001"],
    ]
    assert lines[1].split(" | ")[-1].startswith("ETA ") and "ETA" not in lines[2]


def test_eta_leaves_out_the_compiling_first_step_and_passes_over_a_slow_later_one(tmp_path, monkeypatch):
    # step 1 compiles (100 s), steps then take 1 s, step 5 compiles a new prompt bucket (40 s)
    clock = iter([0.0, 100.0, 101.0, 102.0, 103.0, 143.0, 144.0])
    monkeypatch.setattr("rlmt_jax.run.metrics.time.monotonic", lambda: next(clock))
    stream = io.StringIO()
    logger = MetricsLogger(tmp_path, next_step=1, total_steps=100, tensorboard=False, is_writer=True,
                           stream=stream)
    rates = []
    for step in range(1, 7):
        logger.log(step, {"loss": 1.0})
        rates.append(logger.seconds_per_step)
    logger.close()
    assert rates == [None, 1.0, 1.0, 1.0, 1.0, 1.0]
    etas = [line.split(" | ")[-1] for line in stream.getvalue().splitlines()]
    assert etas == ["loss 1", "ETA 1:38", "ETA 1:37", "ETA 1:36", "ETA 1:35", "ETA 1:34"]


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_terminal_redraws_one_line_and_keeps_notes_apart(tmp_path):
    stream = FakeTerminal()
    with MetricsLogger(tmp_path, next_step=1, total_steps=2, tensorboard=False, is_writer=True,
                       stream=stream) as logger:
        logger.log(1, {"reward_mean": 0.5})
        logger.note("saved checkpoint 1")
        logger.log(2, {"reward_mean": 0.75})
    text = stream.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n")
    first, note, second = text.split("\n")[:3]
    assert first.rstrip() == "\rstep 1/2  50% [##########----------] | reward 0.5"  # no ETA from step 1 alone
    assert note == "saved checkpoint 1"
    assert second.startswith("\rstep 2/2 100% [####################] | reward 0.75")


def test_wandb_asked_for_but_not_installed_warns_and_logs_elsewhere(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails
    with pytest.warns(UserWarning, match=r"project 'rlmt'.*`pip install wandb`"):
        logger = quiet_logger(tmp_path, tensorboard=False, wandb_project="rlmt")
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 1


def fake_wandb(calls):
    class Run:
        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    return types.SimpleNamespace(init=init, util=types.SimpleNamespace(generate_id=lambda: "abc123"))


def test_wandb_gets_finite_scalars_and_a_resumed_run_keeps_its_id(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(calls))
    with quiet_logger(tmp_path, tensorboard=False, wandb_project="rlmt", wandb_config={"seed": 0}) as logger:
        logger.log(1, {"loss": 1.0, "kl": float("nan")})
    assert calls[0] == ("init", {"project": "rlmt", "id": "abc123", "resume": "allow", "dir": str(tmp_path),
                                 "name": tmp_path.name, "config": {"seed": 0}})
    assert calls[1:] == [("log", 1, {"loss": 1.0}), ("finish",)]

    calls.clear()
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(calls))
    (tmp_path / "wandb_run_id").write_text("firstrun\n")
    with quiet_logger(tmp_path, tensorboard=False, wandb_project="rlmt", next_step=2):
        pass
    assert calls[0][1]["id"] == "firstrun"
