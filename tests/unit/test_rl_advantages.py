"""GAE and group baselines; expected values worked out by hand in the comments."""

import math

import pytest
import torch
from torch.testing import assert_close

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

TOL = dict(rtol=0.0, atol=1e-6)

# One 3-token sequence used throughout: r = [1, 0, 4], V = [1, 2, 3], gamma = 0.5.
R = torch.tensor([[1.0, 0.0, 4.0]])
V = torch.tensor([[1.0, 2.0, 3.0]])
FULL = torch.ones(1, 3)


def test_gae_lambda0_is_one_step_td_residual():
    # delta_t = r_t + 0.5 * V_{t+1} - V_t, V_3 = 0 (terminal)
    # delta_0 = 1 + 0.5*2 - 1 = 1; delta_1 = 0 + 0.5*3 - 2 = -0.5; delta_2 = 4 + 0 - 3 = 1
    adv, ret = gae(R, V, FULL, gamma=0.5, lam=0.0)
    assert_close(adv, torch.tensor([[1.0, -0.5, 1.0]]), **TOL)
    # returns = A + V = [2, 1.5, 4]
    assert_close(ret, torch.tensor([[2.0, 1.5, 4.0]]), **TOL)


def test_gae_lambda1_is_monte_carlo_return_minus_value():
    # G_2 = 4; G_1 = 0 + 0.5*4 = 2; G_0 = 1 + 0.5*2 = 2
    # A = G - V = [2-1, 2-2, 4-3] = [1, 0, 1]; returns = G = [2, 2, 4]
    adv, ret = gae(R, V, FULL, gamma=0.5, lam=1.0)
    assert_close(adv, torch.tensor([[1.0, 0.0, 1.0]]), **TOL)
    assert_close(ret, torch.tensor([[2.0, 2.0, 4.0]]), **TOL)


def test_gae_intermediate_lambda():
    # gamma*lam = 0.25; A_2 = 1; A_1 = -0.5 + 0.25*1 = -0.25; A_0 = 1 + 0.25*(-0.25) = 0.9375
    adv, ret = gae(R, V, FULL, gamma=0.5, lam=0.5)
    assert_close(adv, torch.tensor([[0.9375, -0.25, 1.0]]), **TOL)
    # returns = A + V = [1.9375, 1.75, 4]
    assert_close(ret, torch.tensor([[1.9375, 1.75, 4.0]]), **TOL)


def test_gae_left_and_right_padding_give_the_same_numbers():
    # Same sequence as above, padded with garbage (9, 7) to T = 5, in one batch.
    rewards = torch.tensor([[1.0, 0.0, 4.0, 9.0, 9.0], [9.0, 9.0, 1.0, 0.0, 4.0]])
    values = torch.tensor([[1.0, 2.0, 3.0, 7.0, 7.0], [7.0, 7.0, 1.0, 2.0, 3.0]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    adv, ret = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    # valid tokens: A = [0.9375, -0.25, 1] and R = [1.9375, 1.75, 4] (hand values above); padding 0
    assert_close(adv[0], torch.tensor([0.9375, -0.25, 1.0, 0.0, 0.0]), **TOL)
    assert_close(adv[1], torch.tensor([0.0, 0.0, 0.9375, -0.25, 1.0]), **TOL)
    assert_close(ret[0], torch.tensor([1.9375, 1.75, 4.0, 0.0, 0.0]), **TOL)
    assert_close(ret[1], torch.tensor([0.0, 0.0, 1.9375, 1.75, 4.0]), **TOL)


def test_gae_skips_a_masked_gap_inside_the_sequence():
    # A masked token (e.g. a tool output) between valid ones is skipped: same numbers as
    # the contiguous sequence, 0 at the gap.
    rewards = torch.tensor([[1.0, 50.0, 0.0, 4.0]])
    values = torch.tensor([[1.0, 50.0, 2.0, 3.0]])
    mask = torch.tensor([[1, 0, 1, 1]])
    adv, _ = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    assert_close(adv, torch.tensor([[0.9375, 0.0, -0.25, 1.0]]), **TOL)


def test_grpo_normalises_by_group_std():
    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 3.0])
    # group 0: mean 2, deviations [-1, 0, 1], unbiased var (1+0+1)/2 = 1, std 1 -> [-1, 0, 1]
    # group 1: mean 1, deviations [-1, -1, 2], unbiased var (1+1+4)/2 = 3, std sqrt(3)
    #          -> [-1/sqrt3, -1/sqrt3, 2/sqrt3] = [-0.5773503, -0.5773503, 1.1547005]
    s3 = math.sqrt(3.0)
    expected = torch.tensor([-1.0, 0.0, 1.0, -1 / s3, -1 / s3, 2 / s3])
    assert_close(grpo(scores, n=3, eps=0.0), expected, **TOL)
    # without std: plain group-centred scores
    assert_close(
        grpo(scores, n=3, norm_by_std=False), torch.tensor([-1.0, 0.0, 1.0, -1.0, -1.0, 2.0]), **TOL
    )


def test_grpo_equal_scores_give_zero_not_nan():
    assert_close(grpo(torch.tensor([2.0, 2.0, 2.0]), n=3), torch.zeros(3), **TOL)


def test_rloo_leave_one_out():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0])
    # 1 - (2+3+6)/3 = -8/3; 2 - (1+3+6)/3 = -4/3; 3 - (1+2+6)/3 = 0; 6 - (1+2+3)/3 = 4
    assert_close(rloo(scores, n=4), torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0]), **TOL)


def test_reinforce_pp_sequence_part_subtracts_group_mean():
    # mean(1, 2, 3, 6) = 3 -> [-2, -1, 0, 3]
    assert_close(reinforce_pp(torch.tensor([1.0, 2.0, 3.0, 6.0]), n=4), torch.tensor([-2.0, -1.0, 0.0, 3.0]), **TOL)


def test_reinforce_pp_token_level_whitens_over_the_batch():
    scores = torch.tensor([1.0, 2.0, 3.0])
    mask = torch.tensor([[1, 1], [0, 1], [1, 1]])  # row 1 left padded
    inputs = AdvantageInputs(mask=mask, scores=scores)
    adv, ret = compute_advantages("reinforce_pp", inputs, AdvantageParams(gamma=1.0, n=3))
    # group mean 2 -> centred scores [-1, 0, 1] on the last token; return-to-go (gamma 1)
    # puts them on every valid token: [-1, -1], [pad, 0], [1, 1]
    assert_close(ret, torch.tensor([[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0]]), **TOL)
    # 5 valid tokens -1, -1, 0, 1, 1: mean 0, unbiased var 4/4 = 1 -> whitened = same values
    assert_close(adv, torch.tensor([[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0]]), rtol=0.0, atol=1e-5)


def test_reinforce_pp_token_level_with_kl_rewards_and_discount():
    scores = torch.tensor([1.0, 3.0])
    # per-token rewards from shape_rewards: row 0 has a KL penalty -0.5 on t=0
    rewards = torch.tensor([[-0.5, 1.0], [0.0, 3.0]])
    mask = torch.ones(2, 2)
    inputs = AdvantageInputs(mask=mask, scores=scores, rewards=rewards)
    adv, ret = compute_advantages("reinforce_pp", inputs, AdvantageParams(gamma=0.5, n=2))
    # group mean 2 subtracted at the last token: [-0.5, -1], [0, 1]
    # G (gamma 0.5): row 0: G_1 = -1, G_0 = -0.5 + 0.5*(-1) = -1; row 1: G_1 = 1, G_0 = 0.5
    assert_close(ret, torch.tensor([[-1.0, -1.0], [0.5, 1.0]]), **TOL)
    # whiten -1, -1, 0.5, 1: mean -0.125, deviations -0.875, -0.875, 0.625, 1.125,
    # squares 0.765625*2 + 0.390625 + 1.265625 = 3.1875, unbiased var 3.1875/3 = 1.0625
    std = math.sqrt(1.0625)
    expected = torch.tensor([[-0.875, -0.875], [0.625, 1.125]]) / std
    assert_close(adv, expected, rtol=0.0, atol=1e-5)


def test_broadcast_to_tokens():
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    out = broadcast_to_tokens(torch.tensor([2.0, -1.0]), mask)
    assert_close(out, torch.tensor([[2.0, 2.0, 0.0], [0.0, -1.0, -1.0]]), **TOL)


def test_compute_advantages_dispatch_group_estimators():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [0, 1]])
    inputs = AdvantageInputs(mask=mask, scores=scores)
    adv, ret = compute_advantages("rloo", inputs, AdvantageParams(n=4))
    # rloo values [-8/3, -4/3, 0, 4] on valid tokens; no critic so returns = advantages
    expected = torch.tensor([[-8 / 3, -8 / 3], [-4 / 3, 0.0], [0.0, 0.0], [0.0, 4.0]])
    assert_close(adv, expected, **TOL)
    assert_close(ret, expected, **TOL)
    adv, _ = compute_advantages("grpo", inputs, AdvantageParams(n=2, eps=0.0))
    # pairs (1,2) and (3,6): deviations +-0.5 / +-1.5, std sqrt(2*0.25)=0.7071 / sqrt(2*2.25)=2.1213
    # -> each pair is [-1/sqrt2, 1/sqrt2] = [-0.7071068, 0.7071068]
    h = 1 / math.sqrt(2.0)
    assert_close(adv, torch.tensor([[-h, -h], [h, 0.0], [-h, -h], [0.0, h]]), **TOL)


def test_compute_advantages_dispatch_gae_matches_direct_call():
    inputs = AdvantageInputs(mask=FULL, rewards=R, values=V)
    adv, _ = compute_advantages("gae", inputs, AdvantageParams(gamma=0.5, lam=0.0))
    assert_close(adv, torch.tensor([[1.0, -0.5, 1.0]]), **TOL)


def test_registry_names():
    assert set(ADVANTAGE_ESTIMATORS) == {"gae", "grpo", "rloo", "reinforce_pp"}


def test_errors_are_clear():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    inputs = AdvantageInputs(mask=torch.ones(4, 1), scores=scores)
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'ppo'.*'gae'"):
        compute_advantages("ppo", inputs, AdvantageParams(n=2))
    with pytest.raises(ValueError, match="n=3 does not divide batch size B=4"):
        grpo(scores, n=3)
    with pytest.raises(ValueError, match=">= 2"):
        rloo(scores, n=1)
    with pytest.raises(ValueError, match="needs inputs.values"):
        compute_advantages("gae", AdvantageInputs(mask=torch.ones(4, 1), rewards=torch.ones(4, 1)), AdvantageParams())
