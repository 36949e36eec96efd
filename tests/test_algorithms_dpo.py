"""DPO loss values, gradient sign, and the best-vs-worst pair builder."""

import jax
import jax.numpy as jnp
import pytest

from rlmt_jax.algorithms import DPOConfig, build_preference_pairs, dpo_loss, sequence_logprobs

# h = (chosen - ref_chosen) - (rejected - ref_rejected) = 1 - (-1) = 2
CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED = (jnp.array([x]) for x in (-10.0, -12.0, -11.0, -11.0))


def test_sigmoid_dpo_loss_and_rewards():
    loss, m = dpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, DPOConfig())
    assert float(loss) == pytest.approx(0.5981389, abs=1e-6)  # -log sigmoid(0.1 * 2)
    assert float(m["reward_chosen"]) == pytest.approx(0.1, abs=1e-6)
    assert float(m["reward_rejected"]) == pytest.approx(-0.1, abs=1e-6)
    assert float(m["reward_margin"]) == pytest.approx(0.2, abs=1e-6)
    assert float(m["reward_accuracy"]) == 1.0


def test_label_smoothing_and_ipo():
    loss, _ = dpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, DPOConfig(label_smoothing=0.1))
    # 0.9 * log(1 + e^-0.2) + 0.1 * log(1 + e^0.2)
    assert float(loss) == pytest.approx(0.6181389, abs=1e-6)
    loss, _ = dpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, DPOConfig(loss_type="ipo"))
    assert float(loss) == pytest.approx((2.0 - 5.0) ** 2, abs=1e-5)  # (h - 1 / (2 beta))^2


def test_raising_the_chosen_logprob_lowers_the_dpo_loss():
    def loss_of(chosen, rejected):
        return dpo_loss(chosen, rejected, REF_CHOSEN, REF_REJECTED, DPOConfig())[0]

    g_chosen, g_rejected = jax.grad(loss_of, argnums=(0, 1))(CHOSEN, REJECTED)
    # dL/dchosen = -beta * sigmoid(-beta h) = -0.1 * sigmoid(-0.2)
    assert float(g_chosen[0]) == pytest.approx(-0.0450166, abs=1e-6)
    assert float(g_rejected[0]) == pytest.approx(0.0450166, abs=1e-6)
    assert float(loss_of(CHOSEN + 0.5, REJECTED)) < float(loss_of(CHOSEN, REJECTED))


def test_padding_pairs_do_not_count():
    two = lambda x: jnp.concatenate([x, jnp.array([0.0])])  # noqa: E731
    loss, _ = dpo_loss(two(CHOSEN), two(REJECTED), two(REF_CHOSEN), two(REF_REJECTED), DPOConfig(),
                       pair_mask=jnp.array([1, 0]))
    assert float(loss) == pytest.approx(0.5981389, abs=1e-6)


def test_sequence_logprobs_sum_or_average_response_tokens():
    lp = jnp.array([[0.0, -1.0, -2.0, -4.0]])
    mask = jnp.array([[0, 1, 1, 0]])
    assert float(sequence_logprobs(lp, mask)[0]) == -3.0
    assert float(sequence_logprobs(lp, mask, average=True)[0]) == -1.5


def test_pairs_are_best_vs_worst_valid_sample():
    scores = [
        [1.0, 5.0, 3.0, 2.0, 9.0, 0.0],  # sample 4 is best but invalid -> chosen 1, rejected 5
        [1.0, 2.0, 3.0, 4.0],  # only 3 valid -> skipped
        [2.0, 2.0, 2.0, 2.0],  # all tied -> skipped
        [0.0, 1.0, 2.0, 3.0],  # chosen too long -> skipped
        [7.0, 1.0, 7.0, 1.0],  # ties pick the first index: chosen 0, rejected 1
    ]
    valid = [[True, True, True, True, False, True], [True, True, False, True], [True] * 4, [True] * 4, [True] * 4]
    lengths = [[100] * 6, [100] * 4, [100] * 4, [100, 100, 100, 9000], [8192] * 4]
    sel = build_preference_pairs(scores, valid, lengths, min_valid=4, max_pair_tokens=8192)
    assert [(p.prompt_index, p.chosen_index, p.rejected_index) for p in sel.pairs] == [(0, 1, 5), (4, 0, 1)]
    assert (sel.pairs[0].chosen_score, sel.pairs[0].rejected_score) == (5.0, 0.0)
    assert (sel.skipped_too_few_valid, sel.skipped_tied, sel.skipped_too_long) == (1, 1, 1)


def test_pair_builder_rejects_a_non_finite_reward():
    with pytest.raises(ValueError, match="prompt 0, sample 1"):
        build_preference_pairs([[1.0, float("nan")]], [[True, True]], [[1, 1]], min_valid=1)


def test_hinge_loss():
    loss, _ = dpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, DPOConfig(loss_type="hinge"))
    assert float(loss) == pytest.approx(0.8, abs=1e-6)  # max(0, 1 - 0.1 * 2)
