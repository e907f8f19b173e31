"""Chunked token log-probs (rlhf.kernels.logprobs) against the naive formula.

Run: .venv/bin/pytest tests/unit/test_logprobs_kernel.py -q   (the CUDA test skips without a GPU)
"""

import logging
import math

import pytest
import torch

import rlhf.kernels as lp_mod  # the backend selector lives in the package
from rlhf.kernels import naive_token_logprobs, select_backend, token_logprobs

# fp32 chunked vs fp32 naive: same math, different summation order.
FP32_TOL = dict(atol=1e-5, rtol=1e-5)
# Grads sum over V (hidden) or N (weight) terms; fp32 reordering costs a little more.
FP32_GRAD_TOL = dict(atol=5e-5, rtol=1e-4)


def _inputs(n, h, v, *, dtype=torch.float32, bias=False, device="cpu", seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)
    # Logits of order 1-3, like a trained LM head; targets uniform over the vocabulary.
    hidden = torch.randn(*(lead or (n,)), h, generator=g)
    weight = torch.randn(v, h, generator=g) * (2.0 / math.sqrt(h))
    b = torch.randn(v, generator=g) if bias else None
    targets = torch.randint(0, v, tuple(lead or (n,)), generator=g)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype).requires_grad_()
    return cast(hidden), cast(weight), cast(b), targets.to(device)


def _run(fn, hidden, weight, targets, bias, *, with_entropy, **kw):
    """Forward + backward of a random weighted sum; returns values and grads."""
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    out = fn(hidden, weight, targets, bias=bias, with_entropy=with_entropy, **kw)
    logp, ent = out if with_entropy else (out, None)
    g = torch.Generator().manual_seed(1)
    loss = (logp * torch.randn(logp.shape, generator=g).to(logp)).sum()
    if with_entropy:
        loss = loss + (ent * torch.randn(ent.shape, generator=g).to(ent)).sum()
    loss.backward()
    grads = [None if t is None else t.grad.clone() for t in (hidden, weight, bias)]
    return logp.detach(), None if ent is None else ent.detach(), grads


def _compare(a, b, tol, gtol):
    (lp_a, ent_a, grads_a), (lp_b, ent_b, grads_b) = a, b
    torch.testing.assert_close(lp_a, lp_b, **tol)
    if ent_a is not None:
        torch.testing.assert_close(ent_a, ent_b, **tol)
    for ga, gb in zip(grads_a, grads_b):
        if ga is not None:
            torch.testing.assert_close(ga, gb, **gtol)


@pytest.mark.parametrize(
    "n,h,v,chunk",
    [
        (37, 16, 50, 8),     # N not divisible by the chunk
        (5, 8, 13, 64),      # chunk larger than N: a single block
        (64, 16, 97, 16),    # exact division
        (7, 4, 3, 1),        # one row per block
    ],
)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_chunked_matches_naive_fp32(n, h, v, chunk, temperature, bias, with_entropy):
    hid, w, b, y = _inputs(n, h, v, bias=bias)
    kw = dict(temperature=temperature, with_entropy=with_entropy)
    got = _run(token_logprobs, hid, w, y, b, chunk_size=chunk, **kw)
    want = _run(naive_token_logprobs, hid, w, y, b, **kw)
    assert got[0].dtype == torch.float32
    _compare(got, want, FP32_TOL, FP32_GRAD_TOL)


def test_leading_dims_are_flattened_and_restored():
    hid, w, _, y = _inputs(0, 16, 40, lead=(3, 11))
    logp, ent = token_logprobs(hid, w, y, chunk_size=4, with_entropy=True)
    assert logp.shape == ent.shape == (3, 11)
    want_lp, want_ent = naive_token_logprobs(hid, w, y, with_entropy=True)
    torch.testing.assert_close(logp, want_lp, **FP32_TOL)
    torch.testing.assert_close(ent, want_ent, **FP32_TOL)


def _check_bf16_against_fp32(device, n, h, v, chunk):
    """bf16 hidden/weight vs the fp32 formula on the *same* (bf16-representable) values.

    What is left is bf16 rounding: of the GEMM output where it is rounded (CPU, and the
    naive path everywhere), and of the grads, which autograd returns in bf16. Logits of
    size ~3 round by up to 3 * 2^-9 ~ 6e-3 each, which moves log-probs and entropies by
    ~2e-2 at V=1000 (measured: 0.024 on CPU, same for naive); grads by ~1 % of their
    largest entry. The chunked path must also be no less accurate than the naive one.
    """
    hid, w, b, y = _inputs(n, h, v, dtype=torch.bfloat16, bias=True, device=device)
    ref = [t.detach().float().requires_grad_() for t in (hid, w, b)]
    kw = dict(temperature=0.9, with_entropy=True)
    want = _run(naive_token_logprobs, ref[0], ref[1], y, ref[2], **kw)
    got = _run(token_logprobs, hid, w, y, b, chunk_size=chunk, **kw)
    naive = _run(naive_token_logprobs, hid, w, y, b, **kw)
    assert got[0].dtype == torch.float32 and got[2][0].dtype == torch.bfloat16
    for i in (0, 1):  # log-probs, entropies
        err = (got[i] - want[i]).abs().max().item()
        assert err <= 4e-2, err
        assert err <= 1.1 * (naive[i] - want[i]).abs().max().item() + 1e-4
    for g, r in zip(got[2], want[2]):  # d/d hidden, weight, bias
        err, scale = (g.float() - r).abs().max().item(), r.abs().max().item()
        assert err <= 1e-2 * scale, (err, scale)


def test_bf16_inputs_against_fp32_reference():
    _check_bf16_against_fp32("cpu", n=256, h=64, v=1000, chunk=48)


def test_gradcheck_float64():
    # Finite differences on the autograd.Function itself, entropy included.
    hid, w, b, y = _inputs(6, 3, 5, dtype=torch.float64, bias=True)

    def f(hid, w, b):
        logp, ent = token_logprobs(hid, w, y, bias=b, temperature=0.8, chunk_size=4, with_entropy=True)
        return logp, ent

    assert torch.autograd.gradcheck(f, (hid, w, b))


def test_hand_checked_two_token_case():
    # H=1, h=1, W=[[ln 3], [0]] -> logits [ln 3, 0] -> p = [3/4, 1/4], target 0:
    #   logp_0 = ln(3/4) = -0.28768
    #   H = -(3/4 ln 3/4 + 1/4 ln 1/4) = ln 4 - (3/4) ln 3 = 0.56233
    #   d logp_0 / dz = onehot - p = [1/4, -1/4]; dz_v/dW_v = h = 1  =>  dW = [[1/4], [-1/4]]
    #   d logp_0 / dh = sum_v (onehot - p)_v W_v = (1/4) ln 3 = 0.27465
    #   d H / dz = -p (log p + H): z_0: -(3/4)(ln 3/4 + H) = -(3/4)(1/4) ln 3 = -(3/16) ln 3
    #                              z_1: -(1/4)(ln 1/4 + H) = +(3/16) ln 3
    h = torch.tensor([[1.0]], requires_grad=True)
    w = torch.tensor([[math.log(3.0)], [0.0]], requires_grad=True)
    y = torch.tensor([0])
    logp, ent = token_logprobs(h, w, y, with_entropy=True)
    torch.testing.assert_close(logp, torch.tensor([math.log(0.75)]))
    torch.testing.assert_close(ent, torch.tensor([math.log(4.0) - 0.75 * math.log(3.0)]))
    logp.sum().backward(retain_graph=True)  # the entropy backward below reuses the graph
    torch.testing.assert_close(w.grad, torch.tensor([[0.25], [-0.25]]))
    torch.testing.assert_close(h.grad, torch.tensor([[0.25 * math.log(3.0)]]))
    w.grad = None
    ent.sum().backward()
    c = 3.0 / 16.0 * math.log(3.0)
    torch.testing.assert_close(w.grad, torch.tensor([[-c], [c]]))

    # Equal logits [0, 0]: logp = -ln 2 whatever the target, H = ln 2 (the maximum for V=2).
    logp, ent = token_logprobs(torch.ones(1, 1), torch.zeros(2, 1), torch.tensor([1]), with_entropy=True)
    torch.testing.assert_close(logp, torch.tensor([-math.log(2.0)]))
    torch.testing.assert_close(ent, torch.tensor([math.log(2.0)]))


def _find_node(fn, name):
    """Depth-first search of the autograd graph for the node whose class is ``name``."""
    stack = [fn]
    while stack:
        node = stack.pop()
        if type(node).__name__ == name:
            return node
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    raise AssertionError(f"no {name} node in the graph")


@pytest.mark.parametrize("chunk", [64, 16])
def test_forward_saves_no_n_by_v_tensor(chunk):
    # N=64 > H=8, so the saved weight [V, H] is smaller than one [N, V] block. With chunk=N a
    # single block of logits is N*V elements: saving it (or stashing it on ctx) fails here.
    n, h, v = 64, 8, 50
    hid, w, b, y = _inputs(n, h, v, bias=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp, ent = token_logprobs(hid, w, y, bias=b, chunk_size=chunk, with_entropy=True)
    assert saved, "the hook saw no saved tensors: the test is not observing the Function"
    assert max(saved) < n * v
    # Total saved = inputs + two [N] vectors; a list of per-chunk logits would exceed it.
    assert sum(saved) <= hid.numel() + w.numel() + b.numel() + y.numel() + 2 * n
    # Tensors stashed as ctx attributes bypass the hook: inspect the Function's node too.
    node = _find_node(logp.grad_fn, "_ChunkedTokenLogprobsBackward")
    stashed = [x for x in vars(node).values() if isinstance(x, torch.Tensor)]
    assert all(x.numel() < n * v for x in stashed)
    (logp.sum() + ent.sum()).backward()  # and it still differentiates


def test_select_backend(caplog, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert select_backend("reference") is token_logprobs
    assert select_backend("reference", "cuda") is token_logprobs  # no device check for the reference
    lp_mod._log_choice.cache_clear()
    with caplog.at_level(logging.INFO, logger=lp_mod.__name__):
        assert select_backend("auto", "cpu") is token_logprobs
        assert select_backend("auto", torch.device("cpu")) is token_logprobs
    chosen = [r for r in caplog.records if "Triton" in r.getMessage()]
    assert len(chosen) == 1, "the choice must be logged, once"
    assert "reference" in chosen[0].getMessage()
    assert chosen[0].levelno == logging.INFO  # on a CPU "auto" means the reference: the plan, not a fallback
    caplog.clear()
    monkeypatch.setattr(lp_mod, "triton_unavailable_reason", lambda device: "triton is not installed")
    with caplog.at_level(logging.INFO, logger=lp_mod.__name__):
        assert select_backend("auto", "cuda") is token_logprobs  # a CUDA device without the kernel: a fallback
    fallback = [r for r in caplog.records if "Triton" in r.getMessage()]
    assert len(fallback) == 1 and fallback[0].levelno == logging.WARNING
    assert "triton is not installed" in fallback[0].getMessage()
    with pytest.raises(RuntimeError, match="triton"):
        select_backend("triton", "cpu")
    with pytest.raises(ValueError, match="unknown"):
        select_backend("fast")


def test_default_backend_from_environment(monkeypatch):
    monkeypatch.delenv(lp_mod.BACKEND_ENV, raising=False)
    assert lp_mod.default_backend() == "auto"
    monkeypatch.setenv(lp_mod.BACKEND_ENV, "Reference")
    assert lp_mod.default_backend() == "reference"
    monkeypatch.setenv(lp_mod.BACKEND_ENV, "fastest")
    with pytest.raises(ValueError, match="RLHF_LOGPROB_BACKEND"):
        lp_mod.default_backend()


def test_rejects_mismatched_inputs():
    hid, w, _, y = _inputs(4, 8, 10)
    with pytest.raises(ValueError, match="dtypes"):
        token_logprobs(hid.double(), w, y)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(hid, w, y[:3])
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(hid, w, y, temperature=0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("with_entropy", [False, True])
def test_chunked_matches_naive_cuda(with_entropy):
    kw = dict(temperature=0.7, with_entropy=with_entropy)
    hid, w, b, y = _inputs(1000, 64, 3001, bias=True, device="cuda")
    got = _run(token_logprobs, hid, w, y, b, chunk_size=256, **kw)
    want = _run(naive_token_logprobs, hid, w, y, b, **kw)
    # TF32 may be on for fp32 GEMMs on CUDA; tolerances allow for it.
    _compare(got, want, dict(atol=2e-3, rtol=2e-3), dict(atol=2e-2, rtol=2e-2))

    # bf16: here the chunked GEMM keeps its fp32 accumulator (out_dtype), naive rounds.
    _check_bf16_against_fp32("cuda", n=1000, h=64, v=3001, chunk=256)
