"""The update stage: this process's share of a step's data -> one update of the policy (and the critic).

    stage = UpdateStage(cfg, graphdef, objective, optimizer, hosts, pad_id, tokenizer, ref_params, critic)
    state, update = stage(state, data)       # state: TrainState; update.metrics, .seconds, .tokens

What an update does depends on `spec.loop`, one function of UPDATES each: `rollouts` (GRPO, PPO: old and
reference log-probs, rollout correction, advantages, the critic's and the policy's updates on scored groups),
`pairs` (DPO: the reference log-probs of the pairs, the update) and `supervised` (SFT on conversations).
Every process passes its own rows; the update runs on the global batch (process 0's rows first).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from rlmt_jax.algorithms import compute_advantages, rollout_correction, spec_of
from rlmt_jax.core.errors import UserError
from rlmt_jax.scale import multihost
from rlmt_jax.settings.config import RunConfig
from rlmt_jax.training.optim import AdamWConfig
from rlmt_jax.training.sequences import dpo_batch, sft_batch, sft_tokens
from rlmt_jax.training.train_step import compute_logprobs, compute_values, train_step


class NonFiniteUpdate(ArithmeticError):
    """An update's loss, gradient or update is not finite (its metrics are global: every process raises it)."""


class Rollouts(Protocol):
    """The scored rollouts an RL update reads (`rlmt_jax.rollout.scored.ScoredRollouts`, a stage beside this one).

    arrays: tokens, attention_mask, positions, response_mask, sampler_logprobs [rows, seq] and rewards [rows],
    the n samples of a group in consecutive rows; prompt_len: the column where every response starts."""

    arrays: Mapping[str, np.ndarray]
    prompt_len: int


@dataclasses.dataclass(frozen=True)
class TrainState:
    """What updates change: the policy's params and optimizer state, and the critic's (PPO; else None)."""

    params: Any
    opt_state: Any
    critic_params: Any = None
    critic_opt_state: Any = None


@dataclasses.dataclass(frozen=True)
class Critic:
    """PPO's value model: its structure, its loss and its optimizer."""

    graphdef: Any
    objective: Any
    optimizer: AdamWConfig


@dataclasses.dataclass(frozen=True)
class Update:
    """One update: its metrics (over all processes), its seconds, and the tokens it trained on (all processes)."""

    metrics: dict[str, float]
    seconds: float
    tokens: float

    def step_metrics(self, rollout_times: Mapping[str, float] | None = None) -> dict[str, float]:
        """The metrics of a step of this update after rollouts that took `rollout_times` (name -> seconds): the
        update's, those times, time_update_s and tokens_per_s (per second of the whole step)."""
        times = dict(rollout_times or {})
        return {**self.metrics, **times, "time_update_s": self.seconds,
                "tokens_per_s": self.tokens / max(sum(times.values()) + self.seconds, 1e-9)}


@dataclasses.dataclass(frozen=True)
class UpdateStage:
    """The run's update: the policy's structure, objective and optimizer, the frozen reference (None: the
    algorithm needs none), PPO's critic, and how rows are put on the mesh."""

    cfg: RunConfig
    graphdef: Any
    objective: Any
    optimizer: AdamWConfig
    hosts: multihost.HostRows
    pad_id: int
    tokenizer: Any
    ref_params: Any = None
    critic: Critic | None = None

    def __call__(self, state: TrainState, data) -> tuple[TrainState, Update]:
        """One update on this process's `data` (its `spec.loop`'s: scored rollouts, preference pairs or
        conversations) -> (the state after it, the update). Raises NonFiniteUpdate when the loss, gradient or
        update is not finite; the state it was given is then donated and must not be used."""
        start = time.perf_counter()
        state, metrics, attention_mask = UPDATES[spec_of(self.cfg).loop](self, state, data)
        seconds = time.perf_counter() - start
        if not metrics.get("finite", 1.0):
            raise NonFiniteUpdate(f"the loss, gradient or update is not finite (loss={metrics.get('loss')}, "
                                  f"grad_norm={metrics.get('grad_norm')}); the update was not applied")
        return state, Update(metrics, seconds, float(jnp.sum(attention_mask)))

    def micro_batches(self, rows: int) -> int:
        """How many micro-batches of optimizer.micro_batch_size make `rows` rows (global)."""
        size = self.cfg.optimizer.micro_batch_size
        if rows <= size:
            return 1
        if rows % size:
            raise UserError(f"optimizer.micro_batch_size={size} does not divide the {rows} sequences of a step")
        return rows // size

    def put_padded(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's [rows, ..., S] arrays as global arrays, S right-padded to the longest of all processes
        (their programs need one shape): `tokens` with pad_id, masks with 0. One process: S unchanged."""
        length = multihost.global_max_int(arrays["tokens"].shape[-1])
        return self.hosts.put({name: np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, length - a.shape[-1])],
                                            constant_values=self.pad_id if name == "tokens" else 0)
                               for name, a in arrays.items()})


# ------------------------------------------------------------------------------------------- rollouts
def _rollouts_update(stage: UpdateStage, state: TrainState, rollouts: Rollouts):
    """GRPO, PPO: algorithm.update_epochs updates of the critic, then of the policy, on the scored rollouts
    -> (state, metrics, attention_mask [rows, seq])."""
    cfg = stage.cfg
    # every response starts at the bucket's prompt length: the prompt's logits are never made
    start_column = rollouts.prompt_len
    objective = dataclasses.replace(stage.objective, response_start=start_column)
    batch = stage.hosts.put(dict(rollouts.arrays))  # global arrays: process 0's rows, then process 1's, ...
    micro = stage.micro_batches(batch["tokens"].shape[0])
    logprobs = lambda params: compute_logprobs(  # noqa: E731
        stage.graphdef, params, batch, temperature=cfg.rollout.temperature, num_micro_batches=micro,
        response_start=start_column)
    reference = None if stage.ref_params is None else (lambda: logprobs(stage.ref_params))
    values = None if stage.critic is None else (
        lambda: compute_values(stage.critic.graphdef, state.critic_params, batch, num_micro_batches=micro))
    metrics = prepare_rl_batch(cfg, batch, lambda: logprobs(state.params), reference, values)
    if stage.critic is not None:
        state, critic_metrics = _critic_update(stage, state, batch, micro)
        metrics.update(critic_metrics)
    params, opt_state, update = _train(stage.graphdef, state.params, state.opt_state, batch, objective,
                                       stage.optimizer, micro, cfg.algorithm.update_epochs)
    metrics.update(update)
    metrics["clip_fraction"] = update.get("pg_clipfrac", 0.0)
    return dataclasses.replace(state, params=params, opt_state=opt_state), metrics, batch["attention_mask"]


def prepare_rl_batch(cfg: RunConfig, batch: dict, policy_logprobs: Callable[[], jax.Array],
                     reference_logprobs: Callable[[], jax.Array] | None = None,
                     critic_values: Callable[[], jax.Array] | None = None) -> dict[str, float]:
    """Makes a batch of scored rollouts (global arrays [rows, seq] with `rewards` [rows] and `sampler_logprobs`,
    which it takes out) what the losses read, in verl's order: the old log-probs (the policy's, or the sampler's
    with rollout_correction.bypass), the reference's, the critic's values, the rollout correction, whose mask
    replaces `response_mask`, and then the advantages on that mask (REINFORCE++'s whitening and GAE read it:
    a token the correction drops counts in neither). The overlong penalty reads the sampled lengths, as
    verl's reward manager scores before the correction. Groups are whole on each process, so also in the
    global rows. Sets old_logprobs, ref_logprobs, advantages, response_mask, is_weights (weights on), returns
    and old_values (a critic) -> the metrics (sampler-vs-trainer gap, correction, reward_shaped_mean)."""
    rewards = batch.pop("rewards")
    sampler_logprobs = batch.pop("sampler_logprobs")
    metrics, is_weights, corrected_mask = _old_logprobs(cfg, batch, sampler_logprobs, policy_logprobs)
    if reference_logprobs is not None:
        batch["ref_logprobs"] = reference_logprobs()
    values = None if critic_values is None else critic_values()
    sampled_mask, batch["response_mask"] = batch["response_mask"], corrected_mask  # the correction's out: no loss
    batch["advantages"], returns, scores = compute_advantages(
        rewards, corrected_mask, cfg.algorithm, group_size=cfg.rollout.n, max_new_tokens=cfg.rollout.max_new_tokens,
        values=values, lengths=jnp.sum(sampled_mask, axis=-1))
    if cfg.algorithm.overlong_buffer:
        metrics["reward_shaped_mean"] = float(jnp.mean(scores))
    if is_weights is not None:
        batch["is_weights"] = is_weights
    if values is not None:
        batch["returns"], batch["old_values"] = returns, values
    return metrics


def _old_logprobs(cfg: RunConfig, batch: dict, sampler_logprobs: jax.Array, policy_logprobs: Callable[[], jax.Array]):
    """Sets batch["old_logprobs"]: the sampler's with rollout_correction.bypass (no forward pass), else the
    policy's before the update -> (the sampler-vs-trainer gap and correction metrics, the correction's
    importance weights or None, the response mask it leaves). All arrays [rows, seq]."""
    correction = cfg.algorithm.rollout_correction
    if correction.bypass:  # the sampler's log-probs serve as the old policy's
        batch["old_logprobs"] = sampler_logprobs
        return {}, None, batch["response_mask"]
    batch["old_logprobs"] = policy_logprobs()
    metrics = logprob_gap(batch["old_logprobs"], sampler_logprobs, batch["response_mask"])
    is_weights, corrected_mask, correction_metrics = rollout_correction(
        batch["old_logprobs"], sampler_logprobs, batch["response_mask"], correction)
    metrics.update(_floats(correction_metrics))
    return metrics, is_weights, corrected_mask


def _critic_update(stage: UpdateStage, state: TrainState, batch: dict, micro: int):
    """PPO's critic: algorithm.update_epochs updates on the batch's returns -> (state, its metrics as
    critic_<name>). Raises NonFiniteUpdate when its loss or gradient is not finite."""
    critic = stage.critic
    params, opt_state, metrics = _train(critic.graphdef, state.critic_params, state.critic_opt_state, batch,
                                        critic.objective, critic.optimizer, micro, stage.cfg.algorithm.update_epochs)
    if not metrics["finite"]:
        raise NonFiniteUpdate("the critic's loss or gradient is not finite")
    state = dataclasses.replace(state, critic_params=params, critic_opt_state=opt_state)
    return state, {f"critic_{k}": v for k, v in metrics.items()}


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


# ------------------------------------------------------------------------------------------- pairs, supervised
def _pairs_update(stage: UpdateStage, state: TrainState, pairs: list[dict]):
    """DPO: one update on preference pairs {prompt_ids, chosen_ids, rejected_ids}, with the reference's
    sequence log-probs -> (state, metrics, attention_mask [pairs, 2, seq])."""
    batch = stage.put_padded(dpo_batch(pairs, stage.cfg.algorithm.dpo.max_pair_tokens, stage.pad_id))
    count, _, seq = batch["tokens"].shape  # pairs of all processes
    flat = {k: v.reshape(count * 2, seq) for k, v in batch.items()}
    micro = stage.micro_batches(count)
    ref = compute_logprobs(stage.graphdef, stage.ref_params, flat, temperature=1.0, num_micro_batches=micro)
    mask = flat["response_mask"]
    summed = jnp.sum(ref * mask, axis=-1)
    if stage.objective.config.average_logprobs:
        summed = summed / jnp.maximum(jnp.sum(mask, axis=-1), 1)
    batch["ref_logps"] = summed.reshape(count, 2)
    params, opt_state, metrics = _train(stage.graphdef, state.params, state.opt_state, batch, stage.objective,
                                        stage.optimizer, micro)
    return dataclasses.replace(state, params=params, opt_state=opt_state), metrics, batch["attention_mask"]


def _supervised_update(stage: UpdateStage, state: TrainState, conversations: list):
    """SFT: one update on the assistant tokens of conversations -> (state, metrics, attention_mask [rows, seq])."""
    examples = [sft_tokens(stage.tokenizer, c, f"SFT conversation {i}") for i, c in enumerate(conversations)]
    batch = stage.put_padded(sft_batch(examples, stage.cfg.algorithm.sft.max_seq_tokens, stage.pad_id))
    params, opt_state, metrics = _train(stage.graphdef, state.params, state.opt_state, batch, stage.objective,
                                        stage.optimizer, stage.micro_batches(batch["tokens"].shape[0]))
    return dataclasses.replace(state, params=params, opt_state=opt_state), metrics, batch["attention_mask"]


UPDATES: dict[str, Callable[[UpdateStage, TrainState, Any], tuple[TrainState, dict[str, float], jax.Array]]] = {
    "rollouts": _rollouts_update, "pairs": _pairs_update, "supervised": _supervised_update,
}


def _train(graphdef, params, opt_state, batch: dict, objective, optimizer: AdamWConfig, micro: int, epochs: int = 1):
    """`epochs` train_steps on the batch -> (params, opt_state, the last one's metrics as floats)."""
    for _ in range(epochs):
        params, opt_state, metrics = train_step(graphdef, params, opt_state, batch, objective=objective,
                                                optimizer=optimizer, num_micro_batches=micro)
    return params, opt_state, _floats(metrics)


def _floats(metrics: dict) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
