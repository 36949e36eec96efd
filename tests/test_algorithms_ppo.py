"""PPO: token rewards, GAE (against a plain Python loop), whitening, the clipped value loss."""

import jax.numpy as jnp
import numpy as np
import pytest

from rlmt_jax.algorithms import AlgorithmConfig, ADVANTAGES, gae_advantages, last_token_rewards, value_loss


def test_score_goes_on_the_last_response_token():
    mask = jnp.array([[0, 1, 1, 0], [0, 0, 1, 1]])
    np.testing.assert_array_equal(last_token_rewards(jnp.array([2.0, -1.0]), mask), [[0, 0, 2, 0], [0, 0, 0, -1]])


def test_gae_with_gamma_and_lambda_one_is_return_minus_value():
    values = jnp.array([[0.3, 0.5, 0.2, 0.1]])
    mask = jnp.array([[0, 1, 1, 1]])
    rewards = jnp.array([[0.0, 0.0, 0.0, 1.0]])
    adv, ret = gae_advantages(rewards, values, mask, 1.0, 1.0)
    np.testing.assert_allclose(adv, [[0.0, 0.5, 0.8, 0.9]], atol=1e-6)
    np.testing.assert_allclose(ret, [[0.0, 1.0, 1.0, 1.0]], atol=1e-6)


def _gae_python_loop(rewards, values, mask, gamma, lam):
    """Textbook GAE over the masked positions of each row, one row at a time."""
    adv = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        positions = [t for t in range(rewards.shape[1]) if mask[b, t]]
        running = 0.0
        for k in reversed(range(len(positions))):
            t = positions[k]
            next_value = values[b, positions[k + 1]] if k + 1 < len(positions) else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            running = delta + gamma * lam * running
            adv[b, t] = running
    return adv, (adv + values) * mask


def test_gae_matches_a_python_loop_with_prompt_and_padding_positions():
    rng = np.random.default_rng(0)
    mask = np.zeros((3, 9), np.float32)
    mask[0, 2:7] = 1  # prompt of 2, response of 5, 2 padding
    mask[1, 4:9] = 1
    mask[2, 1:3] = 1
    mask[2, 5] = 1  # a hole inside the response is skipped, not treated as a boundary
    rewards = rng.normal(size=(3, 9)).astype(np.float32)
    values = rng.normal(size=(3, 9)).astype(np.float32)
    adv, ret = gae_advantages(jnp.array(rewards), jnp.array(values), jnp.array(mask), 0.9, 0.8)
    ref_adv, ref_ret = _gae_python_loop(rewards, values, mask, 0.9, 0.8)
    np.testing.assert_allclose(adv, ref_adv, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, atol=1e-5)


def test_gae_advantage_estimator_whitens_over_the_batch():
    mask = jnp.array([[0, 1, 1], [0, 1, 0]])
    values = jnp.array([[0.0, 0.5, 0.2], [0.0, 1.0, 0.0]])
    adv, ret = ADVANTAGES("gae")(jnp.array([1.0, 3.0]), mask, AlgorithmConfig(), group_size=1, values=values)
    # raw advantages (gamma = lam = 1): R - V = [0.5, 0.8] and [2.0]; returns [1, 1] and [3]
    # mean 1.1, unbiased var = (0.36 + 0.09 + 0.81) / 2 = 0.63
    std = np.sqrt(0.63)
    np.testing.assert_allclose(adv, [[0, -0.6 / std, -0.3 / std], [0, 0.9 / std, 0]], atol=1e-5)
    np.testing.assert_allclose(ret, [[0, 1, 1], [0, 3, 0]], atol=1e-6)


def test_clipped_value_loss_takes_the_larger_error():
    values = jnp.array([[1.0, 0.0]])
    old = jnp.array([[0.2, 0.0]])
    returns = jnp.array([[1.0, 1.0]])
    loss, m = value_loss(values, old, returns, jnp.ones((1, 2)), value_clip=0.5)
    # token 0: clipped prediction 0.7 -> errors 0 and 0.09 -> 0.09 (clipped); token 1: 1.0 both
    assert float(loss) == pytest.approx(0.5 * (0.09 + 1.0) / 2, abs=1e-6)
    assert float(m["vf_clipfrac"]) == pytest.approx(0.5)


def test_vf_clipfrac_counts_no_token_inside_the_clip_band():
    # V_clip = clip(V, old - c, old + c) (verl) is V itself inside the band; the former old + clip(V - old, -c, c)
    # rounds V by a float32 step on some of these tokens, which then counted as clipped.
    rng = np.random.default_rng(0)
    old = rng.normal(0, 10, (1, 2000)).astype(np.float32)
    values = (old + rng.uniform(-0.49, 0.49, old.shape)).astype(np.float32)
    returns = (old + rng.normal(0, 1, old.shape)).astype(np.float32)  # a critic near its targets
    former = old + np.clip(values - old, np.float32(-0.5), np.float32(0.5))
    former_clipfrac = np.mean((former - returns) ** 2 > (values - returns) ** 2)
    assert former_clipfrac > 0  # the test can fail: the former form counted some of these tokens
    loss, m = value_loss(jnp.asarray(values), jnp.asarray(old), jnp.asarray(returns), jnp.ones(old.shape),
                         value_clip=0.5)
    assert float(m["vf_clipfrac"]) == 0.0
    assert float(loss) == pytest.approx(0.5 * float(np.mean((values - returns) ** 2)), rel=1e-5)


def test_gae_keeps_the_reward_of_a_row_whose_last_sampled_token_a_correction_mask_dropped():
    """Documented difference from verl: the score moves to the last kept token instead of being lost."""
    from rlmt_jax.algorithms.advantages import gae
    from rlmt_jax.algorithms.settings import AlgorithmConfig, PPOConfig

    config = AlgorithmConfig(name="ppo", ppo=PPOConfig(gamma=1.0, gae_lambda=1.0, whiten_advantages=False))
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])  # 4 sampled tokens, the last one masked by the correction
    values = jnp.zeros((1, 4))
    advantages, returns = gae(jnp.array([2.0]), mask, config, group_size=1, values=values)
    np.testing.assert_allclose(np.asarray(advantages), [[2.0, 2.0, 2.0, 0.0]])
    np.testing.assert_allclose(np.asarray(returns)[0, :3], [2.0, 2.0, 2.0])
