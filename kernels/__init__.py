"""Numerical kernels (pure torch; GPU-specific kernels are imported lazily by their backends)."""

from .logprobs import naive_token_logprobs, select_backend, token_logprobs

__all__ = ["token_logprobs", "naive_token_logprobs", "select_backend"]
