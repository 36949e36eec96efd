"""What a run is made of before its first step: the checks of a multi-process run, the models the algorithm
needs (policy, tokenizer and template, reference, reward model and sampler, critic), its optimizers, and online
DPO's batch size.

    policy_path, graphdef, params, model_config = load_policy(cfg, mesh)
    text = load_policy_text(cfg, model_config)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import models
from rlmt_jax.algorithms import AlgorithmSpec, spec_of
from rlmt_jax.core.errors import UserError
from rlmt_jax.inputs.tiny import resolve_model_path
from rlmt_jax.rollout.rewards import RewardScorer, RewardSettings
from rlmt_jax.rollout.sampling import DecodeLayout, Sampler, SamplingConfig
from rlmt_jax.rollout.slot_sampler import SlotSampler
from rlmt_jax.rollout.scored import PolicyText, template_settings
from rlmt_jax.rollout.split_engine import SplitEngine
from rlmt_jax.scale import mesh as mesh_lib
from rlmt_jax.scale import multihost
from rlmt_jax.settings.config import RunConfig, frozen_param_dtype
from rlmt_jax.training.optim import AdamWConfig
from rlmt_jax.training.train_step import init_optimizer_state


def check_multihost(cfg: RunConfig, mesh) -> None:
    """Settings that several processes need: each process owns whole GRPO groups and equal shares of every
    batch (one process: nothing to check)."""
    processes = jax.process_count()
    if processes == 1:
        return
    split, spec = mesh_lib.batch_split(mesh), spec_of(cfg)
    for key, value in spec.process_shares(cfg).items():
        if value % processes:
            raise UserError(f"config key '{key}' ({value}) must be a multiple of the {processes} processes: "
                            "each process takes an equal share (and GRPO groups never straddle processes)")
    if spec.reward_model and cfg.reward.batch_size % split:
        raise UserError(f"config key 'reward.batch_size' ({cfg.reward.batch_size}) must be a multiple of the "
                        f"mesh's batch split (data x fsdp = {split}) with {processes} processes: every "
                        "process scores its share of each reward batch")


def load_model(cfg: RunConfig, mesh, path: str, task: str | None = None, param_dtype: str | None = None):
    """A pretrained model placed on the mesh, in the run's dtypes; a path that does not load: UserError."""
    runtime = cfg.runtime
    try:
        return models.load_pretrained(
            path, dtype=runtime.dtype, param_dtype=param_dtype or runtime.param_dtype, task=task,
            remat=runtime.remat, scan_layers=runtime.scan_layers, attention=runtime.attention,
            place=mesh_lib.make_placer(mesh),
        )
    except (OSError, ValueError) as err:
        raise UserError(f"model {path}: {err}") from err


def load_policy(cfg: RunConfig, mesh) -> tuple[str, Any, nnx.State, Any]:
    """model.policy -> (its resolved path, graphdef, params, model config)."""
    path = resolve_model_path(cfg.model.policy)
    policy = load_model(cfg, mesh, path)
    if not isinstance(policy, models.CausalLM):
        raise UserError(f"model.policy {cfg.model.policy}: is not a *ForCausalLM checkpoint")
    graphdef, params = nnx.split(policy, nnx.Param)
    return path, graphdef, params, policy.config


def load_policy_text(cfg: RunConfig, model_config) -> PolicyText:
    """model.tokenizer with the run's template and the policy's EOS tokens."""
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.model.tokenizer_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise UserError(f"model.tokenizer {path}: cannot load a tokenizer ({err})") from err
    return PolicyText.create(tokenizer, template_settings(cfg), model_config.eos_token_id)


def load_reference(cfg: RunConfig, mesh, policy_path: str, params: nnx.State) -> nnx.State:
    """The frozen reference's params, in the frozen dtype: model.reference, or a copy of the policy's (the
    update donates those) when it is the policy."""
    path = resolve_model_path(cfg.model.reference_path)
    frozen = jnp.dtype(frozen_param_dtype(cfg.runtime))
    if path == policy_path:
        copy = jnp.copy if frozen == jnp.dtype(cfg.runtime.param_dtype) else lambda x: x.astype(frozen)
        return jax.tree.map(copy, params)
    return nnx.split(load_model(cfg, mesh, path, param_dtype=frozen.name), nnx.Param)[1]


def load_scorer(cfg: RunConfig, mesh, hosts: multihost.HostRows) -> RewardScorer:
    """model.reward_model with the reward section's settings; its batches split between the processes when
    reward.batch_size splits over the mesh's batch axes."""
    settings = RewardSettings(
        max_length=cfg.reward.max_length, batch_size=cfg.reward.batch_size,
        truncation_side=cfg.reward.truncation_side, dtype=cfg.runtime.dtype,
        param_dtype=frozen_param_dtype(cfg.runtime), attention=cfg.runtime.attention, label=cfg.reward.label,
    )
    lockstep = cfg.reward.batch_size % mesh_lib.batch_split(mesh) == 0
    return RewardScorer.from_pretrained(resolve_model_path(cfg.model.reward_model), settings,
                                        place=mesh_lib.make_placer(mesh), hosts=hosts if lockstep else None)


def make_sampler(cfg: RunConfig, mesh, hosts: multihost.HostRows, graphdef, text: PolicyText,
                 engine_devices=()) -> Sampler | SplitEngine:
    """The policy's sampler with the rollout section's settings, on the rollout layout (rollout.mesh) unless
    rollout.mesh.reshard is off (then on the training layout); with split placement (rollout.devices), on
    the layout over `engine_devices`, in a SplitEngine."""
    r = cfg.rollout
    layout = None
    if engine_devices:  # rollout.mesh regroups the engine's devices only (the training mesh need not fit it)
        layout = DecodeLayout.of(mesh_lib.engine_mesh(engine_devices), r.mesh, cfg.runtime.dtype)
    elif r.mesh.reshard:
        layout = DecodeLayout.of(mesh, r.mesh, cfg.runtime.dtype)
    config = SamplingConfig(
        n=r.n, max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
        eos_ids=text.stop_ids, pad_id=text.pad_id, prompt_buckets=cfg.prompt_buckets,
        cache_dtype=r.cache_dtype or cfg.runtime.dtype, decode_windows=r.decode_windows,
    )
    if r.engine == "slots":  # split placement's staleness is the engine's own: each call's rows in that call
        sampler = SlotSampler(graphdef, config, slots=r.slots, chunk_tokens=r.chunk_tokens, hosts=hosts,
                              layout=layout, max_staleness=0 if engine_devices else r.max_staleness,
                              carried_cache=r.carried_cache)
    else:
        sampler = Sampler(graphdef, config, hosts=hosts, layout=layout)
    return SplitEngine(sampler) if engine_devices else sampler


def load_critic(cfg: RunConfig, mesh) -> tuple[Any, nnx.State]:
    """model.critic with a value head -> (graphdef, params on the mesh)."""
    critic = load_model(cfg, mesh, resolve_model_path(cfg.model.critic_path), task="value")
    graphdef, params = nnx.split(critic, nnx.Param)
    # its fresh value head is made on the default device, not by the placer
    return graphdef, mesh_lib.place_unplaced_params(params, mesh)


def optimizer(cfg: RunConfig, spec: AlgorithmSpec, total_steps: int, lr: float | None = None) -> AdamWConfig:
    """The optimizer section over `total_steps` (lr: another learning rate, e.g. the critic's)."""
    o = cfg.optimizer
    return AdamWConfig(
        lr=lr or o.lr, schedule=o.schedule, warmup_ratio=o.warmup_ratio, total_steps=total_steps,
        weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps, grad_clip=o.grad_clip,
        decay=spec.weight_decay,
    )


def optimizer_state(params: nnx.State, optimizer: AdamWConfig, mesh):
    """The optimizer's initial state for `params`; its step counter is made off the mesh (placed on it, a
    checkpoint restores it where the params are)."""
    return mesh_lib.replicate_unplaced(init_optimizer_state(params, optimizer), mesh)


def dpo_local_batch(cfg: RunConfig, hosts: multihost.HostRows, pairs: int) -> int:
    """Pairs per step from this process (which has `pairs`): every process the same number (its share of
    algorithm.dpo.batch_size, at most the fewest pairs any process has), rows that split over the mesh."""
    share = cfg.algorithm.dpo.batch_size // jax.process_count()
    multiple = hosts.rows_multiple
    size = min(share, multihost.global_min_int(pairs)) // multiple * multiple
    if size < 1:
        raise UserError(f"online DPO: too few pairs for one step of {multiple * jax.process_count()} pairs "
                        "(a multiple of the mesh's batch split, data x fsdp)")
    return size
