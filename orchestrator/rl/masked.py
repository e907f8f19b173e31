"""Masked reductions over padded token tensors.

Every function takes `x` and a 0/1 `mask` of the same shape (bool or float). Positions
where mask == 0 are padding: they never enter a statistic, and their content may be
anything (even inf/nan) without leaking into the result, because we select with
`torch.where` instead of multiplying by the mask (0 * inf = nan).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _valid(mask: Tensor) -> Tensor:
    return mask.bool()


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of x over valid positions.

    x, mask: [...] (same shape). Returns a scalar if dim is None, else x reduced over dim.
    sum = sum_i m_i x_i
    """
    picked = torch.where(_valid(mask), x, torch.zeros_like(x))
    return picked.sum() if dim is None else picked.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over valid positions.

    x, mask: [...]. Returns a scalar if dim is None, else x reduced over dim.
    mean = sum_i m_i x_i / max(sum_i m_i, 1)
    Why max(., 1): an empty row (or empty micro-batch) has mean 0 instead of nan, so one
    fully padded row cannot poison a loss.
    """
    count = _valid(mask).sum() if dim is None else _valid(mask).sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of x over all valid positions (a scalar).

    x, mask: [...]. Returns [].
    var = sum_i m_i (x_i - mean)^2 / N            (N = sum_i m_i)
    var_unbiased = var * N / (N - 1)              (Bessel's correction)
    Raises ValueError when N == 0, or N < 2 with unbiased=True.
    """
    # .item() syncs with the device once; this runs once per batch, not per token.
    n = int(_valid(mask).sum().item())
    if n == 0:
        raise ValueError("masked_var: mask has no valid positions")
    if unbiased and n < 2:
        raise ValueError("masked_var: unbiased variance needs at least 2 valid positions")
    mean = masked_mean(x, mask)
    var = masked_sum((x - mean) ** 2, mask) / n
    return var * n / (n - 1) if unbiased else var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise x to zero mean and unit variance over valid positions.

    x, mask: [...]. Returns [...], 0 at masked positions.
    x_hat = (x - mean) / sqrt(var_unbiased + eps)
    if not shift_mean: x_hat = x_hat + mean       (rescale only, keep the original mean)
    Statistics are over everything passed in: whiten the whole batch before slicing it
    into micro-batches or data-parallel shards, or each shard gets its own statistics.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(_valid(mask), whitened, torch.zeros_like(whitened))


def last_valid_onehot(mask: Tensor) -> Tensor:
    """One-hot marker of the last valid position of each row.

    mask: [B, T]. Returns [B, T] bool; a row with no valid position is all False.
    idx_b = max{t : m_{b,t} = 1}
    Found from the mask alone, so it is right for right padding, left padding and
    responses cut at the length limit without an EOS token.
    """
    valid = _valid(mask)
    positions = torch.arange(1, mask.shape[-1] + 1, device=mask.device)
    last = torch.where(valid, positions, torch.zeros_like(positions)).amax(dim=-1, keepdim=True)
    # last == 0 means an empty row; positions start at 1 so it matches nothing.
    return positions == last
