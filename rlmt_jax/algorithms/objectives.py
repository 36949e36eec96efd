"""What the update step minimises, per algorithm: a model forward on a micro-batch feeding the
pure losses of `rlmt_jax.algorithms`.

An objective is a frozen (hashable) dataclass, so the jitted update step takes it as a static
argument. It has two methods:
  counts(batch) -> a pytree of scalars: the whole-batch denominators (tokens, sequences, pairs), computed
      once before the batch is cut into micro-batches, so micro-batch losses add up to the batch loss;
  __call__(model, micro_batch, counts) -> (loss, metrics): every metric is normalised by `counts` too,
      so the update step sums losses, gradients and metrics over micro-batches.

Batch layout (a dict of arrays, leading dim = rows; see each objective for its keys):
  tokens [B, S] int32: prompt (left-padded) + response (right-padded);
  attention_mask [B, S]: 1 on real tokens;  positions [B, S] (default: clip(cumsum(mask) - 1, 0));
  response_mask [B, S]: 1 on the response tokens whose log-prob counts;
  old_logprobs, ref_logprobs [B, S], aligned: position t holds log p(token t | tokens < t);
  advantages [B] or [B, S];  is_weights [B, S] (rollout correction's truncated importance weights).
Which objective an algorithm trains with is its spec's (rlmt_jax.algorithms.specs).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rlmt_jax.algorithms.common import Normalizers, chunked_sequence_logprobs_and_entropy, count_tokens, shift_right
from rlmt_jax.algorithms.dpo import dpo_loss, sequence_logprobs
from rlmt_jax.algorithms.policy_losses import actor_loss
from rlmt_jax.algorithms.ppo import value_loss
from rlmt_jax.algorithms.settings import AlgorithmConfig, DPOConfig, PPOConfig
from rlmt_jax.algorithms.sft import sft_loss


def require(batch: dict, *names: str) -> None:
    """Raise a KeyError naming the batch arrays an objective needs and did not get."""
    missing = [n for n in names if n not in batch]
    if missing:
        raise KeyError(f"the update batch lacks {missing}; it has {sorted(batch)}")


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """clip(cumsum(mask) - 1, 0): positions that skip left padding.  [B, S] -> [B, S] int32"""
    return jnp.clip(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def model_inputs(batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(tokens, attention_mask, positions) of a batch, positions derived when absent."""
    require(batch, "tokens", "attention_mask")
    mask = batch["attention_mask"]
    positions = batch.get("positions")
    return batch["tokens"], mask, default_positions(mask) if positions is None else positions


def policy_logprobs_and_entropy(
    model, batch: dict, temperature: float, logits_chunk_size: int | None, response_start: int = 0
) -> tuple[jax.Array, jax.Array]:
    """Aligned log-probs and entropies of `batch["tokens"]` under the CausalLM `model` at `temperature`.

    -> (logprobs [B, S], entropy [B, S]); the logits are made chunk by chunk (see
    `chunked_sequence_logprobs_and_entropy`). response_start > 0: the column where responses begin
    (the padded prompt length); the lm head then runs only on the positions that predict
    tokens[:, response_start:], and columns before response_start hold 0.
    """
    tokens, mask, positions = model_inputs(batch)
    hidden = model.hidden_states(tokens, mask, positions)
    first = max(response_start - 1, 0)  # the last prompt position predicts the first response token
    lp, ent = chunked_sequence_logprobs_and_entropy(
        hidden[:, first:], tokens[:, first:], model.lm_head_weight(), temperature, logits_chunk_size
    )
    if first:
        lp, ent = (jnp.pad(x, ((0, 0), (first, 0))) for x in (lp, ent))
    return lp, ent


@dataclasses.dataclass(frozen=True)
class PolicyObjective:
    """The actor of GRPO and PPO: `policy_losses.actor_loss` (the registered algorithm.policy_loss + KL +
    entropy) with the `algorithm:` section as its config.

    Batch: tokens, attention_mask, [positions], response_mask, old_logprobs, advantages,
    ref_logprobs (when algorithm.kl_coef != 0), [is_weights].
    temperature: rollout.temperature (log-probs of logits / temperature, as sampled); norm_length:
    rollout.max_new_tokens (seq_mean_token_sum_norm's L).
    response_start: the padded prompt length when every response starts at that column (the
    sampler's layout); the lm head then skips the prompt positions. response_mask must be 0 before it.
    """

    algorithm: AlgorithmConfig
    temperature: float = 1.0
    norm_length: float = 4096.0
    logits_chunk_size: int | None = 1024
    response_start: int = 0

    def counts(self, batch: dict) -> Normalizers:
        require(batch, "response_mask")
        return Normalizers.of(batch["response_mask"], self.norm_length)

    def __call__(self, model, batch: dict, counts: Normalizers) -> tuple[jax.Array, dict[str, jax.Array]]:
        kl = self.algorithm.kl_coef != 0
        require(batch, "response_mask", "old_logprobs", "advantages", *(["ref_logprobs"] if kl else []))
        logprobs, entropy = policy_logprobs_and_entropy(
            model, batch, self.temperature, self.logits_chunk_size, self.response_start
        )
        return actor_loss(
            logprobs,
            batch["old_logprobs"],
            batch["advantages"],
            batch["response_mask"],
            self.algorithm,
            normalizers=counts,
            entropy=entropy,
            ref_logprobs=batch["ref_logprobs"] if kl else None,
            is_weights=batch.get("is_weights"),
        )


def critic_values(model, batch: dict) -> jax.Array:
    """Aligned values: position t holds V(tokens < t), the ValueModel's output at t - 1.  -> [B, S]"""
    tokens, mask, positions = model_inputs(batch)
    return shift_right(model(tokens, mask, positions))


@dataclasses.dataclass(frozen=True)
class ValueObjective:
    """The PPO critic: clipped value loss with algorithm.ppo's value_clip and value_coef.  Batch: tokens,
    attention_mask, [positions], response_mask, old_values, returns (aligned like log-probs)."""

    config: PPOConfig = PPOConfig()

    def counts(self, batch: dict) -> dict[str, jax.Array]:
        require(batch, "response_mask")
        return {"num_tokens": count_tokens(batch["response_mask"])}

    def __call__(self, model, batch: dict, counts: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
        require(batch, "response_mask", "old_values", "returns")
        values = critic_values(model, batch)
        loss, metrics = value_loss(
            values,
            batch["old_values"],
            batch["returns"],
            batch["response_mask"],
            self.config.value_clip,
            self.config.value_coef,
            num_tokens=counts["num_tokens"],
        )
        return loss, {**metrics, "loss": loss}


@dataclasses.dataclass(frozen=True)
class DPOObjective:
    """DPO on pairs.  Batch (leading dim = pairs, second = [chosen, rejected]):
    tokens, attention_mask, [positions], response_mask: [P, 2, S]; ref_logps: [P, 2] (sequence log-probs
    of the reference model, summed, or averaged for IPO). Pairs whose response_mask is all 0 are padding.
    """

    config: DPOConfig
    logits_chunk_size: int | None = 1024

    def counts(self, batch: dict) -> dict[str, jax.Array]:
        require(batch, "response_mask")
        return {"num_pairs": jnp.sum((jnp.sum(batch["response_mask"], axis=(1, 2)) > 0).astype(jnp.float32))}

    def __call__(self, model, batch: dict, counts: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
        require(batch, "response_mask", "ref_logps")
        pairs, _, seq = batch["tokens"].shape
        flat = {k: batch[k].reshape(pairs * 2, seq) for k in ("tokens", "attention_mask", "positions") if k in batch}
        logprobs, _ = policy_logprobs_and_entropy(model, flat, 1.0, self.logits_chunk_size)
        mask = batch["response_mask"]
        seq_logps = sequence_logprobs(logprobs.reshape(pairs, 2, seq), mask, self.config.average_logprobs)
        return dpo_loss(
            seq_logps[:, 0],
            seq_logps[:, 1],
            batch["ref_logps"][:, 0],
            batch["ref_logps"][:, 1],
            self.config,
            pair_mask=(jnp.sum(mask, axis=(1, 2)) > 0),
            num_pairs=counts["num_pairs"],
        )


@dataclasses.dataclass(frozen=True)
class SFTObjective:
    """Cross-entropy on assistant tokens.  Batch: tokens, attention_mask, [positions], loss_mask [B, S]
    (aligned: 1 where token t is an assistant token to predict)."""

    logits_chunk_size: int | None = 1024

    def counts(self, batch: dict) -> dict[str, jax.Array]:
        require(batch, "loss_mask")
        return {"num_tokens": count_tokens(batch["loss_mask"])}

    def __call__(self, model, batch: dict, counts: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
        logprobs, _ = policy_logprobs_and_entropy(model, batch, 1.0, self.logits_chunk_size)
        return sft_loss(logprobs, batch["loss_mask"], num_tokens=counts["num_tokens"])
