"""Variants and rollout correction wired through the trainer on the tiny built-in models (one step each)."""

import json
import os

import pytest

import rlmt_jax.training.stage as update_stage
from rlmt_jax.settings.config import resolve
from rlmt_jax.trainer.loop import train

ONE_STEP = [
    "rollout.n=2", "rollout.prompts_per_step=4", "rollout.max_new_tokens=12", "rollout.prompt_buckets=[]",
    "data.max_prompt_tokens=96", "run.total_steps=1", "checkpoint.async_save=false", "logging.tensorboard=false",
    "optimizer.micro_batch_size=4", "run.export_at_end=false",
]


def one_step(tmp_path, *overrides):
    cfg = resolve(None, [*ONE_STEP, f"run.output_dir={tmp_path / 'run'}", *overrides])
    train(cfg)
    rows = [json.loads(line) for line in open(os.path.join(cfg.run.output_dir, "metrics.jsonl"))]
    assert len(rows) == 1
    return rows[0]


def test_gspo_with_rloo_overlong_shaping_and_rollout_correction_trains_a_step(tmp_path, tiny_cache):
    row = one_step(tmp_path, "algorithm.policy_loss=gspo", "algorithm.clip_low=3e-4", "algorithm.clip_high=4e-4",
                   "algorithm.advantage=rloo", "algorithm.overlong_buffer=4",
                   "algorithm.rollout_correction.weights=sequence", "algorithm.rollout_correction.mask=token")
    # the sampler's log-probs are the trainer's (float32): every ratio is 1, no weight truncated, no token masked
    assert abs(row["rollout_ratio_mean"] - 1) < 1e-3 and row["rollout_ratio_max"] < 1.001
    assert abs(row["rollout_weight_mean"] - 1) < 1e-3 and row["rollout_weight_truncated_frac"] == 0.0
    assert row["rollout_masked_frac"] == 0.0
    assert row["reward_shaped_mean"] <= row["reward_mean"] + 1e-6  # the overlong penalty only takes away
    assert row["pg_clipfrac"] == 0.0  # on-policy: every sequence ratio is 1, inside the band
    assert row["finite"] == 1.0


def test_bypass_uses_the_samplers_logprobs_and_skips_the_old_policy_forward(tmp_path, tiny_cache, monkeypatch):
    calls = []
    real = update_stage.compute_logprobs

    def counting(graphdef, params, batch, **kwargs):
        calls.append(params)
        return real(graphdef, params, batch, **kwargs)

    monkeypatch.setattr(update_stage, "compute_logprobs", counting)
    row = one_step(tmp_path, "algorithm.rollout_correction.bypass=true")
    assert len(calls) == 1  # the reference forward only (kl_coef 0.001); no old-policy forward
    assert "logprob_diff_max" not in row and "rollout_ratio_mean" not in row
    assert row["approx_kl"] == pytest.approx(0.0, abs=1e-5)  # old = sampler = current params at the first epoch
