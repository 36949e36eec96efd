"""Each shipped variant against a direct implementation of its paper's formula, written here independently
(objective form, explicit loops, analytic gradients), on random batches that hit every clip branch; and
micro-batches 1, 2, 4 adding up to the whole batch's loss and gradient."""

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
    actor_loss,
    compute_advantages,
    overlong_penalty,
)
from rlmt_jax.training.train_step import join_micro_batches, split_micro_batches

B, S, L = 8, 7, 10.0  # rows, columns, Dr. GRPO's constant length
LENGTHS = [6, 4, 2, 5, 1, 3, 6, 0]  # counted tokens per row (columns 1..n; row 7 is padding)
ADV = np.array([1.0, -1.0, 0.5, -2.0, 1.5, -0.5, 2.0, 1.0], np.float32)


def batch(log_ratio_scale=0.7, seed=0):
    rng = np.random.default_rng(seed)
    logprobs = -rng.uniform(0.1, 3.0, (B, S)).astype(np.float32)
    log_ratio = rng.normal(0.0, log_ratio_scale, (B, S)).astype(np.float32)
    mask = np.zeros((B, S), np.int32)
    for b, n in enumerate(LENGTHS):
        mask[b, 1:1 + n] = 1
    return jnp.asarray(logprobs), jnp.asarray(logprobs - log_ratio), jnp.asarray(mask)


def token_branches(lp, old, adv, mask, eps_l, eps_h, dual=None):
    """Which branch bounds each counted token: in band, clipped high (A > 0), clipped low (A < 0), dual."""
    r = np.exp(np.asarray(lp - old))
    a = np.broadcast_to(np.asarray(adv)[:, None], r.shape)
    m = np.asarray(mask) > 0
    high = m & (a > 0) & (r > 1 + eps_h)
    low = m & (a < 0) & (r < 1 - eps_l)
    dual_hit = m & (a < 0) & (r > dual) if dual else np.zeros_like(m)
    inside = m & ~high & ~low & ~dual_hit
    return {"inside": inside, "high": high, "low": low, "dual": dual_hit}


def objective_clip(r, a, eps_l, eps_h):
    """min(r A, clip(r, 1 - eps_l, 1 + eps_h) A): the PPO objective (to maximise), per token."""
    return jnp.minimum(r * a, jnp.clip(r, 1 - eps_l, 1 + eps_h) * a)


def rows_with_tokens(mask):
    return float(sum(1 for n in LENGTHS if n > 0))


def paper_loss(name, lp, old, adv, mask, cfg):
    """The papers' objectives, negated, written directly (independently of rlmt_jax.algorithms)."""
    m = mask.astype(jnp.float32)
    a = adv[:, None]
    r = jnp.exp(lp - old)
    if name == "ppo_clip":  # seq_mean_token_mean, with the dual clip max(obj, c A) for A < 0
        obj = objective_clip(r, a, cfg.clip_low, cfg.clip_high)
        obj = jnp.where(a < 0, jnp.maximum(obj, cfg.dual_clip * a), obj)
        per_row = [jnp.sum(obj[b] * m[b]) / LENGTHS[b] for b in range(B) if LENGTHS[b]]
        return -sum(per_row) / len(per_row)
    if name == "dapo":  # 1 / sum_i |o_i| sum_i sum_t min(...)
        return -jnp.sum(objective_clip(r, a, cfg.clip_low, cfg.clip_high) * m) / jnp.sum(m)
    if name == "drgrpo":  # 1/G sum_i sum_t min(...) / L
        return -jnp.sum(objective_clip(r, a, cfg.clip_low, cfg.clip_high) * m) / L / rows_with_tokens(mask)
    if name == "gspo":  # 1/G sum_i min(s_i A_i, clip(s_i) A_i), s_i = (pi / pi_old)^(1/|y_i|)
        total = 0.0
        for b in range(B):
            if LENGTHS[b]:
                s = jnp.prod(r[b, 1:1 + LENGTHS[b]]) ** (1.0 / LENGTHS[b])
                total += jnp.minimum(s * adv[b], jnp.clip(s, 1 - cfg.clip_low, 1 + cfg.clip_high) * adv[b])
        return -total / rows_with_tokens(mask)
    if name == "cispo":  # 1 / sum |o_i| sum sum sg(clip(r)) A log pi
        weight = jax.lax.stop_gradient(jnp.clip(r, 1 - cfg.clip_low, 1 + cfg.clip_high))
        return -jnp.sum(weight * a * lp * m) / jnp.sum(m)
    raise AssertionError(name)


# The papers' numbers for each variant (clip_low 1.0: CISPO's "no lower bound"; its eps_high is tuned).
VARIANTS = {
    "ppo_clip": AlgorithmConfig(clip_low=0.2, clip_high=0.2, dual_clip=3.0),
    "dapo": AlgorithmConfig(policy_loss="dapo", clip_low=0.2, clip_high=0.28),
    "drgrpo": AlgorithmConfig(policy_loss="drgrpo", clip_low=0.2, clip_high=0.2),
    "gspo": AlgorithmConfig(policy_loss="gspo", clip_low=3e-4, clip_high=4e-4),
    "cispo": AlgorithmConfig(policy_loss="cispo", clip_low=1.0, clip_high=0.28),
}


def ours(name, lp, old, adv, mask, normalizers=None):
    cfg = VARIANTS[name]
    return POLICY_LOSSES(name)(lp, old, adv, mask, cfg, normalizers=normalizers or Normalizers.of(mask, L))


@pytest.mark.parametrize("name", ["ppo_clip", "dapo", "drgrpo", "cispo"])
def test_token_level_variant_loss_and_gradient_equal_the_papers_formula(name):
    cfg = VARIANTS[name]
    lp, old, mask = batch()
    adv = jnp.asarray(ADV)
    branches = token_branches(lp, old, adv, mask, cfg.clip_low, cfg.clip_high, cfg.dual_clip if name == "ppo_clip"
                              else None)
    hit = {k for k, v in branches.items() if v.any()}
    if name == "cispo":  # no lower bound (clip_low 1): its branches are below / above 1 + eps_high, either sign of A
        r, a, m = np.exp(np.asarray(lp - old)), ADV[:, None], np.asarray(mask) > 0
        above = m & (r > 1 + cfg.clip_high)
        assert (above & (a > 0)).any() and (above & (a < 0)).any() and (m & ~above).any()
    else:
        assert {"inside", "high", "low"} <= hit and (name != "ppo_clip" or "dual" in hit), hit
    loss, metrics = ours(name, lp, old, adv, mask)
    assert float(loss) == pytest.approx(float(paper_loss(name, lp, old, adv, mask, cfg)), rel=1e-5, abs=1e-6)
    grad = jax.grad(lambda x: ours(name, x, old, adv, mask)[0])(lp)
    want = jax.grad(lambda x: paper_loss(name, x, old, adv, mask, cfg))(lp)
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(grad)[np.asarray(mask) == 0] == 0)
    assert 0 < float(metrics["pg_clipfrac"]) < 1


def test_clipped_tokens_get_no_gradient_under_ppo_clip_but_do_under_cispo():
    lp, old, mask = batch()
    adv = jnp.asarray(ADV)
    r, m, a = np.exp(np.asarray(lp - old)), np.asarray(mask), ADV[:, None]
    n = m.sum()
    cfg = VARIANTS["cispo"]
    # CISPO, analytically: d loss / d logp_t = -clip(r_t) A m_t / N, never 0 on a counted token
    grad = np.asarray(jax.grad(lambda x: ours("cispo", x, old, adv, mask)[0])(lp))
    np.testing.assert_allclose(grad, -np.clip(r, 1 - cfg.clip_low, 1 + cfg.clip_high) * a * m / n, rtol=1e-5, atol=1e-7)
    assert np.all(grad[m > 0] != 0)
    # DAPO, analytically: -r A m / N where the unclipped term is the min, else 0
    cfg = VARIANTS["dapo"]
    grad = np.asarray(jax.grad(lambda x: ours("dapo", x, old, adv, mask)[0])(lp))
    active = r * a <= np.clip(r, 1 - cfg.clip_low, 1 + cfg.clip_high) * a
    np.testing.assert_allclose(grad, np.where(active, -r * a * m / n, 0.0), rtol=1e-5, atol=1e-7)
    assert np.any(grad[m > 0] == 0) and np.any(grad[m > 0] != 0)


def gspo_batch():
    """Rows whose sequence log-ratio puts s_i in the band, above it and below it, for both signs of A."""
    lp, _, mask = batch()
    rng = np.random.default_rng(3)
    offsets = np.array([1e-4, 1e-2, 1e-2, -1e-2, -1e-2, -1e-4, 5e-3, 0.0], np.float32)  # mean log ratio per row
    noise = rng.normal(0, 0.05, (B, S)).astype(np.float32)
    m = np.asarray(mask).astype(np.float32)
    noise -= (noise * m).sum(1, keepdims=True) / np.maximum(m.sum(1, keepdims=True), 1) * m  # zero row means
    log_ratio = (offsets[:, None] + noise) * m
    return lp, lp - jnp.asarray(log_ratio), mask, offsets


def test_gspo_loss_and_gradient_equal_the_papers_sequence_level_formula():
    cfg = VARIANTS["gspo"]
    lp, old, mask, offsets = gspo_batch()
    adv = jnp.asarray(ADV)
    s = np.exp(offsets)
    counted = np.array(LENGTHS) > 0
    unclipped = -ADV * s
    clipped = -ADV * np.clip(s, 1 - cfg.clip_low, 1 + cfg.clip_high)
    in_band = counted & (np.abs(offsets) < 3e-4)
    clip_active = counted & (clipped > unclipped)
    assert in_band.any() and clip_active.any() and (counted & ~in_band & ~clip_active).any()
    loss, metrics = ours("gspo", lp, old, adv, mask)
    assert float(loss) == pytest.approx(float(paper_loss("gspo", lp, old, adv, mask, cfg)), rel=1e-5, abs=1e-7)
    # verl's pg_clipfrac: the fraction of counted tokens (each token of a clipped row is clipped)
    lengths_ = np.array(LENGTHS)
    assert float(metrics["pg_clipfrac"]) == pytest.approx((clip_active * lengths_).sum() / lengths_.sum())
    grad = np.asarray(jax.grad(lambda x: ours("gspo", x, old, adv, mask)[0])(lp))
    want = jax.grad(lambda x: paper_loss("gspo", x, old, adv, mask, cfg))(lp)
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-8)
    # analytically: d loss / d logp_i,t = -A_i s_i m_t / (|y_i| G) on unclipped rows, 0 on clipped ones
    m = np.asarray(mask)
    lengths = np.maximum(np.array(LENGTHS), 1)[:, None]
    analytic = np.where(clip_active[:, None], 0.0, -ADV[:, None] * s[:, None] * m / lengths / counted.sum())
    np.testing.assert_allclose(grad, analytic, rtol=1e-3, atol=1e-8)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("micro", [2, 4])
def test_micro_batches_add_up_to_the_whole_batch_loss_and_gradient(name, micro):
    lp, old, mask = batch()
    ref = lp + jnp.asarray(np.random.default_rng(7).normal(0, 0.3, (B, S)).astype(np.float32))
    entropy = jnp.asarray(np.random.default_rng(8).uniform(0, 2, (B, S)).astype(np.float32))
    adv = jnp.asarray(ADV)
    cfg = VARIANTS[name]
    whole_norm = Normalizers.of(mask, L)

    def loss(x, o, a, m, r, e, normalizers):
        return actor_loss(x, o, a, m, cfg, normalizers=normalizers, entropy=e, ref_logprobs=r)

    (whole, whole_metrics), whole_grad = jax.value_and_grad(loss, has_aux=True)(
        lp, old, adv, mask, ref, entropy, whole_norm)
    parts = split_micro_batches({"lp": lp, "old": old, "adv": adv, "mask": mask, "ref": ref, "ent": entropy}, micro)
    total, grads, metrics = 0.0, [], {}
    for k in range(micro):
        p = {key: v[k] for key, v in parts.items()}
        (value, part_metrics), g = jax.value_and_grad(loss, has_aux=True)(
            p["lp"], p["old"], p["adv"], p["mask"], p["ref"], p["ent"], whole_norm)
        total += value
        grads.append(g)
        for key, v in part_metrics.items():
            metrics[key] = metrics.get(key, 0.0) + v
    assert float(total) == pytest.approx(float(whole), rel=1e-5, abs=1e-7)
    np.testing.assert_allclose(join_micro_batches(jnp.stack(grads)), whole_grad, rtol=1e-5, atol=1e-8)
    for key, value in whole_metrics.items():
        assert float(metrics[key]) == pytest.approx(float(value), rel=1e-5, abs=1e-7), key


# --------------------------------------------------------------------------- advantages

SCORES = np.array([1.0, 3.0, 0.0, 2.0, 5.0, 5.0, -1.0, 1.0], np.float32)  # two groups of four
MASK = np.array(batch()[2])


def estimate(name, scores=SCORES, group_size=4):
    adv, returns = ADVANTAGES(name)(jnp.asarray(scores), jnp.asarray(MASK), AlgorithmConfig(), group_size=group_size)
    assert returns is None
    return np.asarray(adv)


def test_rloo_subtracts_the_mean_of_the_other_samples_of_the_group():
    want = [SCORES[i] - np.mean([SCORES[j] for j in range(4 * (i // 4), 4 * (i // 4) + 4) if j != i])
            for i in range(8)]
    np.testing.assert_allclose(estimate("rloo"), want, atol=1e-6)
    np.testing.assert_allclose(estimate("rloo")[:4], [1 - 5 / 3, 3 - 1, 0 - 2, 2 - 4 / 3], atol=1e-6)  # 1, 3, 0, 2


def test_drgrpo_and_grpo_advantages():
    groups = SCORES.reshape(2, 4)
    centred = (groups - groups.mean(1, keepdims=True)).ravel()
    np.testing.assert_allclose(estimate("drgrpo"), centred, atol=1e-6)
    std = groups.std(1, ddof=1, keepdims=True).repeat(4, 1).ravel()
    np.testing.assert_allclose(estimate("grpo"), centred / (std + 1e-6), atol=1e-6)


@pytest.mark.parametrize("group_size", [4, 1])
def test_reinforce_pp_baseline_whitens_the_group_centred_score_over_all_response_tokens(group_size):
    groups = SCORES.reshape(-1, group_size)
    centred = (groups - (groups.mean(1, keepdims=True) if group_size > 1 else 0)).ravel()
    m = MASK.astype(bool)
    tokens = np.broadcast_to(centred[:, None], MASK.shape)[m]  # each response token carries its sequence's value
    want = np.zeros(MASK.shape)
    want[m] = (tokens - tokens.mean()) / np.sqrt(tokens.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(estimate("reinforce_pp", group_size=group_size), want, atol=1e-5)


def test_dapo_overlong_penalty_is_linear_over_the_buffer():
    # L_max 20, L_cache 4: free up to 16 tokens, then -1/4 per token up to -1 at 20
    got = overlong_penalty(jnp.array([10, 16, 17, 19, 20]), max_new_tokens=20, buffer=4, penalty=1.0)
    np.testing.assert_allclose(got, [0.0, 0.0, -0.25, -0.75, -1.0], atol=1e-6)
    cfg = AlgorithmConfig(advantage="drgrpo", overlong_buffer=2, overlong_penalty=0.5)
    mask = jnp.asarray(MASK[:4])  # lengths 6, 4, 2, 5 of max_new_tokens 6: free up to 4
    _, _, shaped = compute_advantages(jnp.zeros(4), mask, cfg, group_size=4, max_new_tokens=6)
    np.testing.assert_allclose(shaped, [-0.5, 0.0, 0.0, -0.25], atol=1e-6)
    adv, _, _ = compute_advantages(jnp.zeros(4), mask, cfg, group_size=4, max_new_tokens=6)
    np.testing.assert_allclose(adv, [-0.3125, 0.1875, 0.1875, -0.0625], atol=1e-6)  # shaped minus its mean


def test_recipe_objective_is_unchanged_by_the_refactor():
    # The GRPO recipe's actor loss on a fixed batch, as the code before the registry computed it
    # (ActorLossConfig(): seq-mean-token-mean, dual clip 3, k3 KL 0.001, entropy 0.001), pinned as numbers.
    lp, old, mask = batch()
    loss, metrics = actor_loss(lp, old, jnp.asarray(ADV), mask, AlgorithmConfig(), entropy=jnp.full((B, S), 0.5),
                               ref_logprobs=lp + 0.1, normalizers=Normalizers.of(mask, 4096.0))
    before = {"loss": 0.017474064603447914, "pg_loss": 0.01796889305114746, "kl": 0.005170941352844238,
              "entropy": 0.5, "pg_clipfrac": 0.4444444477558136, "pg_clipfrac_lower": 0.07407407462596893,
              "approx_kl": 0.2681151032447815}
    assert {k: pytest.approx(v, rel=1e-6) for k, v in before.items()} == {k: float(metrics[k]) for k in before}
    assert float(loss) == pytest.approx(before["loss"], rel=1e-6)
    assert before["kl"] == pytest.approx(math.exp(0.1) - 0.1 - 1, rel=1e-5)  # k3 of a log ratio of 0.1


def test_model_gradients_of_gspo_are_equal_for_1_2_and_4_micro_batches():
    # Through the real update path (PolicyObjective, whole-batch counts, the scan over micro-batches) on the
    # tiny CausalLM of test_train_step: the parameter gradients of 1, 2 and 4 micro-batches agree. GSPO, the
    # sequence-level loss (the token-level ones are covered by the pure-function test above and ppo_clip by
    # test_train_step).
    from tests.test_train_step import T, rl_batch, tiny_policy

    from rlmt_jax.algorithms.objectives import PolicyObjective
    from rlmt_jax.training.train_step import accumulate_gradients, compute_logprobs

    graphdef, params = tiny_policy()
    data = rl_batch()
    current = compute_logprobs(graphdef, params, data, temperature=T)
    data["old_logprobs"] = current + jax.random.normal(jax.random.key(5), current.shape) * 0.3
    data["ref_logprobs"] = current
    data["advantages"] = jnp.array([1.0, -0.5, 2.0, -1.5])
    cfg = AlgorithmConfig(policy_loss="gspo", clip_low=0.05, clip_high=0.05)  # some sequences clipped, some not
    objective = PolicyObjective(cfg, temperature=T, norm_length=8.0, logits_chunk_size=5)
    accumulate = jax.jit(accumulate_gradients, static_argnums=(0, 3, 4))
    loss1, grads1, metrics = accumulate(graphdef, params, data, objective, 1)
    assert 0 < float(metrics["pg_clipfrac"]) < 1
    for micro in (2, 4):
        loss, grads, _ = accumulate(graphdef, params, data, objective, micro)
        assert float(loss) == pytest.approx(float(loss1), rel=1e-5, abs=1e-7)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads1)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads1))
