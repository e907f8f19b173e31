"""Masked reductions; expected values worked out by hand in the comments."""

import math

import pytest
import torch
from torch.testing import assert_close

from rlhf.orchestrator.rl.masked import (
    last_valid_onehot,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

TOL = dict(rtol=0.0, atol=1e-6)

# Valid entries: row 0 -> 1, 2; row 1 -> 3. Padding holds garbage (inf, nan, 100).
X = torch.tensor([[1.0, 2.0, 100.0], [3.0, math.inf, math.nan]])
M = torch.tensor([[1, 1, 0], [1, 0, 0]])


@pytest.mark.parametrize("mask", [M, M.bool(), M.float()])
def test_masked_sum_and_mean_ignore_padding_garbage(mask):
    # sum = 1 + 2 + 3 = 6; mean = 6 / 3 = 2
    assert_close(masked_sum(X, mask), torch.tensor(6.0), **TOL)
    assert_close(masked_mean(X, mask), torch.tensor(2.0), **TOL)
    # per row: sums [1+2, 3] = [3, 3]; means [3/2, 3/1] = [1.5, 3]
    assert_close(masked_sum(X, mask, dim=1), torch.tensor([3.0, 3.0]), **TOL)
    assert_close(masked_mean(X, mask, dim=1), torch.tensor([1.5, 3.0]), **TOL)


def test_masked_mean_of_empty_row_is_zero_not_nan():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    # row 0: (1 + 2) / 2 = 1.5; row 1 empty -> 0 by definition
    assert_close(masked_mean(X, mask, dim=1), torch.tensor([1.5, 0.0]), **TOL)


def test_masked_var_biased_and_unbiased():
    # valid values 1, 2, 3: mean 2, squared deviations 1 + 0 + 1 = 2
    # biased 2 / 3; unbiased 2 / (3 - 1) = 1
    assert_close(masked_var(X, M, unbiased=False), torch.tensor(2.0 / 3.0), **TOL)
    assert_close(masked_var(X, M, unbiased=True), torch.tensor(1.0), **TOL)


def test_masked_var_rejects_too_few_tokens():
    one = torch.tensor([[1, 0, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(X, one, unbiased=True)
    with pytest.raises(ValueError, match="no valid"):
        masked_var(X, torch.zeros_like(M), unbiased=False)


def test_masked_whiten():
    x = torch.tensor([[1.0, 3.0, 7.0], [5.0, -9.0, 8.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # valid 1, 3, 5: mean 3, squared deviations 4 + 0 + 4 = 8, unbiased var 8/2 = 4, std 2
    # whitened (x - 3) / 2 = -1, 0, 1; padding -> 0
    expected = torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert_close(masked_whiten(x, mask, eps=0.0), expected, **TOL)
    # shift_mean=False adds the mean 3 back: 2, 3, 4
    expected_keep = torch.tensor([[2.0, 3.0, 0.0], [4.0, 0.0, 0.0]])
    assert_close(masked_whiten(x, mask, shift_mean=False, eps=0.0), expected_keep, **TOL)


def test_last_valid_onehot_right_left_full_and_empty():
    mask = torch.tensor(
        [
            [1, 1, 0, 0],  # right padded: last valid t = 1
            [0, 0, 1, 1],  # left padded: t = 3
            [1, 1, 1, 1],  # cut without EOS: t = 3
            [0, 0, 0, 0],  # empty: nothing
            [1, 0, 0, 0],  # single token at t = 0
        ]
    )
    expected = torch.tensor(
        [
            [0, 1, 0, 0],
            [0, 0, 0, 1],
            [0, 0, 0, 1],
            [0, 0, 0, 0],
            [1, 0, 0, 0],
        ]
    ).bool()
    assert torch.equal(last_valid_onehot(mask), expected)
