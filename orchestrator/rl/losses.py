"""PPO policy and value losses, entropy, loss aggregation, and the InstructGPT pairwise
reward-model loss.

References
- PPO clipped surrogate: Schulman et al. 2017, eq. 7 (written here as a loss, i.e. negated).
- Dual-clip PPO: Ye et al. 2020, "Mastering Complex Control in MOBA Games", eq. 5.
- Reward-model loss: Ouyang et al. 2022 (InstructGPT), eq. 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf.orchestrator.rl.masked import masked_mean, masked_sum

AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")


def aggregate_loss(
    loss_mat: Tensor,
    mask: Tensor,
    mode: str = "token_mean",
    num_tokens: int | Tensor | None = None,
    num_seqs: int | Tensor | None = None,
) -> Tensor:
    """Reduce a per-token loss to a scalar.

    loss_mat, mask: [B, T]. Returns []. N_tok / N_seq are the GLOBAL counts of the whole
    mini-batch (all micro-batches, all data-parallel ranks); they default to this batch's.
    token_mean:          L = sum_{b,t} m l / N_tok
    seq_mean_token_mean: L = sum_b (sum_t m l / sum_t m) / N_seq
    seq_mean_token_sum:  L = sum_b sum_t m l / N_seq
    Why global counts: dividing each micro-batch by its own count weights tokens of short
    micro-batches more. With global counts the micro-batch losses are plain parts of one
    sum: summing them (gradient accumulation) and summing over ranks gives the full-batch
    loss and gradient exactly. DDP/DeepSpeed *average* gradients over ranks, so the
    learner multiplies this loss by the data-parallel world size to undo that mean.
    """
    if mode == "token_mean":
        denom = mask.bool().sum() if num_tokens is None else num_tokens
        return masked_sum(loss_mat, mask) / denom
    denom = loss_mat.shape[0] if num_seqs is None else num_seqs
    if mode == "seq_mean_token_mean":
        return masked_mean(loss_mat, mask, dim=-1).sum() / denom
    if mode == "seq_mean_token_sum":
        return masked_sum(loss_mat, mask, dim=-1).sum() / denom
    raise ValueError(f"unknown loss aggregation {mode!r}; valid modes: {list(AGG_MODES)}")


def ppo_clip_objective(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    clip_eps: float,
    dual_clip: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token PPO clipped loss with optional dual clip.

    logp, old_logp, advantages: [B, T]. Returns loss [B, T], clipped [B, T] bool,
    dual_clipped [B, T] bool.
    rho = exp(logp - old_logp)
    l = max(-A rho, -A clip(rho, 1 - eps, 1 + eps))
    dual clip, A < 0 only: l = min(l, -c A),  c > 1
    clipped marks tokens where the clip term won (zero gradient); dual_clipped where the
    -c A cap won (also zero gradient).
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped_term = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = torch.maximum(unclipped, clipped_term)
    clipped = clipped_term > unclipped
    dual_clipped = torch.zeros_like(clipped)
    if dual_clip is not None:
        cap = -dual_clip * advantages
        dual_clipped = (advantages < 0) & (loss > cap)
        loss = torch.where(dual_clipped, cap, loss)
    return loss, clipped, dual_clipped


@dataclass(frozen=True)
class PolicyLossStats:
    """Detached scalars over this batch's valid tokens (local, for logging)."""

    clipfrac: Tensor  # [] fraction of tokens where the clip term is active
    dual_clipfrac: Tensor  # [] fraction of tokens where the dual-clip cap is active
    approx_kl: Tensor  # [] k3 estimate of KL(pi_old || pi_theta)


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    dual_clip: float | None = None,
    agg: str = "token_mean",
    num_tokens: int | Tensor | None = None,
    num_seqs: int | Tensor | None = None,
) -> tuple[Tensor, PolicyLossStats]:
    """PPO clipped surrogate loss.

    logp, old_logp, advantages, mask: [B, T]. Returns loss [], stats.
    L = aggregate(ppo_clip_objective(...), mask, agg)
    approx_kl = mean_t[(rho - 1) - log rho]   (k3 with samples from pi_old: >= 0, unbiased)
    """
    loss_mat, clipped, dual_clipped = ppo_clip_objective(
        logp, old_logp, advantages, clip_eps, dual_clip
    )
    loss = aggregate_loss(loss_mat, mask, agg, num_tokens, num_seqs)
    with torch.no_grad():
        log_ratio = logp - old_logp
        stats = PolicyLossStats(
            clipfrac=masked_mean(clipped.to(logp.dtype), mask),
            dual_clipfrac=masked_mean(dual_clipped.to(logp.dtype), mask),
            approx_kl=masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
        )
    return loss, stats


@dataclass(frozen=True)
class ValueLossStats:
    clipfrac: Tensor  # [] fraction of tokens where the clipped value error is the larger


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float | None = None,
    agg: str = "token_mean",
    num_tokens: int | Tensor | None = None,
    num_seqs: int | Tensor | None = None,
) -> tuple[Tensor, ValueLossStats]:
    """PPO value loss, optionally clipped around the rollout-time values.

    values, old_values, returns, mask: [B, T]. Returns loss [], stats.
    V_clip = V_old + clip(V - V_old, -eps, eps)
    l = 0.5 * max((V - R)^2, (V_clip - R)^2)       (clip_eps=None: l = 0.5 (V - R)^2)
    """
    err = (values - returns) ** 2
    if clip_eps is None:
        loss_mat, clipped = err, torch.zeros_like(err, dtype=torch.bool)
    else:
        v_clip = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
        err_clip = (v_clip - returns) ** 2
        loss_mat, clipped = torch.maximum(err, err_clip), err_clip > err
    loss = aggregate_loss(0.5 * loss_mat, mask, agg, num_tokens, num_seqs)
    with torch.no_grad():
        stats = ValueLossStats(clipfrac=masked_mean(clipped.to(values.dtype), mask))
    return loss, stats


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution given by logits.  [..., V] -> [...].

    H = -sum_v p_v log p_v,   log p = log_softmax(z)
    Why log_softmax and not logsumexp(z) - sum_v p_v z_v: the latter subtracts two large
    numbers when logits are large (1e4 + ln 2 - 1e4 loses ln 2 in float32).
    The clamp makes 0 * log 0 = 0 (and its gradient finite) for -inf logits.
    """
    log_probs = torch.log_softmax(logits, dim=-1)
    safe = log_probs.clamp(min=torch.finfo(log_probs.dtype).min)
    return -(log_probs.exp() * safe).sum(dim=-1)


def pairwise_rm_loss(
    rewards: Tensor, ranks: Tensor, valid: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """InstructGPT reward-model loss over all ranked pairs of each prompt.

    rewards: [P, K] scalar reward r(x, y_k) of each reply, scored once.
    ranks:   [P, K] labeller rank, lower = better; equal ranks are ties and are skipped.
    valid:   [P, K] optional 0/1, for prompts with fewer than K replies.
    Returns loss [], accuracy [].
    loss_p = -1/C_p * sum_{(w, l): rank_w < rank_l} log sigmoid(r_w - r_l)
    loss = mean_p loss_p                     (over prompts with at least one pair)
    accuracy = #{pairs with r_w > r_l} / #pairs      (pooled over all pairs)
    Why C_p instead of C(K, 2): C_p counts the pairs actually compared, which equals
    C(K, 2) when all K replies are valid and untied; skipped pairs must not dilute it.
    """
    if valid is None:
        valid = torch.ones_like(rewards, dtype=torch.bool)
    valid = valid.bool()
    # Padding may hold any value; zero it so nan/inf cannot reach the gradient.
    r = torch.where(valid, rewards, torch.zeros_like(rewards))
    diff = r.unsqueeze(2) - r.unsqueeze(1)  # [P, K, K], diff[p, w, l] = r_w - r_l
    pairs = (ranks.unsqueeze(2) < ranks.unsqueeze(1)) & valid.unsqueeze(2) & valid.unsqueeze(1)
    n_pairs = pairs.sum(dim=(1, 2))  # [P]
    has_pairs = n_pairs > 0
    if not bool(has_pairs.any()):
        raise ValueError("pairwise_rm_loss: no prompt has two valid replies with distinct ranks")
    nll = torch.where(pairs, -F.logsigmoid(diff), torch.zeros_like(diff)).sum(dim=(1, 2))
    per_prompt = nll / n_pairs.clamp(min=1).to(r.dtype)
    loss = per_prompt[has_pairs].mean()
    with torch.no_grad():
        accuracy = ((diff > 0) & pairs).sum().to(r.dtype) / n_pairs.sum()
    return loss, accuracy


def rule_violation_loss(scores: Tensor, violated: Tensor) -> tuple[Tensor, Tensor]:
    """Sparrow's rule reward model (Glaese et al. 2022, sec. 2.5): binary cross-entropy on
    P(violation | dialogue, rule) = sigmoid(score).

    scores:   [B] raw head output for (rule, dialogue, reply) examples.
    violated: [B] 0/1 label, 1 = the reply breaks the rule.
    Returns loss [], accuracy [].
    loss = -mean_b [ v_b log sigmoid(s_b) + (1 - v_b) log sigmoid(-s_b) ]
    accuracy = mean_b [ (s_b > 0) == v_b ]
    """
    v = violated.to(scores.dtype)
    loss = -(v * F.logsigmoid(scores) + (1 - v) * F.logsigmoid(-scores)).mean()
    with torch.no_grad():
        accuracy = ((scores > 0) == violated.bool()).to(scores.dtype).mean()
    return loss, accuracy



def behavior_importance_weights(proximal_logp: Tensor, behavior_logp: Tensor, mask: Tensor,
                                cap: float = 2.0) -> Tensor:
    """Truncated per-token importance weights w_t = min(pi_prox / pi_behav, cap), 0 off the mask.

    For one-step off-policy (async) PPO: replies were sampled by the engines' older policy
    pi_behav, while the clipped ratio is taken against the learner's policy before this
    update, pi_prox ("decoupled PPO", Hilton et al. 2022). Since w does not depend on the
    parameters being trained, scaling the advantages by w is the whole correction:
        L = -E_behav[ w_t * min(r_t A_t, clip(r_t) A_t) ],  r_t = pi_theta / pi_prox.
    Truncation at `cap` bounds the variance (truncated IS). Shapes [B, T-1].
    """
    w = torch.exp(proximal_logp - behavior_logp).clamp(max=cap)
    return torch.where(mask.bool(), w, torch.zeros_like(w))
