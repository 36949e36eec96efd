"""PPO: token rewards, GAE advantages and returns, the clipped value loss, the PPO actor loss."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rlmt_jax.algorithms.common import ActorLossConfig, actor_loss, aggregation_weights, masked_whiten, weighted_sum
from rlmt_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class PPOConfig(ActorLossConfig):
    """PPO settings; defaults are the RLMT recipe (GAE 1.0/1.0, whitened advantages, value clip 0.5,
    no KL term as in the released configs; the paper's table lists kl_coef 0.001)."""

    kl_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 1.0
    whiten_advantages: bool = True
    value_clip: float | None = 0.5
    value_loss_scale: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
            raise UserError(f"gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}")


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


def ppo_advantages(
    scores: jax.Array, values: jax.Array, mask: jax.Array, config: PPOConfig
) -> tuple[jax.Array, jax.Array]:
    """The recipe's PPO advantages: score on the last response token, GAE, whitening over the batch.

    scores: [batch]; values, mask: [batch, seq] (values aligned like log-probs: V at t is the
    critic's value of the prefix before token t). Returns (advantages, returns): [batch, seq];
    returns are not whitened.
    """
    rewards = last_token_rewards(scores, mask)
    advantages, returns = gae_advantages(rewards, values, mask, config.gamma, config.lam)
    if config.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
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
    V_clip = old_V + clip(V - old_V, -value_clip, value_clip)   (value_clip None: V_clip = V).

    values, old_values, returns, mask: [batch, seq]. num_tokens: whole-batch count for micro-batches.
    Returns (loss, metrics: vf_loss, vf_clipfrac, value_mean (token means)).
    """
    values = values.astype(jnp.float32)
    if value_clip is None:
        clipped = values
    else:
        clipped = old_values + jnp.clip(values - old_values, -value_clip, value_clip)
    unclipped_err = jnp.square(values - returns)
    clipped_err = jnp.square(clipped - returns)
    weights = aggregation_weights(mask, "token-mean", num_tokens=num_tokens)
    loss = scale * weighted_sum(jnp.maximum(unclipped_err, clipped_err), weights)
    metrics = {
        "vf_loss": loss,
        "vf_clipfrac": weighted_sum((clipped_err > unclipped_err).astype(jnp.float32), weights),
        "value_mean": weighted_sum(values, weights),
    }
    return loss, metrics


def ppo_actor_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    config: PPOConfig,
    *,
    entropy: jax.Array | None = None,
    ref_logprobs: jax.Array | None = None,
    num_tokens: jax.Array | float | None = None,
    num_sequences: jax.Array | float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO actor loss: the same clipped surrogate (+ optional KL, entropy) as `common.actor_loss`.

    All per-token arrays [batch, seq]. Returns (loss, metrics).
    """
    return actor_loss(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        config,
        entropy=entropy,
        ref_logprobs=ref_logprobs,
        num_tokens=num_tokens,
        num_sequences=num_sequences,
    )
