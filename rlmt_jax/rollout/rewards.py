"""Reward-model scoring with the reward model's own tokenizer and chat template, as RLMT does it.

For each rollout: split the answer from the policy output (templates.split_output), re-render
`prompt messages + {"role": "assistant", "content": answer}` with the RM's chat template
(`add_generation_prompt=False`), tokenize without adding special tokens again, cut to `max_length`,
right-pad into a few length buckets, and score in jitted batches of a fixed shape (one compile per
bucket). The reward is the raw score at the last real token (no whitening). On several processes
(`hosts`) the scoring runs in lockstep: all processes run the same batches, each giving its share of rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlmt_jax.core.errors import UserError
from rlmt_jax.inputs.templates import SplitOutput, TemplateSettings, reward_messages, split_output

TRUNCATION_SIDES = ("right", "left")
Messages = Sequence[Mapping[str, str]]


@dataclasses.dataclass(frozen=True)
class RewardSettings:
    """How the reward model is fed.

    max_length: the most tokens the RM sees; longer inputs are cut (and counted in the metrics).
    truncation_side: right (drop the end of the answer) | left (drop the start of the prompt).
    batch_size: rows per jitted call (short batches are padded with dummy rows).
    buckets: padded lengths; None: powers of two from `min_bucket` up to `max_length`, and `max_length`.
    score_index: which of the RM's labels is the reward (a model with more than one label needs `label`).
    label: the name (config.json id2label) or index of the label that is the reward; None: the model must
        have exactly one label.
    """

    max_length: int = 8192
    truncation_side: str = "right"
    batch_size: int = 8
    buckets: tuple[int, ...] | None = None
    min_bucket: int = 128
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "auto"  # ModelConfig.attention
    score_index: int = 0
    label: str | None = None

    def __post_init__(self):
        if self.truncation_side not in TRUNCATION_SIDES:
            raise UserError(f"reward truncation_side: {self.truncation_side!r} is not one of right, left")
        for name in ("max_length", "batch_size", "min_bucket"):
            if getattr(self, name) < 1:
                raise UserError(f"reward {name}: must be at least 1, got {getattr(self, name)}")
        if self.buckets is not None:
            if not self.buckets or any(b < 1 for b in self.buckets):
                raise UserError(f"reward buckets: must be positive lengths, got {self.buckets}")
            if max(self.buckets) < self.max_length:
                raise UserError(
                    f"reward buckets: the largest ({max(self.buckets)}) must be at least max_length ({self.max_length})"
                )

    def bucket_lengths(self) -> tuple[int, ...]:
        if self.buckets is not None:
            return tuple(sorted(set(self.buckets)))
        lengths, length = [], self.min_bucket
        while length < self.max_length:
            lengths.append(length)
            length *= 2
        return (*lengths, self.max_length)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `length` tokens (buckets sorted ascending)."""
    for bucket in buckets:
        if length <= bucket:
            return bucket
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def truncate(ids: Sequence[int], max_length: int, side: str) -> tuple[list[int], bool]:
    """`ids` cut to `max_length` from the given side, and whether anything was cut."""
    ids = list(ids)
    if len(ids) <= max_length:
        return ids, False
    return (ids[:max_length] if side == "right" else ids[len(ids) - max_length :]), True


def right_pad(rows: Sequence[Sequence[int]], length: int, batch: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token rows right-padded to `length`, the batch filled up to `batch` rows with one-token dummies.

    -> input_ids [batch, length] int32, attention_mask [batch, length] int32
    """
    ids = np.full((batch, length), pad_id, np.int32)
    mask = np.zeros((batch, length), np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    mask[len(rows) :, 0] = 1
    return ids, mask


def bucket_batches(lengths: Sequence[int], buckets: Sequence[int], batch_size: int) -> dict[int, list[list[int]]]:
    """Row indices grouped by the smallest bucket that holds each row, cut into batches of `batch_size`
    (the last of a bucket may be short): {bucket: [[row, ...], ...]}, rows in the order given."""
    by_bucket: dict[int, list[int]] = {}
    for i, length in enumerate(lengths):
        by_bucket.setdefault(bucket_for(length, buckets), []).append(i)
    return {bucket: [rows[s : s + batch_size] for s in range(0, len(rows), batch_size)]
            for bucket, rows in by_bucket.items()}


def lockstep_batches(local: Mapping[int, list[list[int]]], buckets: Sequence[int],
                     counts: np.ndarray) -> list[tuple[int, list[int]]]:
    """The batches every process runs, in the same order, with this process's rows of each.

    local: this process's `bucket_batches`; counts: [processes, len(buckets)], how many batches each
    process has per bucket (all-gathered). Every process runs max_p counts[p, b] batches of bucket b, in
    ascending bucket order; a process with fewer gives empty row lists (dummy rows) for the rest.
    -> [(bucket, rows of this process), ...]
    """
    plan = []
    for b, bucket in enumerate(buckets):
        mine = local.get(bucket, [])
        plan += [(bucket, mine[i] if i < len(mine) else []) for i in range(int(counts[:, b].max()))]
    return plan


@dataclasses.dataclass(frozen=True)
class RewardBatch:
    """Scored rollouts.  rewards, valid, truncated, plan_tokens, answer_tokens: [n]."""

    rewards: np.ndarray
    answers: list[str]
    plans: list[str]
    valid: np.ndarray
    truncated: np.ndarray
    plan_tokens: np.ndarray
    answer_tokens: np.ndarray

    @property
    def metrics(self) -> dict[str, float]:
        """Over the batch (`reward_metrics`)."""
        return reward_metrics(self.rewards, self.valid, self.truncated, self.plan_tokens, self.answer_tokens)


def reward_metrics(rewards: np.ndarray, valid: np.ndarray, truncated: np.ndarray, plan_tokens: np.ndarray,
                   answer_tokens: np.ndarray) -> dict[str, float]:
    """Means over rows (reward_truncated: how many RM inputs were cut).  All [rows]."""
    return {
        "format_valid_rate": float(valid.mean()) if len(valid) else 0.0,
        "plan_tokens_mean": float(plan_tokens.mean()) if len(plan_tokens) else 0.0,
        "answer_tokens_mean": float(answer_tokens.mean()) if len(answer_tokens) else 0.0,
        "reward_truncated": float(truncated.sum()),
        "reward_mean": float(rewards.mean()) if len(rewards) else 0.0,
        "reward_std": float(rewards.std()) if len(rewards) else 0.0,
    }


class RewardScorer:
    """Scores (prompt messages, answer) pairs with a sequence-classification reward model."""

    def __init__(self, model, tokenizer, settings: RewardSettings = RewardSettings(), name: str = "reward model",
                 hosts=None):
        """hosts: a `multihost.HostRows` to score on a mesh, each batch split over its batch axes; with several
        processes in lockstep: every process scores its own rows, all processes run the same batches (count and
        buckets agreed, see `lockstep_batches`), each giving batch_size / process_count rows of every batch.
        None: the default device."""
        if not tokenizer.chat_template:
            raise UserError(f"{name}: its tokenizer has no chat template to render the conversation with")
        self.tokenizer = tokenizer
        self.settings = settings
        self.buckets = settings.bucket_lengths()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0
        self.hosts = hosts
        if hosts is not None and settings.batch_size % (hosts.process_count * hosts.rows_multiple):
            raise UserError(f"reward batch_size {settings.batch_size}: must be a multiple of "
                            f"{hosts.process_count * hosts.rows_multiple}, the mesh's batch split (data x fsdp)")
        num_labels = model.config.num_labels
        if num_labels != 1 and settings.label is None or not 0 <= settings.score_index < num_labels:
            raise UserError(f"{name}: has num_labels={num_labels}; a reward model gives one score per answer "
                            "(num_labels 1), or set reward.label (score: --label) to the label that is the reward")
        self.graphdef, self.state = nnx.split(model)
        self._forward = jax.jit(self._scores)

    @classmethod
    def from_pretrained(cls, path, settings: RewardSettings = RewardSettings(), place=None,
                        hosts=None) -> RewardScorer:
        """A scorer from a Hugging Face reward-model directory (its tokenizer files and weights).

        place: how each weight goes on device as it is read (`mesh.make_placer(mesh)` shards it over a mesh);
        hosts: how each input batch goes on device (see the constructor).
        """
        from transformers import AutoTokenizer

        from models import load_pretrained

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        except (OSError, ValueError) as err:
            raise UserError(f"reward model {path}: cannot load its tokenizer ({err})") from err
        if not tokenizer.chat_template:
            raise UserError(f"reward model {path}: its tokenizer has no chat template to render the conversation with")
        try:
            model = load_pretrained(path, dtype=settings.dtype, param_dtype=settings.param_dtype,
                                    attention=settings.attention, place=place)
        except (OSError, ValueError) as err:
            raise UserError(f"reward model {path}: {err}") from err
        if not hasattr(model, "score"):
            raise UserError(f"reward model {path}: is not a *ForSequenceClassification checkpoint")
        if settings.label is not None:
            settings = dataclasses.replace(settings, score_index=label_index(path, settings.label))
        return cls(model, tokenizer, settings, name=f"reward model {path}", hosts=hosts)

    def _scores(self, state, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """input_ids, attention_mask: [batch, bucket] -> rewards [batch] float32."""
        model = nnx.merge(self.graphdef, state)
        return model(input_ids, attention_mask)[:, self.settings.score_index].astype(jnp.float32)

    def render(self, messages: Messages, answer: str) -> str:
        """The RM's text for one rollout: its chat template over the prompt messages and the answer."""
        return self.tokenizer.apply_chat_template(
            reward_messages(messages, answer), tokenize=False, add_generation_prompt=False
        )

    def encode(self, texts: Sequence[str]) -> tuple[list[list[int]], np.ndarray]:
        """Token ids (no special tokens added again) cut to max_length, and which were cut: [n] bool."""
        encoded = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        cut = [truncate(ids, self.settings.max_length, self.settings.truncation_side) for ids in encoded]
        return [ids for ids, _ in cut], np.array([was_cut for _, was_cut in cut], bool)

    def score_ids(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """Rewards of token rows (each at most max_length long): [n] float32, in the order given."""
        for i, row in enumerate(rows):
            if not row:
                raise ValueError(f"row {i} has no tokens to score")
        size = self.settings.batch_size
        if self.hosts is not None:
            size //= self.hosts.process_count  # this process's share of every batch
        local = bucket_batches([len(row) for row in rows], self.buckets, size)
        if self.hosts is not None:
            counts = self.hosts.gather(np.asarray([len(local.get(b, ())) for b in self.buckets], np.int64))
            batches = lockstep_batches(local, self.buckets, counts)
        else:
            batches = [(bucket, chunk) for bucket, chunks in sorted(local.items()) for chunk in chunks]
        rewards = np.zeros(len(rows), np.float32)
        for bucket, chunk in batches:
            ids, mask = right_pad([rows[i] for i in chunk], bucket, size, self.pad_id)
            if self.hosts is None:
                scores = np.asarray(self._forward(self.state, jnp.asarray(ids), jnp.asarray(mask)))
            else:
                scores = self.hosts.take(self._forward(self.state, *self.hosts.put((ids, mask))))
            rewards[chunk] = scores[: len(chunk)]
        return rewards

    def score(self, prompts: Sequence[Messages], answers: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Rewards of (prompt messages, answer) pairs: [n] float32, and which inputs were cut: [n] bool."""
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        if not answers:  # nothing to score here (other processes may still have rows: score_ids runs along)
            return self.score_ids([]), np.zeros(0, bool)
        rows, truncated = self.encode([self.render(m, a) for m, a in zip(prompts, answers)])
        return self.score_ids(rows), truncated

    def score_outputs(
        self,
        prompts: Sequence[Messages],
        outputs: Sequence[str],
        template: TemplateSettings,
        eos_texts: Sequence[str] = (),
        length_tokenizer=None,
        format_penalty: float | None = None,
    ) -> RewardBatch:
        """Split each policy output into plan and answer, score the answers, and measure the batch.

        Plan and answer lengths are counted in `length_tokenizer`'s tokens (the policy's; default the RM's).
        format_penalty: None (the recipe): every answer is scored, `[NULL]` included; a number: outputs
        without the mode's delimiter get this reward and are not sent to the reward model.
        """
        splits: list[SplitOutput] = [split_output(o, template, eos_texts) for o in outputs]
        answers = [s.answer for s in splits]
        valid = np.array([s.valid for s in splits], bool)
        if format_penalty is None:
            rewards, truncated = self.score(prompts, answers)
        else:
            rewards = np.full(len(answers), format_penalty, np.float32)
            truncated = np.zeros(len(answers), bool)
            kept = np.flatnonzero(valid)
            if len(kept) or self.hosts is not None:  # in lockstep every process scores, rows or not
                rewards[kept], truncated[kept] = self.score([prompts[i] for i in kept], [answers[i] for i in kept])
        counter = length_tokenizer or self.tokenizer
        plan_tokens = token_counts(counter, [s.plan for s in splits])
        answer_tokens = token_counts(counter, answers)
        return RewardBatch(
            rewards=rewards,
            answers=answers,
            plans=[s.plan for s in splits],
            valid=valid,
            truncated=truncated,
            plan_tokens=plan_tokens,
            answer_tokens=answer_tokens,
        )


def label_index(path, label: str) -> int:
    """The index of `label` (a name from config.json's id2label, or an index) among the reward model's labels."""
    import json
    import os

    try:
        with open(os.path.join(path, "config.json")) as f:
            hf = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"reward model {path}: cannot read its config.json ({err})") from err
    names = {int(i): str(n) for i, n in (hf.get("id2label") or {}).items()}
    count = len(names) or int(hf.get("num_labels", 1))
    by_name = {n: i for i, n in names.items()}
    if str(label) in by_name:
        return by_name[str(label)]
    if str(label).isdigit() and int(label) < count:
        return int(label)
    raise UserError(f"reward.label {label!r}: reward model {path} has num_labels={count} with labels "
                    f"{[names.get(i, str(i)) for i in range(count)]}")


def token_counts(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """Tokens in each text, no special tokens added: [n] int."""
    if not texts:
        return np.zeros(0, np.int64)
    return np.array([len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]], np.int64)
