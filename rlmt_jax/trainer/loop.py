"""The training loop: each step the rollout stage (prompts -> scored groups) then the update stage (-> new
weights), for GRPO, PPO, online DPO and SFT.

    summary = train(resolve("configs/grpo_llama31_8b_instruct.yaml", ["rollout.temperature=0.8"]))

A run lives in `run.output_dir`: the resolved config, metrics.jsonl, samples.jsonl, TensorBoard events,
checkpoints/ (orbax) and export/ (a Hugging Face directory). Started again on a run dir with checkpoints it
resumes from the newest good one, with the same data order and rng, so it reproduces the uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import tempfile
from typing import Any

import jax
from flax import nnx

import models
from rlmt_jax.algorithms import spec_of
from rlmt_jax.core.errors import UserError
from rlmt_jax.inputs.data import BatchIterator, fit_prompt_limit, load_train_records, prompt_lengths, train_batches
from rlmt_jax.rollout.preference_pairs import preference_pairs
from rlmt_jax.rollout.stage import MorePrompts, NonFiniteReward, RolloutStage
from rlmt_jax.run import checkpoint as ckpt
from rlmt_jax.run.lock import RunDirInUse, RunLock
from rlmt_jax.run.metrics import MetricsLogger
from rlmt_jax.run.resume import check_checkpoint_config, check_config_unchanged
from rlmt_jax.run.run_dir import save_policy_files
from rlmt_jax.run.stop_signals import StopSignals
from rlmt_jax.scale import mesh as mesh_lib
from rlmt_jax.scale import multihost
from rlmt_jax.settings.config import SCHEMA, RunConfig, save_resolved, to_yaml
from rlmt_jax.trainer import setup
from rlmt_jax.trainer.no_signal import NoSignalWatch
from rlmt_jax.training.stage import Critic, NonFiniteUpdate, TrainState, UpdateStage

log = logging.getLogger("rlmt_jax.trainer.loop")
EXPORT_DIR = "export"
STATE_ITEMS = ("params", "opt_state", "critic_params", "critic_opt_state")  # checkpoint items of the TrainState


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, gradient, update or reward); no checkpoint is saved from that
    step, and the message names the newest checkpoint."""


def config_digest(cfg: RunConfig) -> str:
    return hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:16]


AHEAD_ROWS = "ahead_rows"  # the data_iter item's key for the rows sampled ahead (rollout.max_staleness)

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
        # split placement (rollout.devices): each host's last devices decode, the others train
        training_devices, self.engine_devices = mesh_lib.split_devices(cfg.rollout.devices)
        self.mesh = mesh_lib.make_mesh(cfg.mesh, training_devices)
        self.hosts = multihost.HostRows(self.mesh)  # this process's rows of every global batch
        setup.check_multihost(cfg, self.mesh)
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
        """Before anything is written: process 0 takes the run dir's lock and checks the config against the run
        dir's config.yaml (and that the final export may be written), every process raises the same UserError
        when that fails; then every process checks it against the config of the checkpoint the resume starts
        from (a run dir without config.yaml, a checkpoint dir kept apart). Every process opens the checkpoints
        together: orbax synchronises the processes that open them."""
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
        try:
            check_checkpoint_config(self.cfg, allow_config_change)
        except BaseException:
            self.lock.release()  # process 0's; a no-op on the others
            raise

    # ------------------------------------------------------------------------------------ setup
    @property
    def params(self) -> nnx.State:
        """The policy's params now."""
        return self.state.params

    def _load_models(self) -> None:
        """The models the algorithm needs (policy, tokenizer, reference, reward model and sampler, critic);
        prompts over data.max_prompt_tokens are cut, dropped or an error (data.overlong)."""
        cfg, spec = self.cfg, self.spec
        self.policy_path, self.graphdef, params, self.model_config = setup.load_policy(cfg, self.mesh)
        self.text = setup.load_policy_text(cfg, self.model_config)
        if spec.data == "prompts":
            self.records = fit_prompt_limit(self.records, prompt_lengths(self.text.tokenizer, self.records),
                                            cfg.data.max_prompt_tokens, cfg.data.overlong, cfg.data.train_path)
        self.ref_params = None
        if spec.needs_reference(cfg.algorithm):
            self.ref_params = setup.load_reference(cfg, self.mesh, self.policy_path, params)
        self.scorer = self.sampler = None
        if spec.reward_model:
            self.scorer = setup.load_scorer(cfg, self.mesh, self.hosts)
            self.sampler = setup.make_sampler(cfg, self.mesh, self.hosts, self.graphdef, self.text,
                                              self.engine_devices)
        self.critic_graphdef = critic_params = None
        if spec.critic:
            self.critic_graphdef, critic_params = setup.load_critic(cfg, self.mesh)
        self.state = TrainState(params=params, opt_state=None, critic_params=critic_params)

    def _prepare(self) -> None:
        """The data, the two stages and the optimizers; then the state of the newest checkpoint, if any."""
        cfg = self.cfg
        self.rollout_stage = None
        if self.spec.reward_model:
            self.rollout_stage = RolloutStage(self.text, self.sampler, self.scorer, cfg.rollout,
                                              cfg.template.format_penalty)
        self.batches = self._data()
        self.more_prompts = MorePrompts(left=lambda: not self.batches.exhausted,
                                        take=lambda: list(next(self.batches).items))
        data_steps = self.batches.num_steps  # DPO: each process its own pairs; the run stops with the fewest
        data_steps = None if data_steps is None else multihost.global_min_int(data_steps)
        self.total_steps = min(s for s in (cfg.run.total_steps, data_steps) if s is not None)
        self._init_update()
        self._resume()

    def _init_update(self) -> None:
        """The update stage with the optimizers over total_steps, and their initial states."""
        cfg, spec, state = self.cfg, self.spec, self.state
        optimizer, critic = setup.optimizer(cfg, spec, self.total_steps), None
        state = dataclasses.replace(state, opt_state=setup.optimizer_state(state.params, optimizer, self.mesh))
        if spec.critic:
            critic = Critic(self.critic_graphdef, spec.critic_objective(cfg),
                            setup.optimizer(cfg, spec, self.total_steps, lr=cfg.algorithm.ppo.critic_lr))
            state = dataclasses.replace(
                state, critic_opt_state=setup.optimizer_state(state.critic_params, critic.optimizer, self.mesh))
        self.state = state
        self.update_stage = UpdateStage(cfg, self.graphdef, spec.objective(cfg), optimizer, self.hosts,
                                        self.text.pad_id, self.text.tokenizer, self.ref_params, critic)

    def _data(self) -> BatchIterator:
        """The batches of the run's prompts or conversations; online DPO's: of the pairs it samples first."""
        cfg = self.cfg
        if self.spec.loop != "pairs":
            return train_batches(cfg, self.records)
        path = os.path.join(self.run_dir, f"dpo_pairs.process-{jax.process_index()}.jsonl")
        pairs, self.key = preference_pairs(self.rollout_stage, self.params, self.key, self.records,
                                           cfg.algorithm.dpo, path)
        return BatchIterator(pairs, setup.dpo_local_batch(cfg, self.hosts, len(pairs)), seed=cfg.data.shuffle_seed,
                             epochs=cfg.algorithm.dpo.epochs, shard_index=0, shard_count=1)

    # ------------------------------------------------------------------------------------ checkpoints
    def _items(self) -> dict[str, Any]:
        return {
            **{name: getattr(self.state, name) for name in STATE_ITEMS},
            "data_iter": {**self.batches.get_state(), **self._ahead_rows()}, "rng": self.key,
            "meta": {"config_digest": config_digest(self.cfg), "config": SCHEMA.to_dict(self.cfg),
                     "algorithm": self.algorithm, "rolled_back_to": self.rolled_back_to},
        }

    def _ahead_rows(self) -> dict[str, Any]:
        """With partial rollouts, the rows the sampler started for the next steps (saved with this process's
        data iterator state: they are its next batches')."""
        if not self.cfg.rollout.max_staleness:
            return {}
        return {AHEAD_ROWS: self.sampler.carry_state()}

    def _resume(self) -> None:
        targets = {name: value for name, value in self._items().items() if value is not None and name != "meta"}
        targets["data_iter"] = targets["rng"] = None  # JSON items need no target
        restored = self._restore_checkpoint(targets)
        if restored is None:
            return
        saved_config = self.store.meta(restored.step).get("config")
        # checked before anything was written (_claim_run_dir); again for the checkpoint restored (an older one
        # when the newest is damaged), and with --allow-config-change to warn about its changes
        if saved_config is not None:
            check_config_unchanged(self.run_dir, self.cfg, self.allow_config_change, saved_config,
                                   what=f"the checkpoint of step {restored.step} in {self.cfg.checkpoint_dir}")
        items = restored.items
        self.state = TrainState(**{name: items[name] for name in STATE_ITEMS if name in targets})
        self.batches.set_state(items["data_iter"])
        if AHEAD_ROWS in items["data_iter"]:
            self.sampler.restore_carry(items["data_iter"][AHEAD_ROWS])
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
        if not self.store.should_save(self.step, final=final):
            return  # the items are not made: with split placement they wait for the engine's rows
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

    # ------------------------------------------------------------------------------------ the loop
    def _step(self, items: list) -> tuple[dict[str, float], list[dict]]:
        """One step on this process's items of the next data batch -> (the step's metrics, its samples.jsonl
        rows). RL trains on the scored groups of its prompts (the rollout stage); DPO and SFT on their pairs
        or conversations as they are."""
        if self.spec.loop != "rollouts":
            self.state, update = self.update_stage(self.state, items)
            return update.step_metrics(), []
        if self.engine_devices and jax.process_count() > 1:
            # orbax's barriers run on every device: none may be in flight while the engine's thread queues
            # programs on its devices (processes could queue the two in different orders)
            self.store.wait_until_finished()
        groups, self.key = self.rollout_stage(self.params, self.key, items, self.more_prompts, version=self.step,
                                              ahead=self._next_items())
        self.state, update = self.update_stage(self.state, groups.rollouts)
        samples = groups.samples(self.cfg.logging.samples_per_step)
        return {**groups.metrics, **update.step_metrics(groups.times)}, samples

    def _next_items(self) -> list[list]:
        """With partial rollouts (rollout.max_staleness k), this process's items of the next steps' batches (up
        to k, none past the last step or the data), read ahead: the data iterator's state is put back, so the
        next steps read them again, and a checkpoint saved in between resumes there."""
        later = min(self.cfg.rollout.max_staleness, self.total_steps - self.step - 1)
        if later <= 0:
            return []
        state = self.batches.get_state()
        batches = []
        while len(batches) < later and not self.batches.exhausted:
            batches.append(list(next(self.batches).items))
        self.batches.set_state(state)
        return batches

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
            self._prepare()
            logger = MetricsLogger(
                self.run_dir, next_step=self.step + 1, total_steps=self.total_steps,
                tensorboard=cfg.logging.tensorboard, wandb_project=cfg.logging.wandb_project,
                wandb_config=SCHEMA.to_dict(cfg),
            )
            history: list[dict[str, float]] = []
            try:
                stopped = self._steps(logger, history)
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

    def _steps(self, logger: MetricsLogger, history: list[dict[str, float]]) -> str | None:
        """Steps to the last one, the end of the data or a stop signal, each logged (its metrics also appended
        to `history`) and checkpointed -> the signal's name when one stopped the run early, else None."""
        stopped = None
        # a step whose groups all have equal rewards trains on advantages of 0 (GAE's come from a critic instead)
        group_advantages = self.spec.loop == "rollouts" and not self.spec.critic
        no_signal = NoSignalWatch(self.cfg.template, self.cfg.rollout.n) if group_advantages else None
        with StopSignals() as signals:
            # dynamic sampling (rollout.group_filter) takes more batches than steps: the data may end first
            while self.step < self.total_steps and not self.batches.exhausted:
                batch = next(self.batches)
                try:
                    metrics, samples = self._step(list(batch.items))
                except (NonFiniteReward, NonFiniteUpdate) as err:
                    raise TrainingError(f"step {self.step + 1}: {err}") from None
                self.step += 1
                last = self.step == self.total_steps or self.batches.exhausted
                history.append({"step": self.step, **metrics})
                warning = no_signal and no_signal.observe(self.step, metrics)
                if warning:
                    log.warning("%s", warning)
                if self.step % self.cfg.logging.every == 0 or last:
                    logger.log(self.step, metrics)
                if samples:
                    logger.samples(self.step, samples)
                self._save(metrics, final=last)
                if last and self.step < self.total_steps:
                    log.warning("the data ran out after step %d of %d: dynamic sampling (rollout.group_filter) "
                                "took more than one batch for some steps", self.step, self.total_steps)
                # every process stops after the same step when any of them got a signal (also one that came
                # while the save above waited for the previous one)
                if multihost.global_max_int(int(signals.requested is not None)) and not last:
                    self._save(metrics, final=True)  # unless saved above
                    stopped = signals.requested or "a signal to another process"
                    break
            self.store.close()  # the save in flight completes before a stop is reported
        return stopped

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
