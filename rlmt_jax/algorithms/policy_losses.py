"""Policy losses by name (`algorithm.policy_loss`), and the actor loss that adds the KL and entropy terms.

Notation (all per token, [batch, seq]): r = pi_theta / pi_old = exp(logprobs - old_logprobs) (log ratio
clipped to +-20), A the advantage, m the mask, w the truncated importance weights of rollout correction
(1 when off), eps_l / eps_h = algorithm.clip_low / clip_high, N / S / L the whole-batch normalisers
(counted tokens, counted rows, rollout.max_new_tokens; see common.Normalizers).

`ppo_clip` aggregates its token losses with `algorithm.aggregation`; the paper variants use the
normaliser their paper's objective states (DAPO and CISPO: 1/N; Dr. GRPO: 1/(L S); GSPO: 1/S over
sequences of each row's token mean, as verl), whatever `algorithm.aggregation` says (that still averages the
KL and entropy terms).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlmt_jax.algorithms.common import (
    LOG_RATIO_CLAMP,
    Normalizers,
    aggregation_weights,
    behaviour_kl,
    clipped_policy_losses,
    kl_penalty,
    weighted_sum,
)
from rlmt_jax.algorithms.registry import POLICY_LOSSES, register_policy_loss
from rlmt_jax.algorithms.settings import AlgorithmConfig


def token_advantages(advantages: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """[batch] (one per sequence) or [batch, seq] -> [batch, seq]."""
    return jnp.broadcast_to(advantages[:, None], shape) if advantages.ndim == 1 else advantages


def sequence_advantages(advantages: jax.Array, mask: jax.Array) -> jax.Array:
    """[batch] as is; [batch, seq] -> the token mean over each row's mask.  -> [batch]"""
    if advantages.ndim == 1:
        return advantages
    m = mask.astype(jnp.float32)
    return jnp.sum(advantages * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)


def _weighted(losses: jax.Array, is_weights: jax.Array | None) -> jax.Array:
    return losses if is_weights is None else losses * jax.lax.stop_gradient(is_weights)


def _clip_metrics(clipped, dual, mask, normalizers) -> dict[str, jax.Array]:
    token = aggregation_weights(mask, "token_mean", normalizers)
    return {"pg_clipfrac": weighted_sum(clipped, token), "pg_clipfrac_lower": weighted_sum(dual, token)}


@register_policy_loss("ppo_clip")
def ppo_clip_loss(logprobs, old_logprobs, advantages, mask, config: AlgorithmConfig, *,
                  normalizers: Normalizers, is_weights=None):
    """PPO's clipped surrogate with clip-higher and dual clip (GRPO and PPO as the RLMT recipes run them;
    Schulman et al. 2017, arXiv 1707.06347; dual clip: Ye et al. 2020, arXiv 1912.09729).

    L_t = max(-A r, -A clip(r, 1 - eps_l, 1 + eps_h));  where A < 0: L_t = min(L_t, -A c), c = dual_clip
    loss = agg(w L) with agg = algorithm.aggregation.
    """
    adv = token_advantages(advantages, logprobs.shape)
    losses, clipped, dual = clipped_policy_losses(logprobs, old_logprobs, adv, config.clip_low, config.clip_high,
                                                  config.dual_clip)
    weights = aggregation_weights(mask, config.aggregation, normalizers)
    return weighted_sum(_weighted(losses, is_weights), weights), _clip_metrics(clipped, dual, mask, normalizers)


def _clipped_without_dual(logprobs, old_logprobs, advantages, mask, config: AlgorithmConfig,
                          normalizers: Normalizers, is_weights, aggregation: str):
    """The token-level clipped surrogate without a dual clip, aggregated by the paper's fixed rule."""
    adv = token_advantages(advantages, logprobs.shape)
    losses, clipped, dual = clipped_policy_losses(logprobs, old_logprobs, adv, config.clip_low, config.clip_high,
                                                  None)
    weights = aggregation_weights(mask, aggregation, normalizers)
    return weighted_sum(_weighted(losses, is_weights), weights), _clip_metrics(clipped, dual, mask, normalizers)


@register_policy_loss("dapo")
def dapo_loss(logprobs, old_logprobs, advantages, mask, config: AlgorithmConfig, *,
              normalizers: Normalizers, is_weights=None):
    """DAPO's token-level clip-higher objective (Yu et al. 2025, "DAPO", arXiv 2503.14476):

    J = 1 / sum_i |o_i| * sum_i sum_t min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)
    loss = sum(w m max(-A r, -A clip(r, 1 - eps_l, 1 + eps_h))) / N     (no dual clip)
    The paper's numbers: eps_low 0.2, eps_high 0.28; with overlong reward shaping (algorithm.overlong_*).
    """
    return _clipped_without_dual(logprobs, old_logprobs, advantages, mask, config, normalizers, is_weights,
                                 "token_mean")


@register_policy_loss("drgrpo")
def drgrpo_loss(logprobs, old_logprobs, advantages, mask, config: AlgorithmConfig, *,
                normalizers: Normalizers, is_weights=None):
    """Dr. GRPO's objective (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv 2503.20783):
    GRPO without the 1/|o_i| length normalisation; its code divides the token sums by a constant length L.

    J = 1/G sum_i 1/L sum_t min(r A, clip(r, 1 - eps, 1 + eps) A),   A = r_i - mean(r) (advantage drgrpo)
    loss = sum(w m max(-A r, -A clip(r, 1 - eps_l, 1 + eps_h))) / (L S)   (no dual clip)
    """
    return _clipped_without_dual(logprobs, old_logprobs, advantages, mask, config, normalizers, is_weights,
                                 "seq_mean_token_sum_norm")


GSPO_LOG_RATIO_MAX = 10.0  # verl clamps GSPO's log s_i from above only (max=10.0), for exp's sake


@register_policy_loss("gspo")
def gspo_loss(logprobs, old_logprobs, advantages, mask, config: AlgorithmConfig, *,
              normalizers: Normalizers, is_weights=None):
    """GSPO: the importance ratio and its clip per sequence (Zheng et al. 2025, "Group Sequence Policy
    Optimization", arXiv 2507.18071):

    s_i = (pi_theta(y_i) / pi_old(y_i))^(1/|y_i|) = exp(1/|y_i| sum_t log r_i,t)
    J = 1/G sum_i min(s_i A_i, clip(s_i, 1 - eps_l, 1 + eps_h) A_i)

    computed as verl's compute_policy_loss_gspo (b178a3cd), token by token (sg = stop gradient):
    log s_i,t = min(logprobs_i,t - sg(logprobs_i,t) + sg(log s_i), 10)   (clamped above only, as verl: no
        lower bound, and no gradient on a row whose log s_i exceeds 10)
    L_i,t = w_i,t max(-A_i,t s_i,t, -A_i,t clip(s_i,t, 1 - eps_l, 1 + eps_h))
    loss = 1/S sum_i 1/|y_i| sum_t m_t L_i,t          (seq-mean-token-mean, whatever algorithm.aggregation)
    s_i,t has the value s_i and d s_i,t / d logprobs_i,t = s_i, so with one advantage per row the gradient is
    the paper's grad s_i = s_i 1/|y_i| sum_t grad log pi_theta(y_i,t). A [batch] advantage is broadcast over
    the row; a [batch, seq] one is used per token, as verl. The paper's numbers: eps_l 3e-4, eps_h 4e-4.
    Metrics pg_clipfrac: the fraction of counted tokens whose clipped branch bounds the loss (verl's).
    """
    counted = mask > 0
    m = counted.astype(jnp.float32)
    lengths = jnp.maximum(jnp.sum(m, axis=-1, keepdims=True), 1.0)
    seq_log_ratio = jnp.sum(jnp.where(counted, logprobs - old_logprobs, 0.0), axis=-1, keepdims=True) / lengths
    log_s = logprobs - jax.lax.stop_gradient(logprobs) + jax.lax.stop_gradient(seq_log_ratio)
    # where (not minimum): the gradient passes at exactly 10 as torch.clamp's does; padding gets log s = 0
    log_s = jnp.where(counted, jnp.where(log_s <= GSPO_LOG_RATIO_MAX, log_s, GSPO_LOG_RATIO_MAX), 0.0)
    s = jnp.exp(log_s)
    adv = token_advantages(advantages, logprobs.shape)
    unclipped = -adv * s
    clipped_loss = -adv * jnp.clip(s, 1.0 - config.clip_low, 1.0 + config.clip_high)
    losses = jnp.maximum(unclipped, clipped_loss)
    weights = aggregation_weights(mask, "seq_mean_token_mean", normalizers)
    clipped = (clipped_loss > unclipped).astype(jnp.float32)
    return (weighted_sum(_weighted(losses, is_weights), weights),
            _clip_metrics(clipped, jnp.zeros_like(clipped), mask, normalizers))


@register_policy_loss("cispo")
def cispo_loss(logprobs, old_logprobs, advantages, mask, config: AlgorithmConfig, *,
               normalizers: Normalizers, is_weights=None):
    """CISPO: a REINFORCE term weighted by the clipped importance ratio, which gets no gradient, so no token
    loses its gradient to the clip (MiniMax 2025, "MiniMax-M1", arXiv 2506.13585):

    J = 1 / sum_i |o_i| * sum_i sum_t sg(clip(r, 1 - eps_low^IS, 1 + eps_high^IS)) A log pi_theta
    loss = -sum(w m sg(clip(r, 1 - eps_l, 1 + eps_h)) A logprobs) / N
    The paper sets no lower bound (eps_low^IS large: clip_low=1.0) and tunes eps_high^IS.
    Metrics pg_clipfrac: tokens whose ratio was clipped (above or below).
    """
    adv = token_advantages(advantages, logprobs.shape)
    ratio = jnp.exp(jnp.clip(logprobs - old_logprobs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    clipped_ratio = jax.lax.stop_gradient(jnp.clip(ratio, 1.0 - config.clip_low, 1.0 + config.clip_high))
    losses = -clipped_ratio * adv * logprobs
    weights = aggregation_weights(mask, "token_mean", normalizers)
    high = (ratio > 1.0 + config.clip_high).astype(jnp.float32)
    low = (ratio < 1.0 - config.clip_low).astype(jnp.float32)
    return weighted_sum(_weighted(losses, is_weights), weights), _clip_metrics(high + low, low, mask, normalizers)


def actor_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    config: AlgorithmConfig,
    *,
    normalizers: Normalizers,
    entropy: jax.Array | None = None,
    ref_logprobs: jax.Array | None = None,
    is_weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """loss = policy_loss + kl_coef * agg(KL(pi || pi_ref)) - entropy_coef * agg(H)

    policy_loss is the registered `config.policy_loss`; KL the registered `config.kl_estimator` (needs
    `ref_logprobs` when kl_coef != 0); agg is `config.aggregation` with the whole-batch `normalizers`.

    logprobs, old_logprobs, mask, entropy, ref_logprobs, is_weights: [batch, seq]; advantages: [batch, seq]
    or [batch]. Returns (loss, metrics); every metric is normalised by the same whole-batch counts, so
    micro-batch metrics add up to the batch's. Metrics: pg_loss, the policy loss's own (pg_clipfrac, ...),
    kl, entropy (aggregated like the loss), approx_kl (token mean of k3 of KL(pi_old || pi)).
    """
    pg_loss, pg_metrics = POLICY_LOSSES(config.policy_loss)(
        logprobs, old_logprobs, advantages, mask, config, normalizers=normalizers, is_weights=is_weights)
    weights = aggregation_weights(mask, config.aggregation, normalizers)
    loss = pg_loss
    metrics = {"pg_loss": pg_loss, **pg_metrics}
    if config.kl_coef != 0.0:
        if ref_logprobs is None:
            raise ValueError("kl_coef != 0 needs ref_logprobs (log-probs of the reference policy)")
        kl = weighted_sum(kl_penalty(logprobs, ref_logprobs, config.kl_estimator), weights)
        loss = loss + config.kl_coef * kl
        metrics["kl"] = kl
    if entropy is not None:
        ent = weighted_sum(entropy, weights)
        if config.entropy_coef != 0.0:
            loss = loss - config.entropy_coef * ent
        metrics["entropy"] = ent
    elif config.entropy_coef != 0.0:
        raise ValueError("entropy_coef != 0 needs the per-token entropy")
    token = aggregation_weights(mask, "token_mean", normalizers)
    metrics["approx_kl"] = weighted_sum(behaviour_kl(old_logprobs, logprobs), token)
    metrics["loss"] = loss
    return loss, metrics
