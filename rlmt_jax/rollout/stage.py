"""The rollout stage: this process's prompts -> the scored groups a step trains on.

    stage = RolloutStage(text, sampler, scorer, cfg.rollout, cfg.template.format_penalty)
    groups, key = stage(params, key, prompts, more)   # groups.rollouts: len(prompts) groups of n rows

Encode, sample n answers per prompt, decode, score with the reward model; a non-finite reward on any process
raises NonFiniteReward on every one. With rollout.group_filter (DAPO's dynamic sampling) the groups it drops
are made up from further rounds on the prompts of the next data batches (`MorePrompts`). With n > 1 the metrics
say which fraction of the groups has any reward spread (`groups_with_signal_fraction`): a group whose n rewards
are all equal has group advantages of 0.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlmt_jax.algorithms import GROUP_FILTERS, choose_groups, varied_groups
from rlmt_jax.rollout.rewards import RewardScorer
from rlmt_jax.rollout.sampling import Rollout, Sampler
from rlmt_jax.rollout.scored import Conversation, PolicyText, ScoredRollouts
from rlmt_jax.rollout.split_engine import SplitEngine
from rlmt_jax.scale import multihost
from rlmt_jax.settings.config import RolloutConfig

SUMMED_METRICS = ("reward_truncated", "prompts_truncated")  # counts: added over processes, not averaged


SIGNAL_METRIC = "groups_with_signal_fraction"


def groups_with_reward_spread(group_rewards: np.ndarray) -> int:
    """How many groups have rewards that are not all equal: the `varied` group filter's rule (max > min,
    compared exactly). A group of one sample has no spread.  group_rewards: [groups, n]."""
    return int(np.count_nonzero(varied_groups(jnp.asarray(group_rewards))))


def staleness_metrics(rollout: Rollout, version: int, max_staleness: int) -> dict[str, float]:
    """Over every process's response tokens: the fraction chosen by an older policy than `version`
    (stale_token_fraction) and the oldest's age in versions (staleness_max). A token older than max_staleness
    versions never reaches an update: the sampler resamples a row whose call it was not started for."""
    mask = np.asarray(rollout.response_mask)
    age = version - np.asarray(rollout.versions)[mask]
    if len(age) and (age.min() < 0 or age.max() > max_staleness):
        raise RuntimeError(f"sampling: token versions {sorted(set((version - age).tolist()))} at policy version "
                           f"{version} (max_staleness {max_staleness})")
    stale, tokens, oldest = multihost.all_gather(
        np.asarray([int(np.count_nonzero(age)), len(age), int(age.max(initial=0))], np.int64)).T
    return {"stale_token_fraction": float(stale.sum() / max(tokens.sum(), 1)), "staleness_max": float(oldest.max())}


def future_sample_keys(key: jax.Array, count: int) -> list[jax.Array]:
    """The sample keys of the next `count` calls of `RolloutStage.sample` that start from `key` (the key this
    call leaves): each call splits its key into (the key it leaves, its sample key)."""
    keys = []
    for _ in range(count):
        key, sample_key = jax.random.split(key)
        keys.append(sample_key)
    return keys


class NonFiniteReward(ArithmeticError):
    """The reward model gave a non-finite reward on some process (every process raises it)."""


@dataclasses.dataclass(frozen=True)
class MorePrompts:
    """Where further sampling rounds take their prompts (the data iterator's next batches): `left()` says
    whether a batch is left, `take()` takes the next one's prompts (this process's share)."""

    left: Callable[[], bool]
    take: Callable[[], list]


@dataclasses.dataclass(frozen=True)
class ScoredGroups:
    """Scored groups with what making them cost: this process's rows (`ScoredRollouts`), their metrics over
    all processes (reward, format, length; with n > 1 groups_with_signal_fraction; with a group filter,
    sampling_rounds, groups_kept_fraction and groups_filled), and the seconds spent sampling and scoring."""

    rollouts: ScoredRollouts
    metrics: dict[str, float]
    sample_s: float
    score_s: float

    @property
    def times(self) -> dict[str, float]:
        return {"time_sample_s": self.sample_s, "time_score_s": self.score_s}

    def samples(self, count: int) -> list[dict]:
        """The first `count` rows, for samples.jsonl."""
        scored = self.rollouts
        return [
            {"prompt": scored.prompts[i][-1]["content"], "output": scored.texts[i], "plan": scored.plans[i],
             "answer": scored.answers[i], "reward": float(scored.arrays["rewards"][i]),
             "format_valid": bool(scored.stats["format_valid"][i])}
            for i in range(min(count, len(scored.texts)))
        ]


@dataclasses.dataclass(frozen=True)
class RolloutStage:
    """The policy's text side, its sampler and the reward model, with the run's rollout section (n,
    group_filter, max_sampling_rounds) and template.format_penalty (the reward of a malformed output)."""

    text: PolicyText
    sampler: Sampler | SplitEngine
    scorer: RewardScorer
    rollout: RolloutConfig
    format_penalty: float | None

    def __call__(self, params, key: jax.Array, prompts: list[Conversation], more: MorePrompts, version: int = 0,
                 ahead: Sequence[list[Conversation]] = ()) -> tuple[ScoredGroups, jax.Array]:
        """The scored groups a step trains on -> (them, the key left). Their metrics and samples are of these
        groups (with a group filter, not of the groups it dropped). version: the policy's (updates so far);
        ahead (rollout.max_staleness k): the prompts of the next steps (up to k), whose rows may start in this
        step's tail."""
        groups, key = self._round(params, key, prompts, version, ahead)
        if self.rollout.group_filter is not None:
            groups, key = self._filtered(params, key, groups, len(prompts), more)
        scored = groups.rollouts
        local = scored.metrics()
        if self.rollout.n > 1:  # every process has n rows a group: the row-weighted mean is the global fraction
            group_rewards = scored.group_rewards
            local[SIGNAL_METRIC] = groups_with_reward_spread(group_rewards) / max(len(group_rewards), 1)
        metrics = multihost.global_metrics(local, rows=len(scored.texts), sums=SUMMED_METRICS)
        return dataclasses.replace(groups, metrics={**metrics, **groups.metrics}), key

    def sample(self, params, key: jax.Array, prompt_ids: Sequence[Sequence[int]], version: int = 0,
               ahead_ids: Sequence[Sequence[Sequence[int]]] = ()) -> tuple[Rollout, jax.Array]:
        """n answers to each prompt, with a key split off `key` -> (this process's rollout, the key left).
        With ahead_ids (the next steps' prompts) the sampler may start their rows, each with the key its
        step's call will split off (future_sample_keys)."""
        key, sample_key = jax.random.split(key)
        if not self.rollout.max_staleness:
            return self.sampler(params, prompt_ids, sample_key), key
        ahead = list(zip(ahead_ids, future_sample_keys(key, len(ahead_ids))))
        return self.sampler(params, prompt_ids, sample_key, version=version, ahead=ahead), key

    def _round(self, params, key: jax.Array, prompts: list[Conversation], version: int = 0,
               ahead: Sequence[list[Conversation]] = ()) -> tuple[ScoredGroups, jax.Array]:
        """This process's prompts sampled and scored, one group each (with partial rollouts, their staleness
        metrics; no others) -> (them, the key left)."""
        start = time.perf_counter()
        prompt_ids, truncated = self.text.encode_each(prompts)
        ahead_ids = [self.text.encode_each(later)[0] for later in ahead]
        rollout, key = self.sample(params, key, prompt_ids, version, ahead_ids)
        jax.block_until_ready(rollout.tokens)
        sampled = time.perf_counter()
        texts = self.text.decode_responses(rollout)
        repeated = [p for p in prompts for _ in range(self.rollout.n)]
        scored = self.scorer.score_outputs(
            repeated, texts, self.text.settings, self.text.eos_texts, length_tokenizer=self.text.tokenizer,
            format_penalty=self.format_penalty,
        )
        bad = np.flatnonzero(~np.isfinite(scored.rewards))
        if multihost.global_max_int(len(bad)):  # every process sees it and stops
            where = (f"({scored.rewards[bad[0]]}) for rollout {int(bad[0])} of process {jax.process_index()}"
                     if len(bad) else "on another process")
            raise NonFiniteReward(f"the reward model gave a non-finite reward {where}")
        rollouts = ScoredRollouts.of(rollout, texts, scored, prompts, truncated)
        metrics = {}
        if self.rollout.max_staleness and rollout.versions is not None:
            metrics = staleness_metrics(rollout, version, self.rollout.max_staleness)
        if isinstance(self.sampler, SplitEngine):  # time_sample_s: what the step waited for its rows
            metrics["time_engine_sample_s"] = self.sampler.engine_seconds
        return ScoredGroups(rollouts, metrics, sampled - start, time.perf_counter() - sampled), key

    def _filtered(self, params, key: jax.Array, first: ScoredGroups, needed: int,
                  more: MorePrompts) -> tuple[ScoredGroups, jax.Array]:
        """DAPO's dynamic sampling: the first `needed` groups rollout.group_filter keeps, sampled in rounds on
        `more` (so the data iterator's saved state counts every batch a step used) while any process has fewer
        and rounds are left (rollout.max_sampling_rounds, the data), then dropped groups if still short."""
        keep_of = GROUP_FILTERS(self.rollout.group_filter)
        keep = lambda groups: np.asarray(keep_of(jnp.asarray(groups.rollouts.group_rewards)), bool)  # noqa: E731
        rounds, keeps = [first], [keep(first)]
        while (len(rounds) < self.rollout.max_sampling_rounds and more.left()
               and multihost.global_max_int(int(sum(int(k.sum()) for k in keeps) < needed))):
            groups, key = self._round(params, key, more.take())
            rounds.append(groups)
            keeps.append(keep(groups))
        chosen, filled = choose_groups(keeps, needed)  # kept groups first, then fills
        parts = [r.rollouts for r in rounds]
        everything = ScoredRollouts.concat(parts, max(p.prompt_len for p in parts), self.text.pad_id)
        training = everything.take_groups([r * needed + g for r, g in chosen])  # every round: `needed` groups
        kept, sampled, fills = multihost.all_gather(
            np.asarray([sum(int(k.sum()) for k in keeps), sum(len(k) for k in keeps), filled], np.int64)).sum(0)
        metrics = {"sampling_rounds": float(len(rounds)), "groups_kept_fraction": float(kept / sampled),
                   "groups_filled": float(fills)}
        return ScoredGroups(training, metrics, sum(r.sample_s for r in rounds), sum(r.score_s for r in rounds)), key
