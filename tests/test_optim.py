"""AdamW builder: schedules with warmup, recipe presets, weight-decay mask, one update by hand."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlmt_jax.core.errors import UserError
from rlmt_jax.training.optim import (
    DPO_ADAMW,
    GRPO_ADAMW,
    PPO_CRITIC_ADAMW,
    SFT_ADAMW,
    AdamWConfig,
    build_optimizer,
    current_learning_rate,
    learning_rate_schedule,
    weight_decay_mask,
)


def test_cosine_schedule_with_warmup_values():
    cfg = AdamWConfig(lr=1.0, schedule="cosine", warmup_ratio=0.2, total_steps=10)
    lr = learning_rate_schedule(cfg)
    # warmup 2 steps: 0, 0.5; then cosine over 8 steps: step 6 is half way, step 10 reaches 0
    got = [float(lr(s)) for s in (0, 1, 2, 4, 6, 10, 12)]
    np.testing.assert_allclose(got, [0.0, 0.5, 1.0, 0.8535534, 0.5, 0.0, 0.0], atol=1e-6)


def test_constant_schedule_with_and_without_warmup():
    assert [float(learning_rate_schedule(AdamWConfig(lr=2.0))(s)) for s in (0, 5)] == [2.0, 2.0]
    cfg = AdamWConfig(lr=2.0, warmup_ratio=0.25, total_steps=10)  # ceil(2.5) = 3 warmup steps
    np.testing.assert_allclose([float(learning_rate_schedule(cfg)(s)) for s in (0, 1, 3, 9)],
                               [0.0, 2 / 3, 2.0, 2.0], atol=1e-6)


def test_recipe_presets():
    assert (GRPO_ADAMW.lr, GRPO_ADAMW.schedule, GRPO_ADAMW.weight_decay, GRPO_ADAMW.betas, GRPO_ADAMW.grad_clip) == (
        1e-6, "constant", 0.01, (0.9, 0.999), 1.0)
    assert PPO_CRITIC_ADAMW.lr == 1e-5
    assert (DPO_ADAMW.lr, DPO_ADAMW.schedule, DPO_ADAMW.warmup_ratio, DPO_ADAMW.weight_decay, DPO_ADAMW.betas) == (
        3e-7, "cosine", 0.05, 1e-4, (0.9, 0.95))
    assert (SFT_ADAMW.lr, SFT_ADAMW.warmup_ratio) == (4e-6, 0.1)


def test_cosine_without_total_steps_is_a_named_error():
    with pytest.raises(UserError, match="total_steps"):
        AdamWConfig(schedule="cosine")


def test_adamw_first_update_by_hand_with_clipping_and_decay():
    params = {"w": jnp.array([1.0, -2.0]), "norm": {"scale": jnp.array([1.0])}}
    grads = {"w": jnp.array([3.0, 4.0]), "norm": {"scale": jnp.array([0.0])}}  # global norm 5 -> clipped to 1
    cfg = AdamWConfig(lr=0.1, weight_decay=0.5, grad_clip=1.0, decay="matrices")
    tx = build_optimizer(cfg)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    # first Adam step: m_hat / sqrt(v_hat) = sign(g); decoupled decay 0.1 * 0.5 * p on "w" only
    np.testing.assert_allclose(new["w"], [1.0 - 0.1 - 0.05, -2.0 - 0.1 + 0.1], atol=1e-6)
    np.testing.assert_allclose(new["norm"]["scale"], [1.0], atol=1e-6)
    assert float(current_learning_rate(state)) == pytest.approx(0.1)


def test_weight_decay_mask_skips_norms_and_biases():
    tree = {"q_proj": 1, "q_bias": 2, "input_norm": {"scale": 3}, "embed": 4}
    assert weight_decay_mask(tree) == {"q_proj": True, "q_bias": False, "input_norm": {"scale": False}, "embed": True}


def test_equal_configs_are_one_static_jit_argument_and_different_ones_are_not():
    a, b = dataclasses.replace(DPO_ADAMW, total_steps=100), dataclasses.replace(DPO_ADAMW, total_steps=100)
    assert a == b and hash(a) == hash(b)  # the update step compiles once for them
    assert a != dataclasses.replace(a, total_steps=101) and a != dataclasses.replace(a, decay="all")
