"""GRPO group advantages and loss against hand-computed values."""

import jax.numpy as jnp
import numpy as np
import pytest

from rlmt_jax.algorithms import GRPOConfig, group_advantages, grpo_loss
from rlmt_jax.errors import UserError


def test_group_advantages_use_unbiased_std_and_eps():
    rewards = jnp.array([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0])
    adv = group_advantages(rewards, group_size=4)
    # group 1: mean 2.5, unbiased std sqrt(5/3) = 1.2909944 (+1e-6); group 2: all equal -> 0
    np.testing.assert_allclose(adv, [-1.1618941, -0.3872980, 0.3872980, 1.1618941, 0, 0, 0, 0], atol=1e-6)


def test_group_advantages_of_two_samples():
    # mean 0.5, unbiased std sqrt(0.5) = 0.7071068 -> +-0.5 / (0.7071068 + 1e-6)
    np.testing.assert_allclose(group_advantages(jnp.array([0.0, 1.0]), 2), [-0.7071058, 0.7071058], atol=1e-6)


def test_group_advantages_without_std_scaling_are_centred_rewards():
    adv = group_advantages(jnp.array([1.0, 2.0, 3.0, 4.0]), 4, scale_by_std=False)
    np.testing.assert_allclose(adv, [-1.5, -0.5, 0.5, 1.5], atol=1e-6)


def test_group_of_one_uses_mean_zero_std_one():
    np.testing.assert_allclose(group_advantages(jnp.array([2.0, -1.0]), 1), [2.0 / 1.000001, -1.0 / 1.000001], rtol=1e-6)


def test_group_advantages_reject_a_batch_that_does_not_split_into_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(jnp.zeros(6), 4)


def test_grpo_recipe_defaults():
    cfg = GRPOConfig()
    assert (cfg.group_size, cfg.clip_low, cfg.clip_high, cfg.dual_clip) == (8, 0.2, 0.2, 3.0)
    assert (cfg.kl_coef, cfg.kl_estimator, cfg.entropy_coef) == (0.001, "k3", 0.001)
    assert (cfg.loss_agg_mode, cfg.temperature, cfg.advantage_eps, cfg.scale_by_std) == (
        "seq-mean-token-mean",
        0.7,
        1e-6,
        True,
    )
    hash(cfg)  # usable as a jit static argument
    with pytest.raises(UserError, match="group_size"):
        GRPOConfig(group_size=0)


@pytest.mark.parametrize(
    "mode, expected",
    [
        # on-policy (ratio 1): per-token loss -A; row 0 has 2 tokens with A=1, row 1 one token A=-0.5
        ("token-mean", (-1 - 1 + 0.5) / 3),
        ("seq-mean-token-mean", (-1 + 0.5) / 2),
        ("seq-mean-token-sum", (-2 + 0.5) / 2),
        ("seq-mean-token-sum-norm", (-2 + 0.5) / (2 * 10)),
    ],
)
def test_grpo_loss_on_policy_is_minus_mean_advantage_under_each_aggregation(mode, expected):
    logp = jnp.array([[0.0, -1.0, -2.0], [0.0, -0.5, -3.0]])
    mask = jnp.array([[0, 1, 1], [0, 1, 0]])
    cfg = GRPOConfig(kl_coef=0.0, entropy_coef=0.0, loss_agg_mode=mode, norm_length=10.0)
    loss, m = grpo_loss(logp, logp, jnp.array([1.0, -0.5]), mask, cfg)
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert float(m["pg_clipfrac"]) == 0.0 and float(m["approx_kl"]) == 0.0
