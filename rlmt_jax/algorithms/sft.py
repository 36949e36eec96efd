"""SFT: cross-entropy on the assistant tokens only (the warm-start on thinking traces)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlmt_jax.algorithms.common import masked_mean


def sft_loss(
    logprobs: jax.Array, loss_mask: jax.Array, *, num_tokens: jax.Array | float | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Masked cross-entropy, mean over all counted tokens of the batch:

    L = -sum_{b,t} m[b,t] logp[b,t] / sum_{b,t} m[b,t]

    logprobs: [batch, seq] aligned (position t holds log p(token t | tokens < t), temperature 1);
    loss_mask: [batch, seq], 1 on assistant tokens. num_tokens: whole-batch count for micro-batches.
    Returns (loss, metrics: sft_loss, loss).
    """
    loss = -masked_mean(logprobs.astype(jnp.float32), loss_mask, num_tokens)
    return loss, {"sft_loss": loss, "loss": loss}
