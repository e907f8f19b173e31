"""KL penalty to the reference (SFT) policy: per-token estimators, reward shaping and
the KL coefficient controllers.

Estimators follow J. Schulman, "Approximating KL divergence" (2020). Tokens are sampled
from the policy pi, so with log r = log pi_ref(x) - log pi(x) each estimator is a
per-sample estimate of KL(pi || pi_ref):
    k1 = -log r                    unbiased, high variance, can be negative
    k2 = 0.5 * (log r)^2           biased, low variance, >= 0
    k3 = (r - 1) - log r           unbiased, low variance, >= 0
The controllers are from Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences" (section 2.2).

Bound (ppo.kl.clamp, default 10): each token's estimate is clamped to [-clamp, clamp]. k3
grows like exp(|log r|) when the policy drifts (log r = -20 gives ~4.9e8), so one token the
policy has made near-impossible under pi_ref would dominate every reward in the batch and
the advantages' whitening. OpenRLHF clamps k1/k2/k3 to [-10, 10]
(openrlhf/models/utils.py `compute_approx_kl`); we take the same bound. 10 nats leaves the
ordinary range untouched (a healthy run's per-token KL is well under 1) and still gives a
drifting token the largest penalty of the batch. null = unbounded.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from rlhf.orchestrator.rl.masked import last_valid_onehot


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = log pi - log pi_ref.  logp, ref_logp: [...] -> [...]"""
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = 0.5 * (log pi - log pi_ref)^2.  logp, ref_logp: [...] -> [...]"""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = exp(log r) - log r - 1, log r = log pi_ref - log pi.  [...] -> [...]"""
    log_r = ref_logp - logp
    return torch.exp(log_r) - log_r - 1.0


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str, clamp: float | None = None) -> Tensor:
    """Per-token KL estimate by estimator name ("k1", "k2", "k3"), clamped to [-clamp, clamp].

    logp, ref_logp: [...] token log-probs under pi and pi_ref. Returns [...].
    clamp: None = unbounded (see the module docstring for why 10).
    """
    try:
        estimator = KL_ESTIMATORS[kind]
    except KeyError:
        raise ValueError(
            f"unknown KL estimator {kind!r}; valid kinds: {sorted(KL_ESTIMATORS)}"
        ) from None
    if clamp is not None and clamp <= 0:
        raise ValueError(f"KL clamp must be > 0 or None, got {clamp}")
    kl = estimator(logp, ref_logp)
    return kl if clamp is None else kl.clamp(min=-clamp, max=clamp)


def shape_rewards(
    score: Tensor,
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    kl_coef: float,
    estimator: str = "k1",
    clamp: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token rewards: KL penalty on every response token, score on the last one.

    score: [B] sequence reward (reward model and/or rule checks).
    logp, ref_logp, mask: [B, T] response-token log-probs and 0/1 validity.
    Returns rewards [B, T], kl [B, T] (both 0 at masked positions).
    kl_t = clip(k(logp_t, ref_logp_t), -clamp, clamp) * m_t
    r_t = -beta * kl_t + score * [t == last valid token]
    A row with no valid token gets no score (all zeros).
    """
    valid = mask.bool()
    kl = kl_estimate(logp, ref_logp, estimator, clamp)
    kl = torch.where(valid, kl, torch.zeros_like(kl))
    last = last_valid_onehot(mask)
    score_at_last = torch.where(last, score.to(kl.dtype).unsqueeze(-1), torch.zeros_like(kl))
    rewards = -kl_coef * kl + score_at_last
    return rewards, kl


class FixedKLController:
    """Constant KL coefficient beta, with the same interface as AdaptiveKLController."""

    def __init__(self, coef: float) -> None:
        if coef < 0:
            raise ValueError(f"kl coef must be >= 0, got {coef}")
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient is fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, eq. 2.2): steer KL toward a target.

    e_t = clip(KL_t / KL_target - 1, -0.2, 0.2)
    beta_{t+1} = beta_t * (1 + K_beta * e_t),   K_beta = n_steps / horizon
    """

    def __init__(self, init_coef: float, target: float, horizon: int) -> None:
        if init_coef < 0:
            raise ValueError(f"init_coef must be >= 0, got {init_coef}")
        if target <= 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """current_kl: mean per-sequence KL of the last batch; n_steps: samples in it."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        # Only the coefficient is state; target and horizon come from the (new) config,
        # so a resumed run may change them deliberately.
        self.value = float(state["value"])


KLController = FixedKLController | AdaptiveKLController
