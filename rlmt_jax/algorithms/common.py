"""Math shared by the RL losses: token log-probs and entropy, KL estimators, the clipped policy
surrogate, loss aggregation, whitening.

Alignment convention used everywhere: per-token arrays are `[batch, seq]` over the whole sequence
(prompt + response) and position `t` holds the quantity of token `t`, i.e. predicted from the prefix
`0..t-1`. Position 0 has no prediction and always holds 0; masks are 0 there.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlmt_jax.algorithms.registry import KL_ESTIMATORS, register_kl_estimator
from rlmt_jax.algorithms.settings import AGGREGATIONS, Aggregation


class Normalizers(NamedTuple):
    """Whole-batch denominators of the losses, computed before a batch is cut into micro-batches so that
    the micro-batches' losses add up to the batch's: counted tokens, rows with a counted token, and
    Dr. GRPO's constant length L (rollout.max_new_tokens)."""

    num_tokens: jax.Array | float
    num_sequences: jax.Array | float
    norm_length: float = 4096.0

    @classmethod
    def of(cls, mask: jax.Array, norm_length: float = 4096.0) -> Normalizers:
        """The normalisers of `mask` [batch, seq] itself (one batch, no micro-batches)."""
        return cls(count_tokens(mask), count_sequences(mask), norm_length)


# --------------------------------------------------------------------------- log-probs and entropy


def _stats(logits, targets, inv_temperature):
    """(logp of targets, entropy, logsumexp) of softmax(logits * inv_temperature) over the last axis."""
    z = logits.astype(jnp.float32) * inv_temperature
    lse = jax.nn.logsumexp(z, axis=-1)
    target_z = jnp.take_along_axis(z, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    p = jnp.exp(z - lse[..., None])
    entropy = lse - jnp.sum(p * z, axis=-1)
    return target_z - lse, entropy, lse


def _logits_cotangent(logits, targets, inv_temperature, lse, entropy, g_lp, g_ent):
    """d(g_lp . logp + g_ent . H) / d logits, recomputing the softmax from the logits in one pass:
    d logp_y / dz = onehot(y) - p ;  d H / dz = -p (log p + H) ;  dz / dlogits = inv_temperature.
    """
    log_p = logits.astype(jnp.float32) * inv_temperature - lse[..., None]
    p = jnp.exp(log_p)
    onehot = jnp.arange(logits.shape[-1], dtype=jnp.int32) == targets[..., None].astype(jnp.int32)
    dz = g_lp[..., None] * (onehot - p) - g_ent[..., None] * p * (log_p + entropy[..., None])
    return dz * inv_temperature


@jax.custom_vjp
def _logprob_entropy(logits: jax.Array, targets: jax.Array, inv_temperature: jax.Array):
    lp, ent, _ = _stats(logits, targets, inv_temperature)
    return lp, ent


def _logprob_entropy_fwd(logits, targets, inv_temperature):
    lp, ent, lse = _stats(logits, targets, inv_temperature)
    # Only the logits (already alive as the matmul output) and two [B,T] rows are kept for the
    # backward pass; the softmax is recomputed there in one fused pass instead of being stored.
    return (lp, ent), (logits, targets, inv_temperature, lse, ent)


def _logprob_entropy_bwd(residuals, cotangents):
    logits, targets, inv_temperature, lse, ent = residuals
    d_logits = _logits_cotangent(logits, targets, inv_temperature, lse, ent, *cotangents)
    return d_logits.astype(logits.dtype), None, jnp.zeros_like(inv_temperature)


_logprob_entropy.defvjp(_logprob_entropy_fwd, _logprob_entropy_bwd)


def logprobs_and_entropy(
    logits: jax.Array, targets: jax.Array, temperature: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """Log-prob of `targets` and entropy of the temperature-scaled distribution, per position.

    z = logits / temperature;  logp = z[target] - logsumexp(z);  H = logsumexp(z) - sum(softmax(z) * z)

    logits: [..., vocab] (any float dtype; computed in float32), targets: [...] int.
    Returns (logprobs [...], entropy [...]) float32. The backward pass recomputes the softmax from
    the logits instead of storing [..., vocab] intermediates.
    """
    inv_t = jnp.asarray(1.0 / temperature, jnp.float32)
    return _logprob_entropy(logits, targets, inv_t)


@jax.custom_vjp
def _head_logprob_entropy(hidden, weight, targets, inv_temperature):
    logits = jnp.dot(hidden, weight, preferred_element_type=jnp.float32)
    lp, ent, _ = _stats(logits, targets, inv_temperature)
    return lp, ent


def _head_logprob_entropy_fwd(hidden, weight, targets, inv_temperature):
    logits = jnp.dot(hidden, weight, preferred_element_type=jnp.float32)
    lp, ent, lse = _stats(logits, targets, inv_temperature)
    return (lp, ent), (hidden, weight, logits, targets, inv_temperature, lse, ent)


def _head_logprob_entropy_bwd(residuals, cotangents):
    hidden, weight, logits, targets, inv_temperature, lse, ent = residuals
    d_logits = _logits_cotangent(logits, targets, inv_temperature, lse, ent, *cotangents).astype(weight.dtype)
    # Written out (rather than autodiff of the matmul) so that d_logits stays [tokens, vocab]
    # row-major: XLA:CPU otherwise fuses the elementwise work into a transposed copy.
    d_hidden = jnp.dot(d_logits, weight.T, preferred_element_type=jnp.float32).astype(hidden.dtype)
    d_weight = jnp.dot(hidden.T, d_logits, preferred_element_type=jnp.float32).astype(weight.dtype)
    return d_hidden, d_weight, None, jnp.zeros_like(inv_temperature)


_head_logprob_entropy.defvjp(_head_logprob_entropy_fwd, _head_logprob_entropy_bwd)


def head_logprobs_and_entropy(
    hidden: jax.Array, weight: jax.Array, targets: jax.Array, temperature: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """`logprobs_and_entropy(hidden @ weight, targets, temperature)` with the lm-head matmul inside
    one custom gradient (logits float32-accumulated; the softmax is recomputed in the backward pass).

    hidden: [..., embed], weight: [embed, vocab] (in the compute dtype), targets: [...]
    -> (logprobs [...], entropy [...]) float32
    """
    lead = hidden.shape[:-1]
    inv_t = jnp.asarray(1.0 / temperature, jnp.float32)
    lp, ent = _head_logprob_entropy(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), inv_t
    )
    return lp.reshape(lead), ent.reshape(lead)


def shift_right(x: jax.Array) -> jax.Array:
    """out[:, t] = x[:, t-1], out[:, 0] = 0.   x: [batch, seq, ...] -> same shape.

    Turns "predicted at t" (from logits at t, about token t+1) into the alignment convention
    "held at the predicted token's position".
    """
    return jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)


def next_token_targets(tokens: jax.Array) -> jax.Array:
    """targets[:, t] = tokens[:, t+1] (the last position gets token 0; it is never used).

    tokens: [batch, seq] -> [batch, seq]
    """
    return jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)


def sequence_logprobs_and_entropy(
    logits: jax.Array, tokens: jax.Array, temperature: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """Aligned log-probs and entropies of a whole sequence from its logits.

    logprobs[:, t] = log softmax(logits[:, t-1] / temperature)[tokens[:, t]] for t >= 1, 0 at t = 0;
    entropy[:, t] = entropy of that same distribution (the one token t was drawn from).

    logits: [batch, seq, vocab], tokens: [batch, seq] -> (logprobs [batch, seq], entropy [batch, seq])
    """
    lp, ent = logprobs_and_entropy(logits, next_token_targets(tokens), temperature)
    return shift_right(lp), shift_right(ent)


def chunked_sequence_logprobs_and_entropy(
    hidden: jax.Array,
    tokens: jax.Array,
    weight: jax.Array,
    temperature: float = 1.0,
    chunk_size: int | None = 1024,
) -> tuple[jax.Array, jax.Array]:
    """`sequence_logprobs_and_entropy(hidden @ weight, tokens, temperature)` without ever holding the
    whole `[batch, seq, vocab]` logits: the sequence is cut into chunks of `chunk_size` positions,
    each chunk's logits are made, reduced and dropped, and rebuilt in the backward pass (remat).

    hidden: [batch, seq, embed] (final-normed), tokens: [batch, seq], weight: [embed, vocab] (the lm
    head, compute dtype). Returns (logprobs [batch, seq], entropy [batch, seq]) aligned as in the
    module docstring. chunk_size None or >= seq: one pass, no remat.
    """
    batch, seq, _ = hidden.shape
    targets = next_token_targets(tokens)
    if chunk_size is None or chunk_size >= seq:
        lp, ent = head_logprobs_and_entropy(hidden, weight, targets, temperature)
        return shift_right(lp), shift_right(ent)
    num_chunks = -(-seq // chunk_size)
    padded = num_chunks * chunk_size
    if padded != seq:
        hidden = jnp.pad(hidden, ((0, 0), (0, padded - seq), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, padded - seq)))
    hidden_chunks = hidden.reshape(batch, num_chunks, chunk_size, -1).swapaxes(0, 1)
    target_chunks = targets.reshape(batch, num_chunks, chunk_size).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(h, t):
        return head_logprobs_and_entropy(h, weight, t, temperature)

    def body(carry, xs):
        return carry, one_chunk(*xs)

    _, (lp, ent) = jax.lax.scan(body, None, (hidden_chunks, target_chunks))
    lp = lp.swapaxes(0, 1).reshape(batch, padded)[:, :seq]
    ent = ent.swapaxes(0, 1).reshape(batch, padded)[:, :seq]
    return shift_right(lp), shift_right(ent)


# --------------------------------------------------------------------------- KL and the surrogate

LOG_RATIO_CLAMP = 20.0  # |log ratio| bound before an exp (k3, ratios): keeps them finite in float32
K3_CLAMP = 10.0  # k3 (only) is clipped to [-10, 10], as verl does


def _log_ratio(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
    """d = clip(ref_logprobs - logprobs, -20, 20) = log pi_ref / pi, clipped before exp(d) (k3 only)."""
    return jnp.clip(ref_logprobs - logprobs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


@register_kl_estimator("k1")
def kl_k1(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
    """k1 = logprobs - ref_logprobs = log pi / pi_ref (unbiased, high variance; Schulman, "Approximating KL
    divergence", 2020; verl's "kl"/"k1"). Not clamped at all, as verl: a token that drifted 23.9 nats gets
    k1 = 23.9 and keeps its gradient d k1 / d logprobs = 1.  [batch, seq]"""
    return logprobs - ref_logprobs


@register_kl_estimator("k2")
def kl_k2(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
    """k2 = (logprobs - ref_logprobs)^2 / 2 (biased, low variance; Schulman 2020; verl's "mse"/"k2"). Not
    clamped at all, as verl: its gradient is logprobs - ref_logprobs however far a token drifted.
    [batch, seq]"""
    return 0.5 * jnp.square(logprobs - ref_logprobs)


def _k3(log_ratio: jax.Array) -> jax.Array:
    return jnp.exp(log_ratio) - log_ratio - 1.0


@register_kl_estimator("k3")
def kl_k3(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
    """k3 = exp(d) - d - 1 with d = clip(ref_logprobs - logprobs, -20, 20), then clipped to [-10, 10]
    (unbiased, low variance, >= 0; Schulman 2020): verl's "low_var_kl"/"k3", the only estimator verl clamps
    (no gradient where either clamp binds).  [batch, seq]"""
    return jnp.clip(_k3(_log_ratio(logprobs, ref_logprobs)), -K3_CLAMP, K3_CLAMP)


def kl_penalty(logprobs: jax.Array, ref_logprobs: jax.Array, estimator: str = "k3") -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi by the registered `estimator`
    (k1, k2, k3, or one a user registered).  logprobs, ref_logprobs: [batch, seq] -> [batch, seq]"""
    return KL_ESTIMATORS(estimator)(logprobs, ref_logprobs)


def behaviour_kl(old_logprobs: jax.Array, logprobs: jax.Array) -> jax.Array:
    """k3 estimate of KL(pi_old || pi) from samples of pi_old, its log ratio clipped to +-20 but the result
    not clipped to [-10, 10] (the approx_kl metric; no gradient).  [batch, seq] -> [batch, seq]"""
    return _k3(_log_ratio(old_logprobs, jax.lax.stop_gradient(logprobs)))


def clipped_policy_losses(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = 3.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token PPO clipped surrogate with clip-higher and dual clip.

    r = exp(clip(logprobs - old_logprobs, -20, 20))
    L_clip = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))
    L = min(L_clip, -A c) where A < 0 (dual clip, c = dual_clip), else L_clip.

    logprobs, old_logprobs, advantages: [batch, seq].
    Returns (losses, clipped, dual_clipped): [batch, seq] each; `clipped` is 1 where the clipped
    branch bounds the loss (L_clip > -A r), `dual_clipped` where the dual clip bounds it.
    """
    ratio = jnp.exp(jnp.clip(logprobs - old_logprobs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    losses = jnp.maximum(unclipped, clipped)
    is_clipped = (clipped > unclipped).astype(jnp.float32)
    if dual_clip is None:
        return losses, is_clipped, jnp.zeros_like(is_clipped)
    dual_bound = -advantages * dual_clip
    negative = advantages < 0
    is_dual = (negative & (losses > dual_bound)).astype(jnp.float32)
    losses = jnp.where(negative, jnp.minimum(losses, dual_bound), losses)
    return losses, is_clipped, is_dual


# --------------------------------------------------------------------------- aggregation


def count_tokens(mask: jax.Array) -> jax.Array:
    """Number of counted tokens. mask: [batch, seq] -> float32 scalar."""
    return jnp.sum(mask.astype(jnp.float32))


def count_sequences(mask: jax.Array) -> jax.Array:
    """Number of rows with at least one counted token (padding rows do not count).

    mask: [batch, seq] -> float32 scalar
    """
    return jnp.sum((jnp.sum(mask, axis=-1) > 0).astype(jnp.float32))


def aggregation_weights(
    mask: jax.Array, mode: Aggregation, normalizers: Normalizers | None = None
) -> jax.Array:
    """Per-token weights w so that the aggregated loss is sum(w * losses).

    With m the mask, n_b = sum_t m[b, t], N = num_tokens (sum of m), S = num_sequences (rows with n_b > 0),
    L = norm_length (all from `normalizers`; default: those of `mask` itself, L = 4096):
      token_mean:               w = m / N
      seq_mean_token_mean:      w = m / (n_b * S)
      seq_mean_token_sum:       w = m / S
      seq_mean_token_sum_norm:  w = m / (L * S)       (Dr. GRPO: a constant length)

    Passing the whole batch's normalisers while aggregating a micro-batch makes the micro-batch
    results add up to the whole-batch value (n_b is a row's own count: rows are never split).
    seq_mean_token_sum_norm computes sum_b sum_t m[b, t] losses[b, t] / (L * S), with L =
    rollout.max_new_tokens (the constant Dr. GRPO asks for) and S the whole batch's rows with a counted token.
    verl's agg_loss("seq-mean-token-sum-norm") at b178a3cd divides the same token sum of the micro-batch it
    is given by loss_scale_factor only (default: that micro-batch's padded response width), by no row
    count; so ours is its value with loss_scale_factor = L, divided by S. (What verl's actor then
    multiplies each micro-batch's loss by is outside agg_loss and not matched here.)
    mask: [batch, seq] -> weights [batch, seq] float32
    """
    m = mask.astype(jnp.float32)
    n = Normalizers.of(m) if normalizers is None else normalizers
    if mode == "token_mean":
        return m / jnp.maximum(n.num_tokens, 1.0)
    seqs = jnp.maximum(n.num_sequences, 1.0)
    if mode == "seq_mean_token_mean":
        lengths = jnp.sum(m, axis=-1, keepdims=True)
        return m / (jnp.maximum(lengths, 1.0) * seqs)
    if mode == "seq_mean_token_sum":
        return m / seqs
    if mode == "seq_mean_token_sum_norm":
        return m / (n.norm_length * seqs)
    raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {AGGREGATIONS}")


def weighted_sum(values: jax.Array, weights: jax.Array) -> jax.Array:
    """sum(values * weights), with masked-out positions (weight 0) ignored even if not finite.

    values, weights: [batch, seq] -> scalar
    """
    return jnp.sum(jnp.where(weights != 0, values * weights, 0.0))


def aggregate(
    values: jax.Array, mask: jax.Array, mode: Aggregation, normalizers: Normalizers | None = None
) -> jax.Array:
    """Aggregate per-token values to a scalar under `mode` (see `aggregation_weights`).

    values, mask: [batch, seq] -> scalar
    """
    return weighted_sum(values, aggregation_weights(mask, mode, normalizers))


def masked_mean(values: jax.Array, mask: jax.Array, num_tokens: jax.Array | float | None = None) -> jax.Array:
    """sum(values * mask) / num_tokens (default: sum(mask)).  values, mask: [batch, seq] -> scalar"""
    m = mask.astype(jnp.float32)
    total = count_tokens(m) if num_tokens is None else num_tokens
    return weighted_sum(values, m / jnp.maximum(total, 1.0))


def masked_whiten(values: jax.Array, mask: jax.Array, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """Whiten over the masked entries of the whole array:

    mu = sum(m x) / n ;  var = sum(m (x - mu)^2) / (n - 1)  (unbiased) ;
    out = (x - mu) / sqrt(var + eps)  (+ mu back when shift_mean is False); 0 where m = 0.

    values, mask: [batch, seq] (or any equal shapes) -> same shape
    """
    m = mask.astype(jnp.float32)
    n = jnp.sum(m)
    mean = jnp.sum(values * m) / jnp.maximum(n, 1.0)
    var = jnp.sum(jnp.square(values - mean) * m) / jnp.maximum(n - 1.0, 1.0)
    out = (values - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m
