"""The rollout correction's mask comes before the advantages, as in verl (ray_trainer.fit at b178a3cd:
compute_rollout_correction_and_add_to_batch replaces batch["response_mask"], then compute_advantage reads it).

Through the update stage's own path (`prepare_rl_batch`, what `_rollouts_update` calls), in float64, against
verl's definitions written out here in numpy, on inputs where the token mask (0.7 <= rho_t <= 1.6) drops tokens:
REINFORCE++-baseline whitens over the tokens the correction keeps; GAE runs over the corrected mask and is
whitened over it. DAPO's overlong penalty reads the sampled lengths (verl's reward manager scores before the
correction).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlmt_jax.settings.config import resolve
from rlmt_jax.training.stage import prepare_rl_batch

LOW, HIGH = 0.7, 1.6
CORRECTION = ["algorithm.rollout_correction.mask=token", f"algorithm.rollout_correction.mask_low={LOW}",
              f"algorithm.rollout_correction.mask_high={HIGH}"]
SMALL = ["rollout.prompts_per_step=4", "optimizer.micro_batch_size=4"]
START, WIDTH = 2, 8  # responses start at column 2; 8 response columns (rollout.max_new_tokens)


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def inputs(rows: int, seed: int):
    """(response mask, old log-probs, sampler log-probs, rewards): rows of different lengths; the correction drops
    some middle tokens (log rho beyond log 1.6 or below log 0.7) and keeps every row's last token."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, WIDTH + 1, rows)
    lengths[0] = WIDTH
    mask = np.zeros((rows, START + WIDTH), np.int32)
    for i, n in enumerate(lengths):
        mask[i, START:START + n] = 1
    old = np.where(mask > 0, -rng.uniform(0.1, 3.0, mask.shape), 0.0)
    log_rho = rng.uniform(-0.3, 0.3, mask.shape)
    for i, n in enumerate(lengths):
        for t in rng.choice(np.arange(START, START + n - 1), size=min(i % 3 + 1, n - 1), replace=False):
            log_rho[i, t] = rng.choice([0.9, -0.6, 0.55])  # outside [log 0.7, log 1.6] = [-0.357, 0.470]
    sampler = np.where(mask > 0, old - log_rho, 0.0)
    rewards = rng.normal(size=rows)
    keep = mask * ((log_rho >= math.log(LOW)) & (log_rho <= math.log(HIGH)))
    assert keep.sum() < mask.sum() and (keep[np.arange(rows), START + lengths - 1] == 1).all()
    return mask, old, sampler, rewards, keep


def prepared(cfg, mask, old, sampler, rewards, values=None):
    batch = {"response_mask": jnp.asarray(mask), "sampler_logprobs": jnp.asarray(sampler),
             "rewards": jnp.asarray(rewards)}
    metrics = prepare_rl_batch(cfg, batch, lambda: jnp.asarray(old),
                               critic_values=None if values is None else (lambda: jnp.asarray(values)))
    return {k: np.asarray(v) for k, v in batch.items()}, metrics


def verl_masked_whiten(x, m):
    """verl.utils.torch_functional.masked_whiten: the mean and the unbiased variance over m's tokens."""
    mean = (x * m).sum() / m.sum()
    var = ((x - mean) ** 2 * m).sum() / m.sum() * (m.sum() / (m.sum() - 1))
    return (x - mean) / np.sqrt(var + 1e-8)


def verl_reinforce_pp(rewards, mask, n):
    """core_algos.compute_reinforce_plus_plus_baseline_outcome_advantage."""
    scores = rewards - np.repeat(rewards.reshape(-1, n).mean(axis=1), n)
    tiled = scores[:, None] * mask
    return verl_masked_whiten(tiled, mask) * mask


def verl_gae(scores, values, sampled_mask, mask, gamma, lam):
    """core_algos.compute_gae_advantage_return (the reward on the last sampled token, as verl's reward manager
    puts it; the loop and the whitening over `mask`) -> advantages."""
    rows, seq = mask.shape
    rewards = np.zeros((rows, seq))
    last = np.array([np.flatnonzero(row)[-1] for row in sampled_mask])
    rewards[np.arange(rows), last] = scores
    next_values, last_gae, out = np.zeros(rows), np.zeros(rows), np.zeros((rows, seq))
    for t in reversed(range(seq)):
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        gae = delta + gamma * lam * last_gae
        next_values = values[:, t] * mask[:, t] + (1 - mask[:, t]) * next_values
        last_gae = gae * mask[:, t] + (1 - mask[:, t]) * last_gae
        out[:, t] = last_gae
    return verl_masked_whiten(out, mask)


def relative_gap(a, b, m):
    return np.abs((a - b) * m).max() / np.abs(b * m).max()


def test_reinforce_pp_whitens_over_the_tokens_the_correction_keeps():
    cfg = resolve(None, [*SMALL, "algorithm.advantage=reinforce_pp", "rollout.n=2", *CORRECTION])
    mask, old, sampler, rewards, keep = inputs(rows=8, seed=0)
    batch, _ = prepared(cfg, mask, old, sampler, rewards)
    np.testing.assert_array_equal(batch["response_mask"], keep)
    expected = verl_reinforce_pp(rewards, keep, n=2)
    np.testing.assert_allclose(batch["advantages"] * keep, expected, rtol=1e-5, atol=1e-6)
    # the order matters here: whitened over the uncorrected mask, the kept tokens' advantages differ
    assert relative_gap(verl_reinforce_pp(rewards, mask, n=2), expected, keep) > 0.05


def test_gae_runs_and_whitens_over_the_corrected_mask():
    cfg = resolve(None, [*SMALL, "algorithm.name=ppo", "rollout.n=1", "algorithm.kl_coef=0.0",
                         "algorithm.ppo.gamma=0.9", "algorithm.ppo.gae_lambda=0.8", *CORRECTION])
    mask, old, sampler, rewards, keep = inputs(rows=6, seed=1)
    values = np.random.default_rng(2).normal(size=mask.shape)
    batch, _ = prepared(cfg, mask, old, sampler, rewards, values)
    np.testing.assert_array_equal(batch["response_mask"], keep)
    expected = verl_gae(rewards, values, mask, keep, 0.9, 0.8)
    np.testing.assert_allclose(batch["advantages"] * keep, expected * keep, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batch["old_values"], values)
    assert relative_gap(verl_gae(rewards, values, mask, mask, 0.9, 0.8), expected, keep) > 0.05


def test_the_overlong_penalty_reads_the_sampled_lengths_not_the_corrected_mask():
    cfg = resolve(None, [*SMALL, "rollout.n=2", f"rollout.max_new_tokens={WIDTH}", "algorithm.overlong_buffer=4",
                         "algorithm.overlong_penalty=1.0", "algorithm.grpo.eps=0.01", *CORRECTION])
    mask, old, sampler, rewards, keep = inputs(rows=8, seed=3)
    batch, metrics = prepared(cfg, mask, old, sampler, rewards)
    shaped = rewards - np.clip(mask.sum(axis=1) - (WIDTH - 4), 0, None) / 4
    assert metrics["reward_shaped_mean"] == pytest.approx(shaped.mean(), rel=1e-6)
    groups = shaped.reshape(-1, 2)
    expected = (groups - groups.mean(axis=1, keepdims=True)) / (groups.std(axis=1, ddof=1, keepdims=True) + 0.01)
    np.testing.assert_allclose(batch["advantages"], expected.reshape(-1), rtol=1e-5, atol=1e-6)


def test_without_a_correction_mask_the_advantages_read_the_sampled_mask():
    cfg = resolve(None, [*SMALL, "algorithm.advantage=reinforce_pp", "rollout.n=2"])
    mask, old, sampler, rewards, _ = inputs(rows=8, seed=4)
    batch, _ = prepared(cfg, mask, old, sampler, rewards)
    np.testing.assert_array_equal(batch["response_mask"], mask)
    np.testing.assert_allclose(batch["advantages"] * mask, verl_reinforce_pp(rewards, mask, n=2), rtol=1e-5,
                               atol=1e-6)
