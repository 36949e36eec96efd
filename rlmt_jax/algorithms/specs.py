"""What each algorithm needs, in one place: the models it loads, its data, its update batch, its objective,
its checks. Every other module asks `spec_of(cfg)` instead of branching on `algorithm.name`.

    spec = spec_of(cfg)
    spec.reward_model, spec.critic, spec.needs_reference(cfg.algorithm)   # which models to load
    spec.objective(cfg), spec.update_batch(cfg), spec.loop                # how to train
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from rlmt_jax.algorithms.objectives import DPOObjective, PolicyObjective, SFTObjective, ValueObjective
from rlmt_jax.algorithms.registry import ADVANTAGES, GROUP_FILTERS, KL_ESTIMATORS, POLICY_LOSSES, load_entry_points
from rlmt_jax.algorithms.settings import ALGORITHM_NAMES, AlgorithmConfig


class RunSections(Protocol):
    """What a spec reads of a run config (`rlmt_jax.settings.config.RunConfig`, a stage above this one)."""

    algorithm: AlgorithmConfig
    rollout: Any
    data: Any

Check = Callable[[bool, str, str], None]  # check(condition, config key, message) raises a UserError


@dataclass(frozen=True)
class UpdateBatch:
    """One optimizer update: `rows` items of up to `seq` tokens, each `sequences_per_row` sequences
    (DPO pairs: 2), set by the config keys `keys` (for messages)."""

    keys: str
    rows: int
    seq: int
    sequences_per_row: int = 1


@dataclass(frozen=True)
class AlgorithmSpec:
    """An algorithm's needs. loop: how the trainer steps (rollouts: sample, score, update every step;
    pairs: sample and score once, then train on preference pairs; supervised: train on the data as is).
    reference: `always`, `kl` (when algorithm.kl_coef != 0) or `never`. weight_decay: AdamW decays `all`
    params or only `matrices`. default_advantage fills algorithm.advantage when it is null."""

    name: str
    loop: Literal["rollouts", "pairs", "supervised"]
    data: Literal["prompts", "conversations"]
    reward_model: bool
    critic: bool
    reference: Literal["always", "kl", "never"]
    weight_decay: Literal["all", "matrices"]
    default_advantage: str | None
    update_batch: Callable[[RunSections], UpdateBatch]
    data_batches: Callable[[RunSections], tuple[int, int]]  # (items per step over all processes, epochs)
    process_shares: Callable[[RunSections], dict[str, int]]  # config keys each process takes an equal share of
    objective: Callable[[RunSections], object]
    critic_objective: Callable[[RunSections], object] | None = None
    check: Callable[[RunSections, Check], None] = lambda cfg, check: None

    def needs_reference(self, algorithm: AlgorithmConfig) -> bool:
        return self.reference == "always" or (self.reference == "kl" and algorithm.kl_coef != 0)


def _rollout_batch(cfg: RunSections) -> UpdateBatch:
    r = cfg.rollout
    return UpdateBatch("rollout.prompts_per_step x rollout.n", r.prompts_per_step * r.n,
                       cfg.data.max_prompt_tokens + r.max_new_tokens)


def _policy_objective(cfg: RunSections):
    return PolicyObjective(cfg.algorithm, temperature=cfg.rollout.temperature,
                           norm_length=float(cfg.rollout.max_new_tokens))


def _value_objective(cfg: RunSections):
    return ValueObjective(cfg.algorithm.ppo)


def _dpo_objective(cfg: RunSections):
    return DPOObjective(cfg.algorithm.dpo)


def _sft_objective(cfg: RunSections):
    return SFTObjective()


def _check_dpo(cfg: RunSections, check: Check) -> None:
    dpo = cfg.algorithm.dpo
    check(dpo.min_valid >= 2, "algorithm.dpo.min_valid", "must be >= 2 (a pair needs two answers)")
    check(cfg.rollout.n >= dpo.min_valid, "rollout.n",
          f"must be >= algorithm.dpo.min_valid ({dpo.min_valid}) for DPO, got {cfg.rollout.n}")


def _check_sft(cfg: RunSections, check: Check) -> None:
    check(cfg.data.epochs == 1, "data.epochs", "is not used by SFT: set algorithm.sft.epochs instead")


def _rollout_spec(name: str, critic: bool, default_advantage: str) -> AlgorithmSpec:
    return AlgorithmSpec(
        name=name, loop="rollouts", data="prompts", reward_model=True, critic=critic, reference="kl",
        weight_decay="all", default_advantage=default_advantage, update_batch=_rollout_batch,
        data_batches=lambda cfg: (cfg.rollout.prompts_per_step, cfg.data.epochs),
        process_shares=lambda cfg: {"rollout.prompts_per_step": cfg.rollout.prompts_per_step},
        objective=_policy_objective, critic_objective=_value_objective if critic else None,
    )


SPECS: dict[str, AlgorithmSpec] = {
    "grpo": _rollout_spec("grpo", critic=False, default_advantage="grpo"),
    "ppo": _rollout_spec("ppo", critic=True, default_advantage="gae"),
    "dpo": AlgorithmSpec(
        name="dpo", loop="pairs", data="prompts", reward_model=True, critic=False, reference="always",
        weight_decay="matrices", default_advantage=None,
        update_batch=lambda cfg: UpdateBatch("algorithm.dpo.batch_size", cfg.algorithm.dpo.batch_size,
                                             cfg.algorithm.dpo.max_pair_tokens, sequences_per_row=2),
        data_batches=lambda cfg: (cfg.rollout.prompts_per_step, cfg.data.epochs),
        process_shares=lambda cfg: {"rollout.prompts_per_step": cfg.rollout.prompts_per_step,
                                    "algorithm.dpo.batch_size": cfg.algorithm.dpo.batch_size},
        objective=_dpo_objective, check=_check_dpo,
    ),
    "sft": AlgorithmSpec(
        name="sft", loop="supervised", data="conversations", reward_model=False, critic=False, reference="never",
        weight_decay="matrices", default_advantage=None,
        update_batch=lambda cfg: UpdateBatch("algorithm.sft.batch_size", cfg.algorithm.sft.batch_size,
                                             cfg.algorithm.sft.max_seq_tokens),
        data_batches=lambda cfg: (cfg.algorithm.sft.batch_size, cfg.algorithm.sft.epochs),
        process_shares=lambda cfg: {"algorithm.sft.batch_size": cfg.algorithm.sft.batch_size},
        objective=_sft_objective, check=_check_sft,
    ),
}
assert tuple(SPECS) == ALGORITHM_NAMES, "settings.AlgorithmName and SPECS must list the same algorithms"


def spec_of(cfg: RunSections | AlgorithmConfig) -> AlgorithmSpec:
    """The spec of a run config's (or an algorithm section's) algorithm."""
    algorithm = cfg if isinstance(cfg, AlgorithmConfig) else cfg.algorithm
    return SPECS[algorithm.name]


def check_variants(cfg: RunSections, check: Check) -> None:
    """The registered names the config selects exist, and fit the algorithm (an advantage that reads a
    critic's values needs an algorithm that trains one; group advantages and group filters need rollout.n
    samples; a group filter needs an algorithm that samples every step)."""
    spec, algo, rollout = spec_of(cfg), cfg.algorithm, cfg.rollout
    check(rollout.max_sampling_rounds >= 1, "rollout.max_sampling_rounds",
          f"must be >= 1 (1: sample once, never again), got {rollout.max_sampling_rounds}")
    if rollout.group_filter is not None:
        load_entry_points()
        GROUP_FILTERS.entry(rollout.group_filter)
        samplers = ", ".join(name for name, s in SPECS.items() if s.loop == "rollouts")
        check(spec.loop == "rollouts", "rollout.group_filter",
              f"needs an algorithm that samples groups every step ({samplers}), not {algo.name}: set it null")
        check(rollout.n >= 2, "rollout.group_filter",
              f"needs groups of rollout.n >= 2 samples (a group of one always has equal rewards), got n={rollout.n}")
    if spec.loop != "rollouts":
        return
    load_entry_points()
    POLICY_LOSSES.entry(algo.policy_loss)
    KL_ESTIMATORS.entry(algo.kl_estimator)
    advantage = ADVANTAGES.entry(algo.advantage)
    check(advantage.needs_critic == spec.critic, "algorithm.advantage",
          f"{algo.advantage!r} " + ("reads a critic's values: use algorithm.name=ppo" if advantage.needs_critic
                                    else f"needs no critic, but algorithm.name={algo.name} trains one: use "
                                         f"algorithm.advantage={spec.default_advantage} (or null)"))
    check(cfg.rollout.n >= advantage.min_group_size, "rollout.n",
          f"must be >= {advantage.min_group_size} for algorithm.advantage={algo.advantage} (it compares the "
          f"samples of a group), got {cfg.rollout.n}")

