"""GRPO: group-normalised advantages and the GRPO actor loss (clipped surrogate + KL + entropy)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rlmt_jax.algorithms.common import ActorLossConfig, actor_loss
from rlmt_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class GRPOConfig(ActorLossConfig):
    """GRPO settings; defaults are the RLMT recipe (8 samples, std-normalised, k3 KL 0.001, ...).

    scale_by_std False gives Dr. GRPO's advantage r - mean_g (pair it with
    loss_agg_mode='seq-mean-token-sum-norm' for the full Dr. GRPO loss).
    """

    group_size: int = 8
    advantage_eps: float = 1e-6
    scale_by_std: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.group_size < 1:
            raise UserError(f"group_size must be >= 1, got {self.group_size}")


def group_advantages(
    rewards: jax.Array, group_size: int, eps: float = 1e-6, scale_by_std: bool = True
) -> jax.Array:
    """Advantage of each sample relative to its group (the samples of one prompt).

    A_i = (r_i - mean_g) / (std_g + eps)   with std_g the unbiased (n - 1) std of the group,
    A_i = r_i - mean_g                      when scale_by_std is False.
    A group of one sample has mean 0 and std 1 (A = r / (1 + eps)), as verl does.

    rewards: [num_prompts * group_size], groups stored consecutively -> advantages, same shape.
    """
    if rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of {group_size}")
    grouped = rewards.astype(jnp.float32).reshape(-1, group_size)
    if group_size == 1:
        mean, std = jnp.zeros_like(grouped), jnp.ones_like(grouped)
    else:
        mean = jnp.mean(grouped, axis=1, keepdims=True)
        std = jnp.std(grouped, axis=1, keepdims=True, ddof=1)
    centred = grouped - mean
    advantages = centred / (std + eps) if scale_by_std else centred
    return advantages.reshape(rewards.shape)


def grpo_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    config: GRPOConfig,
    *,
    entropy: jax.Array | None = None,
    ref_logprobs: jax.Array | None = None,
    num_tokens: jax.Array | float | None = None,
    num_sequences: jax.Array | float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO loss = agg(L_clip) + kl_coef * agg(KL) - entropy_coef * agg(H); see `common.actor_loss`.

    logprobs, old_logprobs, mask, entropy, ref_logprobs: [batch, seq]; advantages: [batch] or
    [batch, seq] (from `group_advantages`). Returns (loss, metrics).
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
