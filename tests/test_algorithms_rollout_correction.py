"""Rollout correction against hand-computed ratios: truncated importance weights and masks at token and
sequence level, and the ratio statistics logged every step."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from rlmt_jax.algorithms import AlgorithmConfig, Normalizers, RolloutCorrectionConfig, actor_loss, rollout_correction

# log rho = old - sampler on the counted tokens: row 0 [0.1, 1.0], row 1 [-0.9, 0.0, 0.2], row 2 padding
OLD = jnp.array([[0.0, -1.0, -2.0, 0.0], [0.0, -1.9, -1.0, -0.3], [0.0, 0.0, 0.0, 0.0]])
SAMPLER = jnp.array([[0.0, -1.1, -3.0, 0.0], [0.0, -1.0, -1.0, -0.5], [0.0, 5.0, 5.0, 5.0]])
MASK = jnp.array([[0, 1, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0]], jnp.int32)
RHO = np.exp([[0, 0.1, 1.0, 0], [0, -0.9, 0.0, 0.2], [0, 0, 0, 0]])


def correct(**settings):
    return rollout_correction(OLD, SAMPLER, MASK, RolloutCorrectionConfig(**settings))


def test_off_changes_nothing_and_still_logs_the_ratio_statistics():
    weights, mask, metrics = correct()
    assert weights is None
    np.testing.assert_array_equal(mask, MASK)
    counted = RHO[np.asarray(MASK) > 0]
    assert float(metrics["rollout_ratio_mean"]) == pytest.approx(counted.mean(), rel=1e-6)
    assert float(metrics["rollout_ratio_max"]) == pytest.approx(math.e, rel=1e-6)
    assert float(metrics["rollout_ratio_min"]) == pytest.approx(math.exp(-0.9), rel=1e-6)
    assert float(metrics["rollout_seq_log_ratio_mean"]) == pytest.approx((1.1 + -0.7) / 2, rel=1e-5)
    assert float(metrics["rollout_seq_log_ratio_max_abs"]) == pytest.approx(1.1, rel=1e-5)
    assert "rollout_weight_mean" not in metrics and "rollout_masked_frac" not in metrics


def test_token_level_weights_are_truncated_at_the_cap():
    weights, mask, metrics = correct(weights="token", weight_cap=2.0)
    want = np.minimum(RHO, 2.0) * np.asarray(MASK)
    np.testing.assert_allclose(weights, want, rtol=1e-6)
    np.testing.assert_array_equal(mask, MASK)
    assert float(metrics["rollout_weight_truncated_frac"]) == pytest.approx(1 / 5)  # e > 2
    assert float(metrics["rollout_weight_mean"]) == pytest.approx(want.sum() / 5, rel=1e-6)


def test_sequence_level_weights_use_the_product_of_the_rows_ratios():
    weights, _, _ = correct(weights="sequence", weight_cap=2.0)
    # row 0: e^1.1 = 3.004 -> 2; row 1: e^-0.7 = 0.4966 on every counted token
    e = math.exp(-0.7)
    np.testing.assert_allclose(weights, [[0, 2, 2, 0], [0, e, e, e], [0, 0, 0, 0]], rtol=1e-6)


def test_token_mask_drops_tokens_outside_the_band_and_sequence_mask_drops_rows():
    _, mask, metrics = correct(mask="token", mask_low=0.5, mask_high=2.0)
    # rho: row 0 [1.105, 2.718 > 2], row 1 [0.407 < 0.5, 1, 1.221]
    np.testing.assert_array_equal(mask, [[0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]])
    assert float(metrics["rollout_masked_frac"]) == pytest.approx(2 / 5)
    _, mask, _ = correct(mask="sequence", mask_low=0.5, mask_high=2.0)
    np.testing.assert_array_equal(mask, [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])  # e^1.1 > 2, e^-0.7 < 0.5
    _, mask, _ = correct(mask="sequence", mask_low=0.4, mask_high=4.0)
    np.testing.assert_array_equal(mask, MASK)


def test_weights_multiply_the_token_losses_of_the_policy_loss():
    weights, _, _ = correct(weights="token", weight_cap=2.0)
    cfg = AlgorithmConfig(kl_coef=0.0, entropy_coef=0.0, aggregation="token_mean")
    lp = OLD  # on-policy for the trainer: L_t = -A
    adv = jnp.array([1.0, -2.0, 0.0])
    loss, _ = actor_loss(lp, OLD, adv, MASK, cfg, normalizers=Normalizers.of(MASK), is_weights=weights)
    w = np.asarray(weights)
    assert float(loss) == pytest.approx(float((-w[0].sum() * 1.0 + w[1].sum() * 2.0) / 5), rel=1e-6)
