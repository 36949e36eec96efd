"""Rollout correction: the sampler (decode loop, its own dtype and kernels) and the trainer's forward give
slightly different log-probs for the same tokens. As verl's rollout correction (verl/trainer/ppo/
rollout_corr_helper.py at b178a3cd), with l_t = log rho_t = old log-prob - sampler log-prob (pi_trainer /
pi_sampler at the params that sampled) on the counted tokens:

  truncated importance weights (Ionides 2008; verl rollout_is, compute_rollout_correction_weights), no
  gradient, multiplying the policy loss:
    token:    w_t = min(exp(clip(l_t, -20, 20)), cap)
    sequence: w_t = min(exp(clip(sum_t' m_t' l_t', -20, 20)), cap) on every token of the row (the row's
              log-ratios are summed first, then clamped: one extreme token does not decide the product)
  masking (verl rollout_rs, compute_rollout_rejection_mask with its "token_k1" / "seq_sum_k1" options):
    token:    keep token t iff log(mask_low) <= clip(l_t, -20, 20) <= log(mask_high)
    sequence: keep the row iff log(mask_low) <= sum_t m_t clip(l_t, -20, 20) <= log(mask_high)
              (verl sums the per-token clamped k1 = -clip(l_t) here, unlike the weights' sum)
  verl's k1 options bound exp(k1) = 1/rho, so mask=token|sequence with [mask_low, mask_high] is verl's
  rollout_rs=token_k1|seq_sum_k1 with rollout_rs_threshold "{1/mask_high}_{1/mask_low}" (the defaults 0.5
  and 2.0 give verl's "0.5_2.0" either way).

Settings: algorithm.rollout_correction (settings.RolloutCorrectionConfig); the bypass mode lives in the
trainer (it uses the sampler's log-probs as the old ones, so rho = 1).
"""

from __future__ import annotations

import functools
import math

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
    the input mask): rollout_ratio_mean / _min / _max (rho_t = exp(clip(l_t, -20, 20))),
    rollout_seq_log_ratio_mean / _max_abs (the row sums sum_t m_t l_t, unclamped), rollout_weight_mean and
    rollout_weight_truncated_frac (weights on), rollout_masked_frac (the fraction of tokens taken out, mask on).
    """
    m = mask.astype(jnp.float32)
    counted = m > 0
    log_rho = jnp.where(counted, old_logprobs - sampler_logprobs, 0.0)
    token_log_rho = jnp.clip(log_rho, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # verl: clamp(log_ratio, -20, 20)
    rho = jnp.exp(token_log_rho)
    seq_log_rho = jnp.sum(log_rho, axis=-1)  # verl: masked_sum(log_ratio), unclamped until the exp
    seq_rho = jnp.exp(jnp.clip(seq_log_rho, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    tokens = jnp.maximum(jnp.sum(m), 1.0)
    rows = (jnp.sum(m, axis=-1) > 0).astype(jnp.float32)
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
        # verl's token_k1 / seq_sum_k1 statistics (up to their sign), compared in log space as verl does
        level_stat = {"token": token_log_rho,
                      "sequence": jnp.broadcast_to(jnp.sum(token_log_rho, axis=-1, keepdims=True), rho.shape)}
        stat = level_stat[config.mask]
        low = -math.inf if config.mask_low <= 0 else math.log(config.mask_low)
        keep = (stat >= low) & (stat <= math.log(config.mask_high))
        new_mask = jnp.where(keep, mask, jnp.zeros_like(mask))
        metrics["rollout_masked_frac"] = 1.0 - jnp.sum(new_mask.astype(jnp.float32)) / tokens
        mask = new_mask
    return weights, mask, metrics
