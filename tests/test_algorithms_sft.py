"""SFT cross-entropy counts assistant tokens only."""

import jax.numpy as jnp
import pytest

from rlmt_jax.algorithms import sft_loss


def test_sft_loss_is_mean_negative_logprob_of_masked_tokens():
    lp = jnp.array([[0.0, -1.0, -2.0, -3.0], [0.0, -5.0, -0.5, jnp.nan]])
    mask = jnp.array([[0, 0, 1, 1], [0, 0, 1, 0]])
    loss, m = sft_loss(lp, mask)
    assert float(loss) == pytest.approx((2.0 + 3.0 + 0.5) / 3, abs=1e-6)
    # a micro-batch normalised by the whole batch's token count adds up
    part0, _ = sft_loss(lp[:1], mask[:1], num_tokens=3.0)
    part1, _ = sft_loss(lp[1:], mask[1:], num_tokens=3.0)
    assert float(part0 + part1) == pytest.approx(float(loss), abs=1e-6)
