"""The fused Triton token log-prob kernel (rlhf.kernels.logprobs_triton) against fp32 math.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1: CPU tensors,
numpy) on small shapes that still cover every masked edge: rows not a multiple of the
row block, a vocabulary split into several tiles and two splits, H over two K steps.
Skipped cleanly when triton is not importable. The `gpu` tests run the compiled kernels
at realistic sizes in bf16 (tolerance 1e-3 on log-probs and entropies).

Run: .venv/bin/pytest tests/unit/test_logprobs_triton.py -q
"""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from rlhf.kernels import naive_token_logprobs, select_backend, token_logprobs, triton_token_logprobs

# find_spec, not an import: importing triton here would fix its interpreter setting.
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _inputs(n, h, v, *, dtype=torch.float32, bias=False, device="cpu", seed=0, lead=None, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*(lead or (n,)), h, generator=g)
    weight = torch.randn(v, h, generator=g) * (scale / math.sqrt(h))  # logits of order 1-3
    b = torch.randn(v, generator=g) if bias else None
    targets = torch.randint(0, v, tuple(lead or (n,)), generator=g)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return cast(hidden), cast(weight), cast(b), targets.to(device)


def _run(fn, hidden, weight, targets, bias, *, logp_grad=True, with_entropy=True, **kw):
    """Forward, then backward of a random weighted sum of the outputs; values and grads."""
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    out = fn(hidden, weight, targets, bias=bias, with_entropy=with_entropy, **kw)
    logp, ent = out if with_entropy else (out, None)
    g = torch.Generator().manual_seed(1)
    w_lp = torch.randn(logp.shape, generator=g).to(logp.device)
    w_ent = torch.randn(logp.shape, generator=g).to(logp.device)
    loss = (logp * w_lp).sum() if logp_grad else 0.0
    if ent is not None:
        loss = loss + (ent * w_ent).sum()
    loss.backward()
    grads = [None if t is None else t.grad.detach().float() for t in (hidden, weight, bias)]
    return logp.detach(), None if ent is None else ent.detach(), grads


def _reference(hidden, weight, targets, bias, **kw):
    """The fp32 formula on the same (possibly half-precision-representable) values."""
    ref = [None if t is None else t.detach().float().requires_grad_() for t in (hidden, weight, bias)]
    return _run(naive_token_logprobs, ref[0], ref[1], targets, ref[2], **kw)


def _assert_close(got, want, *, atol, grad_rtol):
    (lp, ent, grads), (lp_r, ent_r, grads_r) = got, want
    assert lp.dtype == torch.float32
    assert (lp - lp_r).abs().max().item() <= atol
    if ent_r is not None:
        assert (ent - ent_r).abs().max().item() <= atol
    for g, r in zip(grads, grads_r):
        if r is not None:  # grads relative to their largest entry (bf16/fp16 grads round)
            err, scale = (g - r).abs().max().item(), r.abs().max().item()
            assert err <= grad_rtol * scale, (err, scale)


# ---- without a GPU: imports, selection, and the interpreter -------------------------------

def test_imports_and_falls_back_without_triton():
    # A fresh interpreter where `import triton` fails: the package still imports, 'auto'
    # falls back (and says why), 'triton' raises with the reason.
    code = textwrap.dedent("""
        import sys; sys.modules["triton"] = None
        import logging; logging.basicConfig(level=logging.INFO, format="%(message)s")
        from rlhf.kernels import select_backend, token_logprobs
        from rlhf.kernels.logprobs_triton import triton_unavailable_reason
        assert "not importable" in triton_unavailable_reason("cuda")
        assert select_backend("auto", "cuda") is token_logprobs
        try:
            select_backend("triton", "cuda")
        except RuntimeError as e:
            print("raised:", e)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "raised:" in res.stdout and "not importable" in res.stdout
    assert "chunked PyTorch reference" in res.stderr and "not importable" in res.stderr


@needs_triton
def test_select_backend_with_interpreter(interpret):
    assert select_backend("triton", "cpu") is triton_token_logprobs
    assert select_backend("auto", "cpu") is token_logprobs  # auto: Triton on CUDA only


# The interpreter must be on before triton is first imported (triton.language's own jitted
# helpers, e.g. tl.zeros, are decorated then), and pytest may have imported triton already:
# the kernels run in a fresh interpreter process, all cases in one (~3 s of start-up).
_WORKER = textwrap.dedent("""
    import json, math, os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from rlhf.kernels import naive_token_logprobs, triton_token_logprobs

    def inputs(n, h, v, dtype, bias, lead=None):
        g = torch.Generator().manual_seed(0)
        shape = lead or (n,)
        hid = torch.randn(*shape, h, generator=g)
        w = torch.randn(v, h, generator=g) * (2.0 / math.sqrt(h))
        b = torch.randn(v, generator=g) if bias else None
        y = torch.randint(0, v, shape, generator=g)
        cast = lambda t: None if t is None else t.to(dtype).requires_grad_()
        return cast(hid), cast(w), cast(b), y

    def run(fn, hid, w, b, y, logp_grad, **kw):
        for t in (hid, w, b):
            if t is not None:
                t.grad = None
        out = fn(hid, w, y, bias=b, **kw)
        lp, ent = out if kw["with_entropy"] else (out, None)
        g = torch.Generator().manual_seed(1)
        wl, we = torch.randn(lp.shape, generator=g), torch.randn(lp.shape, generator=g)
        loss = (lp * wl).sum() if logp_grad else 0.0
        if ent is not None:
            loss = loss + (ent * we).sum()
        loss.backward()
        return lp.detach(), ent, [None if t is None else t.grad.float() for t in (hid, w, b)]

    def errors(case, dtype, bias, logp_grad, **kw):
        # N=37: two row blocks of 32 (one partial); V=300: five 64-wide tiles in two
        # splits; H=40: two K steps of 32 (one partial); chunk 16: three backward chunks.
        hid, w, b, y = inputs(37, 40, 300, dtype, bias)
        got = run(triton_token_logprobs, hid, w, b, y, logp_grad, chunk_size=16, **kw)
        ref = [None if t is None else t.detach().float().requires_grad_() for t in (hid, w, b)]
        want = run(naive_token_logprobs, ref[0], ref[1], ref[2], y, logp_grad, **kw)
        out = {"dtype": str(got[0].dtype), "logp": (got[0] - want[0]).abs().max().item()}
        if want[1] is not None:
            out["entropy"] = (got[1] - want[1]).abs().max().item()
        out["grads_rel"] = [None if r is None else ((g - r).abs().max() / r.abs().max()).item()
                            for g, r in zip(got[2], want[2])]
        return out

    res = {
        "bias_temp_entropy": errors(0, torch.float32, True, True, temperature=0.7, with_entropy=True),
        "logp_only": errors(1, torch.float32, False, True, with_entropy=False),
        "entropy_grad_only": errors(2, torch.float32, False, False, temperature=0.7, with_entropy=True),
        "fp16": errors(3, torch.float16, True, True, temperature=1.3, with_entropy=True),
    }
    # Leading dims restored; autograd keeps inputs and two [N] vectors, never [N, V].
    hid, w, _, y = inputs(0, 16, 200, torch.float32, False, lead=(3, 11))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        lp, ent = triton_token_logprobs(hid, w, y, with_entropy=True)
    res["saved"] = {"shape": list(lp.shape), "max": max(saved), "total": sum(saved),
                    "budget": hid.numel() + w.numel() + y.numel() + 2 * 33, "nv": 33 * 200}
    print(json.dumps(res))
""")


@pytest.fixture(scope="module")
def interpreter_results():
    res = subprocess.run([sys.executable, "-c", _WORKER], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@needs_triton
@pytest.mark.parametrize("case", ["bias_temp_entropy", "logp_only", "entropy_grad_only", "fp16"])
def test_interpreter_matches_fp32_reference(interpreter_results, case):
    r = interpreter_results[case]
    assert r["dtype"] == "torch.float32"
    assert r["logp"] <= 2e-5 and r.get("entropy", 0.0) <= 2e-5, r
    # float32 grads agree to float32 rounding; fp16 grads are rounded to fp16 (2^-11).
    grad_tol = 2e-3 if case == "fp16" else 2e-5
    assert all(g is None or g <= grad_tol for g in r["grads_rel"]), r
    assert (r["grads_rel"][2] is None) == (case not in ("bias_temp_entropy", "fp16"))


@needs_triton
def test_interpreter_shapes_and_saved_tensors(interpreter_results):
    r = interpreter_results["saved"]
    assert r["shape"] == [3, 11]
    assert r["max"] < r["nv"] and r["total"] <= r["budget"], r


def test_rejects_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hid, w, _, y = _inputs(4, 8, 10)
    with pytest.raises((RuntimeError, ValueError), match="triton|Triton"):
        triton_token_logprobs(hid, w, y)


# ---- on a GPU: compiled kernels, bf16, realistic sizes -------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bias,with_entropy", [(False, True), (True, True), (False, False)])
def test_gpu_bf16_matches_fp32_reference(bias, with_entropy):
    # N and V not multiples of any tile; logits of order 1-3 as from a trained LM head.
    hid, w, b, y = _inputs(4093, 512, 32003, dtype=torch.bfloat16, bias=bias, device="cuda")
    kw = dict(temperature=0.7, with_entropy=with_entropy)
    got = _run(triton_token_logprobs, hid, w, y, b, chunk_size=1024, **kw)
    want = _reference(hid, w, y, b, **kw)
    # Log-probs and entropies: fp32 logits throughout, so far inside 1e-3 (bf16 logits
    # would be ~1e-2 off here). Grads come back in bf16: ~1 % of their largest entry.
    _assert_close(got, want, atol=1e-3, grad_rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fp32_and_auto_selection():
    assert select_backend("auto", "cuda") is triton_token_logprobs
    hid, w, b, y = _inputs(1000, 64, 3001, bias=True, device="cuda")
    kw = dict(temperature=1.3, with_entropy=True)
    got = _run(triton_token_logprobs, hid, w, y, b, chunk_size=300, **kw)
    want = _run(token_logprobs, hid, w, y, b, chunk_size=256, **kw)
    # IEEE fp32 dots in the kernel; the reference's fp32 GEMM may use TF32 if enabled.
    _assert_close(got, want, atol=2e-3, grad_rtol=2e-3)
    empty = triton_token_logprobs(hid[:0], w, y[:0], with_entropy=True)
    assert empty[0].shape == empty[1].shape == (0,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_forward_memory_is_independent_of_vocab():
    hid, w, _, y = _inputs(8192, 256, 65536, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():  # warm-up: compiling and any autotuning (its timing buffers) happen here
        triton_token_logprobs(hid, w, y, with_entropy=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        triton_token_logprobs(hid, w, y, with_entropy=True)
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 8192 * 4 * 64, extra  # a few [S, N] fp32 vectors; logits would be 2 GiB
