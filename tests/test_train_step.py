"""The jitted update step on a tiny CausalLM: GRPO gradients at ratio 1, micro-batching equals one
big batch, the direction of GRPO and DPO updates, critic and SFT steps, compile-once, donation,
non-finite guard."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import CausalLM, ModelConfig, ValueModel
from rlmt_jax.algorithms import AlgorithmConfig, DPOConfig, PPOConfig
from rlmt_jax.algorithms.objectives import DPOObjective, PolicyObjective, SFTObjective, ValueObjective
from rlmt_jax.training.optim import AdamWConfig
from rlmt_jax.training.train_step import (
    accumulate_gradients,
    compute_logprobs,
    compute_values,
    init_optimizer_state,
    train_step,
)

CFG = ModelConfig(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
B, S, T = 4, 12, 0.7
OPT = AdamWConfig(lr=1e-3)


def tiny_policy():
    return nnx.split(CausalLM(CFG, rngs=nnx.Rngs(0)), nnx.Param)


def rl_batch():
    """4 rows: row 0 has a left-padded prompt; responses of 6, 6, 3 and 5 counted tokens."""
    tokens = jax.random.randint(jax.random.key(0), (B, S), 1, CFG.vocab_size)
    attention_mask = jnp.ones((B, S), jnp.int32).at[0, :3].set(0).at[2, 9:].set(0).at[3, 11:].set(0)
    response_mask = jnp.zeros((B, S)).at[:, 6:].set(1.0) * attention_mask
    positions = jnp.clip(jnp.cumsum(attention_mask, axis=1) - 1, 0)
    return dict(tokens=tokens, attention_mask=attention_mask, positions=positions, response_mask=response_mask)


def reference_logprobs(model, batch, temperature):
    """Aligned log-probs from the plain full-logits forward (independent of the chunked path)."""
    logits = model(batch["tokens"], batch["attention_mask"], batch["positions"]) / temperature
    logp = jax.nn.log_softmax(logits, axis=-1)[:, :-1]
    lp = jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(lp, ((0, 0), (1, 0)))


def test_compute_logprobs_matches_full_forward_and_micro_batching():
    graphdef, params = tiny_policy()
    batch = rl_batch()
    expected = jax.jit(lambda p: reference_logprobs(nnx.merge(graphdef, p), batch, T))(params)
    for n, chunk in [(1, 5), (2, None)]:
        lp = compute_logprobs(graphdef, params, batch, temperature=T, num_micro_batches=n, logits_chunk_size=chunk)
        np.testing.assert_allclose(lp, expected, atol=2e-5)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"])
def test_grpo_gradient_at_ratio_one_is_policy_gradient_of_mean_advantage_logprob(mode):
    graphdef, params = tiny_policy()
    batch = rl_batch()
    batch["old_logprobs"] = compute_logprobs(graphdef, params, batch, temperature=T, logits_chunk_size=5)
    advantages = jnp.array([1.0, -0.5, 2.0, -1.5])
    batch["advantages"] = advantages
    config = AlgorithmConfig(kl_coef=0.0, entropy_coef=0.0, aggregation=mode)
    objective = PolicyObjective(config, temperature=T, norm_length=16.0, logits_chunk_size=5)
    _, grads, _ = jax.jit(accumulate_gradients, static_argnums=(0, 3, 4))(graphdef, params, batch, objective, 1)

    m = batch["response_mask"]
    lengths = m.sum(axis=1, keepdims=True)  # 6, 6, 3, 5
    weights = {
        "token_mean": m / m.sum(),
        "seq_mean_token_mean": m / (lengths * B),
        "seq_mean_token_sum": m / B,
        "seq_mean_token_sum_norm": m / (16.0 * B),
    }[mode]

    def minus_mean_advantage_logprob(p):
        lp = reference_logprobs(nnx.merge(graphdef, p), batch, T)
        return -jnp.sum(weights * advantages[:, None] * lp)

    expected = jax.jit(jax.grad(minus_mean_advantage_logprob))(params)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


def off_policy_grpo_batch(graphdef, params):
    batch = rl_batch()
    current = compute_logprobs(graphdef, params, batch, temperature=T)
    noise = jax.random.normal(jax.random.key(5), current.shape) * 0.3
    batch["old_logprobs"] = current + noise  # ratios away from 1: some tokens clipped
    batch["ref_logprobs"] = current - noise
    batch["advantages"] = jnp.array([1.0, -0.5, 2.0, -1.5])
    return batch


def test_micro_batched_accumulation_equals_one_big_batch():
    graphdef, params = tiny_policy()
    batch = off_policy_grpo_batch(graphdef, params)
    objective = PolicyObjective(AlgorithmConfig(kl_coef=0.1, entropy_coef=0.01), temperature=T, logits_chunk_size=5)
    accumulate = jax.jit(accumulate_gradients, static_argnums=(0, 3, 4))
    loss1, grads1, metrics1 = accumulate(graphdef, params, batch, objective, 1)
    loss4, grads4, metrics4 = accumulate(graphdef, params, batch, objective, 4)
    assert float(metrics1["pg_clipfrac"]) > 0
    assert float(loss4) == pytest.approx(float(loss1), rel=1e-5, abs=1e-7)
    for k in metrics1:
        assert float(metrics4[k]) == pytest.approx(float(metrics1[k]), rel=1e-5, abs=1e-7), k
    for a, b in zip(jax.tree.leaves(grads4), jax.tree.leaves(grads1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731 (params are donated)
    new1, _, m1 = train_step(graphdef, copy(params), init_optimizer_state(params, OPT), batch,
                             objective=objective, optimizer=OPT, num_micro_batches=1)
    new2, _, m2 = train_step(graphdef, copy(params), init_optimizer_state(params, OPT), batch,
                             objective=objective, optimizer=OPT, num_micro_batches=2)
    assert float(m2["grad_norm"]) == pytest.approx(float(m1["grad_norm"]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(new2), jax.tree.leaves(new1)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_response_start_skips_prompt_logits_without_changing_loss_or_gradients():
    graphdef, params = tiny_policy()
    batch = off_policy_grpo_batch(graphdef, params)  # responses start at column 6
    config = AlgorithmConfig(kl_coef=0.1, entropy_coef=0.01)
    accumulate = jax.jit(accumulate_gradients, static_argnums=(0, 3, 4))
    loss0, grads0, _ = accumulate(graphdef, params, batch, PolicyObjective(config, temperature=T), 1)
    loss6, grads6, _ = accumulate(graphdef, params, batch, PolicyObjective(config, temperature=T, response_start=6), 1)
    assert float(loss6) == pytest.approx(float(loss0), rel=1e-6)
    for a, b in zip(jax.tree.leaves(grads6), jax.tree.leaves(grads0)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    lp = compute_logprobs(graphdef, params, batch, temperature=T, response_start=6)
    full = compute_logprobs(graphdef, params, batch, temperature=T)
    np.testing.assert_allclose(lp[:, 6:], full[:, 6:], atol=1e-6)
    np.testing.assert_array_equal(lp[:, :6], 0.0)


def test_grpo_update_raises_positive_and_lowers_negative_advantage_samples():
    graphdef, params = tiny_policy()
    batch = rl_batch()
    before = compute_logprobs(graphdef, params, batch, temperature=T)
    batch.update(old_logprobs=before, ref_logprobs=before, advantages=jnp.array([1.0, -1.0, 1.0, -1.0]))
    objective = PolicyObjective(AlgorithmConfig(), temperature=T)
    opt_state = init_optimizer_state(params, OPT)
    first_leaf = jax.tree.leaves(params)[0]
    params, opt_state, metrics = train_step(graphdef, params, opt_state, batch, objective=objective, optimizer=OPT)
    assert first_leaf.is_deleted()  # params were donated
    assert float(metrics["finite"]) == 1.0 and float(metrics["lr"]) == pytest.approx(1e-3)
    assert float(metrics["approx_kl"]) == 0.0 and float(metrics["kl"]) == 0.0  # on-policy, ref = policy
    after = compute_logprobs(graphdef, params, batch, temperature=T)
    change = np.asarray(((after - before) * batch["response_mask"]).sum(axis=1))
    assert (change[[0, 2]] > 0).all() and (change[[1, 3]] < 0).all(), change

    # a second step with the same shapes reuses the compiled program
    compiled = train_step._cache_size()
    train_step(graphdef, params, opt_state, batch, objective=objective, optimizer=OPT)
    assert train_step._cache_size() == compiled


def test_non_finite_loss_leaves_params_unchanged():
    graphdef, params = tiny_policy()
    batch = rl_batch()
    batch.update(old_logprobs=jnp.zeros((B, S)), advantages=jnp.array([1.0, jnp.nan, 1.0, 1.0]))
    objective = PolicyObjective(AlgorithmConfig(kl_coef=0.0), temperature=T)
    kept = jax.tree.map(np.asarray, params)
    new, _, metrics = train_step(graphdef, params, init_optimizer_state(params, OPT), batch,
                                 objective=objective, optimizer=OPT)
    assert float(metrics["finite"]) == 0.0
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(kept)):
        np.testing.assert_array_equal(a, b)


def test_dpo_step_widens_the_chosen_rejected_margin():
    graphdef, params = tiny_policy()
    tokens = jax.random.randint(jax.random.key(1), (2, 2, S), 1, CFG.vocab_size)
    ones = jnp.ones((2, 2, S), jnp.int32)
    response = jnp.zeros((2, 2, S)).at[..., 5:].set(1.0)
    batch = dict(tokens=tokens, attention_mask=ones, response_mask=response)
    flat = {k: v.reshape(4, S) for k, v in batch.items()}

    def sequence_logps(p):
        lp = compute_logprobs(graphdef, p, flat, temperature=1.0)
        return (lp * flat["response_mask"]).sum(axis=1).reshape(2, 2)

    before = sequence_logps(params)
    batch["ref_logps"] = before
    objective = DPOObjective(DPOConfig())
    params, _, metrics = train_step(graphdef, params, init_optimizer_state(params, OPT), batch,
                                    objective=objective, optimizer=OPT)
    assert float(metrics["dpo_loss"]) == pytest.approx(np.log(2.0), abs=1e-5)  # policy = reference
    after = sequence_logps(params)
    margin = (after[:, 0] - after[:, 1]) - (before[:, 0] - before[:, 1])
    assert (np.asarray(margin) > 0).all(), margin


def test_critic_step_lowers_value_loss():
    critic = ValueModel(CFG, rngs=nnx.Rngs(1))
    graphdef, params = nnx.split(critic, nnx.Param)
    batch = rl_batch()
    batch["old_values"] = compute_values(graphdef, params, batch)
    batch["returns"] = batch["response_mask"] * 0.5
    objective = ValueObjective(PPOConfig(value_clip=0.5))
    opt = dataclasses.replace(OPT, lr=3e-3)
    opt_state = init_optimizer_state(params, opt)
    losses = []
    for _ in range(3):
        params, opt_state, metrics = train_step(graphdef, params, opt_state, batch, objective=objective, optimizer=opt)
        losses.append(float(metrics["vf_loss"]))
    assert losses[2] < losses[0], losses


def test_sft_step_lowers_cross_entropy_on_assistant_tokens():
    graphdef, params = tiny_policy()
    batch = rl_batch()
    batch["loss_mask"] = batch.pop("response_mask")
    objective = SFTObjective()
    opt = dataclasses.replace(OPT, lr=3e-3)
    opt_state = init_optimizer_state(params, opt)
    losses = []
    for _ in range(3):
        params, opt_state, metrics = train_step(graphdef, params, opt_state, batch, objective=objective, optimizer=opt,
                                                num_micro_batches=2)
        losses.append(float(metrics["sft_loss"]))
    assert losses[0] == pytest.approx(np.log(CFG.vocab_size), abs=0.3)  # near-uniform at init
    assert losses[2] < losses[0], losses


def test_missing_batch_array_is_named():
    graphdef, params = tiny_policy()
    batch = rl_batch()
    with pytest.raises(KeyError, match="old_logprobs"):
        accumulate_gradients(graphdef, params, batch, PolicyObjective(AlgorithmConfig(), temperature=T), 1)
