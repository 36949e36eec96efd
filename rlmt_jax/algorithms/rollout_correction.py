"""Rollout correction: the sampler (decode loop, its own dtype and kernels) and the trainer's forward give
slightly different log-probs for the same tokens. As verl's rollout correction, with
rho_t = pi_trainer(y_t) / pi_sampler(y_t) at the params that sampled (the old log-probs over the
sampler's) and rho = prod_t rho_t for a sequence:

  truncated importance weights (Ionides 2008; verl rollout_is): w_t = min(rho_t, cap) (token level) or
  w_t = min(rho, cap) for every token of the sequence; no gradient; they multiply the policy loss.
  masking (verl rollout_rs): tokens with rho_t outside [low, high] (token level), or every token of a
  sequence whose rho is outside it, count in no loss.

Settings: algorithm.rollout_correction (settings.RolloutCorrectionConfig); the bypass mode lives in the
trainer (it uses the sampler's log-probs as the old ones, so rho = 1).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rlmt_jax.algorithms.common import LOG_RATIO_CLAMP
from rlmt_jax.algorithms.settings import RolloutCorrectionConfig


@functools.partial(jax.jit, static_argnames="config")
def rollout_correction(
    old_logprobs: jax.Array, sampler_logprobs: jax.Array, mask: jax.Array, config: RolloutCorrectionConfig
) -> tuple[jax.Array | None, jax.Array, dict[str, jax.Array]]:
    """(importance weights [B, S] or None when config.weights is off, the corrected mask [B, S] (the input
    mask when config.mask is off), metrics).

    old_logprobs, sampler_logprobs, mask: [batch, seq]. Metrics, always (means over the tokens / rows of
    the input mask): rollout_ratio_mean / _min / _max (rho_t), rollout_seq_log_ratio_mean / _max_abs
    (log rho), rollout_weight_mean and rollout_weight_truncated_frac (weights on), rollout_masked_frac
    (the fraction of tokens taken out, mask on).
    """
    m = mask.astype(jnp.float32)
    log_rho = jnp.where(m > 0, jnp.clip(old_logprobs - sampler_logprobs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP), 0.0)
    rho = jnp.exp(log_rho)
    seq_log_rho = jnp.sum(log_rho, axis=-1)
    seq_rho = jnp.exp(jnp.clip(seq_log_rho, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    tokens = jnp.maximum(jnp.sum(m), 1.0)
    rows = (jnp.sum(m, axis=-1) > 0).astype(jnp.float32)
    counted = m > 0
    metrics = {
        "rollout_ratio_mean": jnp.sum(rho * m) / tokens,
        "rollout_ratio_min": jnp.min(jnp.where(counted, rho, jnp.inf), initial=jnp.inf),
        "rollout_ratio_max": jnp.max(jnp.where(counted, rho, 0.0), initial=0.0),
        "rollout_seq_log_ratio_mean": jnp.sum(seq_log_rho * rows) / jnp.maximum(jnp.sum(rows), 1.0),
        "rollout_seq_log_ratio_max_abs": jnp.max(jnp.abs(seq_log_rho) * rows),
    }
    metrics["rollout_ratio_min"] = jnp.where(jnp.isfinite(metrics["rollout_ratio_min"]),
                                             metrics["rollout_ratio_min"], 0.0)
    level_rho = {"token": rho, "sequence": jnp.broadcast_to(seq_rho[:, None], rho.shape)}
    weights = None
    if config.weights != "off":
        raw = level_rho[config.weights]
        weights = jnp.minimum(raw, config.weight_cap) * m
        metrics["rollout_weight_mean"] = jnp.sum(weights) / tokens
        metrics["rollout_weight_truncated_frac"] = jnp.sum((raw > config.weight_cap) * m) / tokens
    if config.mask != "off":
        raw = level_rho[config.mask]
        keep = (raw >= config.mask_low) & (raw <= config.mask_high)
        new_mask = jnp.where(keep, mask, jnp.zeros_like(mask))
        metrics["rollout_masked_frac"] = 1.0 - jnp.sum(new_mask.astype(jnp.float32)) / tokens
        mask = new_mask
    return weights, mask, metrics
