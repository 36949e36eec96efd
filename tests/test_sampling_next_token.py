"""Next-token choice on hand-built distributions: exact nucleus, inverse-CDF draws, top-k, greedy, log-probs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlmt_jax.rollout.next_token import (
    DRAW_BLOCK,
    NUCLEUS_CANDIDATES,
    bisected_nucleus_floor,
    choose_next_token,
    first_max_index,
    inverse_cdf_draw,
    nucleus_floor,
    top_k_floor,
)

# probabilities of 5 tokens, most probable first: 1 (.4), 3 (.3), 4 (.15), 2 (.1), 0 (.05)
PROBS = np.array([0.05, 0.4, 0.1, 0.3, 0.15], np.float32)


def kept_by_nucleus(weights, top_p):
    weights = jnp.asarray(weights, jnp.float32)[None]
    floor = nucleus_floor(weights, top_p)
    return set(np.flatnonzero(np.asarray(weights[0] >= floor[0])).tolist())


@pytest.mark.parametrize(
    "top_p, nucleus",
    [
        (0.3, {1}),  # .4 alone reaches .3
        (0.4, {1}),  # .4 reaches .4 exactly
        (0.5, {1, 3}),  # .4 < .5 <= .7
        (0.75, {1, 3, 4}),  # .7 < .75 <= .85
        (0.9, {1, 3, 4, 2}),  # .85 < .9 <= .95
        (0.96, {0, 1, 2, 3, 4}),
        (1.0, {0, 1, 2, 3, 4}),
    ],
)
def test_nucleus_keeps_exactly_the_smallest_set_reaching_top_p(top_p, nucleus):
    assert kept_by_nucleus(PROBS, top_p) == nucleus
    # Unnormalised weights (what the sampler passes: exp(z - max z)) give the same set.
    assert kept_by_nucleus(PROBS / PROBS.max(), top_p) == nucleus


def test_nucleus_keeps_tokens_tied_with_its_last_token():
    # sorted: .3 .3 .2 .2; .6 < .65, so one .2 is needed, and the tied .2 comes with it.
    assert kept_by_nucleus([0.3, 0.2, 0.3, 0.2], 0.65) == {0, 1, 2, 3}
    assert kept_by_nucleus([0.3, 0.2, 0.3, 0.2], 0.55) == {0, 2}


def test_nucleus_separates_weights_one_float_step_apart():
    # A threshold found by bisection on the values would need ~2^-24 resolution here; on the bit patterns
    # it is exact.
    below = np.nextafter(np.float32(0.25), np.float32(0))
    weights = np.array([0.5, 0.25, below, 0.0], np.float32)
    assert kept_by_nucleus(weights, 0.5 / (0.75 + below)) == {0}
    assert kept_by_nucleus(weights, 0.7) == {0, 1}  # .75 / (1 - 1e-8) reaches .7, and `below` is not needed


def test_nucleus_of_a_row_whose_top_tokens_hold_most_mass_in_a_large_vocabulary():
    rng = np.random.default_rng(0)
    weights = rng.uniform(0, 1e-6, size=(3, 5000)).astype(np.float32)
    weights[:, [7, 4000, 123]] = [1.0, 0.5, 0.25]
    floor = np.asarray(nucleus_floor(jnp.asarray(weights), 0.8))
    for row in range(3):
        # mass = 1.75 + ~2.5e-3; 0.8 of it = ~1.402: 1 + .5 reaches it, 1 alone does not.
        assert set(np.flatnonzero(weights[row] >= floor[row]).tolist()) == {7, 4000}


def sorted_nucleus(weights, top_p):
    """Reference: sort descending, keep the shortest prefix whose mass reaches top_p, plus ties of its last."""
    order = np.argsort(-weights, kind="stable")
    mass = np.cumsum(weights[order].astype(np.float64))
    last = weights[order][np.searchsorted(mass, top_p * mass[-1] * (1 - 1e-12))]
    return set(np.flatnonzero(weights >= last).tolist())


def test_nucleus_of_flat_rows_outside_the_top_candidates_is_found_by_bisection():
    rng = np.random.default_rng(1)
    weights = rng.uniform(0.5, 1.0, size=(2, 3000)).astype(np.float32)  # top-64 hold ~3% of the mass
    floor = np.asarray(nucleus_floor(jnp.asarray(weights), 0.6))
    for row in range(2):
        kept = set(np.flatnonzero(weights[row] >= floor[row]).tolist())
        assert len(kept) > NUCLEUS_CANDIDATES
        assert kept == sorted_nucleus(weights[row], 0.6)
    # the bisection alone gives the same floor on rows the fast path handles too
    peaked = np.array([[1.0, 0.5, 0.25, 0.125] + [1e-4] * 100], np.float32)
    need = 0.8 * peaked.sum(axis=-1, keepdims=True)
    np.testing.assert_array_equal(np.asarray(bisected_nucleus_floor(jnp.asarray(peaked), jnp.asarray(need))),
                                  np.asarray(nucleus_floor(jnp.asarray(peaked), 0.8)))


def test_inverse_cdf_draw_picks_the_token_whose_mass_interval_holds_u():
    weights = jnp.asarray([[0.0, 1.0, 0.0, 3.0]] * 5)
    uniform = jnp.asarray([0.0, 0.1, 0.25, 0.3, 0.999999])
    # cumulative mass 0, 1, 1, 4: u*4 in [0, 1) -> token 1, in [1, 4) -> token 3; zero-weight tokens never.
    assert np.asarray(inverse_cdf_draw(weights, uniform)).tolist() == [1, 1, 3, 3, 3]


def test_inverse_cdf_draw_across_blocks_and_a_vocabulary_not_a_multiple_of_the_block():
    vocab = 2 * DRAW_BLOCK + 88
    weights = np.zeros((6, vocab), np.float32)
    weights[:, [5, DRAW_BLOCK, DRAW_BLOCK + 3, vocab - 1]] = [1.0, 1.0, 0.5, 1.5]  # total 4
    # mass intervals: token 5 [0, 1), DRAW_BLOCK [1, 2), DRAW_BLOCK + 3 [2, 2.5), vocab - 1 [2.5, 4)
    uniform = jnp.asarray([0.0, 0.2499, 0.25, 0.55, 0.625, 0.9999])  # u * 4: 0, .9996, 1, 2.2, 2.5, 3.9996
    expected = [5, 5, DRAW_BLOCK, DRAW_BLOCK + 3, vocab - 1, vocab - 1]
    assert np.asarray(inverse_cdf_draw(jnp.asarray(weights), uniform)).tolist() == expected


def test_sampled_frequencies_follow_the_renormalised_nucleus():
    logits = jnp.log(jnp.asarray(np.tile(PROBS, (20000, 1))))
    uniform = jax.random.uniform(jax.random.key(0), (20000,))
    tokens, logprobs = choose_next_token(logits, uniform, temperature=1.0, top_p=0.75)
    counts = np.bincount(np.asarray(tokens), minlength=5) / 20000
    # nucleus {1, 3, 4} with mass .85: .4/.85, .3/.85, .15/.85; 0 and 2 never drawn.
    np.testing.assert_allclose(counts, [0, 0.4 / 0.85, 0, 0.3 / 0.85, 0.15 / 0.85], atol=0.015)
    # log-probs are those of the full distribution, not of the truncated one.
    np.testing.assert_allclose(np.asarray(logprobs), np.log(PROBS)[np.asarray(tokens)], atol=1e-6)


def test_temperature_scales_logits_before_the_draw_and_the_logprob():
    logits = jnp.asarray([[0.0, np.log(3.0)]] * 2)  # T=0.5 -> weights 1 : 9 -> probs .1, .9
    tokens, logprobs = choose_next_token(logits, jnp.asarray([0.05, 0.5]), temperature=0.5)
    assert np.asarray(tokens).tolist() == [0, 1]
    np.testing.assert_allclose(np.asarray(logprobs), np.log([0.1, 0.9]), rtol=1e-6)


def test_top_k_keeps_the_k_largest_and_top_k_1_is_greedy():
    logits = jnp.asarray([[0.1, 2.0, -1.0, 1.5, 0.3]])
    np.testing.assert_allclose(np.asarray(top_k_floor(logits, 2)), [[1.5]])
    uniform = jnp.linspace(0, 0.999, 50)
    tokens, _ = choose_next_token(jnp.tile(logits, (50, 1)), uniform, temperature=1.0, top_k=2)
    assert set(np.asarray(tokens).tolist()) == {1, 3}
    tokens, logprobs = choose_next_token(jnp.tile(logits, (50, 1)), uniform, temperature=0.7, top_k=1)
    assert set(np.asarray(tokens).tolist()) == {1}
    expected = 2.0 / 0.7 - np.log(np.sum(np.exp(np.asarray(logits[0]) / 0.7)))
    np.testing.assert_allclose(np.asarray(logprobs), expected, rtol=1e-6)


def test_greedy_takes_the_first_maximum_and_the_raw_logprob():
    logits = jnp.asarray([[0.0, 3.0, 3.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    tokens, logprobs = choose_next_token(logits, jnp.zeros(2), temperature=0.0)
    assert np.asarray(tokens).tolist() == [1, 0]
    expected = [3.0 - np.log(1 + 2 * np.exp(3.0) + np.exp(1.0)), 5.0 - np.log(np.exp(5.0) + 3)]
    np.testing.assert_allclose(np.asarray(logprobs), expected, atol=1e-6)
    assert np.asarray(first_max_index(jnp.asarray([[2.0, 7.0, 7.0]]))).tolist() == [1]
