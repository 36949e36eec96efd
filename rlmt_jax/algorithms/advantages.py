"""Advantage estimators by name (`algorithm.advantage`), and DAPO's overlong reward shaping.

Rows are groups of G = rollout.n consecutive samples of one prompt; r_i is the reward model's score of
sample i, mean_g / std_g the mean and unbiased (n - 1) std of its group.

Exact ties: a group (G > 1) whose rewards are all equal (max == min, DAPO's "no signal" group) gets a centred
reward of exactly 0 (r_i - mean_g, r_i - the others' mean), set by a select rather than left to the float
arithmetic, whose rounding of the mean depends on how XLA orders the sum (0.1 eight times in float32 gave
advantages of -0.007 once fused into a larger jit). In exact arithmetic, verl's definition, it is 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rlmt_jax.algorithms.common import masked_whiten
from rlmt_jax.algorithms.ppo import gae_advantages, last_token_rewards
from rlmt_jax.algorithms.registry import ADVANTAGES, register_advantage
from rlmt_jax.algorithms.settings import AlgorithmConfig


def _groups(scores: jax.Array, group_size: int) -> jax.Array:
    if scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} rewards do not split into groups of {group_size}")
    return scores.astype(jnp.float32).reshape(-1, group_size)


def _zero_where_tied(grouped: jax.Array, centred: jax.Array) -> jax.Array:
    """centred [groups, G] with the rows of tied groups (max == min) set to exactly 0."""
    tied = jnp.max(grouped, axis=1, keepdims=True) == jnp.min(grouped, axis=1, keepdims=True)
    return jnp.where(tied, jnp.zeros_like(centred), centred)


def group_advantages(
    rewards: jax.Array, group_size: int, eps: float = 1e-6, scale_by_std: bool = True
) -> jax.Array:
    """Advantage of each sample relative to its group (the samples of one prompt).

    A_i = (r_i - mean_g) / (std_g + eps)   with std_g the unbiased (n - 1) std of the group,
    A_i = r_i - mean_g                      when scale_by_std is False.
    A group of one sample has mean 0 and std 1 (A = r / (1 + eps)), as verl does. A group of G > 1 equal
    rewards gets exactly 0 (module docstring).

    rewards: [num_prompts * group_size], groups stored consecutively -> advantages, same shape.
    """
    grouped = _groups(rewards, group_size)
    if group_size == 1:
        mean, std = jnp.zeros_like(grouped), jnp.ones_like(grouped)
    else:
        mean = jnp.mean(grouped, axis=1, keepdims=True)
        std = jnp.std(grouped, axis=1, keepdims=True, ddof=1)
    centred = grouped - mean if group_size == 1 else _zero_where_tied(grouped, grouped - mean)
    advantages = centred / (std + eps) if scale_by_std else centred
    return advantages.reshape(rewards.shape)


@register_advantage("grpo", min_group_size=2)
def grpo_advantages(scores, mask, config: AlgorithmConfig, *, group_size: int, values=None):
    """GRPO (Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300, outcome supervision):
    A_i = (r_i - mean_g) / (std_g + eps), eps = algorithm.grpo.eps.  -> ([batch], None)"""
    return group_advantages(scores, group_size, config.grpo.eps, scale_by_std=True), None


@register_advantage("drgrpo", min_group_size=2)
def drgrpo_advantages(scores, mask, config: AlgorithmConfig, *, group_size: int, values=None):
    """Dr. GRPO (Liu et al. 2025, arXiv 2503.20783): no std division, A_i = r_i - mean_g.
    -> ([batch], None)"""
    return group_advantages(scores, group_size, scale_by_std=False), None


@register_advantage("rloo", min_group_size=2)
def rloo_advantages(scores, mask, config: AlgorithmConfig, *, group_size: int, values=None):
    """RLOO, the leave-one-out baseline (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for
    free"; Ahmadian et al. 2024, "Back to Basics", arXiv 2402.14740):
    A_i = r_i - 1/(G - 1) sum_{j != i} r_j (exactly 0 in a tied group).  -> ([batch], None)"""
    grouped = _groups(scores, group_size)
    others = (jnp.sum(grouped, axis=1, keepdims=True) - grouped) / (group_size - 1)
    return _zero_where_tied(grouped, grouped - others).reshape(scores.shape), None


@register_advantage("reinforce_pp", min_group_size=1)
def reinforce_pp_advantages(scores, mask, config: AlgorithmConfig, *, group_size: int, values=None):
    """REINFORCE++ with baseline (Hu et al. 2025, "REINFORCE++", arXiv 2501.03262, REINFORCE++-baseline):
    the group mean subtracted (mean 0 for a group of one, as verl; exactly 0 for a tied group), then
    whitened over every response token of the batch: A_i,t = (a_i - mu) / sqrt(var + 1e-8), a_i = r_i - mean_g,
    mu and var (unbiased) over the tokens with m = 1.  -> ([batch, seq], None)"""
    centred = group_advantages(scores, group_size, scale_by_std=False) if group_size > 1 else scores
    m = mask.astype(jnp.float32)
    return masked_whiten(centred.astype(jnp.float32)[:, None] * m, m), None


@register_advantage("gae", needs_critic=True)
def gae(scores, mask, config: AlgorithmConfig, *, group_size: int, values=None):
    """PPO's advantages (Schulman et al. 2016, arXiv 1506.02438): the score on the last response token,
    GAE with algorithm.ppo.gamma / gae_lambda over the critic's values, whitened over the batch's response
    tokens when algorithm.ppo.whiten_advantages (returns are not whitened).
    values: [batch, seq] aligned like log-probs.  -> (advantages [batch, seq], returns [batch, seq])

    With a rollout correction mask (applied to `mask` before this, as verl does) a row whose last sampled token
    is masked gets its score on its last KEPT token, where verl (b178a3cd) places it on the last sampled token
    and its masked GAE loop then drops it, so the row trains on no reward at all. We differ on purpose and
    keep the reward: a masked-out last token says the sampler and trainer disagree on it, not that the
    answer earned nothing."""
    rewards = last_token_rewards(scores, mask)
    advantages, returns = gae_advantages(rewards, values, mask, config.ppo.gamma, config.ppo.gae_lambda)
    if config.ppo.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    return advantages, returns


def overlong_penalty(lengths: jax.Array, max_new_tokens: int, buffer: int, penalty: float) -> jax.Array:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476), L_max = max_new_tokens,
    L_cache = buffer:  R(y) = 0 if |y| <= L_max - L_cache, else -penalty * (|y| - (L_max - L_cache)) / L_cache
    (-penalty at |y| = L_max; the sampler stops there).  lengths: [batch] -> [batch] float32"""
    excess = lengths.astype(jnp.float32) - (max_new_tokens - buffer)
    return -penalty * jnp.clip(excess, 0.0, None) / buffer


@functools.partial(jax.jit, static_argnames=("config", "group_size", "max_new_tokens"))
def compute_advantages(scores, mask, config: AlgorithmConfig, *, group_size: int, max_new_tokens: int,
                       values=None, lengths=None):
    """The run's advantages: scores shaped by the overlong penalty when algorithm.overlong_buffer is set,
    then the registered `config.advantage` estimator (name resolved by the algorithm's spec).

    scores: [batch]; mask: [batch, seq]; values: [batch, seq] or None; lengths: [batch] the sampled response
    lengths the penalty reads (None: the mask's; a rollout correction mask may have dropped tokens of them).
    -> (advantages, returns or None, shaped scores [batch])"""
    if config.overlong_buffer:
        lengths = jnp.sum(mask, axis=-1) if lengths is None else lengths
        scores = scores + overlong_penalty(lengths, max_new_tokens, config.overlong_buffer, config.overlong_penalty)
    advantages, returns = ADVANTAGES(config.advantage)(scores, mask, config, group_size=group_size, values=values)
    return advantages, returns, scores
