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

from rlmt_jax.core.errors import UserError
from rlmt_jax.rollout.rewards import RewardBatch, reward_metrics
from rlmt_jax.rollout.sampling import STOP_LENGTH, Rollout
from rlmt_jax.inputs.templates import (
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
        ids, truncated = self.encode_each(conversations)
        return ids, int(truncated.sum())

    def encode_each(self, conversations: Sequence[Conversation]) -> tuple[list[list[int]], np.ndarray]:
        """Prompt ids (left-truncated to the limit) and which prompts were truncated: [prompts] bool."""
        encoded = [encode_prompt(self.tokenizer, c, self.settings.max_prompt_tokens) for c in conversations]
        return [e.ids for e in encoded], np.array([e.truncated for e in encoded], bool)

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


def rollout_metrics(rollout: Rollout) -> dict[str, float]:
    return length_metrics(np.asarray(rollout.response_lengths), np.asarray(rollout.stop_reason) == STOP_LENGTH)


def length_metrics(response_tokens: np.ndarray, length_stopped: np.ndarray) -> dict[str, float]:
    """Response lengths and how many stopped at the length limit.  Both [rows]."""
    return {
        "response_tokens_mean": float(response_tokens.mean()),
        "response_tokens_max": float(response_tokens.max()),
        "length_stop_rate": float(length_stopped.mean()),
    }


@dataclasses.dataclass(frozen=True)
class ScoredRollouts:
    """This process's scored rollouts as numpy: rows = groups x n, the n samples of one prompt consecutive.

    arrays: the RL batch (`rl_batch`) and sampler_logprobs [rows, prompt_len + max_new_tokens], rewards [rows];
    prompt_len: the column where every response starts; prompts, texts, plans, answers: [rows] (the row's
    prompt conversation, decoded output, plan, answer); stats: [rows] numbers the step's metrics are made of.
    """

    arrays: dict[str, np.ndarray]
    prompt_len: int
    n: int
    prompts: list
    texts: list[str]
    plans: list[str]
    answers: list[str]
    stats: dict[str, np.ndarray]

    @classmethod
    def of(cls, rollout: Rollout, texts: Sequence[str], scored: RewardBatch, prompts: Sequence[Conversation],
           prompt_truncated: np.ndarray) -> ScoredRollouts:
        """texts: [rows] the decoded outputs; prompts, prompt_truncated: [groups] (whether the prompt was cut
        to the prompt limit)."""
        n = rollout.group_size
        arrays = {k: np.asarray(v) for k, v in rl_batch(rollout).items()}
        arrays["sampler_logprobs"] = np.asarray(rollout.logprobs)
        arrays["rewards"] = np.asarray(scored.rewards)
        stats = {
            "format_valid": np.asarray(scored.valid), "reward_truncated": np.asarray(scored.truncated),
            "plan_tokens": np.asarray(scored.plan_tokens), "answer_tokens": np.asarray(scored.answer_tokens),
            "response_tokens": np.asarray(rollout.response_lengths),
            "length_stopped": np.asarray(rollout.stop_reason) == STOP_LENGTH,
            "prompt_truncated": np.repeat(np.asarray(prompt_truncated, bool), n),
        }
        return cls(arrays, rollout.prompt_len, n, [p for p in prompts for _ in range(n)], list(texts),
                   list(scored.plans), list(scored.answers), stats)

    @property
    def group_rewards(self) -> np.ndarray:
        """[groups, n]"""
        return self.arrays["rewards"].reshape(-1, self.n)

    def take_groups(self, groups: Sequence[int]) -> ScoredRollouts:
        """These groups' rows, in the order given."""
        rows = np.asarray([g * self.n + i for g in groups for i in range(self.n)], np.int64)
        pick = lambda items: [items[r] for r in rows]  # noqa: E731
        return ScoredRollouts({k: v[rows] for k, v in self.arrays.items()}, self.prompt_len, self.n,
                              pick(self.prompts), pick(self.texts), pick(self.plans), pick(self.answers),
                              {k: v[rows] for k, v in self.stats.items()})

    @staticmethod
    def concat(parts: Sequence[ScoredRollouts], prompt_len: int, pad_id: int) -> ScoredRollouts:
        """The parts' rows in order, every part's [rows, seq] arrays left-padded to `prompt_len` prompt columns
        (tokens with pad_id, masks, positions and log-probs with 0: the padding is never attended)."""
        def padded(part: ScoredRollouts, name: str) -> np.ndarray:
            array = part.arrays[name]
            if array.ndim == 1:
                return array
            width = prompt_len - part.prompt_len
            return np.pad(array, ((0, 0), (width, 0)), constant_values=pad_id if name == "tokens" else 0)

        first = parts[0]
        return ScoredRollouts(
            {k: np.concatenate([padded(p, k) for p in parts]) for k in first.arrays}, prompt_len, first.n,
            [x for p in parts for x in p.prompts], [x for p in parts for x in p.texts],
            [x for p in parts for x in p.plans], [x for p in parts for x in p.answers],
            {k: np.concatenate([p.stats[k] for p in parts]) for k in first.stats})

    def metrics(self) -> dict[str, float]:
        """This process's reward, format and length metrics over its rows (`multihost.global_metrics` makes
        them global; prompts_truncated and reward_truncated are counts)."""
        s = self.stats
        metrics = reward_metrics(self.arrays["rewards"], s["format_valid"], s["reward_truncated"], s["plan_tokens"],
                                 s["answer_tokens"])
        metrics.update(length_metrics(s["response_tokens"], s["length_stopped"]))
        metrics["prompts_truncated"] = float(s["prompt_truncated"][:: self.n].sum())
        return metrics
