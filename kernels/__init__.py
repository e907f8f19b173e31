"""Numerical kernels, and the choice between a fast kernel and its reference.

- ``logprobs.token_logprobs``: chunked PyTorch token log-probs (the reference; runs anywhere);
  ``naive_token_logprobs`` materialises the logits (tests, benchmarks).
- ``logprobs_triton.triton_token_logprobs``: the fused Triton kernel (CUDA, or Triton's CPU
  interpreter); the module imports without triton installed.
- ``select_backend(name, device)`` / ``default_backend()``: which of the two a forward uses
  ("auto" | "reference" | "triton", $RLHF_LOGPROB_BACKEND); the choice is logged once.
- ``varlen_attention``: the packed-sequence attention adapter (imported lazily by its user).

Import order inside the package: ``_common`` <- ``logprobs``, ``logprobs_triton`` <- this
file, so neither implementation imports the other. Pure torch; runs on one CPU machine.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Callable

import torch

from .logprobs import naive_token_logprobs, token_logprobs
from .logprobs_triton import triton_token_logprobs, triton_unavailable_reason

__all__ = ["token_logprobs", "naive_token_logprobs", "select_backend", "default_backend", "triton_token_logprobs"]

_log = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "triton")
BACKEND_ENV = "RLHF_LOGPROB_BACKEND"


def default_backend() -> str:
    """The backend name from $RLHF_LOGPROB_BACKEND ("auto" when unset).

    An environment variable rather than a config key: the choice is a property of the
    machine (GPU or not, triton installed or not), not of the experiment, and "auto" is
    right everywhere; set it (e.g. in a Ray runtime_env) only to force one for a comparison.
    """
    name = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={name!r}: expected one of {', '.join(BACKENDS)}")
    return name


@functools.cache
def _log_choice(name: str, device_type: str, chosen: str, reason: str | None) -> None:
    """One log line per distinct choice and process, so a fallback is never silent: a warning
    on a CUDA device, where the kernel was wanted; elsewhere "auto" means the reference, which
    is the plan, not a fallback: INFO (a local run's worker log keeps it)."""
    if chosen == "triton":
        _log.info("token log-probs: backend %r on %s -> the fused Triton kernel", name, device_type)
    else:
        _log.log(
            logging.WARNING if device_type == "cuda" else logging.INFO,
            "token log-probs: backend %r on %s -> the chunked PyTorch reference "
            "(rlhf.kernels.logprobs.token_logprobs); the Triton kernel is not used: %s",
            name, device_type, reason or "not requested",
        )


def select_backend(
    name: str = "auto", device: torch.device | str | None = None
) -> Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    """Pick the token log-prob implementation: "auto" | "reference" | "triton".

    `device` is where the inputs live (default: cuda when available, else cpu).
    "auto" returns the Triton kernel on a CUDA device when triton imports, else the chunked
    reference; the choice (and a fallback's reason) is logged once per process. "triton"
    raises RuntimeError where it cannot run. Both functions take the same arguments.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown token log-prob backend {name!r}; expected 'auto', 'reference' or 'triton'")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if name == "reference":
        return token_logprobs
    if name == "auto" and device.type != "cuda":
        # Not even an import attempt: CPU runs stay exactly as without Triton installed.
        reason = f"'auto' uses it on CUDA devices only (inputs on {device.type})"
    else:
        reason = triton_unavailable_reason(device)
    if reason is None:
        _log_choice(name, device.type, "triton", None)
        return triton_token_logprobs
    if name == "triton":
        raise RuntimeError(f"token log-probs backend 'triton' cannot run on {device.type}: {reason}; "
                           "use 'reference' (chunked PyTorch) or 'auto'")
    _log_choice(name, device.type, "reference", reason)
    return token_logprobs
