"""Fused token log-probs and entropy in Triton: ``triton_token_logprobs``.

Same contract as ``rlhf.kernels.logprobs.token_logprobs`` (hidden [..., H], weight [V, H],
targets [...], optional bias [V], temperature; float32 log-probs and entropy of
softmax((h W^T + b) / T)), but the forward never writes a logit to memory: one kernel
computes h W^T tile by tile and folds each tile into an online softmax kept in float32
(see ``_triton_logprobs_kernels`` for the math). Extra memory in the forward is a few
float32 vectors per row, whatever V is.

The backward recomputes logit tiles in a second kernel that writes dL/dlogits for
``chunk_size`` rows at a time (in the input dtype: a [chunk, V] block, 311 MiB for 1,024
rows of a 152k bf16 vocabulary), then hands the two remaining GEMMs to cuBLAS:
dL/dh = G W and dL/dW += G^T h, the latter accumulated in float32 across chunks.

Where it runs: CUDA tensors with ``triton`` importable. Under ``TRITON_INTERPRET=1`` the
same kernels run on CPU tensors through Triton's numpy interpreter (slow; tests only;
float32 and float16 -- the interpreter mishandles bfloat16 stores). This module imports
without triton installed; ``triton_unavailable_reason()`` says why it cannot run.

On one CPU machine: select ``reference`` (or ``auto``, which picks it there). On GPU
nodes ``auto`` picks this kernel (``rlhf.kernels.select_backend``).
Tests: tests/unit/test_logprobs_triton.py. Benchmark: bench/logprob_kernel.py.
"""
from __future__ import annotations

import functools
import os

import torch
from torch.autograd.function import once_differentiable

from ._common import _check_inputs, _mm_fp32

__all__ = ["triton_token_logprobs", "triton_unavailable_reason", "interpret_mode"]

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def _import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401

        from . import _triton_logprobs_kernels  # noqa: F401
    except Exception as e:  # ImportError, or a broken install (driver/compiler probes)
        return f"triton is not importable ({type(e).__name__}: {e})"
    return None


def interpret_mode() -> bool:
    """TRITON_INTERPRET=1: Triton runs kernels on CPU tensors via numpy (for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """None if the Triton kernel can run on `device` (default: the current CUDA device),
    else one line saying why not."""
    err = _import_error()
    if err is not None:
        return err
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cpu" and interpret_mode():
        return None
    if dev is None or dev.type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device"
    return f"Triton kernels need a CUDA device (got {dev.type}; TRITON_INTERPRET=1 runs them on CPU, slowly)"


def _kernels():
    from . import _triton_logprobs_kernels as k

    return k.compiled(interpret_mode())


def _num_splits(n: int, v: int, device: torch.device) -> int:
    """Vocabulary splits per row block: enough programs to cover the GPU about twice when N
    is small, never more splits than vocabulary tiles."""
    if device.type != "cuda":  # interpreter: two splits exercise the merge path
        return max(1, min(2, -(-v // 64)))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = -(-n // 128)
    return max(1, min(-(-2 * sms // row_blocks), -(-v // 256)))


def _merge_splits(m, s, t, zy, with_entropy):
    """Combine per-split online-softmax states ([S, N] each) into lse, logp_y, entropy [N]."""
    top = m.max(0).values
    a = torch.exp(m - top)                   # 0 for splits that saw no tile (m = -1e30)
    total = (a * s).sum(0)
    lse = top + torch.log(total)
    logp = zy.sum(0) - lse                   # z_y lives in exactly one split; others hold 0
    if not with_entropy:
        return lse, logp, None
    # t_i is relative to m_i: shifting it to the global max adds (m_i - top) s_i.
    tt = (a * (t + (m - top) * s)).sum(0)
    return lse, logp, torch.log(total) - tt / total


def _launch_fwd(hidden, weight, bias, targets, temperature, with_entropy):
    n, k = hidden.shape
    v = weight.shape[0]
    if n == 0:  # nothing to launch (a zero-sized grid is an error in Triton)
        empty = torch.empty(0, dtype=torch.float32, device=hidden.device)
        return empty, empty, (empty if with_entropy else None)
    fwd, _ = _kernels()
    splits = _num_splits(n, v, hidden.device)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    m, s, zy = (torch.empty(splits, n, **f32) for _ in range(3))
    t = torch.empty(splits, n, **f32) if with_entropy else s  # unused (not written) without entropy
    args = (hidden, weight, bias if bias is not None else weight, targets, m, s, t, zy,
            n, v, k, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            1.0 / temperature, splits)
    flags = dict(HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, IEEE=hidden.dtype == torch.float32)
    if interpret_mode():
        from ._triton_logprobs_kernels import INTERPRET_BLOCKS as blocks

        fwd[(-(-n // blocks["BLOCK_N"]), splits)](*args, **flags, **blocks)
    else:
        fwd[lambda meta: (-(-n // meta["BLOCK_N"]), splits)](*args, **flags)
    return _merge_splits(m, s, t, zy, with_entropy)


def _launch_grad_logits(g, h_c, weight, bias, y_c, lse_c, ent_c, glogp_c, gent_c, temperature):
    """Writes dL/d(h W^T + b) for the rows of h_c into g [c, V]."""
    _, bwd = _kernels()
    n, k = h_c.shape
    v = weight.shape[0]
    dummy = lse_c
    args = (h_c, weight, bias if bias is not None else weight, y_c, lse_c,
            ent_c if ent_c is not None else dummy, glogp_c if glogp_c is not None else dummy,
            gent_c if gent_c is not None else dummy, g,
            n, v, k, h_c.stride(0), h_c.stride(1), weight.stride(0), weight.stride(1),
            g.stride(0), g.stride(1), 1.0 / temperature)
    flags = dict(HAS_BIAS=bias is not None, HAS_GLOGP=glogp_c is not None, HAS_GENT=gent_c is not None,
                 IEEE=h_c.dtype == torch.float32)
    if interpret_mode():
        from ._triton_logprobs_kernels import INTERPRET_BLOCKS as blocks, INTERPRET_GROUP

        grid = (-(-n // blocks["BLOCK_N"]) * -(-v // blocks["BLOCK_V"]),)
        bwd[grid](*args, **flags, **blocks, GROUP_N=INTERPRET_GROUP)
    else:
        bwd[lambda meta: (-(-n // meta["BLOCK_N"]) * -(-v // meta["BLOCK_V"]),)](*args, **flags)


class _TritonTokenLogprobs(torch.autograd.Function):
    """Saves h, W, b, targets and two [N] float32 vectors (lse, entropy); never [N, V]."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, with_entropy):
        lse, logp, entropy = _launch_fwd(hidden, weight, bias, targets, temperature, with_entropy)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.set_materialize_grads(False)
        return (logp, entropy) if with_entropy else logp

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, v = hidden.shape[0], weight.shape[0]
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None, None, None
        prep = lambda g: None if g is None else g.float().contiguous()  # noqa: E731
        grad_logp, grad_entropy = prep(grad_logp), prep(grad_entropy)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(v, dtype=torch.float32, device=weight.device) if need_b else None
        c = max(1, min(ctx.chunk_size, n))
        block = torch.empty(c, v, dtype=weight.dtype, device=weight.device)  # reused by every chunk
        for s in range(0, n, c):
            rows = slice(s, min(s + c, n))
            g, h_c = block[: rows.stop - s], hidden[rows]
            _launch_grad_logits(
                g, h_c, weight, bias, targets[rows], lse[rows],
                None if entropy is None else entropy[rows],
                None if grad_logp is None else grad_logp[rows],
                None if grad_entropy is None else grad_entropy[rows], ctx.temperature)
            if need_h:
                torch.mm(g, weight, out=grad_h[rows])
            if need_w:
                if g.dtype == torch.float32:
                    grad_w.addmm_(g.t(), h_c)
                else:  # bf16/fp16 GEMM with its fp32 accumulator as the output (CUDA)
                    grad_w += _mm_fp32(g.t(), h_c)
            if need_b:
                grad_b += g.sum(0, dtype=torch.float32)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def triton_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target token (and softmax entropy) with fused Triton kernels.

    hidden [..., H], weight [V, H] (same dtype: float32, float16 or bfloat16), targets [...],
    bias [V] or None. Returns float32 logprobs [...] (and entropy [...] when `with_entropy`)
    of softmax(logits / temperature). Differentiable w.r.t. hidden, weight and bias;
    `chunk_size` is the number of rows per backward block (the forward needs none).
    """
    _check_inputs(hidden, weight, targets, bias, temperature)
    if hidden.dtype not in _SUPPORTED:
        raise ValueError(f"the Triton kernel supports {[str(d) for d in _SUPPORTED]}, got {hidden.dtype}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    reason = triton_unavailable_reason(hidden.device)
    if reason is not None:
        raise RuntimeError(f"token log-probs backend 'triton' cannot run: {reason}")
    lead = targets.shape
    out = _TritonTokenLogprobs.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1).long().contiguous(),
        float(temperature), int(chunk_size), bool(with_entropy),
    )
    if with_entropy:
        return out[0].reshape(lead), out[1].reshape(lead)
    return out.reshape(lead)
