"""Token log-probs (and entropy) of chosen tokens without the [N, V] logits matrix.

PPO needs, for every generated token, ``log p(y_t | context)`` under the current policy,
where ``p = softmax((h_t @ W.T + b) / T)`` over a vocabulary of ``V`` (often 150k) tokens.
The textbook ``log_softmax(h @ W.T).gather(...)`` materialises ``N x V`` float32 logits,
plus as much again for the softmax and the backward: 19 GiB forward and 28 GiB
forward+backward for 16k tokens of a 152k vocabulary (see shared/ENVIRONMENT.md).

``token_logprobs`` computes the same numbers ``chunk_size`` rows at a time:

    z      = (h @ W.T + b) / T                      one [chunk, V] block at a time
    lse    = logsumexp(z)                            kept per row, [N]
    logp_y = z_y - lse
    H      = -sum_v p_v log p_v,  log p = z - lse    kept per row, [N]

and its backward recomputes each block of logits from ``h``, ``W`` and the saved ``lse``
instead of storing them, so neither pass ever holds more than one [chunk, V] block.

Precision: every block of logits is float32 before the logsumexp. On CUDA a bf16/fp16
GEMM accumulates in float32 anyway; we ask for that accumulator as the output
(``torch.mm(..., out_dtype=torch.float32)``) instead of letting it round to bf16, and keep
float32 through the softmax. Rounding logits to bf16 moves log-probs by up to ~0.0075 at a
152k vocabulary, and PPO's ratio ``exp(logp_train - logp_rollout)`` is only honest when the
rollout engine and the learner agree far better than that. On CPU, half-precision GEMMs
still round their output before we upcast (CPU half precision is a test path only).

Backends (``rlhf.kernels.select_backend``): ``reference`` is this file; ``triton`` is the
fused kernel in ``logprobs_triton.py`` (logits never leave the GPU's registers, fp32
softmax); ``auto`` picks Triton on CUDA devices where triton imports and this file
elsewhere, logging which. Input checks and the fp32 matmul live in ``_common.py``.

Pure torch; no Ray/vLLM/DeepSpeed imports. Tests: ``tests/unit/test_logprobs_kernel.py``.
Benchmark: ``bench/bench_logprobs.py``.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._common import _check_inputs, _compute_dtype, _mm_fp32

__all__ = ["token_logprobs", "naive_token_logprobs"]


def _chunk_logits(h_c, weight, bias, temperature: float) -> torch.Tensor:
    """z = (h_c @ W.T + b) / T for one row block: [c, H] -> [c, V] in float32 (or float64)."""
    z = _mm_fp32(h_c, weight.t())
    if bias is not None:
        z += bias.to(z.dtype)
    if temperature != 1.0:
        z /= temperature
    return z


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """Forward saves h, W, b, targets and two [N] vectors (lse, entropy); never [N, V]."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, with_entropy):
        # hidden [N, H], weight [V, H], bias [V] | None, targets [N] long.
        n = hidden.shape[0]
        cdt = _compute_dtype(hidden.dtype)
        lse = torch.empty(n, dtype=cdt, device=hidden.device)
        logp_y = torch.empty(n, dtype=cdt, device=hidden.device)
        entropy = torch.empty(n, dtype=cdt, device=hidden.device) if with_entropy else None
        for s in range(0, n, chunk_size):
            rows = slice(s, min(s + chunk_size, n))
            z = _chunk_logits(hidden[rows], weight, bias, temperature)      # [c, V]
            lse[rows] = torch.logsumexp(z, dim=-1)
            logp = z.sub_(lse[rows, None])                                  # in place: log p
            logp_y[rows] = logp.gather(1, targets[rows, None]).squeeze(1)
            if with_entropy:
                # H = -sum p log p, from log p itself (not lse - sum p z) to avoid cancellation.
                entropy[rows] = -(logp.exp().mul_(logp)).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.set_materialize_grads(False)  # an unused output's grad arrives as None: skip it
        return (logp_y, entropy) if with_entropy else logp_y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, cdt = hidden.shape[0], lse.dtype
        grad_h = torch.empty_like(hidden) if need_h else None
        # Weight/bias grads are sums over all rows: accumulate them in float32.
        grad_w = torch.zeros(weight.shape, dtype=cdt, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=cdt, device=bias.device) if need_b else None
        for s in range(0, n, ctx.chunk_size):
            rows = slice(s, min(s + ctx.chunk_size, n))
            h_c = hidden[rows]
            g = _grad_chunk_logits(
                _chunk_logits(h_c, weight, bias, ctx.temperature),  # recomputed, not stored
                lse[rows], targets[rows],
                None if grad_logp is None else grad_logp[rows],
                None if grad_entropy is None else grad_entropy[rows],
                None if entropy is None else entropy[rows],
            )
            g /= ctx.temperature                      # z = s / T  =>  dL/ds = dL/dz / T
            if need_h:
                grad_h[rows] = torch.mm(g.to(weight.dtype), weight)
            if need_w:
                if h_c.dtype == cdt:
                    grad_w.addmm_(g.t(), h_c)             # in place: no [V, H] temporary
                else:
                    grad_w += _mm_fp32(g.to(h_c.dtype).t(), h_c)
            if need_b:
                grad_b += g.sum(0)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def _grad_chunk_logits(z, lse, targets, g_logp, g_ent, entropy):
    """dL/dz for one block, [c, V], overwriting ``z``.

    log-prob:  d logp_y / dz_j = 1[j = y] - p_j
    entropy:   d H / dz_j      = -p_j (log p_j + H)
      because dp_k/dz_j = p_k (1[k=j] - p_j) and H = -sum_k p_k log p_k give
      dH/dz_j = -sum_k p_k (1[k=j] - p_j)(log p_k + 1)
              = -p_j (log p_j + 1) + p_j (1 - H)  =  -p_j (log p_j + H).
    """
    logp = z.sub_(lse[:, None])
    p = logp.exp()
    if g_ent is not None:
        g = logp.add_(entropy[:, None]).mul_(p).mul_(-g_ent[:, None])
    else:
        g = logp.zero_()
    if g_logp is not None:
        g.addcmul_(p, g_logp[:, None].to(g.dtype), value=-1.0)
        g.scatter_add_(1, targets[:, None], g_logp[:, None].to(g.dtype))
    return g


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target token (and softmax entropy), chunked over rows.

    hidden [..., H], weight [V, H] (same dtype), targets [...] long, bias [V] or None.
    Returns logprobs [...] float32 (float64 for float64 inputs), and entropy [...] of
    softmax(logits / temperature) when ``with_entropy``. Differentiable w.r.t. hidden,
    weight and bias; peak extra memory is O(chunk_size * V), in backward too.
    """
    _check_inputs(hidden, weight, targets, bias, temperature)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    lead = targets.shape
    out = _ChunkedTokenLogprobs.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1).long(),
        float(temperature), int(chunk_size), bool(with_entropy),
    )
    if with_entropy:
        return out[0].reshape(lead), out[1].reshape(lead)
    return out.reshape(lead)


def naive_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain ``log_softmax(h @ W.T).gather`` reference; materialises [N, V]. Same semantics
    as ``token_logprobs`` (``chunk_size`` is accepted for a drop-in signature and unused)."""
    _check_inputs(hidden, weight, targets, bias, temperature)
    cdt = _compute_dtype(hidden.dtype)
    logits = (hidden @ weight.t()).to(cdt)
    if bias is not None:
        logits = logits + bias.to(cdt)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    logp_y = logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logp_y
    return logp_y, -(logp.exp() * logp).sum(-1)
