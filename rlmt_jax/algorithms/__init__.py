"""The algorithms' math as pure jnp functions, research variants registered by name, and each
algorithm's spec (the models, data, batch and objective it needs).

    from rlmt_jax.algorithms import register_policy_loss, register_advantage, register_kl_estimator, \
        register_group_filter
"""

from rlmt_jax.algorithms.advantages import compute_advantages, group_advantages, overlong_penalty
from rlmt_jax.algorithms.common import (
    Normalizers,
    aggregate,
    aggregation_weights,
    chunked_sequence_logprobs_and_entropy,
    clipped_policy_losses,
    count_sequences,
    count_tokens,
    head_logprobs_and_entropy,
    kl_penalty,
    logprobs_and_entropy,
    masked_mean,
    masked_whiten,
    sequence_logprobs_and_entropy,
    shift_right,
    weighted_sum,
)
from rlmt_jax.algorithms.dpo import PairSelection, PreferencePair, build_preference_pairs, dpo_loss, sequence_logprobs
from rlmt_jax.algorithms.group_filters import choose_groups, varied_groups
from rlmt_jax.algorithms.policy_losses import actor_loss, sequence_advantages, token_advantages
from rlmt_jax.algorithms.ppo import gae_advantages, last_token_rewards, value_loss
from rlmt_jax.algorithms.registry import (
    ADVANTAGES,
    GROUP_FILTERS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    import_variants,
    register_advantage,
    register_group_filter,
    register_kl_estimator,
    register_policy_loss,
)
from rlmt_jax.algorithms.rollout_correction import rollout_correction
from rlmt_jax.algorithms.settings import (
    AGGREGATIONS,
    ALGORITHM_NAMES,
    AlgorithmConfig,
    DPOConfig,
    GRPOConfig,
    PPOConfig,
    RolloutCorrectionConfig,
    SFTConfig,
)
from rlmt_jax.algorithms.sft import sft_loss
from rlmt_jax.algorithms.specs import SPECS, AlgorithmSpec, spec_of

__all__ = [
    "ADVANTAGES",
    "AGGREGATIONS",
    "ALGORITHM_NAMES",
    "GROUP_FILTERS",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "SPECS",
    "AlgorithmConfig",
    "AlgorithmSpec",
    "DPOConfig",
    "GRPOConfig",
    "Normalizers",
    "PPOConfig",
    "PairSelection",
    "PreferencePair",
    "RolloutCorrectionConfig",
    "SFTConfig",
    "actor_loss",
    "aggregate",
    "aggregation_weights",
    "build_preference_pairs",
    "choose_groups",
    "chunked_sequence_logprobs_and_entropy",
    "clipped_policy_losses",
    "compute_advantages",
    "count_sequences",
    "count_tokens",
    "dpo_loss",
    "gae_advantages",
    "group_advantages",
    "head_logprobs_and_entropy",
    "import_variants",
    "kl_penalty",
    "last_token_rewards",
    "logprobs_and_entropy",
    "masked_mean",
    "masked_whiten",
    "overlong_penalty",
    "register_advantage",
    "register_group_filter",
    "register_kl_estimator",
    "register_policy_loss",
    "rollout_correction",
    "sequence_advantages",
    "sequence_logprobs",
    "sequence_logprobs_and_entropy",
    "sft_loss",
    "shift_right",
    "spec_of",
    "token_advantages",
    "value_loss",
    "varied_groups",
    "weighted_sum",
]
