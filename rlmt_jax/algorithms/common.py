"""Math shared by the RL losses: token log-probs and entropy, KL estimators, the clipped policy
surrogate, loss aggregation, whitening.

Alignment convention used everywhere: per-token arrays are `[batch, seq]` over the whole sequence
(prompt + response) and position `t` holds the quantity of token `t`, i.e. predicted from the prefix
`0..t-1`. Position 0 has no prediction and always holds 0; masks are 0 there.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from rlmt_jax.errors import UserError

AggregationMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
AGGREGATION_MODES: tuple[str, ...] = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")


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


def kl_penalty(
    logprobs: jax.Array,
    ref_logprobs: jax.Array,
    estimator: KLEstimator = "k3",
    log_ratio_clamp: float = 20.0,
    kl_clamp: float = 10.0,
) -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi.

    d = clip(ref_logprobs - logprobs, -log_ratio_clamp, log_ratio_clamp)     (= log pi_ref/pi)
    k1 = -d ;  k2 = d^2 / 2 ;  k3 = exp(d) - d - 1 ;  result clipped to [-kl_clamp, kl_clamp].

    logprobs, ref_logprobs: [batch, seq] -> [batch, seq]
    """
    log_ratio = jnp.clip(ref_logprobs - logprobs, -log_ratio_clamp, log_ratio_clamp)
    if estimator == "k1":
        kl = -log_ratio
    elif estimator == "k2":
        kl = 0.5 * jnp.square(log_ratio)
    elif estimator == "k3":
        kl = jnp.exp(log_ratio) - log_ratio - 1.0
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")
    return jnp.clip(kl, -kl_clamp, kl_clamp)


def clipped_policy_losses(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = 3.0,
    log_ratio_clamp: float = 20.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token PPO clipped surrogate with clip-higher and dual clip.

    r = exp(clip(logprobs - old_logprobs, -log_ratio_clamp, log_ratio_clamp))
    L_clip = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))
    L = min(L_clip, -A c) where A < 0 (dual clip, c = dual_clip), else L_clip.

    logprobs, old_logprobs, advantages: [batch, seq].
    Returns (losses, clipped, dual_clipped): [batch, seq] each; `clipped` is 1 where the clipped
    branch bounds the loss (L_clip > -A r), `dual_clipped` where the dual clip bounds it.
    """
    ratio = jnp.exp(jnp.clip(logprobs - old_logprobs, -log_ratio_clamp, log_ratio_clamp))
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
    mask: jax.Array,
    mode: AggregationMode,
    *,
    num_tokens: jax.Array | float | None = None,
    num_sequences: jax.Array | float | None = None,
    norm_length: float = 4096.0,
) -> jax.Array:
    """Per-token weights w so that the aggregated loss is sum(w * losses).

    With m the mask, n_b = sum_t m[b, t], N = num_tokens (sum of m), S = num_sequences (rows with n_b > 0):
      token-mean:               w = m / N
      seq-mean-token-mean:      w = m / (n_b * S)
      seq-mean-token-sum:       w = m / S
      seq-mean-token-sum-norm:  w = m / (norm_length * S)       (Dr. GRPO: a constant length)

    Passing the whole batch's N and S while aggregating a micro-batch makes the micro-batch
    results add up to the whole-batch value. Defaults: N and S of `mask` itself.
    mask: [batch, seq] -> weights [batch, seq] float32
    """
    m = mask.astype(jnp.float32)
    if mode == "token-mean":
        total = count_tokens(m) if num_tokens is None else num_tokens
        return m / jnp.maximum(total, 1.0)
    seqs = count_sequences(m) if num_sequences is None else num_sequences
    seqs = jnp.maximum(seqs, 1.0)
    if mode == "seq-mean-token-mean":
        lengths = jnp.sum(m, axis=-1, keepdims=True)
        return m / (jnp.maximum(lengths, 1.0) * seqs)
    if mode == "seq-mean-token-sum":
        return m / seqs
    if mode == "seq-mean-token-sum-norm":
        return m / (norm_length * seqs)
    raise ValueError(f"unknown loss aggregation mode {mode!r}; expected one of {AGGREGATION_MODES}")


def weighted_sum(values: jax.Array, weights: jax.Array) -> jax.Array:
    """sum(values * weights), with masked-out positions (weight 0) ignored even if not finite.

    values, weights: [batch, seq] -> scalar
    """
    return jnp.sum(jnp.where(weights != 0, values * weights, 0.0))


def aggregate(
    values: jax.Array,
    mask: jax.Array,
    mode: AggregationMode,
    *,
    num_tokens: jax.Array | float | None = None,
    num_sequences: jax.Array | float | None = None,
    norm_length: float = 4096.0,
) -> jax.Array:
    """Aggregate per-token losses to a scalar under `mode` (see `aggregation_weights`).

    values, mask: [batch, seq] -> scalar
    """
    weights = aggregation_weights(
        mask, mode, num_tokens=num_tokens, num_sequences=num_sequences, norm_length=norm_length
    )
    return weighted_sum(values, weights)


def masked_mean(values: jax.Array, mask: jax.Array, num_tokens: jax.Array | float | None = None) -> jax.Array:
    """sum(values * mask) / num_tokens (default: sum(mask)).  values, mask: [batch, seq] -> scalar"""
    return aggregate(values, mask, "token-mean", num_tokens=num_tokens)


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


# --------------------------------------------------------------------------- the actor loss


@dataclasses.dataclass(frozen=True)
class ActorLossConfig:
    """Settings of the clipped-surrogate actor loss shared by GRPO and PPO (recipe defaults)."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = 3.0
    kl_coef: float = 0.001
    kl_estimator: KLEstimator = "k3"
    entropy_coef: float = 0.001
    loss_agg_mode: AggregationMode = "seq-mean-token-mean"
    norm_length: float = 4096.0
    temperature: float = 0.7
    log_ratio_clamp: float = 20.0
    kl_clamp: float = 10.0

    def __post_init__(self):
        # accept the run config's spelling (token_mean) as well as verl's (token-mean)
        object.__setattr__(self, "loss_agg_mode", self.loss_agg_mode.replace("_", "-"))
        if self.loss_agg_mode not in AGGREGATION_MODES:
            raise UserError(f"loss_agg_mode {self.loss_agg_mode!r}: expected one of {AGGREGATION_MODES}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise UserError(f"kl_estimator {self.kl_estimator!r}: expected one of {KL_ESTIMATORS}")
        if not (0.0 <= self.clip_low < 1.0) or self.clip_high < 0.0:
            raise UserError(f"clip_low must be in [0, 1) and clip_high >= 0, got {self.clip_low}, {self.clip_high}")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise UserError(f"dual_clip must be > 1 (or None to turn it off), got {self.dual_clip}")
        if self.temperature <= 0.0:
            raise UserError(f"temperature must be > 0 for log-probs, got {self.temperature}")


def actor_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    config: ActorLossConfig,
    *,
    entropy: jax.Array | None = None,
    ref_logprobs: jax.Array | None = None,
    num_tokens: jax.Array | float | None = None,
    num_sequences: jax.Array | float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """loss = agg(L_clip) + kl_coef * agg(KL(pi || pi_ref)) - entropy_coef * agg(H)

    agg is `config.loss_agg_mode` (see `aggregation_weights`); L_clip is `clipped_policy_losses`;
    KL is `kl_penalty` with `config.kl_estimator`. The KL term needs `ref_logprobs` when kl_coef != 0.

    logprobs, old_logprobs, mask, entropy, ref_logprobs: [batch, seq]; advantages: [batch, seq] or
    [batch] (one per sequence, broadcast over tokens). num_tokens / num_sequences: whole-batch counts
    when this is a micro-batch. Returns (loss, metrics); every metric is normalised by the same
    whole-batch counts, so micro-batch metrics add up to the batch's.
    Metrics: pg_loss, kl, entropy (aggregated like the loss), pg_clipfrac, pg_clipfrac_lower
    (dual clip), approx_kl (token mean of the k3 estimate of KL(behaviour || current)).
    """
    if advantages.ndim == 1:
        advantages = jnp.broadcast_to(advantages[:, None], logprobs.shape)
    weights = aggregation_weights(
        mask,
        config.loss_agg_mode,
        num_tokens=num_tokens,
        num_sequences=num_sequences,
        norm_length=config.norm_length,
    )
    token_weights = aggregation_weights(mask, "token-mean", num_tokens=num_tokens)
    losses, clipped, dual = clipped_policy_losses(
        logprobs,
        old_logprobs,
        advantages,
        config.clip_low,
        config.clip_high,
        config.dual_clip,
        config.log_ratio_clamp,
    )
    pg_loss = weighted_sum(losses, weights)
    loss = pg_loss
    metrics = {"pg_loss": pg_loss}
    if config.kl_coef != 0.0:
        if ref_logprobs is None:
            raise ValueError("kl_coef != 0 needs ref_logprobs (log-probs of the reference policy)")
        kl_tokens = kl_penalty(logprobs, ref_logprobs, config.kl_estimator, config.log_ratio_clamp, config.kl_clamp)
        kl = weighted_sum(kl_tokens, weights)
        loss = loss + config.kl_coef * kl
        metrics["kl"] = kl
    if entropy is not None:
        ent = weighted_sum(entropy, weights)
        if config.entropy_coef != 0.0:
            loss = loss - config.entropy_coef * ent
        metrics["entropy"] = ent
    elif config.entropy_coef != 0.0:
        raise ValueError("entropy_coef != 0 needs the per-token entropy")
    # KL(behaviour || current) from behaviour samples: k3 with r = pi / pi_old.
    behaviour_kl = kl_penalty(old_logprobs, jax.lax.stop_gradient(logprobs), "k3", config.log_ratio_clamp, 1e30)
    metrics["pg_clipfrac"] = weighted_sum(clipped, token_weights)
    metrics["pg_clipfrac_lower"] = weighted_sum(dual, token_weights)
    metrics["approx_kl"] = weighted_sum(behaviour_kl, token_weights)
    metrics["loss"] = loss
    return loss, metrics
