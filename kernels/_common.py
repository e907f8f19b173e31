"""What both token log-prob implementations share: input checks and the fp32 matmul.

Imported by ``logprobs`` (the chunked PyTorch reference) and ``logprobs_triton`` (the fused
kernel); it imports neither, so the two implementations do not import each other. Pure
torch; runs anywhere.
"""
from __future__ import annotations

import torch

_HALF = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/float32 inputs, float64 for float64 (lets gradcheck run)."""
    return torch.promote_types(dtype, torch.float32)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with an (at least) float32 result.

    On CUDA, half-precision GEMMs hand back their float32 accumulator directly, so the
    logits are never rounded to bf16. Elsewhere the product is upcast after the fact.
    """
    if a.is_cuda and a.dtype in _HALF:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            # A torch without `out_dtype` for this GEMM: multiply in float32 instead (slower,
            # same or better accuracy); never fall back to rounding the logits to bf16.
            return torch.mm(a.float(), b.float())
    return torch.mm(a, b).to(_compute_dtype(a.dtype))


def _check_inputs(hidden, weight, targets, bias, temperature) -> None:
    """ValueError unless hidden [..., H], weight [V, H] (same dtype), targets [...], bias [V]|None, T > 0."""
    if hidden.shape[-1] != weight.shape[1] or weight.dim() != 2:
        raise ValueError(f"hidden [..., H] and weight [V, H] disagree: {tuple(hidden.shape)} vs {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight dtypes differ: {hidden.dtype} vs {weight.dtype}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be hidden's leading shape {tuple(hidden.shape[:-1])}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V]={tuple(weight.shape[:1])}, got {tuple(bias.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
