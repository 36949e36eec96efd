"""GRPO group advantages and loss against hand-computed values."""

import jax.numpy as jnp
import numpy as np
import pytest

from rlmt_jax.algorithms import AlgorithmConfig, Normalizers, actor_loss, group_advantages


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
    cfg = AlgorithmConfig()
    assert (cfg.name, cfg.policy_loss, cfg.advantage) == ("grpo", "ppo_clip", None)  # null: the algorithm's own
    assert (cfg.clip_low, cfg.clip_high, cfg.dual_clip) == (0.2, 0.2, 3.0)
    assert (cfg.kl_coef, cfg.kl_estimator, cfg.entropy_coef) == (0.001, "k3", 0.001)
    assert (cfg.aggregation, cfg.grpo.eps) == ("seq_mean_token_mean", 1e-6)
    hash(cfg)  # usable as a jit static argument


@pytest.mark.parametrize(
    "mode, expected",
    [
        # on-policy (ratio 1): per-token loss -A; row 0 has 2 tokens with A=1, row 1 one token A=-0.5
        ("token_mean", (-1 - 1 + 0.5) / 3),
        ("seq_mean_token_mean", (-1 + 0.5) / 2),
        ("seq_mean_token_sum", (-2 + 0.5) / 2),
        ("seq_mean_token_sum_norm", (-2 + 0.5) / (2 * 10)),
    ],
)
def test_grpo_loss_on_policy_is_minus_mean_advantage_under_each_aggregation(mode, expected):
    logp = jnp.array([[0.0, -1.0, -2.0], [0.0, -0.5, -3.0]])
    mask = jnp.array([[0, 1, 1], [0, 1, 0]])
    cfg = AlgorithmConfig(kl_coef=0.0, entropy_coef=0.0, aggregation=mode)
    loss, m = actor_loss(logp, logp, jnp.array([1.0, -0.5]), mask, cfg, normalizers=Normalizers.of(mask, 10.0))
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert float(m["pg_clipfrac"]) == 0.0 and float(m["approx_kl"]) == 0.0
