"""Edge cases where the math meets real data: GRPO groups whose rewards are (nearly) tied."""

import jax.numpy as jnp
import numpy as np

from rlmt_jax.algorithms import group_advantages


def test_nearly_tied_group_is_scaled_by_std_plus_eps_not_blown_up():
    # std (n - 1) = 1.414e-7, far below eps = 1e-6: A = +-1e-7 / (1.414e-7 + 1e-6) = +-0.0876, not +-0.707
    rewards = jnp.array([0.0, 2e-7, 5.0, 7.0], jnp.float32)
    adv = np.asarray(group_advantages(rewards, 2, eps=1e-6))
    spread = 1e-7 / (np.sqrt(2.0) * 1e-7 + 1e-6)
    np.testing.assert_allclose(adv, [-spread, spread, -1 / np.sqrt(2), 1 / np.sqrt(2)], rtol=2e-3)


def test_exactly_tied_groups_get_zero_advantages_with_or_without_std_scaling():
    rewards = jnp.array([3.0, 3.0, 3.0, -1.0, 0.0, 1.0], jnp.float32)
    np.testing.assert_array_equal(group_advantages(rewards, 3)[:3], 0.0)
    np.testing.assert_allclose(group_advantages(rewards, 3)[3:], [-1.0, 0.0, 1.0], rtol=1e-5)  # std 1
    np.testing.assert_array_equal(group_advantages(rewards, 3, scale_by_std=False), [0, 0, 0, -1, 0, 1])


def test_ipo_objective_compares_per_token_mean_log_probs_of_chosen_and_rejected():
    import jax
    from flax import nnx

    from models import CausalLM, ModelConfig
    from rlmt_jax.algorithms import DPOConfig
    from rlmt_jax.algorithms.objectives import DPOObjective

    cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(2), (2, 2, 8), 1, 64)
    response = np.zeros((2, 2, 8), np.float32)
    response[0, 0, 3:8], response[0, 1, 3:5], response[1, 0, 2:4], response[1, 1, 2:8] = 1, 1, 1, 1
    batch = {"tokens": tokens, "attention_mask": jnp.ones((2, 2, 8), jnp.int32), "response_mask": jnp.asarray(response),
             "ref_logps": jnp.array([[-3.0, -2.5], [-4.0, -1.0]])}
    objective = DPOObjective(DPOConfig(loss_type="ipo", beta=0.5))
    loss, metrics = objective(model, batch, objective.counts(batch))

    flat = tokens.reshape(4, 8)
    logp = jax.nn.log_softmax(model(flat, jnp.ones((4, 8), jnp.int32), None), axis=-1)
    lp = np.pad(np.asarray(jnp.take_along_axis(logp[:, :-1], flat[:, 1:, None], axis=-1)[..., 0]), ((0, 0), (1, 0)))
    mask = response.reshape(4, 8)
    mean_lp = ((lp * mask).sum(axis=1) / mask.sum(axis=1)).reshape(2, 2)  # chosen at 0, rejected at 1
    h = (mean_lp[:, 0] - np.array([-3.0, -4.0])) - (mean_lp[:, 1] - np.array([-2.5, -1.0]))
    np.testing.assert_allclose(float(loss), np.mean((h - 1.0) ** 2), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["reward_margin"]), 0.5 * np.mean(h), rtol=1e-5)
