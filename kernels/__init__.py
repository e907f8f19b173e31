"""Numerical kernels (pure torch; GPU-specific kernels are imported lazily by their backends)."""

from .logprobs import default_backend, naive_token_logprobs, select_backend, token_logprobs
from .logprobs_triton import triton_token_logprobs

__all__ = ["token_logprobs", "naive_token_logprobs", "select_backend", "default_backend", "triton_token_logprobs"]
