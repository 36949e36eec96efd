"""PPO's critic side: the score on the last token, GAE advantages and returns, the clipped value loss
(the actor uses a policy loss of rlmt_jax.algorithms.policy_losses, the `gae` advantage estimator)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlmt_jax.algorithms.common import masked_mean


def last_token_rewards(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Place each sequence's score on its last counted (response) token, 0 elsewhere.

    scores: [batch], mask: [batch, seq] -> rewards [batch, seq] float32
    """
    seq = mask.shape[1]
    positions = jnp.arange(seq)
    last = jnp.max(jnp.where(mask > 0, positions, -1), axis=1)
    return jnp.where(positions[None, :] == last[:, None], scores[:, None].astype(jnp.float32), 0.0)


def gae_advantages(
    rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float = 1.0, lam: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over the counted (response) tokens of each row.

    Walking back over the positions with m_t = 1 (positions with m_t = 0 are skipped: they pass
    the next value and the running advantage through unchanged):
      delta_t = r_t + gamma * V_next - V_t            (V_next = 0 after the last counted token)
      A_t     = delta_t + gamma * lam * A_next
      returns_t = A_t + V_t
    rewards, values, mask: [batch, seq] -> (advantages, returns): [batch, seq], 0 where m_t = 0.
    """
    rewards = rewards.astype(jnp.float32)
    values = values.astype(jnp.float32)
    m = mask.astype(jnp.float32)

    def step(carry, xs):
        next_value, next_adv = carry
        r, v, mt = xs
        delta = r + gamma * next_value - v
        adv = delta + gamma * lam * next_adv
        carry = (mt * v + (1 - mt) * next_value, mt * adv + (1 - mt) * next_adv)
        return carry, adv * mt

    zeros = jnp.zeros(rewards.shape[0], jnp.float32)
    _, adv = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T, m.T), reverse=True)
    advantages = adv.T
    returns = (advantages + values) * m
    return advantages, returns


def value_loss(
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    mask: jax.Array,
    value_clip: float | None = 0.5,
    scale: float = 0.5,
    *,
    num_tokens: jax.Array | float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped value loss:  scale * token-mean( max((V - R)^2, (V_clip - R)^2) ),
    V_clip = clip(V, old_V - value_clip, old_V + value_clip)   (value_clip None: V_clip = V).

    V_clip is computed as verl does, not as old_V + clip(V - old_V): that form rounds V by one float32 step on
    a few percent of the tokens inside the band, which then count as clipped.
    values, old_values, returns, mask: [batch, seq] (scale: algorithm.ppo.value_coef). num_tokens:
    whole-batch count for micro-batches. Returns (loss, metrics: vf_loss, vf_clipfrac, value_mean (token
    means)); vf_clipfrac counts tokens where the clipped error is the larger.
    """
    values = values.astype(jnp.float32)
    clipped = values if value_clip is None else jnp.clip(values, old_values - value_clip, old_values + value_clip)
    unclipped_err = jnp.square(values - returns)
    clipped_err = jnp.square(clipped - returns)
    loss = scale * masked_mean(jnp.maximum(unclipped_err, clipped_err), mask, num_tokens)
    metrics = {
        "vf_loss": loss,
        "vf_clipfrac": masked_mean((clipped_err > unclipped_err).astype(jnp.float32), mask, num_tokens),
        "value_mean": masked_mean(values, mask, num_tokens),
    }
    return loss, metrics
