"""The variants that mean to be verl's, against verl's definitions (volcengine/verl at b178a3cd) written out
here independently in float64 numpy, values and gradients, on inputs that reach verl's clamps and masks:

1. KL k1 / k2 / k3 (core_algos.kl_penalty_forward): only k3 ("low_var_kl") is clamped.
2. GSPO (core_algos.compute_policy_loss_gspo): log s clamped with max=10 only, token-level losses,
   seq-mean-token-mean.
3. Rollout correction (rollout_corr_helper): token / sequence truncated importance weights; the token_k1 /
   seq_sum_k1 rejection masks.
5. Exact ties: a group whose rewards are all equal has advantage exactly 0 (its centred reward is 0 by
   definition), also inside a larger jit where XLA reassociates the group mean.
7. seq_mean_token_sum_norm against the text of verl's agg_loss.

Everything runs with jax_enable_x64 on (restored after each test), so float64 inputs stay float64.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlmt_jax.algorithms import (
    ADVANTAGES,
    POLICY_LOSSES,
    AlgorithmConfig,
    Normalizers,
    RolloutCorrectionConfig,
    aggregate,
    compute_advantages,
    kl_penalty,
    rollout_correction,
)


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


# --------------------------------------------------------------------------- verl's definitions (numpy)

SAFETY_BOUND = 20.0  # verl rollout_corr_helper.SAFETY_BOUND


def verl_kl(logp, ref, kind):
    """core_algos.kl_penalty_forward and d/d logp (torch.clamp passes the gradient inside [min, max])."""
    if kind == "k1":  # "kl"
        return logp - ref, np.ones_like(logp)
    if kind == "k2":  # "mse"
        return 0.5 * (logp - ref) ** 2, logp - ref
    kl = ref - logp  # "low_var_kl"
    inside = (kl >= -20) & (kl <= 20)
    kl = np.clip(kl, -20, 20)
    kld = np.exp(kl) - kl - 1
    inside_out = (kld >= -10) & (kld <= 10)
    grad = -(np.exp(kl) - 1) * inside * inside_out
    return np.clip(kld, -10, 10), grad


def verl_gspo(lp, old, adv, mask, clip_low, clip_high, w=None):
    """compute_policy_loss_gspo with agg_loss "seq-mean-token-mean" (global_batch_size: rows with a token).
    -> (loss, d loss / d lp, pg_clipfrac)."""
    m = mask.astype(np.float64)
    adv = np.broadcast_to(adv[:, None], lp.shape) if adv.ndim == 1 else adv
    w = np.ones_like(lp) if w is None else w
    negative_approx_kl = lp - old
    seq_lengths = np.maximum(m.sum(-1), 1)
    seq = (negative_approx_kl * m).sum(-1) / seq_lengths
    log_s = np.broadcast_to(seq[:, None], lp.shape)  # log_prob - log_prob.detach() + seq.detach()
    passes = log_s <= 10.0
    s = np.exp(np.minimum(log_s, 10.0))
    l1 = -adv * s
    s_clip = np.clip(s, 1 - clip_low, 1 + clip_high)
    l2 = -adv * s_clip
    pg = np.maximum(l1, l2) * w
    n = m.sum(-1)
    rows = (n > 0).astype(np.float64)
    loss = ((pg * m).sum(-1) / (n + 1e-8) * rows).sum() / rows.sum()
    ds = s * passes  # d s_t / d lp_t (the sequence part is detached)
    d1 = -adv * ds
    d2 = -adv * ds * ((s >= 1 - clip_low) & (s <= 1 + clip_high))
    dpg = np.where(l1 > l2, d1, d2) * w
    grad = dpg * m / (n + 1e-8)[:, None] * rows[:, None] / rows.sum()
    clipfrac = ((l2 > l1) * m).sum() / m.sum()
    return loss, grad, clipfrac


def verl_is_weights(log_ratio, mask, level, threshold):
    """compute_rollout_correction_weights (no batch normalisation)."""
    if level == "token":
        w = np.exp(np.clip(log_ratio, -SAFETY_BOUND, SAFETY_BOUND))
    else:
        total = (log_ratio * mask).sum(-1, keepdims=True)  # verl_F.masked_sum
        w = np.broadcast_to(np.exp(np.clip(total, -SAFETY_BOUND, SAFETY_BOUND)), log_ratio.shape)
    return np.minimum(w * mask, threshold)


def verl_rejection_mask(log_ratio, mask, option, lower, upper):
    """compute_rollout_rejection_mask for "token_k1" / "seq_sum_k1" with threshold "lower_upper"."""
    token_k1 = -np.clip(log_ratio, -SAFETY_BOUND, SAFETY_BOUND)
    lo, hi = math.log(lower), math.log(upper)
    if option == "token_k1":
        keep = (token_k1 >= lo) & (token_k1 <= hi)
    else:
        stat = (token_k1 * mask).sum(-1, keepdims=True)
        keep = np.broadcast_to((stat >= lo) & (stat <= hi), mask.shape)
    return mask * keep


# --------------------------------------------------------------------------- 1. KL estimators


def test_k1_and_k2_are_verls_unclamped_estimators_on_tokens_that_drifted_past_20_nats():
    # logp - ref: 23.9 (drifted up), 0.5, -28 (drifted down), -19.5, 0
    logp = np.array([-0.1, -1.0, -30.0, -20.0, -2.0])
    ref = np.array([-24.0, -1.5, -2.0, -0.5, -2.0])
    for kind in ("k1", "k2", "k3"):
        want, want_grad = verl_kl(logp, ref, kind)
        got = kl_penalty(jnp.asarray(logp), jnp.asarray(ref), kind)
        grad = jax.grad(lambda x: jnp.sum(kl_penalty(x, jnp.asarray(ref), kind)))(jnp.asarray(logp))
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=kind)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-12, atol=1e-12, err_msg=kind)
    # the drifted token: k1 = 23.9 with gradient 1, k2 = 285.605 with gradient 23.9 (not 20 / 200 and 0)
    assert float(kl_penalty(jnp.asarray(logp), jnp.asarray(ref), "k1")[0]) == pytest.approx(23.9, rel=1e-12)
    assert float(kl_penalty(jnp.asarray(logp), jnp.asarray(ref), "k2")[0]) == pytest.approx(0.5 * 23.9**2, rel=1e-12)


# --------------------------------------------------------------------------- 2. GSPO

# rows (log ratio per counted token; the row mean is what matters):
#   0: mean 12 (past verl's max=10 clamp), A < 0: unclipped branch, clamped -> no gradient
#   1: mean -25 (below ours' old -20 clamp, verl has none), A > 0: unclipped branch, gradient -A e^-25
#   2: mean 0.05 inside [1 - 0.2, 1 + 0.3], A > 0, non-uniform importance weights
#   3: mean 0.5 above the band, A > 0: clipped
#   4: padding
GSPO_LOG_RATIO = np.array([
    [0.0, 11.0, 13.0, 12.0, 0.0],
    [0.0, -20.0, -30.0, 0.0, 0.0],
    [0.0, 0.1, -0.05, 0.1, 0.05],
    [0.0, 0.5, 0.0, 0.0, 0.0],
    [0.0, 0.0, 0.0, 0.0, 0.0],
])
GSPO_MASK = np.array([[0, 1, 1, 1, 0], [0, 1, 1, 0, 0], [0, 1, 1, 1, 1], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
GSPO_ADV = np.array([-1.0, 2.0, 1.5, 1.0, 0.7])
GSPO_W = np.array([[0, 1, 1, 1, 0], [0, 1, 1, 0, 0], [0, 0.5, 2.0, 1.0, 0.25], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0]], float)


def gspo_ours(lp, old, adv, mask, cfg, w=None):
    return POLICY_LOSSES("gspo")(lp, old, adv, mask, cfg, normalizers=Normalizers.of(mask), is_weights=w)


@pytest.mark.parametrize("with_weights", [False, True])
def test_gspo_equals_verls_with_its_one_sided_clamp_at_10(with_weights):
    cfg = AlgorithmConfig(policy_loss="gspo", clip_low=0.2, clip_high=0.3)
    lp = -np.linspace(0.5, 3.0, GSPO_MASK.size).reshape(GSPO_MASK.shape)
    old = lp - GSPO_LOG_RATIO
    w = GSPO_W if with_weights else None
    want, want_grad, want_clipfrac = verl_gspo(lp, old, GSPO_ADV, GSPO_MASK, 0.2, 0.3, w)
    args = (jnp.asarray(old), jnp.asarray(GSPO_ADV), jnp.asarray(GSPO_MASK), cfg,
            None if w is None else jnp.asarray(w))
    loss, metrics = gspo_ours(jnp.asarray(lp), *args)
    grad = np.asarray(jax.grad(lambda x: gspo_ours(x, *args)[0])(jnp.asarray(lp)))
    # rtol 1e-7: verl divides by (n + 1e-8); our aggregation weights are float32
    assert float(loss) == pytest.approx(want, rel=1e-7)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-7, atol=0)  # every entry, e^-25-sized ones included
    assert float(metrics["pg_clipfrac"]) == pytest.approx(want_clipfrac, rel=1e-6)  # float32 token count
    assert np.all(grad[0] == 0) and np.all(grad[1][GSPO_MASK[1] > 0] < 0)
    # the row with mean log-ratio 12 alone: loss e^10 (verl), not e^12
    one = (jnp.asarray(lp[:1]), jnp.asarray(old[:1]), jnp.asarray(GSPO_ADV[:1]), jnp.asarray(GSPO_MASK[:1]), cfg)
    assert float(gspo_ours(*one)[0]) == pytest.approx(math.exp(10.0), rel=1e-7)


def test_gspo_token_level_advantages_are_used_per_token_as_verl():
    cfg = AlgorithmConfig(policy_loss="gspo", clip_low=0.2, clip_high=0.3)
    lp = -np.linspace(0.5, 3.0, GSPO_MASK.size).reshape(GSPO_MASK.shape)
    old = lp - GSPO_LOG_RATIO
    adv = np.array([[0, -1.0, 2.0, 0.5, 0], [0, 1.0, -3.0, 0, 0], [0, 1.0, -1.0, 0.5, 2.0],
                    [0, -2.0, 0, 0, 0], [0, 0, 0, 0, 0]])
    want, want_grad, _ = verl_gspo(lp, old, adv, GSPO_MASK, 0.2, 0.3)
    args = (jnp.asarray(old), jnp.asarray(adv), jnp.asarray(GSPO_MASK), cfg)
    loss, _ = gspo_ours(jnp.asarray(lp), *args)
    grad = jax.grad(lambda x: gspo_ours(x, *args)[0])(jnp.asarray(lp))
    assert float(loss) == pytest.approx(want, rel=1e-7)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-7, atol=0)


# --------------------------------------------------------------------------- 3. rollout correction

# log rho = old - sampler on counted tokens:
#   row 0: one +25 token and the rest summing to -24 (sum 1: e^1 -> the cap 2.0)
#   row 1: -25 and 0.3 (token weights exp(-20) and e^0.3)
#   row 2: 15 and 10 (sum 25, clamped per token it is still 25)
#   row 3: 25 and -24.5 (sum 0.5 unclamped; clamped per token -4.5)
#   row 4: padding with garbage log-probs
RC_LOG_RATIO = np.array([
    [0.0, 25.0, -12.0, -12.0],
    [0.0, -25.0, 0.3, 0.0],
    [0.0, 15.0, 10.0, 0.0],
    [0.0, 25.0, -24.5, 0.0],
    [0.0, 40.0, -40.0, 9.0],
])
RC_MASK = np.array([[0, 1, 1, 1], [0, 1, 1, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]])


def correct(**settings):
    sampler = -np.linspace(1.0, 2.0, RC_MASK.size).reshape(RC_MASK.shape)
    old = sampler + RC_LOG_RATIO
    return rollout_correction(jnp.asarray(old), jnp.asarray(sampler), jnp.asarray(RC_MASK),
                              RolloutCorrectionConfig(**settings))


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_importance_weights_equal_verls(level):
    weights, mask, _ = correct(weights=level, weight_cap=2.0)
    want = verl_is_weights(RC_LOG_RATIO, RC_MASK, level, 2.0)
    np.testing.assert_allclose(weights, want, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(mask, RC_MASK)
    if level == "sequence":  # the row of the issue: 2.0 (verl), not e^-4 = 0.018
        np.testing.assert_allclose(np.asarray(weights)[0], [0, 2.0, 2.0, 2.0], rtol=1e-12)


@pytest.mark.parametrize("level, low, high", [("token", 0.5, 2.0), ("sequence", 0.5, 2.0),
                                              ("sequence", 0.5, 1e10), ("token", 1e-10, 3.0)])
def test_masks_equal_verls_k1_rejection_with_the_reciprocal_bounds(level, low, high):
    # ours keeps rho in [low, high]; verl's token_k1 / seq_sum_k1 keep exp(k1) = 1/rho in [lower, upper]
    _, mask, _ = correct(mask=level, mask_low=low, mask_high=high)
    option = "token_k1" if level == "token" else "seq_sum_k1"
    want = verl_rejection_mask(RC_LOG_RATIO, RC_MASK, option, 1.0 / high, 1.0 / low)
    np.testing.assert_array_equal(mask, want)


# --------------------------------------------------------------------------- 5. exact ties

G = 8
TIE_VALUES = (0.1, 0.3, 0.7, 1.0 / 3.0)  # in float32 their group means are not the value itself


def tie_batch():
    """Groups of 8: varied, tied at 0.1, varied, tied at 0.3, tied at 0.7, tied at 1/3."""
    varied = np.array([0.2, 0.9, -0.4, 1.3, 0.0, 0.5, 0.25, -1.0])
    groups = [varied, np.full(G, 0.1), varied[::-1] * 0.7, np.full(G, 0.3), np.full(G, 0.7), np.full(G, 1 / 3)]
    return np.concatenate(groups).astype(np.float32), [1, 3, 4, 5]


def verl_group_centred(scores, name):
    """r - mean_g (grpo: / (std_g + 1e-6), rloo: r - mean of the others) in exact arithmetic: 0 on a tie."""
    g = scores.astype(np.float64).reshape(-1, G)
    tie = (g.max(1) == g.min(1))[:, None]
    if name == "rloo":
        out = g - (g.sum(1, keepdims=True) - g) / (G - 1)
    else:
        out = g - g.mean(1, keepdims=True)
        if name == "grpo":
            out = out / (g.std(1, ddof=1, keepdims=True) + 1e-6)
    return np.where(tie, 0.0, out).ravel()


@pytest.mark.parametrize("name", ["grpo", "drgrpo", "rloo"])
def test_tied_groups_get_exactly_zero_advantage_alone_and_fused_in_a_larger_jit(name):
    scores, tied = tie_batch()
    mask = jnp.ones((scores.shape[0], 4), jnp.int32)
    cfg = AlgorithmConfig(advantage=name)

    @jax.jit
    def step(s, lp):  # the advantage inside other arithmetic, as a training step fuses it
        adv, _ = ADVANTAGES(name)(s * 1.0 + 0.0, mask, cfg, group_size=G)
        return adv, jnp.sum(adv[:, None] * lp), jnp.mean(s)

    fused = np.asarray(step(jnp.asarray(scores), jnp.ones((scores.shape[0], 4), jnp.float32))[0])
    alone = np.asarray(compute_advantages(jnp.asarray(scores), mask, cfg, group_size=G, max_new_tokens=4)[0])
    want = verl_group_centred(scores, name)
    for got in (fused, alone):
        rows = got.reshape(-1, G)
        for g in tied:
            assert np.all(rows[g] == 0.0), (name, g, rows[g])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_reinforce_pp_of_a_batch_of_tied_groups_is_exactly_zero():
    # every group tied: each centred reward is 0, so the whitened advantage (0 - 0) / sqrt(0 + 1e-8) is 0
    scores = np.repeat(np.array(TIE_VALUES, np.float32), G)
    mask = jnp.ones((scores.shape[0], 4), jnp.int32)
    cfg = AlgorithmConfig(advantage="reinforce_pp")

    @jax.jit
    def step(s, lp):
        adv, _ = ADVANTAGES("reinforce_pp")(s * 1.0 + 0.0, mask, cfg, group_size=G)
        return adv, jnp.sum(adv * lp)

    fused = np.asarray(step(jnp.asarray(scores), jnp.ones((scores.shape[0], 4), jnp.float32))[0])
    alone = np.asarray(compute_advantages(jnp.asarray(scores), mask, cfg, group_size=G, max_new_tokens=4)[0])
    assert np.all(fused == 0.0) and np.all(alone == 0.0)


# --------------------------------------------------------------------------- 7. seq_mean_token_sum_norm


def test_seq_mean_token_sum_norm_is_verls_agg_loss_with_scale_factor_L_over_the_row_count():
    # verl b178a3cd agg_loss("seq-mean-token-sum-norm"): sum(sum(loss * mask, -1)) / loss_scale_factor
    rng = np.random.default_rng(0)
    values = rng.normal(size=(4, 6))
    mask = np.array([[0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]])
    length = 16.0
    verl = (values * mask).sum(-1).sum() / length
    ours = aggregate(jnp.asarray(values), jnp.asarray(mask), "seq_mean_token_sum_norm", Normalizers.of(mask, length))
    assert float(ours) == pytest.approx(verl / 3, rel=1e-6)  # 3 rows with a counted token
