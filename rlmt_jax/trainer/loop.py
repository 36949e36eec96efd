"""The training loop: sample -> extract -> score -> advantages -> update, for GRPO, PPO, online DPO and SFT.

    summary = train(resolve("configs/grpo_llama31_8b_instruct.yaml", ["rollout.temperature=0.8"]))

A run lives in `run.output_dir`: the resolved config, metrics.jsonl, samples.jsonl, TensorBoard events,
checkpoints/ (orbax) and export/ (a Hugging Face directory). Started again on a run dir with checkpoints it
resumes from the newest good one, with the same data order and rng, so it reproduces the uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import models
from rlmt_jax.run import checkpoint as ckpt
from rlmt_jax.scale import mesh as mesh_lib
from rlmt_jax.scale import multihost
from rlmt_jax.algorithms import (
    GROUP_FILTERS,
    build_preference_pairs,
    choose_groups,
    compute_advantages,
    rollout_correction,
    spec_of,
)
from rlmt_jax.settings.config import SCHEMA, RunConfig, frozen_param_dtype, save_resolved, to_yaml
from rlmt_jax.inputs.data import BatchIterator, fit_prompt_limit, load_train_records, prompt_lengths, train_batches
from rlmt_jax.core.errors import UserError
from rlmt_jax.core.jsonl import read_jsonl, write_jsonl_atomic
from rlmt_jax.run.metrics import MetricsLogger
from rlmt_jax.training.optim import AdamWConfig
from rlmt_jax.rollout.rewards import RewardScorer, RewardSettings
from rlmt_jax.run.resume import check_config_unchanged
from rlmt_jax.rollout.scored import PolicyText, ScoredRollouts, logprob_gap, template_settings
from rlmt_jax.run.run_dir import save_policy_files
from rlmt_jax.run.lock import RunDirInUse, RunLock
from rlmt_jax.rollout.sampling import DecodeLayout, Sampler, SamplingConfig
from rlmt_jax.training.sequences import dpo_batch, sft_batch, sft_tokens
from rlmt_jax.run.stop_signals import StopSignals
from rlmt_jax.inputs.tiny import resolve_model_path
from rlmt_jax.training.train_step import compute_logprobs, compute_values, init_optimizer_state, train_step

log = logging.getLogger("rlmt_jax.trainer.loop")
EXPORT_DIR = "export"
SUMMED_METRICS = ("reward_truncated", "prompts_truncated")  # counts: added over processes, not averaged


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, gradient, update or reward); no checkpoint is saved from that
    step, and the message names the newest checkpoint."""


def _floats(metrics: dict) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}


def _pad_to_agreed_length(arrays: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """[..., S] arrays right-padded to the longest S of all processes (their programs need one shape):
    `tokens` with pad_id, masks with 0. One process: unchanged."""
    length = multihost.global_max_int(arrays["tokens"].shape[-1])
    return {name: np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, length - a.shape[-1])],
                         constant_values=pad_id if name == "tokens" else 0) for name, a in arrays.items()}


def config_digest(cfg: RunConfig) -> str:
    return hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:16]


class Trainer:
    """One run: models, optimizer, data, checkpoints and metrics for `cfg`, and the loop over steps."""

    def __init__(self, cfg: RunConfig, allow_config_change: bool = False):
        """allow_config_change: resume a run dir whose config.yaml differs from `cfg` (else UserError)."""
        self.cfg = cfg
        self.allow_config_change = allow_config_change
        self.algorithm = cfg.algorithm.name
        self.spec = spec_of(cfg)  # the models, data, batch and objective of the algorithm
        self.run_dir = cfg.run.output_dir
        mesh_lib.initialize_distributed(**dataclasses.asdict(cfg.distributed))
        self.mesh = mesh_lib.make_mesh(cfg.mesh)
        self.hosts = multihost.HostRows(self.mesh)  # this process's rows of every global batch
        self._check_multihost()
        self.step = 0
        self.key = jax.random.key(cfg.run.seed)
        # One run per run dir, with the config it was started with: checked first, and nothing in the run dir
        # changes before. Then everything else a user can get wrong (data, model paths) is read before the run
        # dir is written; a failed start removes the run dir again when it made it (and left it empty).
        made_run_dir = not os.path.isdir(self.run_dir)
        self.lock = RunLock(self.run_dir)
        self._claim_run_dir(allow_config_change)
        try:
            self.records = load_train_records(cfg)
            with mesh_lib.activation_sharding(self.mesh):
                self._load_models()
            os.makedirs(self.run_dir, exist_ok=True)  # every process: DPO pairs are kept per process
            if jax.process_index() == 0:
                save_resolved(cfg, self.run_dir)
                save_policy_files(self.run_dir, self.policy_path, self.text.tokenizer)  # the run dir stands alone
            self.store = ckpt.CheckpointStore(
                cfg.checkpoint_dir, save_every=cfg.checkpoint.save_every, keep=cfg.checkpoint.keep,
                best_metric=cfg.checkpoint.best_metric, best_mode=cfg.checkpoint.best_mode,
                async_save=cfg.checkpoint.async_save,
            )
        except BaseException:
            self.lock.release()
            if made_run_dir and os.path.isdir(self.run_dir) and not os.listdir(self.run_dir):
                os.rmdir(self.run_dir)
            raise
        self.rolled_back_to: int | None = None  # a checkpoint.restore_step this run's checkpoints descend from

    def _claim_run_dir(self, allow_config_change: bool) -> None:
        """Process 0 takes the run dir's lock and checks the config against the saved one (and that the final
        export may be written); every process raises the same UserError when that fails."""
        error = None
        if jax.process_index() == 0:
            try:
                self.lock.acquire()
                try:
                    check_config_unchanged(self.run_dir, self.cfg, allow_config_change)
                    if self.cfg.run.export_at_end:
                        models.check_destination(os.path.join(self.run_dir, EXPORT_DIR))
                except BaseException:
                    self.lock.release()
                    raise
            except UserError as err:
                error = err
            except models.DestinationError as err:
                error = UserError(f"the run's export folder: {err}")
        if multihost.global_max_int(int(error is not None)):
            raise error or UserError(f"process 0 refused the run dir {self.run_dir} (see its message)")

    # ------------------------------------------------------------------------------------ setup
    def _check_multihost(self) -> None:
        """Settings that several processes need: each process owns whole GRPO groups and equal shares of
        every batch (one process: nothing to check)."""
        processes = jax.process_count()
        if processes == 1:
            return
        cfg, split = self.cfg, mesh_lib.batch_split(self.mesh)
        spec = spec_of(cfg)
        for key, value in spec.process_shares(cfg).items():
            if value % processes:
                raise UserError(f"config key '{key}' ({value}) must be a multiple of the {processes} processes: "
                                "each process takes an equal share (and GRPO groups never straddle processes)")
        if spec.reward_model and cfg.reward.batch_size % split:
            raise UserError(f"config key 'reward.batch_size' ({cfg.reward.batch_size}) must be a multiple of the "
                            f"mesh's batch split (data x fsdp = {split}) with {processes} processes: every "
                            "process scores its share of each reward batch")

    def _load(self, path: str, task: str | None = None, param_dtype: str | None = None):
        runtime = self.cfg.runtime
        try:
            return models.load_pretrained(
                path, dtype=runtime.dtype, param_dtype=param_dtype or runtime.param_dtype, task=task,
                remat=runtime.remat, scan_layers=runtime.scan_layers, attention=runtime.attention,
                place=mesh_lib.make_placer(self.mesh),
            )
        except (OSError, ValueError) as err:
            raise UserError(f"model {path}: {err}") from err

    def _load_models(self) -> None:
        from transformers import AutoTokenizer

        cfg = self.cfg
        self.policy_path = resolve_model_path(cfg.model.policy)
        policy = self._load(self.policy_path)
        if not isinstance(policy, models.CausalLM):
            raise UserError(f"model.policy {cfg.model.policy}: is not a *ForCausalLM checkpoint")
        self.model_config = policy.config
        self.graphdef, self.params = nnx.split(policy, nnx.Param)
        del policy

        tokenizer_path = resolve_model_path(cfg.model.tokenizer_path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=False)
        except (OSError, ValueError) as err:
            raise UserError(f"model.tokenizer {tokenizer_path}: cannot load a tokenizer ({err})") from err
        self.text = PolicyText.create(tokenizer, template_settings(cfg), self.model_config.eos_token_id)
        if self.spec.data == "prompts":  # prompts over data.max_prompt_tokens: cut, dropped or an error (data.overlong)
            self.records = fit_prompt_limit(self.records, prompt_lengths(self.text.tokenizer, self.records),
                                            cfg.data.max_prompt_tokens, cfg.data.overlong, cfg.data.train_path)

        self.ref_params = None
        if self.spec.needs_reference(cfg.algorithm):
            ref_path = resolve_model_path(cfg.model.reference_path)
            frozen = jnp.dtype(frozen_param_dtype(cfg.runtime))
            if ref_path == self.policy_path:
                # a copy (the update donates the policy's params), in the frozen dtype
                copy = jnp.copy if frozen == jnp.dtype(cfg.runtime.param_dtype) else lambda x: x.astype(frozen)
                self.ref_params = jax.tree.map(copy, self.params)
            else:
                _, self.ref_params = nnx.split(self._load(ref_path, param_dtype=frozen.name), nnx.Param)

        self.scorer = None
        if self.spec.reward_model:
            rm_path = resolve_model_path(cfg.model.reward_model)
            settings = RewardSettings(
                max_length=cfg.reward.max_length, batch_size=cfg.reward.batch_size,
                truncation_side=cfg.reward.truncation_side, dtype=cfg.runtime.dtype,
                param_dtype=frozen_param_dtype(cfg.runtime), attention=cfg.runtime.attention, label=cfg.reward.label,
            )
            lockstep = self.cfg.reward.batch_size % mesh_lib.batch_split(self.mesh) == 0
            self.scorer = RewardScorer.from_pretrained(rm_path, settings, place=mesh_lib.make_placer(self.mesh),
                                                       hosts=self.hosts if lockstep else None)
            n = cfg.rollout.n
            self.sampler = Sampler(self.graphdef, SamplingConfig(
                n=n, max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, eos_ids=self.text.stop_ids,
                pad_id=self.text.pad_id, prompt_buckets=cfg.prompt_buckets,
                cache_dtype=cfg.rollout.cache_dtype or cfg.runtime.dtype, decode_windows=cfg.rollout.decode_windows,
            ), hosts=self.hosts, layout=self._decode_layout())

        self.critic_graphdef = self.critic_params = None
        if self.spec.critic:
            critic = self._load(resolve_model_path(cfg.model.critic_path), task="value")
            self.critic_graphdef, critic_params = nnx.split(critic, nnx.Param)
            # its fresh value head is made on the default device, not by the placer
            self.critic_params = mesh_lib.place_unplaced_params(critic_params, self.mesh)

    def _decode_layout(self) -> DecodeLayout | None:
        """The rollout's layout (rollout.mesh) over this run's devices; None: sample in the training layout."""
        rollout_mesh = self.cfg.rollout.mesh
        return DecodeLayout.of(self.mesh, rollout_mesh, self.cfg.runtime.dtype) if rollout_mesh.reshard else None

    def _optimizer(self, total_steps: int, lr: float | None = None) -> AdamWConfig:
        o = self.cfg.optimizer
        return AdamWConfig(
            lr=lr or o.lr, schedule=o.schedule, warmup_ratio=o.warmup_ratio, total_steps=total_steps,
            weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps, grad_clip=o.grad_clip,
            decay=self.spec.weight_decay,
        )

    def _micro_batches(self, rows: int) -> int:
        size = self.cfg.optimizer.micro_batch_size
        if rows <= size:
            return 1
        if rows % size:
            raise UserError(f"optimizer.micro_batch_size={size} does not divide the {rows} sequences of a step")
        return rows // size

    # ------------------------------------------------------------------------------------ checkpoints
    def _items(self) -> dict[str, Any]:
        return {
            "params": self.params, "opt_state": self.opt_state,
            "critic_params": self.critic_params, "critic_opt_state": getattr(self, "critic_opt_state", None),
            "data_iter": self.batches.get_state(), "rng": self.key,
            "meta": {"config_digest": config_digest(self.cfg), "config": SCHEMA.to_dict(self.cfg),
                     "algorithm": self.algorithm, "rolled_back_to": self.rolled_back_to},
        }

    def _resume(self) -> None:
        targets = {name: value for name, value in self._items().items() if value is not None and name != "meta"}
        targets["data_iter"] = targets["rng"] = None  # JSON items need no target
        restored = self._restore_checkpoint(targets)
        if restored is None:
            return
        saved_config = self.store.meta(restored.step).get("config")
        if saved_config is not None:  # a checkpoint dir kept apart from the run dir (gs://) has its own config
            check_config_unchanged(self.run_dir, self.cfg, self.allow_config_change, saved_config,
                                   what=f"the checkpoint of step {restored.step} in {self.cfg.checkpoint_dir}")
        items = restored.items
        self.params, self.opt_state = items["params"], items["opt_state"]
        if self.critic_params is not None:
            self.critic_params, self.critic_opt_state = items["critic_params"], items["critic_opt_state"]
        self.batches.set_state(items["data_iter"])
        self.key = items["rng"]
        self.step = restored.step
        log.warning("resumed from the checkpoint of step %d in %s", self.step, self.cfg.checkpoint_dir)

    def _restore_checkpoint(self, targets: dict[str, Any]) -> ckpt.Restored | None:
        """The newest checkpoint, or with checkpoint.restore_step=N step N, the newer ones set aside. A run
        that already rolled back to N (its newest checkpoint says so) resumes from its newest."""
        wanted = self.cfg.checkpoint.restore_step
        newest = self.store.latest_step()
        if wanted is not None and newest is not None:
            self.rolled_back_to = self.store.meta(newest).get("rolled_back_to")
            if self.rolled_back_to != wanted:
                restored = self.store.restore(targets, step=wanted)
                later = self.store.set_aside_after(wanted)
                self.rolled_back_to = wanted
                log.warning("rolled back to the checkpoint of step %d; the newer ones (%s) are kept as "
                            "<step>%s", wanted, later, ckpt.ROLLED_BACK_SUFFIX)
                return restored
        restored = self.store.restore(targets)
        if restored is not None and wanted is None:
            self.rolled_back_to = self.store.meta(restored.step).get("rolled_back_to")
        return restored

    def _save(self, metrics: dict[str, float] | None, final: bool = False) -> None:
        try:
            self.store.save(self.step, self._items(), metrics, final=final)
        except ckpt.NonFiniteError as err:
            raise TrainingError(str(err)) from None

    def _newest_checkpoint(self) -> str:
        """Which checkpoint a resume starts from, said truthfully (every saved step had finite values)."""
        try:
            self.store.wait_until_finished()
        except UserError:
            pass
        step = self.store.latest_step()
        if step is None:
            return "no checkpoint has been saved yet"
        return (f"the newest checkpoint is step {step} in {self.cfg.checkpoint_dir} (saved from a step with a finite "
                "loss, gradient and update; checkpoint.restore_step=N resumes from an older one)")

    # ------------------------------------------------------------------------------------ RL steps
    def _sample_and_score(self, prompts: list) -> tuple[ScoredRollouts, float, float]:
        """Samples and scores this process's prompts -> (its scored rollouts, seconds sampling, seconds scoring).
        A non-finite reward on any process stops the step on every process."""
        cfg = self.cfg
        n = cfg.rollout.n
        start = time.perf_counter()
        prompt_ids, truncated = self.text.encode_each(prompts)
        self.key, sample_key = jax.random.split(self.key)
        rollout = self.sampler(self.params, prompt_ids, sample_key)  # this process's rows
        jax.block_until_ready(rollout.tokens)
        sampled = time.perf_counter()
        texts = self.text.decode_responses(rollout)
        repeated = [p for p in prompts for _ in range(n)]
        scored = self.scorer.score_outputs(
            repeated, texts, self.text.settings, self.text.eos_texts, length_tokenizer=self.text.tokenizer,
            format_penalty=cfg.template.format_penalty,
        )
        bad = np.flatnonzero(~np.isfinite(scored.rewards))
        if multihost.global_max_int(len(bad)):  # every process sees it and stops
            where = (f"({scored.rewards[bad[0]]}) for rollout {int(bad[0])} of process {jax.process_index()}"
                     if len(bad) else "on another process")
            raise TrainingError(f"step {self.step + 1}: the reward model gave a non-finite reward {where}")
        return ScoredRollouts.of(rollout, texts, scored, prompts, truncated), sampled - start, \
            time.perf_counter() - sampled

    def _training_groups(self, prompts: list) -> tuple[ScoredRollouts, dict[str, float], float, float]:
        """The scored groups this step trains on: this process's prompts' groups; with rollout.group_filter
        (DAPO's dynamic sampling) the first len(prompts) groups the filter keeps, sampled in rounds of the next
        batches of the data iterator (so its saved state counts every batch a step used) while any process
        has fewer and rounds are left (rollout.max_sampling_rounds, the data), then dropped groups if still
        short. -> (the groups, their sampling metrics, seconds sampling, seconds scoring)."""
        rollout = self.cfg.rollout
        scored, t_sample, t_score = self._sample_and_score(prompts)
        if rollout.group_filter is None:
            return scored, {}, t_sample, t_score
        keep_of = GROUP_FILTERS(rollout.group_filter)
        rounds = [scored]
        keeps = [np.asarray(keep_of(jnp.asarray(scored.group_rewards)), bool)]
        needed = len(prompts)
        while (len(rounds) < rollout.max_sampling_rounds and not self.batches.exhausted
               and multihost.global_max_int(int(sum(int(k.sum()) for k in keeps) < needed))):
            scored, sample_s, score_s = self._sample_and_score(list(next(self.batches).items))
            rounds.append(scored)
            keeps.append(np.asarray(keep_of(jnp.asarray(scored.group_rewards)), bool))
            t_sample, t_score = t_sample + sample_s, t_score + score_s
        chosen, filled = choose_groups(keeps, needed)  # kept groups first, then fills
        everything = ScoredRollouts.concat(rounds, max(r.prompt_len for r in rounds), self.text.pad_id)
        training = everything.take_groups([r * needed + g for r, g in chosen])  # every round: `needed` groups
        kept, sampled, fills = multihost.all_gather(
            np.asarray([sum(int(k.sum()) for k in keeps), sum(len(k) for k in keeps), filled], np.int64)).sum(0)
        return training, {"sampling_rounds": float(len(rounds)), "groups_kept_fraction": float(kept / sampled),
                          "groups_filled": float(fills)}, t_sample, t_score

    def _samples(self, scored: ScoredRollouts) -> list[dict]:
        """The first logging.samples_per_step rows of this process's training batch, for samples.jsonl."""
        return [
            {"step": self.step + 1, "prompt": scored.prompts[i][-1]["content"], "output": scored.texts[i],
             "plan": scored.plans[i], "answer": scored.answers[i], "reward": float(scored.arrays["rewards"][i]),
             "format_valid": bool(scored.stats["format_valid"][i])}
            for i in range(min(self.cfg.logging.samples_per_step, len(scored.texts)))
        ]

    def _rl_step(self, prompts: list) -> tuple[dict[str, float], list[dict]]:
        """One RL update on this process's prompts. Its reward, format and length metrics and its samples are
        of the groups it trains on (with a group filter, not of the groups it dropped)."""
        cfg = self.cfg
        scored, sampling, t_sample, t_score = self._training_groups(prompts)
        info = multihost.global_metrics(scored.metrics(), rows=len(scored.texts), sums=SUMMED_METRICS)
        info.update(sampling)
        samples = self._samples(scored)
        local = dict(scored.arrays)
        start = time.perf_counter()
        # every response starts at the bucket's prompt length: the prompt's logits are never made
        start_column = scored.prompt_len
        objective = dataclasses.replace(self.objective, response_start=start_column)
        batch = self.hosts.put(local)  # global arrays: process 0's rows, then process 1's, ...
        rewards = batch.pop("rewards")
        sampler_logprobs = batch.pop("sampler_logprobs")
        rows = batch["tokens"].shape[0]
        micro = self._micro_batches(rows)
        temperature = cfg.rollout.temperature
        metrics = dict(info)
        correction = cfg.algorithm.rollout_correction
        is_weights, corrected_mask = None, batch["response_mask"]
        if correction.bypass:  # the sampler's log-probs serve as the old policy's: no forward pass
            batch["old_logprobs"] = sampler_logprobs
        else:
            batch["old_logprobs"] = compute_logprobs(self.graphdef, self.params, batch, temperature=temperature,
                                                     num_micro_batches=micro, response_start=start_column)
            metrics.update(logprob_gap(batch["old_logprobs"], sampler_logprobs, batch["response_mask"]))
            is_weights, corrected_mask, correction_metrics = rollout_correction(
                batch["old_logprobs"], sampler_logprobs, batch["response_mask"], correction)
            metrics.update(_floats(correction_metrics))
        if self.ref_params is not None:
            batch["ref_logprobs"] = compute_logprobs(self.graphdef, self.ref_params, batch, temperature=temperature,
                                                     num_micro_batches=micro, response_start=start_column)
        values = None
        if self.spec.critic:
            values = compute_values(self.critic_graphdef, self.critic_params, batch, num_micro_batches=micro)
        # groups are whole on each process, so also whole in the global rows
        batch["advantages"], returns, scores = compute_advantages(
            rewards, batch["response_mask"], cfg.algorithm, group_size=cfg.rollout.n,
            max_new_tokens=cfg.rollout.max_new_tokens, values=values)
        if cfg.algorithm.overlong_buffer:
            metrics["reward_shaped_mean"] = float(jnp.mean(scores))
        batch["response_mask"] = corrected_mask  # tokens the correction masked count in no loss
        if is_weights is not None:
            batch["is_weights"] = is_weights
        if self.spec.critic:
            batch["returns"], batch["old_values"] = returns, values
            for _ in range(cfg.algorithm.update_epochs):
                self.critic_params, self.critic_opt_state, critic_metrics = train_step(
                    self.critic_graphdef, self.critic_params, self.critic_opt_state, batch,
                    objective=self.critic_objective, optimizer=self.critic_optimizer, num_micro_batches=micro)
            critic_metrics = _floats(critic_metrics)
            metrics.update({f"critic_{k}": v for k, v in critic_metrics.items()})
            if not critic_metrics["finite"]:
                raise TrainingError(f"step {self.step + 1}: the critic's loss or gradient is not finite")
        for _ in range(cfg.algorithm.update_epochs):
            self.params, self.opt_state, update = train_step(
                self.graphdef, self.params, self.opt_state, batch, objective=objective,
                optimizer=self.optimizer, num_micro_batches=micro)
        update = _floats(update)
        metrics.update(update)
        metrics["clip_fraction"] = update.get("pg_clipfrac", 0.0)
        t_update = time.perf_counter() - start
        tokens = float(jnp.sum(batch["attention_mask"]))  # over all processes
        metrics.update(time_sample_s=t_sample, time_score_s=t_score, time_update_s=t_update,
                       tokens_per_s=tokens / max(t_sample + t_score + t_update, 1e-9))
        return metrics, samples

    # ------------------------------------------------------------------------------------ SFT / DPO steps
    def _sft_step(self, conversations: list) -> tuple[dict[str, float], list[dict]]:
        start = time.perf_counter()
        examples = [sft_tokens(self.text.tokenizer, c, f"SFT conversation {i}") for i, c in enumerate(conversations)]
        arrays = sft_batch(examples, self.cfg.algorithm.sft.max_seq_tokens, self.text.pad_id)
        batch = self.hosts.put(_pad_to_agreed_length(arrays, self.text.pad_id))
        self.params, self.opt_state, update = train_step(
            self.graphdef, self.params, self.opt_state, batch, objective=self.objective, optimizer=self.optimizer,
            num_micro_batches=self._micro_batches(batch["tokens"].shape[0]))
        metrics = _floats(update)
        elapsed = time.perf_counter() - start
        metrics.update(time_update_s=elapsed, tokens_per_s=float(jnp.sum(batch["attention_mask"])) / elapsed)
        return metrics, []

    def _dpo_step(self, pairs: list) -> tuple[dict[str, float], list[dict]]:
        start = time.perf_counter()
        arrays = dpo_batch(pairs, self.cfg.algorithm.dpo.max_pair_tokens, self.text.pad_id)
        batch = self.hosts.put(_pad_to_agreed_length(arrays, self.text.pad_id))
        count, _, seq = batch["tokens"].shape  # pairs of all processes
        flat = {k: v.reshape(count * 2, seq) for k, v in batch.items()}
        micro = self._micro_batches(count)
        ref = compute_logprobs(self.graphdef, self.ref_params, flat, temperature=1.0, num_micro_batches=micro)
        mask = flat["response_mask"]
        summed = jnp.sum(ref * mask, axis=-1)
        if self.objective.config.average_logprobs:
            summed = summed / jnp.maximum(jnp.sum(mask, axis=-1), 1)
        batch["ref_logps"] = summed.reshape(count, 2)
        self.params, self.opt_state, update = train_step(
            self.graphdef, self.params, self.opt_state, batch, objective=self.objective, optimizer=self.optimizer,
            num_micro_batches=micro)
        metrics = _floats(update)
        elapsed = time.perf_counter() - start
        metrics.update(time_update_s=elapsed, tokens_per_s=float(jnp.sum(batch["attention_mask"])) / elapsed)
        return metrics, []

    def _dpo_pairs(self) -> list[dict]:
        """Online DPO's one round: n answers per prompt from the initial policy, best vs worst valid answer.

        Each process samples its own prompts (every process runs the same number of sampler calls, a short
        last chunk filled up with prompts that make no pairs) and keeps its pairs in
        RUN_DIR/dpo_pairs.process-<i>.jsonl, so a resumed run trains on the same pairs."""
        path = os.path.join(self.run_dir, f"dpo_pairs.process-{jax.process_index()}.jsonl")
        if multihost.global_min_int(int(os.path.exists(path))):  # every process has its pairs: none samples
            return read_jsonl(path)
        cfg = self.cfg
        n = cfg.rollout.n
        processes = jax.process_count()
        local = self.records[jax.process_index()::processes]
        chunk = max(cfg.rollout.prompts_per_step // processes, 1)
        chunks = math.ceil(math.ceil(len(self.records) / processes) / chunk)  # process 0's count: the most
        pairs: list[dict] = []
        skipped = {"too_few_valid": 0, "too_long": 0, "tied": 0}
        for start in range(0, chunks * chunk, chunk):
            prompts = list(local[start:start + chunk])
            real = len(prompts)
            prompts += [self.records[0]] * (chunk - real)  # fillers: sampled for the lockstep, never scored
            prompt_ids, _ = self.text.encode(prompts)
            self.key, sample_key = jax.random.split(self.key)
            rollout = self.sampler(self.params, prompt_ids, sample_key)
            texts = self.text.decode_responses(rollout)[: real * n]
            repeated = [p for p in prompts[:real] for _ in range(n)]
            scored = self.scorer.score_outputs(repeated, texts, self.text.settings, self.text.eos_texts)
            lengths = np.asarray(rollout.response_lengths)
            responses = [rollout.response_tokens(r) for r in range(len(texts))]
            selection = build_preference_pairs(
                scored.rewards.reshape(-1, n).tolist(), scored.valid.reshape(-1, n).tolist(),
                [[len(prompt_ids[p]) + int(lengths[p * n + i]) for i in range(n)] for p in range(real)],
                min_valid=cfg.algorithm.dpo.min_valid, max_pair_tokens=cfg.algorithm.dpo.max_pair_tokens,
            )
            skipped["too_few_valid"] += selection.skipped_too_few_valid
            skipped["too_long"] += selection.skipped_too_long
            skipped["tied"] += selection.skipped_tied
            for pair in selection.pairs:
                pairs.append({
                    "prompt_ids": prompt_ids[pair.prompt_index],
                    "chosen_ids": responses[pair.prompt_index * n + pair.chosen_index],
                    "rejected_ids": responses[pair.prompt_index * n + pair.rejected_index],
                    "chosen_score": pair.chosen_score, "rejected_score": pair.rejected_score,
                })
        log.warning("online DPO: %d pairs from %d prompts (skipped: %s)", len(pairs), len(local), skipped)
        if not multihost.global_min_int(len(pairs)):  # every process stops together
            raise UserError("online DPO: no preference pairs" + (" on some process" if processes > 1 else "")
                            + " (every prompt had fewer than algorithm.dpo.min_valid parseable answers, tied "
                            "scores, or too many tokens)")
        write_jsonl_atomic(path, pairs)
        return pairs

    # ------------------------------------------------------------------------------------ the loop
    def _prepare(self) -> Iterator:
        cfg = self.cfg
        self.objective = self.spec.objective(cfg)
        if self.spec.loop == "pairs":
            pairs = self._dpo_pairs()
            dpo = cfg.algorithm.dpo
            self.batches = BatchIterator(pairs, self._dpo_local_batch(len(pairs)), seed=cfg.data.shuffle_seed,
                                         epochs=dpo.epochs, shard_index=0, shard_count=1)
        else:
            self.batches = train_batches(cfg, self.records)
        step_fn = {"rollouts": self._rl_step, "pairs": self._dpo_step, "supervised": self._sft_step}[self.spec.loop]
        data_steps = self.batches.num_steps  # DPO: each process its own pairs; the run stops with the fewest
        data_steps = None if data_steps is None else multihost.global_min_int(data_steps)
        self.total_steps = min(s for s in (cfg.run.total_steps, data_steps) if s is not None)
        self.optimizer = self._optimizer(self.total_steps)
        # the step counter is made off the mesh: placed on it, a checkpoint restores it where the params are
        self.opt_state = mesh_lib.replicate_unplaced(init_optimizer_state(self.params, self.optimizer), self.mesh)
        if self.spec.critic:
            self.critic_optimizer = self._optimizer(self.total_steps, lr=cfg.algorithm.ppo.critic_lr)
            self.critic_opt_state = mesh_lib.replicate_unplaced(
                init_optimizer_state(self.critic_params, self.critic_optimizer), self.mesh)
            self.critic_objective = self.spec.critic_objective(cfg)
        self._resume()
        return step_fn

    def _dpo_local_batch(self, pairs: int) -> int:
        """Pairs per step from this process: every process the same number (its share of
        algorithm.dpo.batch_size, at most the fewest pairs any process has), rows that split over the mesh."""
        share = self.cfg.algorithm.dpo.batch_size // jax.process_count()
        multiple = self.hosts.rows_multiple
        size = min(share, multihost.global_min_int(pairs)) // multiple * multiple
        if size < 1:
            raise UserError(f"online DPO: too few pairs for one step of {multiple * jax.process_count()} pairs "
                            "(a multiple of the mesh's batch split, data x fsdp)")
        return size

    def run(self) -> dict[str, Any]:
        """Trains to the last step (or a stop signal), checkpointing and logging; returns a summary: the steps'
        metrics, the export, and "stopped" (the signal's name) when a signal ended it early with a checkpoint."""
        try:
            return self._run()
        finally:
            self.lock.release()

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        with mesh_lib.activation_sharding(self.mesh):
            step_fn = self._prepare()
            logger = MetricsLogger(
                self.run_dir, next_step=self.step + 1, total_steps=self.total_steps,
                tensorboard=cfg.logging.tensorboard, wandb_project=cfg.logging.wandb_project,
                wandb_config=SCHEMA.to_dict(cfg),
            )
            history: list[dict[str, float]] = []
            metrics: dict[str, float] | None = None
            stopped = None
            try:
                with StopSignals() as signals:
                    # dynamic sampling (rollout.group_filter) takes more batches than steps: the data may end first
                    while self.step < self.total_steps and not self.batches.exhausted:
                        batch = next(self.batches)
                        metrics, samples = step_fn(list(batch.items))
                        if not metrics.get("finite", 1.0):
                            raise TrainingError(
                                f"step {self.step + 1}: the loss, gradient or update is not finite "
                                f"(loss={metrics.get('loss')}, grad_norm={metrics.get('grad_norm')}); the update "
                                "was not applied")
                        self.step += 1
                        last = self.step == self.total_steps or self.batches.exhausted
                        history.append({"step": self.step, **metrics})
                        if self.step % cfg.logging.every == 0 or last:
                            logger.log(self.step, metrics)
                        if samples:
                            logger.samples(self.step, samples)
                        self._save(metrics, final=last)
                        if last and self.step < self.total_steps:
                            log.warning("the data ran out after step %d of %d: dynamic sampling "
                                        "(rollout.group_filter) took more than one batch for some steps",
                                        self.step, self.total_steps)
                        # every process stops after the same step when any of them got a signal (also one
                        # that came while the save above waited for the previous one)
                        stop = multihost.global_max_int(int(signals.requested is not None))
                        if stop and not last:
                            self._save(metrics, final=True)  # unless saved above
                            stopped = signals.requested or "a signal to another process"
                            break
                    self.store.close()  # the save in flight completes before a stop is reported
            except TrainingError as err:
                raise TrainingError(f"{err}; {self._newest_checkpoint()}") from None
            finally:
                self.store.close()
                logger.close()
        if stopped is not None:
            return {"steps": self.step, "history": history, "export": None, "stopped": stopped,
                    "checkpoint": self.store.latest_step()}
        export = None
        if cfg.run.export_at_end:
            export = self.export(os.path.join(self.run_dir, EXPORT_DIR))
        return {"steps": self.step, "history": history, "export": export, "stopped": None}

    def export(self, out_dir: str) -> str:
        """The current policy as a Hugging Face directory with the policy's tokenizer files."""
        policy = nnx.merge(self.graphdef, self.params)
        try:
            return export_policy(policy, self.text.tokenizer, out_dir)
        except models.DestinationError as err:  # the folder changed during the run; the checkpoints hold it
            raise UserError(f"the run's export: {err}; `rlmt-jax export {self.run_dir} --out NEW` writes it") from None


def export_policy(policy, tokenizer, out_dir: str, **save_options) -> str:
    """save_pretrained plus the tokenizer files (with its chat template), written atomically together."""
    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer.save_pretrained(tok_dir)
        files = [os.path.join(tok_dir, f) for f in sorted(os.listdir(tok_dir))]
        return models.save_pretrained(policy, out_dir, extra_files=files, **save_options)


def train(cfg: RunConfig, allow_config_change: bool = False) -> dict[str, Any]:
    """Runs (or resumes) `cfg`; the summary's "stopped" names the signal that stopped it early (None: it ran to
    the end). A start that fails before its first step removes the run dir if it made it (config.yaml, empty
    metrics, TensorBoard and checkpoint folders), so no half-made run is left to resume or mistake."""
    run_dir = cfg.run.output_dir
    made_run_dir = not os.path.exists(run_dir)
    trainer = None
    try:
        trainer = Trainer(cfg, allow_config_change=allow_config_change)
        return trainer.run()
    except RunDirInUse:
        raise  # the run dir is another trainer's, even when it made it just now
    except BaseException:
        if made_run_dir and (trainer is None or trainer.step == 0) and os.path.isdir(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
            log.warning("removed %s: this start made it and stopped before its first step", run_dir)
        raise
