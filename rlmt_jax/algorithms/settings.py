"""The `algorithm:` section of a run config. It is also the loss config: the pure losses, advantage
estimators and objectives read these dataclasses as they are (one name per setting, from YAML to the
function that uses it). Choices with a fixed set of values are `Literal`s checked when the config is
built; choices among registered functions (policy_loss, advantage, kl_estimator) are checked against
their registry (rlmt_jax.algorithms.registry) by `rlmt_jax.settings.config.validate`.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

AlgorithmName = Literal["grpo", "ppo", "dpo", "sft"]
ALGORITHM_NAMES: tuple[str, ...] = typing.get_args(AlgorithmName)
# How per-token terms become one number, with n_b the tokens of row b, N the tokens of the batch, S its
# rows (see common.aggregation_weights): token_mean sum/N; seq_mean_token_mean mean over rows of the row
# means; seq_mean_token_sum mean over rows of the row sums; seq_mean_token_sum_norm row sums / (L * S)
# with L = rollout.max_new_tokens (Dr. GRPO).
Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]
AGGREGATIONS: tuple[str, ...] = typing.get_args(Aggregation)
DPOLossType = Literal["sigmoid", "ipo", "hinge"]
CorrectionLevel = Literal["off", "token", "sequence"]


@dataclass(frozen=True)
class GRPOConfig:
    eps: float = 1e-6  # advantage (r - mean) / (std + eps) of the `grpo` estimator


@dataclass(frozen=True)
class PPOConfig:
    gamma: float = 1.0
    gae_lambda: float = 1.0
    whiten_advantages: bool = True
    value_clip: float | None = 0.5  # V_clip = clip(V, V_old - value_clip, V_old + value_clip); null: off
    value_coef: float = 0.5  # the value loss is value_coef * token-mean(max(err, clipped err))
    critic_lr: float = 1e-5


@dataclass(frozen=True)
class DPOConfig:
    beta: float = 0.1
    loss_type: DPOLossType = "sigmoid"  # ipo averages log-probs over tokens (as TRL does), others sum
    label_smoothing: float = 0.0
    min_valid: int = 4  # prompts with fewer parseable answers are skipped
    max_pair_tokens: int = 8192  # longer pairs are dropped
    epochs: int = 2
    batch_size: int = 128  # pairs per optimizer step

    @property
    def average_logprobs(self) -> bool:
        return self.loss_type == "ipo"


@dataclass(frozen=True)
class SFTConfig:
    epochs: int = 2
    batch_size: int = 16  # conversations per optimizer step
    max_seq_tokens: int = 8192  # longer conversations are truncated on the right


@dataclass(frozen=True)
class RolloutCorrectionConfig:
    """Correction of the sampler/trainer mismatch (as verl's rollout correction); off by default.

    rho_t = pi_trainer(y_t) / pi_sampler(y_t) at the old params (sequence level: prod_t rho_t).
    weights: truncated importance weights min(rho, weight_cap), no gradient, multiply the policy loss.
    mask: tokens (or whole sequences) whose rho leaves [mask_low, mask_high] count in no loss.
    bypass: the sampler's log-probs are the old log-probs; the trainer's old-policy forward is skipped
    (nothing is left to correct, so weights and mask must be off).
    """

    weights: CorrectionLevel = "off"
    weight_cap: float = 2.0
    mask: CorrectionLevel = "off"
    mask_low: float = 0.5
    mask_high: float = 2.0
    bypass: bool = False


@dataclass(frozen=True)
class AlgorithmConfig:
    """The algorithm and its loss settings; clip/KL/entropy/aggregation serve GRPO and PPO.

    policy_loss, advantage, kl_estimator name registered functions (rlmt_jax.algorithms.registry);
    advantage null: the algorithm's own (grpo: grpo, ppo: gae).
    """

    name: AlgorithmName = "grpo"
    policy_loss: str = "ppo_clip"
    advantage: str | None = None
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = 3.0  # ppo_clip's dual clip; null: off
    kl_coef: float = 0.001  # 0: no KL term, no reference forward
    kl_estimator: str = "k3"
    entropy_coef: float = 0.001
    aggregation: Aggregation = "seq_mean_token_mean"  # ppo_clip's policy term, the KL and entropy terms
    update_epochs: int = 1  # passes over each rollout batch
    # DAPO's overlong reward shaping: a response longer than rollout.max_new_tokens - overlong_buffer tokens
    # loses overlong_penalty * (its excess / overlong_buffer) of reward. null: off
    overlong_buffer: int | None = None
    overlong_penalty: float = 1.0
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)
