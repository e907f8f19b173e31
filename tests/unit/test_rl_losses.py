"""PPO losses, aggregation, entropy and the pairwise RM loss; hand-worked expected values."""

import math

import pytest
import torch
from torch.testing import assert_close

from rlhf.orchestrator.rl.losses import (
    aggregate_loss,
    entropy_from_logits,
    pairwise_rm_loss,
    policy_loss,
    ppo_clip_objective,
    value_loss,
)

TOL = dict(rtol=0.0, atol=1e-6)
LN3 = math.log(3.0)


def _ratios(*ratios: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logp with exp(logp - old_logp) = ratios, old_logp = 0. Shape [1, len]."""
    logp = torch.log(torch.tensor([list(ratios)])).requires_grad_()
    return logp, torch.zeros_like(logp)


def test_policy_loss_clipped_surrogate_and_stats():
    logp, old = _ratios(1.5, 0.5, 1.5, 0.5)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4)
    loss, stats = policy_loss(logp, old, adv, mask, clip_eps=0.2)
    # l = max(-A rho, -A clip(rho, 0.8, 1.2)):
    # (1.5, +1): max(-1.5, -1.2) = -1.2 clipped | (0.5, +1): max(-0.5, -0.8) = -0.5
    # (1.5, -1): max(1.5, 1.2) = 1.5            | (0.5, -1): max(0.5, 0.8) = 0.8 clipped
    # mean = (-1.2 - 0.5 + 1.5 + 0.8) / 4 = 0.6 / 4 = 0.15; clipfrac = 2/4
    assert_close(loss, torch.tensor(0.15), **TOL)
    assert_close(stats.clipfrac, torch.tensor(0.5), **TOL)
    # approx_kl = mean (rho - 1) - ln rho: 1.5 -> 0.5 - 0.4054651 = 0.0945349;
    # 0.5 -> -0.5 + 0.6931472 = 0.1931472; mean = (0.0945349 + 0.1931472) / 2 = 0.1438410
    assert_close(stats.approx_kl, torch.tensor(0.1438410), rtol=0.0, atol=1e-6)
    loss.backward()
    # d/dlogp of -A rho / 4 = -A rho / 4 on unclipped tokens: token 1 -> -0.5/4 = -0.125,
    # token 2 -> +1.5/4 = 0.375; clipped tokens get 0
    assert_close(logp.grad, torch.tensor([[0.0, -0.125, 0.375, 0.0]]), **TOL)


def test_policy_loss_respects_mask():
    logp, old = _ratios(1.5, 0.5, 1.5, 0.5)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = policy_loss(logp, old, adv, mask, clip_eps=0.2)
    # (-1.2 - 0.5 + 1.5) / 3 = -0.2 / 3 = -0.0666667; clipfrac 1/3
    assert_close(loss, torch.tensor(-0.2 / 3), **TOL)
    assert_close(stats.clipfrac, torch.tensor(1 / 3), **TOL)


def test_dual_clip_caps_negative_advantage_loss():
    logp, old = _ratios(4.0, 2.0, 4.0, 0.5)
    adv = torch.tensor([[-1.0, -1.0, 1.0, -1.0]])
    plain, _, _ = ppo_clip_objective(logp, old, adv, clip_eps=0.2)
    # without dual clip: max(4, 1.2) = 4; max(2, 1.2) = 2; max(-4, -1.2) = -1.2; max(0.5, 0.8) = 0.8
    assert_close(plain, torch.tensor([[4.0, 2.0, -1.2, 0.8]]), **TOL)
    loss_mat, _, dual = ppo_clip_objective(logp, old, adv, clip_eps=0.2, dual_clip=3.0)
    # cap -c A = 3 for A = -1: 4 -> 3; 2 < 3 stays; A > 0 untouched; 0.8 stays
    assert_close(loss_mat, torch.tensor([[3.0, 2.0, -1.2, 0.8]]), **TOL)
    assert dual.tolist() == [[True, False, False, False]]
    loss, stats = policy_loss(logp, old, adv, torch.ones(1, 4), clip_eps=0.2, dual_clip=3.0)
    # (3 + 2 - 1.2 + 0.8) / 4 = 1.15; dual_clipfrac 1/4
    assert_close(loss, torch.tensor(1.15), **TOL)
    assert_close(stats.dual_clipfrac, torch.tensor(0.25), **TOL)
    loss.backward()
    # only token 1 (rho 2, A -1, unclipped) has a gradient: -A rho / 4 = 2/4 = 0.5
    assert_close(logp.grad, torch.tensor([[0.0, 0.5, 0.0, 0.0]]), **TOL)


def test_dual_clip_must_exceed_one():
    logp, old = _ratios(1.0)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        policy_loss(logp, old, torch.ones(1, 1), torch.ones(1, 1), clip_eps=0.2, dual_clip=1.0)


def test_value_loss_clipped():
    values = torch.tensor([[1.5, 0.9, 2.5]], requires_grad=True)
    old = torch.ones(1, 3)
    returns = torch.full((1, 3), 2.0)
    mask = torch.ones(1, 3)
    loss, stats = value_loss(values, old, returns, mask, clip_eps=0.2)
    # tok0: (1.5-2)^2 = 0.25, V_clip = 1.2 -> (1.2-2)^2 = 0.64 -> 0.5*0.64 = 0.32 (clipped)
    # tok1: V_clip = 0.9 -> both (0.9-2)^2 = 1.21 -> 0.605
    # tok2: (2.5-2)^2 = 0.25, V_clip = 1.2 -> 0.64 -> 0.32 (clipped)
    # mean = (0.32 + 0.605 + 0.32) / 3 = 1.245 / 3 = 0.415; clipfrac 2/3
    assert_close(loss, torch.tensor(0.415), **TOL)
    assert_close(stats.clipfrac, torch.tensor(2 / 3), **TOL)
    loss.backward()
    # only tok1 has a gradient: (0.9 - 2) / 3 = -0.3666667
    assert_close(values.grad, torch.tensor([[0.0, -1.1 / 3, 0.0]]), **TOL)
    # unclipped: 0.5 * (0.25 + 1.21 + 0.25) / 3 = 0.285
    plain, _ = value_loss(values, old, returns, mask, clip_eps=None)
    assert_close(plain, torch.tensor(0.285), **TOL)


def test_entropy_from_logits():
    # uniform over 4: ln 4 = 1.3862944
    # logits [0, ln3] -> p = [1/4, 3/4]: -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.3465736 + 0.2157616 = 0.5623351
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, LN3, -30.0, -30.0]])
    expected = torch.tensor([math.log(4.0), 0.5623351])
    assert_close(entropy_from_logits(logits), expected, rtol=0.0, atol=1e-5)
    # large equal logits stay stable: ln 2 = 0.6931472
    assert_close(entropy_from_logits(torch.tensor([1e4, 1e4])), torch.tensor(math.log(2.0)), **TOL)
    # -inf logits (masked vocabulary) have p = 0 and add nothing, with a finite gradient:
    # [0, ln3, -inf] -> 0.5623351 as above
    masked = torch.tensor([0.0, LN3, -math.inf], requires_grad=True)
    h = entropy_from_logits(masked)
    assert_close(h, torch.tensor(0.5623351), rtol=0.0, atol=1e-6)
    h.backward()
    assert torch.isfinite(masked.grad).all()


def test_aggregate_loss_modes():
    loss_mat = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # token_mean: (1 + 2 + 3 + 4) / 4 = 2.5
    assert_close(aggregate_loss(loss_mat, mask, "token_mean"), torch.tensor(2.5), **TOL)
    # seq_mean_token_mean: (6/3 + 4/1) / 2 = 3
    assert_close(aggregate_loss(loss_mat, mask, "seq_mean_token_mean"), torch.tensor(3.0), **TOL)
    # seq_mean_token_sum: (6 + 4) / 2 = 5
    assert_close(aggregate_loss(loss_mat, mask, "seq_mean_token_sum"), torch.tensor(5.0), **TOL)
    # global counts override the local ones: 10 / 8 tokens = 1.25; (6 + 4) / 4 seqs = 2.5
    assert_close(aggregate_loss(loss_mat, mask, "token_mean", num_tokens=8), torch.tensor(1.25), **TOL)
    assert_close(aggregate_loss(loss_mat, mask, "seq_mean_token_sum", num_seqs=4), torch.tensor(2.5), **TOL)
    with pytest.raises(ValueError, match="valid modes"):
        aggregate_loss(loss_mat, mask, "mean")


def _tiny_batch():
    """8 sequences of unequal length (mixed left/right padding) from a tiny linear policy."""
    g = torch.Generator().manual_seed(0)
    b, t, d, v = 8, 6, 4, 5
    lengths = [6, 1, 3, 5, 2, 6, 4, 3]
    mask = torch.zeros(b, t)
    for i, n in enumerate(lengths):
        if i % 2:
            mask[i, t - n :] = 1  # left padded
        else:
            mask[i, :n] = 1  # right padded
    feats = torch.randn(b, t, d, generator=g)
    tokens = torch.randint(0, v, (b, t), generator=g)
    weight = torch.randn(d, v, generator=g)
    old_logp = _logp(weight, feats, tokens) + 0.3 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, t, generator=g)
    return weight, feats, tokens, old_logp, adv, mask


def _logp(weight, feats, tokens):
    logits = feats @ weight
    return torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_microbatch_and_dp_split_equals_global_loss_and_gradient(mode):
    weight, feats, tokens, old_logp, adv, mask = _tiny_batch()

    def loss_on(w, rows, **counts):
        logp = _logp(w, feats[rows], tokens[rows])
        loss, _ = policy_loss(logp, old_logp[rows], adv[rows], mask[rows], 0.2, 3.0, mode, **counts)
        return loss

    w_global = weight.clone().requires_grad_()
    global_loss = loss_on(w_global, slice(0, 8))
    global_loss.backward()

    # 2 data-parallel ranks x 2 micro-batches of 2 sequences; each rank has its own replica,
    # accumulates gradients over its micro-batches; then an all-reduce SUM over ranks.
    counts = dict(num_tokens=mask.sum(), num_seqs=8)
    total, grad_sum = torch.tensor(0.0), torch.zeros_like(weight)
    for rank_rows in ([slice(0, 2), slice(2, 4)], [slice(4, 6), slice(6, 8)]):
        w_rank = weight.clone().requires_grad_()
        for rows in rank_rows:
            part = loss_on(w_rank, rows, **counts)
            part.backward()
            total = total + part.detach()
        grad_sum += w_rank.grad
    assert_close(total, global_loss.detach(), rtol=1e-6, atol=1e-6)
    assert_close(grad_sum, w_global.grad, rtol=1e-5, atol=1e-6)

    if mode != "token_mean":
        return  # equal sequence counts per part: local seq means happen to be exact here
    # The same split with local token counts (naive per-micro-batch mean) is NOT exact, so
    # the check above has teeth: unequal lengths make local means mis-weight tokens.
    naive = sum(loss_on(weight, rows).detach() for rows in (slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8))) / 4
    assert not torch.allclose(naive, global_loss.detach(), rtol=1e-4, atol=1e-4)


def test_pairwise_rm_loss_k3_all_equal_is_log2():
    rewards = torch.zeros(1, 3)
    ranks = torch.tensor([[0, 1, 2]])
    loss, acc = pairwise_rm_loss(rewards, ranks)
    # every difference is 0: -log sigmoid(0) = ln 2 = 0.6931472 for each of the 3 pairs
    assert_close(loss, torch.tensor(math.log(2.0)), **TOL)
    assert_close(acc, torch.tensor(0.0), **TOL)


def test_pairwise_rm_loss_k3_and_variable_k():
    rewards = torch.tensor([[LN3, 0.0, 0.0], [0.0, LN3, math.nan]], requires_grad=True)
    ranks = torch.tensor([[0, 1, 2], [0, 1, 5]])
    valid = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, acc = pairwise_rm_loss(rewards, ranks, valid)
    # prompt 0 (K=3): pairs (0,1), (0,2): d = ln3, sigmoid = 3/4, -ln(3/4) = ln(4/3) = 0.2876821
    #                  pair (1,2): d = 0, ln 2 = 0.6931472
    #                  loss_0 = (2*0.2876821 + 0.6931472) / 3 = 1.2685113 / 3 = 0.4228371
    # prompt 1 (K=2): pair (0,1): d = -ln3, sigmoid = 1/4, -ln(1/4) = ln 4 = 1.3862944
    # loss = (0.4228371 + 1.3862944) / 2 = 0.9045657
    assert_close(loss, torch.tensor(0.9045657), rtol=0.0, atol=1e-6)
    # correct pairs: prompt 0 -> 2 of 3 (the tie in reward is not correct), prompt 1 -> 0 of 1
    assert_close(acc, torch.tensor(0.5), **TOL)
    loss.backward()
    assert torch.isfinite(rewards.grad).all()
    assert rewards.grad[1, 2] == 0.0


def test_pairwise_rm_loss_gradient_k2():
    rewards = torch.tensor([[LN3, 0.0]], requires_grad=True)
    loss, acc = pairwise_rm_loss(rewards, torch.tensor([[0, 1]]))
    # L = -log sigmoid(d), d = ln3: dL/dr_w = -(1 - sigmoid(d)) = -(1 - 3/4) = -0.25, dL/dr_l = +0.25
    loss.backward()
    assert_close(rewards.grad, torch.tensor([[-0.25, 0.25]]), **TOL)
    assert_close(acc, torch.tensor(1.0), **TOL)


def test_pairwise_rm_loss_skips_ties_and_is_order_free():
    rewards = torch.tensor([[LN3, 0.0, 0.0]])
    # ranks [0, 0, 1]: only (0,2) and (1,2) are compared
    # (ln(4/3) + ln 2) / 2 = (0.2876821 + 0.6931472) / 2 = 0.4904146
    loss, acc = pairwise_rm_loss(rewards, torch.tensor([[0, 0, 1]]))
    assert_close(loss, torch.tensor(0.4904146), rtol=0.0, atol=1e-6)
    assert_close(acc, torch.tensor(0.5), **TOL)
    # the replies listed in reverse order with reversed ranks give the same K=3 value 0.4228371
    loss, _ = pairwise_rm_loss(torch.tensor([[0.0, 0.0, LN3]]), torch.tensor([[2, 1, 0]]))
    assert_close(loss, torch.tensor(0.4228371), rtol=0.0, atol=1e-6)


def test_pairwise_rm_loss_without_pairs_raises():
    with pytest.raises(ValueError, match="no prompt"):
        pairwise_rm_loss(torch.zeros(1, 2), torch.tensor([[0, 0]]))


def test_behavior_importance_weights_truncated_and_masked():
    import math

    from rlhf.orchestrator.rl import behavior_importance_weights

    behavior = torch.tensor([[-1.0, -2.0, -3.0, -0.5]])
    # prox - behav = [0, ln 1.5, ln 4, ln 0.5]  ->  w = [1, 1.5, min(4, cap 2) = 2, 0.5]; last token off the mask
    proximal = behavior + torch.tensor([[0.0, math.log(1.5), math.log(4.0), math.log(0.5)]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = behavior_importance_weights(proximal, behavior, mask, cap=2.0)
    assert torch.allclose(w, torch.tensor([[1.0, 1.5, 2.0, 0.0]]), atol=1e-6)
