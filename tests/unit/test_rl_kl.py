"""KL estimators, reward shaping and KL controllers; expected values worked out by hand."""

import math

import pytest
import torch
from torch.testing import assert_close

from rlhf.orchestrator.rl.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    shape_rewards,
)

TOL = dict(rtol=0.0, atol=1e-6)

# Two tokens: log pi - log pi_ref = [-1 - (-2), -2 - (-1)] = [1, -1]
LOGP = torch.tensor([-1.0, -2.0])
REF = torch.tensor([-2.0, -1.0])


def test_k1_k2_k3_on_two_tokens():
    # k1 = logp - ref = [1, -1]
    assert_close(kl_estimate(LOGP, REF, "k1"), torch.tensor([1.0, -1.0]), **TOL)
    # k2 = 0.5 * [1^2, (-1)^2] = [0.5, 0.5]
    assert_close(kl_estimate(LOGP, REF, "k2"), torch.tensor([0.5, 0.5]), **TOL)
    # log r = ref - logp = [-1, 1]; k3 = e^{log r} - log r - 1
    # token 0: e^-1 + 1 - 1 = e^-1 = 0.3678794; token 1: e - 1 - 1 = e - 2 = 0.7182818
    assert_close(kl_estimate(LOGP, REF, "k3"), torch.tensor([math.exp(-1), math.e - 2]), **TOL)


def test_estimators_are_zero_when_policies_match():
    x = torch.tensor([-0.3, -4.0])
    for kind in KL_ESTIMATORS:
        assert_close(kl_estimate(x, x, kind), torch.zeros(2), **TOL)


def test_unknown_estimator_names_valid_kinds():
    with pytest.raises(ValueError, match=r"unknown KL estimator 'k4'.*'k1', 'k2', 'k3'"):
        kl_estimate(LOGP, REF, "k4")


def test_shape_rewards_places_score_at_last_valid_token():
    score = torch.tensor([5.0, 7.0, 3.0, 9.0])
    # padding holds garbage log-probs (100) that must not show up anywhere
    logp = torch.tensor(
        [
            [-1.0, -2.0, 100.0],  # right padded
            [100.0, -1.0, -2.0],  # left padded
            [-1.0, -2.0, -1.0],  # cut at the length limit, no EOS
            [100.0, 100.0, 100.0],  # empty row
        ]
    )
    ref = torch.tensor(
        [
            [-2.0, -1.0, 0.0],
            [0.0, -2.0, -1.0],
            [-2.0, -1.0, -1.0],
            [0.0, 0.0, 0.0],
        ]
    )
    mask = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 1, 1], [0, 0, 0]])
    rewards, kl = shape_rewards(score, logp, ref, mask, kl_coef=0.1, estimator="k1")
    # k1 on valid tokens: [1, -1], [1, -1], [1, -1, 0]; padding 0
    expected_kl = torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0], [1.0, -1.0, 0.0], [0.0, 0.0, 0.0]])
    assert_close(kl, expected_kl, **TOL)
    # r = -0.1 * kl, + score at the last valid token:
    # row 0: [-0.1, 0.1 + 5, 0]; row 1: [0, -0.1, 0.1 + 7]; row 2: [-0.1, 0.1, 0 + 3]; row 3: 0
    expected = torch.tensor([[-0.1, 5.1, 0.0], [0.0, -0.1, 7.1], [-0.1, 0.1, 3.0], [0.0, 0.0, 0.0]])
    assert_close(rewards, expected, **TOL)


def test_shape_rewards_left_and_right_padding_agree():
    score = torch.tensor([2.0, 2.0])
    logp = torch.tensor([[-1.0, -2.0, 0.0], [0.0, -1.0, -2.0]])
    ref = torch.tensor([[-2.0, -1.0, 0.0], [0.0, -2.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    rewards, _ = shape_rewards(score, logp, ref, mask, kl_coef=0.5, estimator="k2")
    # k2 = [0.5, 0.5]; r = -0.5 * 0.5 = -0.25 each, + 2 at the last: [-0.25, 1.75]
    assert_close(rewards[0, :2], torch.tensor([-0.25, 1.75]), **TOL)
    assert_close(rewards[1, 1:], rewards[0, :2], **TOL)


def test_adaptive_kl_controller_one_update():
    # err = clip(9/6 - 1 = 0.5, -0.2, 0.2) = 0.2; beta = 0.2 * (1 + 0.2 * 1000/10000) = 0.2 * 1.02 = 0.204
    up = AdaptiveKLController(init_coef=0.2, target=6.0, horizon=10000)
    up.update(current_kl=9.0, n_steps=1000)
    assert up.value == pytest.approx(0.204, abs=1e-12)
    # err = clip(3/6 - 1 = -0.5) = -0.2; beta = 0.2 * 0.98 = 0.196
    down = AdaptiveKLController(init_coef=0.2, target=6.0, horizon=10000)
    down.update(current_kl=3.0, n_steps=1000)
    assert down.value == pytest.approx(0.196, abs=1e-12)
    # inside the clip: err = 6.6/6 - 1 = 0.1; beta = 0.2 * (1 + 0.1 * 0.1) = 0.202
    inside = AdaptiveKLController(init_coef=0.2, target=6.0, horizon=10000)
    inside.update(current_kl=6.6, n_steps=1000)
    assert inside.value == pytest.approx(0.202, abs=1e-12)


def test_kl_controllers_state_dict_round_trip():
    ctl = AdaptiveKLController(init_coef=0.2, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=1000)
    resumed = AdaptiveKLController(init_coef=0.05, target=6.0, horizon=10000)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == pytest.approx(0.204, abs=1e-12)

    fixed = FixedKLController(0.1)
    fixed.update(current_kl=100.0, n_steps=1000)
    assert fixed.value == 0.1
    other = FixedKLController(0.3)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.1


def test_adaptive_kl_controller_rejects_bad_config():
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(init_coef=0.1, target=0.0, horizon=10)
    with pytest.raises(ValueError, match="horizon"):
        AdaptiveKLController(init_coef=0.1, target=1.0, horizon=0)


def test_clamp_bounds_each_token_estimate():
    # log pi - log pi_ref = [20, -20, 0.5]; log r = ref - logp = [-20, 20, -0.5]
    logp, ref = torch.tensor([0.0, -20.0, -1.0]), torch.tensor([-20.0, 0.0, -1.5])
    # k1 = [20, -20, 0.5] -> clamp 10: [10, -10, 0.5]
    assert_close(kl_estimate(logp, ref, "k1", clamp=10.0), torch.tensor([10.0, -10.0, 0.5]), **TOL)
    # k3 token 1: e^20 - 20 - 1 = 4.85e8 -> 10; token 0: e^-20 + 20 - 1 = 19.000000002 -> 10;
    # token 2: e^-0.5 + 0.5 - 1 = 0.1065307 (untouched)
    k3 = kl_estimate(logp, ref, "k3", clamp=10.0)
    assert_close(k3, torch.tensor([10.0, 10.0, math.exp(-0.5) - 0.5]), **TOL)
    assert kl_estimate(logp, ref, "k3")[1] > 4e8  # unbounded without it
    # k2 = 0.5 * 20^2 = 200 -> 2 with clamp 2; 0.5 * 0.25 = 0.125 stays
    assert_close(kl_estimate(logp, ref, "k2", clamp=2.0), torch.tensor([2.0, 2.0, 0.125]), **TOL)


def test_clamp_must_be_positive():
    with pytest.raises(ValueError, match="clamp must be > 0"):
        kl_estimate(LOGP, REF, "k1", clamp=0.0)


def test_shape_rewards_uses_the_clamped_estimate():
    # one row, two valid tokens; k3 of log r = [20, 0] is [4.85e8, 0] -> clamped [10, 0]
    logp, ref, mask = torch.tensor([[-20.0, -1.0]]), torch.tensor([[0.0, -1.0]]), torch.tensor([[1, 1]])
    rewards, kl = shape_rewards(torch.tensor([1.0]), logp, ref, mask, kl_coef=0.1, estimator="k3", clamp=10.0)
    assert_close(kl, torch.tensor([[10.0, 0.0]]), **TOL)
    # r = -0.1 * [10, 0] + [0, 1] = [-1, 1]
    assert_close(rewards, torch.tensor([[-1.0, 1.0]]), **TOL)
