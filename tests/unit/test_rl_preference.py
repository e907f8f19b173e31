"""Preference losses (DPO, cDPO, IPO, SimPO, KTO) and pair building; hand-worked expected values.

Notation as in orchestrator/rl/preference.py: h = (pc - rc) - (pr - rr); -log sigmoid(x) = log(1 + e^-x).
Run: .venv/bin/pytest tests/unit/test_rl_preference.py -q   (pure torch, about a second)
"""

import pytest
import torch
from torch.testing import assert_close

from rlhf.orchestrator.rl.preference import (
    LOSSES,
    REFERENCE_FREE,
    kto_examples,
    kto_kl_reference,
    kto_loss,
    pair_loss,
    preference_pairs,
)

TOL = dict(rtol=0.0, atol=1e-6)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _leaf(*values: float) -> torch.Tensor:
    return t(*values).requires_grad_()


# Two pairs: pc = (-1, -2), rc = (-1.5, -1.5), pr = (-2, -1), rr = (-2, -1.5)
#   pair 0: h = (-1 + 1.5) - (-2 + 2) = 0.5;  pair 1: h = (-2 + 1.5) - (-1 + 1.5) = -1.0
PC, RC, PR, RR = (-1.0, -2.0), (-1.5, -1.5), (-2.0, -1.0), (-2.0, -1.5)


def test_dpo_sigmoid_loss_rewards_and_gradient():
    pc = _leaf(*PC)
    out = pair_loss("dpo", pc, t(*PR), t(*RC), t(*RR), beta=0.1)
    # pair 0: log(1 + e^-0.05) = 0.6684596; pair 1: log(1 + e^0.1) = 0.7443967; mean 0.7064282
    assert_close(out.loss, t(0.7064282).squeeze(), rtol=0.0, atol=1e-7)
    # rewards beta (p - r): chosen 0.1 * (0.5, -0.5), rejected 0.1 * (0, 0.5)
    assert_close(out.chosen_rewards, t(0.05, -0.05), **TOL)
    assert_close(out.rejected_rewards, t(0.0, 0.05), **TOL)
    assert not out.chosen_rewards.requires_grad
    out.loss.backward()
    # dl/dpc = -beta sigmoid(-beta h) / B: -0.1 * 0.4875026 / 2 = -0.0243751; -0.1 * 0.5249792 / 2 = -0.0262490
    assert_close(pc.grad, t(-0.0243751, -0.0262490), rtol=0.0, atol=1e-7)


def test_cdpo_label_smoothing():
    pc = _leaf(PC[0])
    out = pair_loss("cdpo", pc, t(PR[0]), t(RC[0]), t(RR[0]), beta=0.1, label_smoothing=0.1)
    # h = 0.5: 0.9 log(1 + e^-0.05) + 0.1 log(1 + e^0.05) = 0.9 * 0.6684596 + 0.1 * 0.7184596 = 0.6734596
    assert_close(out.loss, t(0.6734596).squeeze(), rtol=0.0, atol=1e-7)
    out.loss.backward()
    # dl/dpc = beta (-(1 - eps) sigmoid(-beta h) + eps sigmoid(beta h))
    #        = 0.1 (-0.9 * 0.4875026 + 0.1 * 0.5124974) = -0.0387503
    assert_close(pc.grad, t(-0.0387503), rtol=0.0, atol=1e-7)
    # eps = 0 is plain DPO
    plain = pair_loss("cdpo", t(*PC), t(*PR), t(*RC), t(*RR), beta=0.1, label_smoothing=0.0)
    assert_close(plain.loss, pair_loss("dpo", t(*PC), t(*PR), t(*RC), t(*RR), beta=0.1).loss, **TOL)


def test_ipo_squared_loss_and_regularising_gradient():
    # beta 0.5 -> target margin 1 / (2 beta) = 1. Pairs h = 0.5 and h = 3 (pr lowered by 2.5 more).
    pc = _leaf(-1.0, -1.0)
    out = pair_loss("ipo", pc, t(-2.0, -4.5), t(-1.5, -1.5), t(-2.0, -2.0), beta=0.5)
    # (0.5 - 1)^2 = 0.25; (3 - 1)^2 = 4; mean 2.125
    assert_close(out.loss, t(2.125).squeeze(), **TOL)
    out.loss.backward()
    # dl/dpc = 2 (h - 1) / B: -0.5 (push chosen up), +2.0 (past the target IPO pulls it back, unlike DPO)
    assert_close(pc.grad, t(-0.5, 2.0), **TOL)


def test_simpo_length_normalised_margin():
    pc = _leaf(-3.0)
    out = pair_loss("simpo", pc, t(-8.0), None, None, beta=2.0, gamma=0.5,
                    chosen_lengths=torch.tensor([3]), rejected_lengths=torch.tensor([4]))
    # rewards beta logp / |y|: 2 * -3 / 3 = -2, 2 * -8 / 4 = -4; margin -2 + 4 - 0.5 = 1.5
    # loss log(1 + e^-1.5) = 0.2014133
    assert_close(out.loss, t(0.2014133).squeeze(), rtol=0.0, atol=1e-7)
    assert_close(out.chosen_rewards, t(-2.0), **TOL)
    assert_close(out.rejected_rewards, t(-4.0), **TOL)
    out.loss.backward()
    # dl/dpc = -(beta / |yc|) sigmoid(-1.5) = -(2/3) * 0.1824255 = -0.1216170
    assert_close(pc.grad, t(-0.1216170), rtol=0.0, atol=1e-7)


def test_kto_weighted_desirable_and_undesirable():
    logps = _leaf(-1.0, -2.0)
    # r = logp - ref = (1.2, 0.6); z0 = 0.2; rows: desirable, undesirable; w_d = 1, w_u = 2; beta 0.5
    out = kto_loss(logps, t(-2.2, -2.6), torch.tensor([True, False]), beta=0.5, kl_ref=torch.tensor(0.2),
                   desirable_weight=1.0, undesirable_weight=2.0)
    # desirable: 1 - sigmoid(0.5 * (1.2 - 0.2)) = 1 - 0.6224593 = 0.3775407
    # undesirable: 2 (1 - sigmoid(0.5 * (0.2 - 0.6))) = 2 * 0.5498340 = 1.0996680; mean 0.7386043
    assert_close(out.loss, t(0.7386043).squeeze(), rtol=0.0, atol=1e-7)
    assert_close(out.chosen_rewards, t(0.6), **TOL)
    assert_close(out.rejected_rewards, t(0.3), **TOL)
    out.loss.backward()
    # sigmoid'(x) = s (1 - s). desirable: -w beta s(1-s) / B, s = sigmoid(0.5): -0.5 * 0.2350037 / 2 = -0.0587509
    # undesirable: +w beta s(1-s) / B, s = sigmoid(-0.2): 2 * 0.5 * 0.2475166 / 2 = 0.1237583
    assert_close(logps.grad, t(-0.0587509, 0.1237583), rtol=0.0, atol=1e-7)


def test_kto_reference_point_is_clamped_and_detached():
    kl = kto_kl_reference(_leaf(-1.0, -3.0), t(-2.0, -2.5))
    # mean((1, -0.5)) = 0.25
    assert_close(kl, t(0.25).squeeze(), **TOL)
    assert not kl.requires_grad
    assert kto_kl_reference(t(-3.0), t(-1.0)).item() == 0.0  # mean -2 clamps to 0
    # a negative kl_ref counts as 0: 1 - sigmoid(0.5 * 1.2) = 1 - 0.6456563 = 0.3543437
    out = kto_loss(t(-1.0), t(-2.2), torch.tensor([True]), beta=0.5, kl_ref=-1.0)
    assert_close(out.loss, t(0.3543437).squeeze(), rtol=0.0, atol=1e-7)


def _grad_chosen(name: str, a: torch.Tensor, b: torch.Tensor, swap: bool) -> float:
    """d loss / d a, with a the chosen reply (swap False) or the rejected one (swap True)."""
    a = a.clone().requires_grad_()
    ref_a, ref_b = t(-1.5), t(-2.0)
    first, second, ref_first, ref_second = (b, a, ref_b, ref_a) if swap else (a, b, ref_a, ref_b)
    if name == "kto":
        out = kto_loss(a, ref_a, torch.tensor([not swap]), beta=0.5, kl_ref=0.1)
    elif name in REFERENCE_FREE:
        n = torch.tensor([2])
        out = pair_loss(name, first, second, None, None, beta=0.5, gamma=0.5, chosen_lengths=n, rejected_lengths=n)
    else:
        out = pair_loss(name, first, second, ref_first, ref_second, beta=0.5, label_smoothing=0.1)
    out.loss.backward()
    return a.grad.item()


@pytest.mark.parametrize("name", LOSSES)
def test_swapping_chosen_and_rejected_flips_the_gradient(name):
    # a = -1 (ratio 0.5), b = -2 (ratio 0): h = 0.5, inside IPO's |h| < 1 / (2 beta) = 1 so its sign flips too
    a, b = t(-1.0), t(-2.0)
    as_chosen, as_rejected = _grad_chosen(name, a, b, swap=False), _grad_chosen(name, a, b, swap=True)
    assert as_chosen < 0 < as_rejected, (name, as_chosen, as_rejected)


def test_preference_pairs_all_and_best_worst_with_ties():
    ranks = [1, 0, 2, 1]  # reply 1 best; 0 and 3 tie in the middle; 2 worst
    assert preference_pairs(ranks, "all") == [(0, 2), (1, 0), (1, 2), (1, 3), (3, 2)]
    assert preference_pairs(ranks, "best_worst") == [(1, 2)]
    # two tied best, two tied worst: 2 x 2 best_worst pairs, and no pair within a tie
    assert preference_pairs([0, 1, 0, 1], "best_worst") == [(0, 1), (0, 3), (2, 1), (2, 3)]
    assert preference_pairs([0, 1, 0, 1], "all") == [(0, 1), (0, 3), (2, 1), (2, 3)]
    # K = 4 untied: C(4, 2) = 6 pairs
    assert len(preference_pairs([3, 2, 1, 0], "all")) == 6
    for mode in ("all", "best_worst"):
        assert preference_pairs([0, 0, 0], mode) == []
        assert preference_pairs([0], mode) == []
    with pytest.raises(ValueError, match="unknown preference pair mode 'some'"):
        preference_pairs([0, 1], "some")


def test_kto_examples_keep_best_and_worst():
    assert kto_examples([1, 0, 2, 1]) == [(1, True), (2, False)]
    assert kto_examples([0, 2, 0, 1, 2]) == [(0, True), (1, False), (2, True), (4, False)]
    assert kto_examples([0, 0]) == []
    assert kto_examples([]) == []


def _pair(name="dpo", refs=True, lengths=False, **kw):
    x = t(-1.0, -2.0)
    ref = x if refs else None
    n = torch.tensor([2, 3]) if lengths else None
    kw.setdefault("beta", 0.1)
    return pair_loss(name, x, x, ref, ref, chosen_lengths=n, rejected_lengths=n, **kw)


@pytest.mark.parametrize("call, match", [
    (lambda: _pair("orpo"), "unknown pairwise preference loss 'orpo'"),
    (lambda: _pair("kto"), "kto is unpaired, use kto_loss"),
    (lambda: _pair(beta=0.0), "beta must be > 0, got 0.0"),
    (lambda: _pair("ipo", beta=-1.0), "beta must be > 0"),
    (lambda: _pair("dpo", refs=False), "dpo needs ref_chosen_logps"),
    (lambda: _pair("simpo", refs=True, lengths=True), "simpo is reference-free"),
    (lambda: _pair("simpo", refs=False, lengths=False), "simpo needs chosen_lengths"),
    (lambda: _pair("cdpo", label_smoothing=0.5), "label_smoothing must be in"),
    (lambda: pair_loss("dpo", t(-1.0, -2.0), t(-1.0), t(0.0, 0.0), t(0.0, 0.0), beta=0.1), "equal non-empty 1-D"),
    (lambda: pair_loss("dpo", t(), t(), t(), t(), beta=0.1), "equal non-empty 1-D"),
    (lambda: pair_loss("simpo", t(-1.0), t(-1.0), None, None, beta=0.1, chosen_lengths=torch.tensor([0]),
                       rejected_lengths=torch.tensor([1])), "lengths must be > 0"),
    (lambda: kto_loss(t(-1.0), t(-1.0), torch.tensor([True]), beta=0.0, kl_ref=0.0), "kto: beta must be > 0"),
    (lambda: kto_loss(t(-1.0, -2.0), t(-1.0), torch.tensor([True]), beta=0.1, kl_ref=0.0), "equal non-empty"),
])
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_label_smoothing_and_gamma_only_touch_their_losses():
    # the config carries label_smoothing 0.1 and gamma 0.5 whatever the loss: dpo and ipo ignore both
    x, y = t(-1.0, -2.0), t(-2.0, -1.0)
    ref = t(-1.5, -1.5)
    for name in ("dpo", "ipo"):
        base = pair_loss(name, x, y, ref, ref, beta=0.1).loss
        assert_close(pair_loss(name, x, y, ref, ref, beta=0.1, label_smoothing=0.1, gamma=0.5).loss, base, **TOL)
