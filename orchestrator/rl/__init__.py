"""RL math: pure-torch functions, no Ray/vLLM/DeepSpeed. See each module's docstring."""

from rlhf.orchestrator.rl.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    AdvantageParams,
    broadcast_to_tokens,
    compute_advantages,
    gae,
    grpo,
    reinforce_pp,
    rloo,
)
from rlhf.orchestrator.rl.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    shape_rewards,
)
from rlhf.orchestrator.rl.losses import (
    aggregate_loss,
    behavior_importance_weights,
    entropy_from_logits,
    pairwise_rm_loss,
    policy_loss,
    value_loss,
)
from rlhf.orchestrator.rl.masked import masked_mean, masked_sum, masked_var, masked_whiten

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_ESTIMATORS",
    "AdaptiveKLController",
    "AdvantageInputs",
    "AdvantageParams",
    "FixedKLController",
    "aggregate_loss",
    "behavior_importance_weights",
    "broadcast_to_tokens",
    "compute_advantages",
    "entropy_from_logits",
    "gae",
    "grpo",
    "kl_estimate",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "pairwise_rm_loss",
    "policy_loss",
    "reinforce_pp",
    "rloo",
    "shape_rewards",
    "value_loss",
]
