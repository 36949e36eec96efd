"""From prompts to scored rollouts and the RL batch: render -> sample -> decode -> split -> score.

The policy side (`PolicyText`) renders prompts with the policy tokenizer (or the zero template) and turns
sampled token ids back into text; `rl_batch` lays a rollout out as the arrays the update step reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlmt_jax.errors import UserError
from rlmt_jax.sampling import Rollout
from rlmt_jax.templates import (
    ZERO_EOS_BY_FAMILY,
    TemplateSettings,
    encode_prompt,
    eos_texts_of,
    prepare_policy_tokenizer,
)

Conversation = Sequence[dict]


def template_settings(cfg) -> TemplateSettings:
    """The run config's template section as the templates module's settings."""
    family = cfg.template.zero_family
    return TemplateSettings(
        mode=cfg.template.mode,
        strict=cfg.template.strict,
        thinking=cfg.template.mode != "none",
        prompt_template="zero" if cfg.template.mode == "zero" or (
            cfg.template.mode == "none" and family is not None) else "chat",
        max_prompt_tokens=cfg.data.max_prompt_tokens,
        zero_eos_token=ZERO_EOS_BY_FAMILY[family] if family else None,
    )


@dataclasses.dataclass
class PolicyText:
    """The policy's tokenizer with the run's template: prompts to ids, sampled ids back to text."""

    tokenizer: object
    settings: TemplateSettings
    stop_ids: tuple[int, ...]

    @classmethod
    def create(cls, tokenizer, settings: TemplateSettings, model_eos_ids: Sequence[int]) -> PolicyText:
        tokenizer = prepare_policy_tokenizer(tokenizer, settings)
        stop = list(model_eos_ids)
        if tokenizer.eos_token_id is not None:
            stop.append(int(tokenizer.eos_token_id))
        if not stop:
            raise UserError("the policy has no EOS token (config.json eos_token_id and the tokenizer's eos_token "
                            "are both unset): rollouts could only stop at the length limit")
        return cls(tokenizer, settings, tuple(dict.fromkeys(int(i) for i in stop)))

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.stop_ids[0])

    @property
    def eos_texts(self) -> tuple[str, ...]:
        return eos_texts_of(self.tokenizer, self.stop_ids)

    def encode(self, conversations: Sequence[Conversation]) -> tuple[list[list[int]], int]:
        """Prompt ids (left-truncated to the limit) and how many prompts were truncated."""
        encoded = [encode_prompt(self.tokenizer, c, self.settings.max_prompt_tokens) for c in conversations]
        return [e.ids for e in encoded], sum(e.truncated for e in encoded)

    def decode_responses(self, rollout: Rollout) -> list[str]:
        """The text of every response, special tokens kept (EOS text is removed by the splitter)."""
        tokens = np.asarray(rollout.tokens)[:, rollout.prompt_len:]
        lengths = np.asarray(rollout.response_lengths)
        return self.tokenizer.batch_decode(
            [row[:n].tolist() for row, n in zip(tokens, lengths)], skip_special_tokens=False
        )


def rl_batch(rollout: Rollout) -> dict[str, jax.Array]:
    """The arrays every RL update reads, from a rollout: tokens, attention_mask, positions, response_mask,
    sampler_logprobs.  All [rows, prompt_len + max_new_tokens]."""
    return {
        "tokens": rollout.tokens,
        "attention_mask": rollout.attention_mask.astype(jnp.int32),
        "positions": rollout.positions,
        "response_mask": rollout.response_mask.astype(jnp.int32),
    }


def logprob_gap(trainer_logprobs: jax.Array, sampler_logprobs: jax.Array, mask: jax.Array) -> dict[str, float]:
    """Mean and max |trainer - sampler| log-prob over response tokens: how far the sampler is off-policy.

    All [rows, seq]; computed on device, so global arrays of a multi-host run give the global values."""
    count, total, largest = _gap_stats(trainer_logprobs, sampler_logprobs, mask)
    if not int(count):
        return {"logprob_diff_mean": 0.0, "logprob_diff_max": 0.0}
    return {"logprob_diff_mean": float(total) / int(count), "logprob_diff_max": float(largest)}


@jax.jit
def _gap_stats(trainer_logprobs, sampler_logprobs, mask):
    """(masked tokens, sum and max of |trainer - sampler| over them)."""
    m = mask.astype(bool)
    gap = jnp.where(m, jnp.abs(trainer_logprobs - sampler_logprobs), 0.0)
    return jnp.sum(m, dtype=jnp.int32), jnp.sum(gap), jnp.max(gap)


def rollout_metrics(rollout: Rollout) -> dict[str, float]:
    lengths = np.asarray(rollout.response_lengths)
    stopped_by_length = np.asarray(rollout.stop_reason) == 1
    return {
        "response_tokens_mean": float(lengths.mean()),
        "response_tokens_max": float(lengths.max()),
        "length_stop_rate": float(stopped_by_length.mean()),
    }
