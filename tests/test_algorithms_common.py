"""Shared RL math against hand-computed values: log-probs/entropy, KL estimators, the clipped
surrogate, aggregation modes, whitening, and the composed actor loss."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlmt_jax.algorithms import (
    AlgorithmConfig,
    Normalizers,
    actor_loss,
    aggregate,
    chunked_sequence_logprobs_and_entropy,
    clipped_policy_losses,
    kl_penalty,
    logprobs_and_entropy,
    masked_whiten,
    sequence_logprobs_and_entropy,
)

LN2 = math.log(2.0)


def test_logprob_and_entropy_of_temperature_scaled_logits():
    # logits / 2 = [0, ln2, 0] -> p = [1/4, 1/2, 1/4]
    logits = jnp.array([[[0.0, 2 * LN2, 0.0], [0.0, 2 * LN2, 0.0]]])
    lp, ent = logprobs_and_entropy(logits, jnp.array([[1, 0]]), temperature=2.0)
    np.testing.assert_allclose(lp, [[-0.6931472, -1.3862944]], atol=1e-6)
    # H = -(2 * 1/4 ln 1/4 + 1/2 ln 1/2) = 1.0397208
    np.testing.assert_allclose(ent, [[1.0397208, 1.0397208]], atol=1e-6)


def _naive_logprob_entropy(logits, targets, temperature):
    logp_all = jax.nn.log_softmax(logits / temperature, axis=-1)
    lp = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
    ent = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return lp, ent


def test_logprob_entropy_custom_gradient_matches_autodiff():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 11)) * 3.0
    targets = jax.random.randint(jax.random.key(1), (2, 5), 0, 11)
    g_lp = jax.random.normal(jax.random.key(2), (2, 5))
    g_ent = jax.random.normal(jax.random.key(3), (2, 5))

    def objective(fn):
        def f(x):
            lp, ent = fn(x, targets, 0.7)
            return jnp.sum(lp * g_lp) + jnp.sum(ent * g_ent)

        return f

    ours = jax.grad(objective(logprobs_and_entropy))(logits)
    reference = jax.grad(objective(_naive_logprob_entropy))(logits)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_sequence_logprobs_are_aligned_to_the_predicted_token():
    # position 0 predicts token 1 (p = 1/2), position 1 predicts token 2 (p = 1/4)
    logits = jnp.array([[[0.0, LN2, 0.0], [0.0, LN2, 0.0], [9.0, 9.0, 9.0]]])
    lp, ent = sequence_logprobs_and_entropy(logits, jnp.array([[2, 1, 0]]))
    np.testing.assert_allclose(lp, [[0.0, -0.6931472, -1.3862944]], atol=1e-6)
    np.testing.assert_allclose(ent, [[0.0, 1.0397208, 1.0397208]], atol=1e-6)


@pytest.mark.parametrize("chunk", [3, 4, 7, None])
def test_chunked_logprobs_equal_full_logits_with_gradients(chunk):
    hidden = jax.random.normal(jax.random.key(0), (2, 7, 6))
    weight = jax.random.normal(jax.random.key(1), (6, 13))
    tokens = jax.random.randint(jax.random.key(2), (2, 7), 0, 13)

    def full(h, w):
        lp, ent = sequence_logprobs_and_entropy(h @ w, tokens, 0.7)
        return jnp.sum(lp * jnp.arange(7.0)) + jnp.sum(ent)

    def chunked(h, w):
        lp, ent = chunked_sequence_logprobs_and_entropy(h, tokens, w, 0.7, chunk)
        return jnp.sum(lp * jnp.arange(7.0)) + jnp.sum(ent)

    np.testing.assert_allclose(chunked(hidden, weight), full(hidden, weight), rtol=1e-6)
    g_ours = jax.grad(chunked, argnums=(0, 1))(hidden, weight)
    g_ref = jax.grad(full, argnums=(0, 1))(hidden, weight)
    for a, b in zip(g_ours, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_kl_estimators_k1_k2_k3():
    logp = jnp.array([[-1.0]])
    ref = jnp.array([[-1.5]])  # log(pi_ref / pi) = -0.5
    np.testing.assert_allclose(kl_penalty(logp, ref, "k1"), [[0.5]], atol=1e-7)
    np.testing.assert_allclose(kl_penalty(logp, ref, "k2"), [[0.125]], atol=1e-7)
    # exp(-0.5) + 0.5 - 1
    np.testing.assert_allclose(kl_penalty(logp, ref, "k3"), [[0.1065307]], atol=1e-7)


def test_kl_log_ratio_clamp_and_only_k3_clamped_to_10():
    logp = jnp.array([0.0, 0.0, 0.0])
    ref = jnp.array([-30.0, -5.0, 30.0])
    # k3's log-ratio clipped to +-20: k3 = e^-20 + 19 -> clamped to 10; k1 and k2 are not clamped at all (as verl)
    np.testing.assert_allclose(kl_penalty(logp, ref, "k3"), [10.0, math.exp(-5) + 4.0, 10.0], atol=1e-6)
    np.testing.assert_allclose(kl_penalty(logp, ref, "k1"), [30.0, 5.0, -30.0], atol=1e-6)
    np.testing.assert_allclose(kl_penalty(logp, ref, "k2"), [450.0, 12.5, 450.0], atol=1e-4)


def test_k1_and_k2_keep_their_gradient_on_tokens_that_drifted_far():
    # d = ref - logp = -12: k1 = 12 and k2 = 72 lie beyond the old +-10 clamp, which zeroed their gradient
    logp, ref = jnp.array([0.0, 0.0]), jnp.array([-12.0, -0.5])
    g1 = jax.grad(lambda x: jnp.sum(kl_penalty(x, ref, "k1")))(logp)
    g2 = jax.grad(lambda x: jnp.sum(kl_penalty(x, ref, "k2")))(logp)
    g3 = jax.grad(lambda x: jnp.sum(kl_penalty(x, ref, "k3")))(logp)
    np.testing.assert_allclose(g1, [1.0, 1.0], atol=1e-6)  # d k1 / d logp = 1
    np.testing.assert_allclose(g2, [12.0, 0.5], atol=1e-5)  # d (d^2/2) / d logp = -d
    # k3 = e^d - d - 1: 11 at d = -12 is clamped to 10 (no gradient); at d = -0.5 the gradient is 1 - e^d
    np.testing.assert_allclose(g3, [0.0, 1.0 - math.exp(-0.5)], atol=1e-6)


def test_clipped_surrogate_clip_and_dual_clip_cases():
    log_ratio = jnp.array([0.5, -0.5, 0.5, 1.5, -0.5])
    adv = jnp.array([1.0, 1.0, -1.0, -1.0, -1.0])
    losses, clipped, dual = clipped_policy_losses(log_ratio, jnp.zeros(5), adv, 0.2, 0.2, 3.0)
    # r = 1.6487: clipped to 1.2 | r = 0.6065: unclipped | A<0, r=1.6487: unclipped 1.6487
    # A<0, r = 4.4817 -> dual clip bound 3 | A<0, r = 0.6065: clipped to 0.8
    np.testing.assert_allclose(losses, [-1.2, -0.6065307, 1.6487213, 3.0, 0.8], atol=1e-6)
    np.testing.assert_array_equal(clipped, [1, 0, 0, 0, 1])
    np.testing.assert_array_equal(dual, [0, 0, 0, 1, 0])


def test_clip_higher_and_no_dual_clip():
    losses, clipped, _ = clipped_policy_losses(jnp.array([0.25, 0.25]), jnp.zeros(2), jnp.array([1.0, 1.0]), 0.2, 0.3)
    np.testing.assert_allclose(losses, [-1.2840254, -1.2840254], atol=1e-6)  # 1.284 < 1.3: not clipped
    np.testing.assert_array_equal(clipped, [0, 0])
    losses, _, dual = clipped_policy_losses(jnp.array([1.5]), jnp.zeros(1), jnp.array([-1.0]), 0.2, 0.2, None)
    np.testing.assert_allclose(losses, [4.4816891], atol=1e-5)
    np.testing.assert_array_equal(dual, [0])


VALUES = jnp.array([[1.0, 2.0, 3.0, jnp.nan], [4.0, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]])
MASK = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token_mean", 2.5),  # (1+2+3+4)/4
        ("seq_mean_token_mean", 3.0),  # (2 + 4) / 2 rows (the empty row does not count)
        ("seq_mean_token_sum", 5.0),  # (6 + 4) / 2
        ("seq_mean_token_sum_norm", 1.25),  # (6 + 4) / (4 * 2)
    ],
)
def test_aggregation_modes(mode, expected):
    assert float(aggregate(VALUES, MASK, mode, Normalizers.of(MASK, 4.0))) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"])
def test_aggregation_of_micro_batches_with_batch_counts_adds_up(mode):
    counts = Normalizers(num_tokens=4.0, num_sequences=2.0, norm_length=4.0)
    parts = [aggregate(VALUES[i : i + 1], MASK[i : i + 1], mode, counts) for i in range(3)]
    whole = aggregate(VALUES, MASK, mode, Normalizers.of(MASK, 4.0))
    assert float(sum(parts)) == pytest.approx(float(whole), abs=1e-6)


def test_masked_whiten_uses_unbiased_variance_over_masked_entries():
    out = masked_whiten(jnp.array([1.0, 2.0, 3.0, 4.0]), jnp.ones(4))
    # mean 2.5, var = 5/3 -> std 1.2909944
    np.testing.assert_allclose(out, [-1.161895, -0.387298, 0.387298, 1.161895], atol=1e-5)
    out = masked_whiten(jnp.array([[1.0, 2.0], [3.0, 100.0]]), jnp.array([[1, 1], [1, 0]]))
    np.testing.assert_allclose(out, [[-1.0, 0.0], [1.0, 0.0]], atol=1e-5)


def test_actor_loss_composes_surrogate_kl_and_entropy():
    logp = jnp.array([[0.0, -1.0, -2.0], [0.0, -0.5, 0.0]])
    old = jnp.array([[0.0, -1.5, -2.0], [0.0, -1.0, 0.0]])
    ref = jnp.array([[0.0, -1.0, -1.5], [0.0, -0.5, 0.0]])
    entropy = jnp.array([[0.0, 2.0, 1.0], [0.0, 3.0, 0.0]])
    mask = jnp.array([[0, 1, 1], [0, 1, 0]])
    loss, m = actor_loss(logp, old, jnp.array([1.0, -1.0]), mask, AlgorithmConfig(), normalizers=Normalizers.of(mask),
                         entropy=entropy, ref_logprobs=ref)
    # pg: row 0 tokens -1.2 (clipped) and -1.0 -> -1.1; row 1: 1.6487213 -> mean 0.2743606
    # kl (k3): row 0 tokens 0 and e^0.5 - 1.5 = 0.1487213 -> 0.0743606; row 1: 0 -> 0.0371803
    # entropy: (1.5 + 3.0) / 2 = 2.25 ; loss = pg + 0.001 kl - 0.001 H
    assert float(m["pg_loss"]) == pytest.approx(0.2743606, abs=1e-6)
    assert float(m["kl"]) == pytest.approx(0.0371803, abs=1e-6)
    assert float(m["entropy"]) == pytest.approx(2.25, abs=1e-6)
    assert float(loss) == pytest.approx(0.2721478, abs=1e-6)
    assert float(m["pg_clipfrac"]) == pytest.approx(1 / 3, abs=1e-6)
    assert float(m["pg_clipfrac_lower"]) == 0.0
    # approx KL(behaviour || current): k3 with log r = 0.5 on two of three tokens
    assert float(m["approx_kl"]) == pytest.approx(2 * 0.1487213 / 3, abs=1e-6)
