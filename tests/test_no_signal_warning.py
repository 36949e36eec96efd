"""A run that cannot learn says so (issue 24): when no group of a step has any reward spread, every group
advantage is 0; after WARN_AFTER_STEPS such steps in a row the trainer warns, then every WARN_EVERY_STEPS steps
while it lasts, with the step's format-valid rate and, when that is 0 in strict mode, why and what to do."""

import dataclasses
import json
import logging

import numpy as np
import pytest

from rlmt_jax.rollout.rewards import RewardScorer
from rlmt_jax.rollout.stage import SIGNAL_METRIC, groups_with_reward_spread
from rlmt_jax.settings.config import resolve
from rlmt_jax.trainer import no_signal
from rlmt_jax.trainer.loop import train
from rlmt_jax.trainer.no_signal import NoSignalWatch


def test_a_group_has_spread_when_its_rewards_are_not_all_exactly_equal():
    rewards = np.array([[0.1] * 8, [0.1] * 7 + [np.nextafter(np.float32(0.1), np.float32(1))], [-3.0] * 8,
                        [1.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]], np.float32)
    assert groups_with_reward_spread(rewards) == 2  # one float32 step apart counts; 0.1 eight times does not
    assert groups_with_reward_spread(np.full((4, 8), -3.0, np.float32)) == 0
    assert groups_with_reward_spread(np.array([[1.0], [2.0]])) == 0  # a group of one has no spread
    assert groups_with_reward_spread(np.zeros((0, 4))) == 0


def strict_think(**changes):
    return dataclasses.replace(resolve(None).template, **{"strict": True, "format_penalty": None, **changes})


def warned_steps(watch, fractions):
    return [step for step, fraction in enumerate(fractions, start=1)
            if watch.observe(step, {SIGNAL_METRIC: fraction, "format_valid_rate": 0.0})]


def test_the_warning_comes_after_five_steps_without_spread_then_every_ten_while_it_lasts():
    watch = NoSignalWatch(strict_think(), n=8)
    assert (watch.after, watch.every) == (no_signal.WARN_AFTER_STEPS, no_signal.WARN_EVERY_STEPS) == (5, 10)
    assert warned_steps(watch, [0.0] * 30) == [5, 15, 25]
    # a step with spread starts the count again; the tiny default's first two steps have none
    assert warned_steps(NoSignalWatch(strict_think(), n=8), [0.0] * 4 + [0.25] + [0.0] * 6) == [10]
    assert warned_steps(NoSignalWatch(strict_think(), n=4), [0.0, 0.0] + [0.125] * 48) == []
    # rollout.n = 1: the rollout stage logs no fraction (no groups); nothing to say
    watch = NoSignalWatch(strict_think(), n=1)
    assert not any(watch.observe(step, {"format_valid_rate": 0.0}) for step in range(1, 30))


def test_the_warning_says_why_with_the_format_valid_rate_and_what_to_do():
    watch = NoSignalWatch(strict_think(), n=8, after=3)
    messages = [watch.observe(step, {SIGNAL_METRIC: 0.0, "format_valid_rate": 0.0}) for step in (7, 8, 9)]
    assert messages[:2] == [None, None]
    text = messages[2]
    assert text.startswith("steps 7-9: no group had any reward spread (the 8 rewards of every prompt were equal), "
                           "so every advantage is 0")
    assert "format-valid rate 0.0% at step 9" in text
    assert "template.strict=true scores every answer as `[NULL]`" in text
    for fix in ("SFT warm-start", "Instruct model", "template.mode=zero", "template.strict=false"):
        assert fix in text
    assert "(warned again every 10 steps while it lasts)" in text
    # a format penalty without strict mode
    penalty = NoSignalWatch(strict_think(strict=False, format_penalty=-3.0), n=4, after=1)
    text = penalty.observe(1, {SIGNAL_METRIC: 0.0, "format_valid_rate": 0.0})
    assert text.startswith("step 1: ") and "template.format_penalty=-3.0" in text
    assert "set template.format_penalty=null (the reward model then scores" in text
    assert "template.strict=false" not in text
    # the tiny default: strict and a penalty, both to unset
    tiny = NoSignalWatch(resolve(None).template, n=4, after=1).observe(1, {SIGNAL_METRIC: 0.0,
                                                                           "format_valid_rate": 0.0})
    assert "set template.strict=false and template.format_penalty=null" in tiny
    # valid answers all scored alike: the reward model's side
    valid = NoSignalWatch(strict_think(), n=4, after=1).observe(1, {SIGNAL_METRIC: 0.0, "format_valid_rate": 0.5})
    assert "format-valid rate 50.0%" in valid and "reward model gives every answer" in valid
    assert "[NULL]" not in valid


def test_a_run_whose_rewards_are_all_equal_warns_and_logs_no_signal(tmp_path, tiny_cache, monkeypatch, caplog):
    def constant(scorer, prompts, outputs, *args, **kwargs):
        scored = real(scorer, prompts, outputs, *args, **kwargs)
        return dataclasses.replace(scored, rewards=np.full(len(outputs), 0.25, np.float32))

    real = RewardScorer.score_outputs
    monkeypatch.setattr(RewardScorer, "score_outputs", constant)
    monkeypatch.setattr(no_signal, "WARN_AFTER_STEPS", 2)  # a 2-step run: warned at its second step
    cfg = resolve(None, ["run.total_steps=2", "rollout.prompts_per_step=4", "rollout.n=2", "rollout.max_new_tokens=8",
                         "optimizer.micro_batch_size=8", "checkpoint.async_save=false", "logging.tensorboard=false",
                         "run.export_at_end=false", f"run.output_dir={tmp_path / 'run'}"])
    with caplog.at_level(logging.WARNING, logger="rlmt_jax.trainer.loop"):
        train(cfg)
    warnings = [r.getMessage() for r in caplog.records if "reward spread" in r.getMessage()]
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [row[SIGNAL_METRIC] for row in rows] == [0.0, 0.0]
    assert len(warnings) == 1 and warnings[0].startswith("steps 1-2: no group had any reward spread")
    assert f"format-valid rate {rows[1]['format_valid_rate']:.1%} at step 2" in warnings[0]


@pytest.mark.parametrize("fraction", [0.5, None])
def test_steps_with_spread_or_without_groups_never_warn(fraction):
    watch = NoSignalWatch(strict_think(), n=2, after=1, every=1)
    metrics = {"format_valid_rate": 0.0, **({} if fraction is None else {SIGNAL_METRIC: fraction})}
    assert not any(watch.observe(step, metrics) for step in range(1, 20))
