"""Choosing the next token from one row of logits per sequence: temperature, top-k, exact top-p (nucleus),
an inverse-CDF draw, and the log-prob of the chosen token.

Everything here runs once per decode step inside the sampler's loop, so it avoids the costly ops of the
obvious implementation (PERF_NOTES.md): no sort over the vocabulary (the nucleus is found by bisecting a
probability threshold), no `jax.random.categorical` (one uniform per row, located in the cumulative mass by
a two-level search), and every pass over `[batch, vocab]` is a single fused elementwise/reduce.

Shapes: logits `[batch, vocab]`, everything per row is `[batch]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Tokens are located in the cumulative mass block by block: one pass for the block sums, then a cumulative
# sum over the [batch, vocab / block] block sums and one over the chosen block only.
DRAW_BLOCK = 256
_BITS_OF_ONE = 0x3F800000  # int32 bit pattern of float32 1.0


def weights_and_logprob_base(scaled: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Unnormalised probabilities and the log-normaliser of softmax(scaled).

    weights = exp(scaled - max) (each in (0, 1], the largest exactly 1), log_z = max + log(sum(weights)),
    so log softmax(scaled)[i] = scaled[i] - log_z.  scaled: [batch, vocab] -> ([batch, vocab], [batch]).
    """
    top = jnp.max(scaled, axis=-1, keepdims=True)
    weights = jnp.exp(scaled - top)
    return weights, top[:, 0] + jnp.log(jnp.sum(weights, axis=-1))


def top_k_floor(scaled: jax.Array, k: int) -> jax.Array:
    """The k-th largest value of each row: keeping `scaled >= floor` keeps the top k (and any ties with
    the k-th, as transformers does).  scaled: [batch, vocab] -> [batch, 1]."""
    # min over the k values rather than [..., -1]: XLA:CPU turns "last of top_k" into a full sort (~50x slower).
    return jnp.min(jax.lax.top_k(scaled, k)[0], axis=-1, keepdims=True)


NUCLEUS_CANDIDATES = 64  # the nucleus is looked for among the top 64 tokens first


def nucleus_floor(weights: jax.Array, top_p: float) -> jax.Array:
    """The smallest weight of the nucleus: keeping `weights >= floor` keeps exactly the smallest set of
    tokens, taken from the most probable down, whose mass reaches top_p (tokens tied with the last one kept
    are kept too).

    floor = max { t : sum_{i: w_i >= t} w_i >= top_p * sum_i w_i }, which is one of the weights.
    Fast path: when the NUCLEUS_CANDIDATES largest weights of every row hold top_p of its mass (a trained
    model at the usual temperatures), the floor is read off their cumulative sum. Otherwise every row is
    bisected (`bisected_nucleus_floor`).  No full sort of the vocabulary either way.
    weights: [batch, vocab], non-negative, max <= 1 -> [batch, 1] float32.
    """
    weights = weights.astype(jnp.float32)
    need = top_p * jnp.sum(weights, axis=-1, keepdims=True)
    top = jax.lax.top_k(weights, min(NUCLEUS_CANDIDATES, weights.shape[-1]))[0]  # [batch, k], descending
    reach = jnp.cumsum(top, axis=-1) >= need
    inside = jnp.sum(~reach, axis=-1, keepdims=True)  # index of the first top weight whose prefix reaches
    from_top = jnp.take_along_axis(top, jnp.minimum(inside, top.shape[-1] - 1), axis=-1)
    return jax.lax.cond(
        jnp.all(reach[:, -1]), lambda: from_top, lambda: bisected_nucleus_floor(weights, need)
    )


def bisected_nucleus_floor(weights: jax.Array, need: jax.Array) -> jax.Array:
    """max { t : sum_{i: w_i >= t} w_i >= need } by bisection on the int32 bit patterns of non-negative
    float32 values (ordered like the values): 31 halvings of [0, bits(1.0)] leave one bit pattern, so the
    threshold is exact, not an approximation of it.  weights: [batch, vocab] in [0, 1], need: [batch, 1]."""
    lo = jnp.zeros(need.shape, jnp.int32)  # the mass of {w >= lo} reaches `need`
    hi = jnp.full(need.shape, _BITS_OF_ONE + 1, jnp.int32)  # the mass of {w >= hi} does not

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        threshold = jax.lax.bitcast_convert_type(mid, jnp.float32)
        mass = jnp.sum(jnp.where(weights >= threshold, weights, 0.0), axis=-1, keepdims=True)
        reaches = mass >= need
        return jnp.where(reaches, mid, lo), jnp.where(reaches, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 31, halve, (lo, hi))
    return jax.lax.bitcast_convert_type(lo, jnp.float32)


def inverse_cdf_draw(weights: jax.Array, uniform: jax.Array) -> jax.Array:
    """The token i with C(i-1) <= u * C(V-1) < C(i), C the cumulative sum of the weights: a draw from
    weights / sum(weights) with one uniform per row.

    Two levels: block sums locate the block, a cumulative sum over that block alone locates the token.
    Tokens of zero weight are never returned.  weights: [batch, vocab] >= 0 (some > 0 per row),
    uniform: [batch] in [0, 1) -> tokens [batch] int32.
    """
    batch, vocab = weights.shape
    block = min(DRAW_BLOCK, vocab)
    blocks = -(-vocab // block)
    weights = weights.astype(jnp.float32)
    if blocks * block != vocab:
        weights = jnp.pad(weights, ((0, 0), (0, blocks * block - vocab)))
    weights = weights.reshape(batch, blocks, block)
    block_mass = jnp.sum(weights, axis=-1)  # [batch, blocks]
    block_ends = jnp.cumsum(block_mass, axis=-1)
    target = uniform * block_ends[:, -1]
    last_nonempty = _last_true(block_mass > 0)
    chosen = jnp.minimum(jnp.sum(block_ends <= target[:, None], axis=-1), last_nonempty)  # [batch]
    starts = jnp.pad(block_ends, ((0, 0), (1, 0)))  # starts[b] = mass before block b; <= target for `chosen`
    before = jnp.take_along_axis(starts, chosen[:, None], axis=-1)[:, 0]
    inside = jnp.take_along_axis(weights, chosen[:, None, None], axis=1)[:, 0]  # [batch, block]
    inside_ends = jnp.cumsum(inside, axis=-1)
    offset = jnp.minimum(jnp.sum(inside_ends <= (target - before)[:, None], axis=-1), _last_true(inside > 0))
    return (chosen * block + offset).astype(jnp.int32)


def first_max_index(x: jax.Array) -> jax.Array:
    """argmax over the last axis (the first index on ties) as two plain reductions, which XLA:CPU runs
    several times faster than its (value, index) argmax reduction.  [batch, n] -> [batch] int32."""
    top = jnp.max(x, axis=-1, keepdims=True)
    idx = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(x == top, idx, x.shape[-1] - 1), axis=-1).astype(jnp.int32)


def _last_true(flags: jax.Array) -> jax.Array:
    """Index of the last True along the last axis (0 when none).  [batch, n] -> [batch] int32."""
    idx = jnp.arange(flags.shape[-1], dtype=jnp.int32)
    return jnp.max(jnp.where(flags, idx, 0), axis=-1)


def choose_next_token(
    logits: jax.Array,
    uniform: jax.Array,
    temperature: float,
    top_k: int | None = None,
    top_p: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Next tokens and their log-probs.

    temperature > 0: z = logits / temperature; tokens outside the top k of z, then outside the nucleus
    top_p of what is left, get weight 0; the token is drawn from the rest in proportion to exp(z).
    temperature == 0: greedy, argmax of the logits (top_k and top_p are irrelevant; `uniform` unused).
    The log-prob is that of the FULL distribution, log softmax(z)[token] (z = logits when greedy), which is
    what the RL losses recompute with a teacher-forced forward pass; it ignores the top-k/top-p truncation.
    logits: [batch, vocab], uniform: [batch] in [0, 1) -> (tokens [batch] int32, logprobs [batch] float32).
    """
    logits = logits.astype(jnp.float32)
    if temperature == 0:
        tokens = first_max_index(logits)
        scaled = logits
        weights, log_z = weights_and_logprob_base(scaled)
    else:
        scaled = logits / temperature if temperature != 1 else logits
        weights, log_z = weights_and_logprob_base(scaled)
        kept = weights
        if top_k is not None and top_k < logits.shape[-1]:
            kept = jnp.where(scaled >= top_k_floor(scaled, top_k), kept, 0.0)
        if top_p < 1.0:
            kept = jnp.where(kept >= nucleus_floor(kept, top_p), kept, 0.0)
        tokens = inverse_cdf_draw(kept, uniform)
    chosen = jnp.take_along_axis(scaled, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen - log_z
