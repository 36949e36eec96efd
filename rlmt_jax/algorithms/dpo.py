"""DPO: the preference loss (sigmoid / IPO, label smoothing) and the online pair builder
(best vs worst of n scored samples per prompt)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from rlmt_jax.algorithms.settings import DPOConfig

def sequence_logprobs(logprobs: jax.Array, mask: jax.Array, average: bool = False) -> jax.Array:
    """Log-prob of each sequence's counted tokens: sum_t m_t logp_t (or that / sum_t m_t).

    logprobs, mask: [..., seq] -> [...]
    """
    m = mask.astype(jnp.float32)
    total = jnp.sum(jnp.where(m > 0, logprobs * m, 0.0), axis=-1)
    if average:
        total = total / jnp.maximum(jnp.sum(m, axis=-1), 1.0)
    return total


def dpo_loss(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    config: DPOConfig,
    *,
    pair_mask: jax.Array | None = None,
    num_pairs: jax.Array | float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean over pairs of the DPO loss.

    h = (chosen - ref_chosen) - (rejected - ref_rejected)      (sequence log-probs)
    sigmoid: L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps = label_smoothing)
    ipo:     L = (h - 1 / (2 beta))^2
    hinge:   L = max(0, 1 - beta h)

    All inputs: [pairs]. pair_mask [pairs] (1 = a real pair) and num_pairs (whole-batch count for
    micro-batches) default to all pairs of this call.
    Metrics (means over pairs): dpo_loss, reward_chosen = beta (chosen - ref_chosen),
    reward_rejected, reward_margin, reward_accuracy (reward_chosen > reward_rejected).
    """
    h = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    if config.loss_type == "sigmoid":
        eps = config.label_smoothing
        losses = -(1.0 - eps) * jax.nn.log_sigmoid(config.beta * h) - eps * jax.nn.log_sigmoid(-config.beta * h)
    elif config.loss_type == "ipo":
        losses = jnp.square(h - 1.0 / (2.0 * config.beta))
    else:
        losses = jax.nn.relu(1.0 - config.beta * h)
    m = jnp.ones_like(losses) if pair_mask is None else pair_mask.astype(jnp.float32)
    total = jnp.sum(m) if num_pairs is None else num_pairs
    w = m / jnp.maximum(total, 1.0)

    def mean(x):
        return jnp.sum(jnp.where(m > 0, x * w, 0.0))

    reward_chosen = config.beta * jax.lax.stop_gradient(chosen_logps - ref_chosen_logps)
    reward_rejected = config.beta * jax.lax.stop_gradient(rejected_logps - ref_rejected_logps)
    loss = mean(losses)
    metrics = {
        "dpo_loss": loss,
        "loss": loss,
        "reward_chosen": mean(reward_chosen),
        "reward_rejected": mean(reward_rejected),
        "reward_margin": mean(reward_chosen - reward_rejected),
        "reward_accuracy": mean((reward_chosen > reward_rejected).astype(jnp.float32)),
    }
    return loss, metrics


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """One DPO pair: indices into the prompt list and into that prompt's samples."""

    prompt_index: int
    chosen_index: int
    rejected_index: int
    chosen_score: float
    rejected_score: float


@dataclasses.dataclass(frozen=True)
class PairSelection:
    """The pairs kept, and how many prompts were skipped for each reason."""

    pairs: tuple[PreferencePair, ...]
    skipped_too_few_valid: int
    skipped_too_long: int
    skipped_tied: int


def build_preference_pairs(
    scores: Sequence[Sequence[float]],
    valid: Sequence[Sequence[bool]],
    lengths: Sequence[Sequence[int]],
    *,
    min_valid: int = 4,
    max_pair_tokens: int = 8192,
) -> PairSelection:
    """Best vs worst valid sample of each prompt.

    scores[p][i]: reward of sample i of prompt p; valid[p][i]: its answer could be parsed;
    lengths[p][i]: tokens of prompt + sample i (what the DPO step will train on).
    A prompt is skipped when it has fewer than `min_valid` valid samples, when its best and worst
    valid scores are equal (no preference), or when the chosen or the rejected sequence is longer than
    `max_pair_tokens` (algorithm.dpo.*). Ties in score pick the lowest sample index.
    """
    pairs: list[PreferencePair] = []
    too_few = too_long = tied = 0
    if not (len(scores) == len(valid) == len(lengths)):
        raise ValueError(
            f"scores, valid and lengths must have one entry per prompt, got {len(scores)}, {len(valid)}, {len(lengths)}"
        )
    for p, (s, v, n) in enumerate(zip(scores, valid, lengths)):
        if not (len(s) == len(v) == len(n)):
            raise ValueError(f"prompt {p}: scores, valid and lengths differ in length ({len(s)}, {len(v)}, {len(n)})")
        candidates = [i for i in range(len(s)) if v[i]]
        for i in candidates:
            if not math.isfinite(float(s[i])):
                raise ValueError(f"prompt {p}, sample {i}: reward {s[i]} is not finite")
        if len(candidates) < min_valid:
            too_few += 1
            continue
        best = max(candidates, key=lambda i: (float(s[i]), -i))
        worst = min(candidates, key=lambda i: (float(s[i]), i))
        if float(s[best]) == float(s[worst]):
            tied += 1
            continue
        if n[best] > max_pair_tokens or n[worst] > max_pair_tokens:
            too_long += 1
            continue
        pairs.append(PreferencePair(p, best, worst, float(s[best]), float(s[worst])))
    return PairSelection(tuple(pairs), too_few, too_long, tied)
