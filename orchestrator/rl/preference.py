"""Offline preference losses on ranked comparisons: DPO, IPO, cDPO, SimPO and KTO.

Every loss takes SUMMED reply-token log-probs, one number per sequence: logp = sum_t log pi(y_t | x, y_<t),
the prompt masked out. Shapes: [B] per pair (or per KTO example); lengths are reply token counts [B].
Notation: pc, pr = policy log-probs of the chosen / rejected reply; rc, rr = the reference's;
h = (pc - rc) - (pr - rr), the difference of the two log-ratios.

References
- DPO: Rafailov et al. 2023, "Direct Preference Optimization", eq. 7.
- cDPO: Mitchell 2023, "A note on DPO with noisy preferences" (DPO with label smoothing eps).
- IPO: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences", eq. 17 (the empirical IPO loss).
- SimPO: Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", eq. 6.
- KTO: Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

LOSSES = ("dpo", "ipo", "cdpo", "simpo", "kto")
PAIR_LOSSES = ("dpo", "ipo", "cdpo", "simpo")
REFERENCE_FREE = frozenset({"simpo"})
PAIR_MODES = ("all", "best_worst")


def preference_pairs(ranks: list[int], mode: str) -> list[tuple[int, int]]:
    """(better, worse) index pairs from one comparison's ranks (0 = best; equal ranks tie, no pair).

    all:        every (i, j) with ranks[i] < ranks[j]       (K untied replies give K(K-1)/2 pairs)
    best_worst: (i, j) for each i among the best-ranked and each j among the worst-ranked
    All tied (or fewer than two replies) -> []. Pairs are ordered by i, then j.
    """
    if mode not in PAIR_MODES:
        raise ValueError(f"unknown preference pair mode {mode!r}; valid modes: {list(PAIR_MODES)}")
    if not ranks or min(ranks) == max(ranks):
        return []
    idx = range(len(ranks))
    if mode == "all":
        return [(i, j) for i in idx for j in idx if ranks[i] < ranks[j]]
    best, worst = min(ranks), max(ranks)
    return [(i, j) for i in idx if ranks[i] == best for j in idx if ranks[j] == worst]


def kto_examples(ranks: list[int]) -> list[tuple[int, bool]]:
    """(index, desirable) from one comparison for KTO: best-ranked replies are desirable, worst-ranked
    undesirable, the middle ones left out. All tied (or fewer than two replies) -> []. Ordered by index."""
    if not ranks or min(ranks) == max(ranks):
        return []
    best, worst = min(ranks), max(ranks)
    return [(i, r == best) for i, r in enumerate(ranks) if r in (best, worst)]


@dataclass(frozen=True)
class PreferenceLoss:
    loss: Tensor  # [] mean over the pairs (or KTO examples)
    chosen_rewards: Tensor  # [B] implicit rewards, detached: beta * (logp - ref_logp); simpo: beta * logp / |y|
    rejected_rewards: Tensor  # [B] the same for the rejected replies (KTO: the undesirable rows)


def _check_shapes(**tensors: Tensor | None) -> None:
    """Every given tensor is 1-D [B] with the same non-zero B."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    first = next(iter(shapes.values()))
    if len(first) != 1 or first[0] == 0 or any(s != first for s in shapes.values()):
        raise ValueError(f"preference loss: expected equal non-empty 1-D shapes [B], got {shapes}")


def pair_loss(
    name: str,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> PreferenceLoss:
    """A pairwise preference loss by name; all inputs [B], returns the mean over the B pairs.

    dpo:   l = -log sigmoid(beta h)
    cdpo:  l = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)        eps = label_smoothing
    ipo:   l = (h - 1 / (2 beta))^2
    simpo: l = -log sigmoid(beta (pc / |yc| - pr / |yr|) - gamma)               no reference
    label_smoothing is read by cdpo only, gamma and the lengths by simpo only.
    IPO departs from TRL here: h uses summed log-probs, as the paper's h_pi(y, y', x) is built from
    sequence probabilities pi(y | x); TRL divides each log-prob by the reply length first. Callers
    who want that variant pass logps / lengths.
    Why a mean over pairs and not over prompts: a K-reply comparison gives up to K(K-1)/2 pairs,
    and each pair is one preference statement (as in DPO's dataset of pairs).
    """
    if name not in PAIR_LOSSES:
        hint = "; kto is unpaired, use kto_loss" if name == "kto" else ""
        raise ValueError(f"unknown pairwise preference loss {name!r}; valid: {list(PAIR_LOSSES)}{hint}")
    if not beta > 0:
        raise ValueError(f"preference loss {name}: beta must be > 0, got {beta}")
    refs = (ref_chosen_logps, ref_rejected_logps)
    if name in REFERENCE_FREE:
        if any(r is not None for r in refs):
            raise ValueError(f"preference loss {name} is reference-free: pass no reference log-probs")
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"preference loss {name} needs chosen_lengths and rejected_lengths")
        if gamma < 0:
            raise ValueError(f"preference loss {name}: gamma must be >= 0, got {gamma}")
    elif any(r is None for r in refs):
        raise ValueError(f"preference loss {name} needs ref_chosen_logps and ref_rejected_logps")
    if name == "cdpo" and not 0 <= label_smoothing < 0.5:
        raise ValueError(f"preference loss cdpo: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    _check_shapes(chosen_logps=chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen_logps,
                  ref_rejected_logps=ref_rejected_logps, chosen_lengths=chosen_lengths,
                  rejected_lengths=rejected_lengths)

    if name == "simpo":
        if bool((chosen_lengths <= 0).any()) or bool((rejected_lengths <= 0).any()):
            raise ValueError("preference loss simpo: reply lengths must be > 0")
        chosen_r = beta * chosen_logps / chosen_lengths.to(chosen_logps.dtype)
        rejected_r = beta * rejected_logps / rejected_lengths.to(rejected_logps.dtype)
        losses = -F.logsigmoid(chosen_r - rejected_r - gamma)
    else:
        chosen_log_ratio = chosen_logps - ref_chosen_logps
        rejected_log_ratio = rejected_logps - ref_rejected_logps
        h = chosen_log_ratio - rejected_log_ratio
        chosen_r, rejected_r = beta * chosen_log_ratio, beta * rejected_log_ratio
        if name == "dpo":
            losses = -F.logsigmoid(beta * h)
        elif name == "cdpo":
            eps = label_smoothing
            losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
        else:  # ipo
            losses = (h - 1.0 / (2.0 * beta)) ** 2
    return PreferenceLoss(loss=losses.mean(), chosen_rewards=chosen_r.detach(), rejected_rewards=rejected_r.detach())


def kto_kl_reference(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """KTO's reference point z0 = max(0, mean_b (logp_b - ref_logp_b)), detached.  [B] -> [].

    Computed on MISMATCHED pairs (prompt x_i with the reply of another prompt x_j), so it estimates
    KL(pi(y | x) || ref(y | x)) over replies unrelated to the prompt (KTO paper, sec. 4.1).
    Why detached: the paper treats z0 as a baseline, not something to train.
    """
    _check_shapes(logps=logps, ref_logps=ref_logps)
    return (logps - ref_logps).mean().clamp(min=0).detach()


def kto_loss(
    logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    *,
    beta: float,
    kl_ref: Tensor | float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> PreferenceLoss:
    """KTO on unpaired examples; logps, ref_logps, desirable (bool) [B]; kl_ref [] or float.

    r = logp - ref_logp,  z0 = max(0, kl_ref) (detached; see kto_kl_reference)
    desirable:   l = w_d (1 - sigmoid(beta (r - z0)))
    undesirable: l = w_u (1 - sigmoid(beta (z0 - r)))
    loss = mean_b l. chosen_rewards = beta r of the desirable rows, rejected_rewards of the others.
    """
    if not beta > 0:
        raise ValueError(f"preference loss kto: beta must be > 0, got {beta}")
    if desirable_weight <= 0 or undesirable_weight <= 0:
        raise ValueError(f"preference loss kto: weights must be > 0, got {desirable_weight}, {undesirable_weight}")
    _check_shapes(logps=logps, ref_logps=ref_logps, desirable=desirable)
    desirable = desirable.bool()
    z0 = torch.as_tensor(kl_ref, dtype=logps.dtype, device=logps.device).detach().clamp(min=0)
    r = logps - ref_logps
    losses = torch.where(desirable,
                         desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))
    rewards = (beta * r).detach()
    return PreferenceLoss(loss=losses.mean(), chosen_rewards=rewards[desirable], rejected_rewards=rewards[~desirable])
