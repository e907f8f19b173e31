"""Triton kernels behind ``rlhf.kernels.logprobs_triton`` (imports triton at module level).

Only ``logprobs_triton`` imports this module, and only after checking that triton imports;
nothing else should. The math is the chunked reference's (``rlhf.kernels.logprobs``):

    z      = (h @ W.T + b) / T          computed one [BLOCK_N, BLOCK_V] tile at a time
    lse    = logsumexp_v z,  logp_y = z_y - lse,  H = -sum_v p_v log p_v

Forward (``fwd_kernel``): a program owns BLOCK_N rows and one *split* of the vocabulary
tiles. It keeps, per row and in float32, the online-softmax state over the tiles it has
seen: the running max m, s = sum exp(z - m), t = sum exp(z - m) (z - m) (for the entropy)
and z_y. When m grows to m', old terms rescale by a = exp(m - m'):
    s' = a s + sum exp(z - m'),   t' = a (t + (m - m') s) + sum exp(z - m') (z - m').
Each split writes its partial (m, s, t, z_y); the wrapper merges splits with the same rule
(a handful of [S, N] float32 vectors). Then lse = m + log s and H = log s - t / s: both use
logits relative to the max, so no large terms cancel. The logits stay in the GEMM's fp32
accumulator through the softmax (never rounded to bf16): that is what keeps the log-probs
within ~1e-5 of an fp32 reference, where bf16 logits cost up to ~0.0075.

Splitting the vocabulary gives enough programs to fill the GPU when N is small; programs
of one split run side by side over the same W tiles, so those tiles are reused from L2.

Backward (``grad_logits_kernel``): for a block of rows, recomputes each logit tile from h,
W and the saved lse and writes dL/d(h W^T + b) for it, in the input dtype:
    d logp_y / dz_j = 1[j = y] - p_j;   d H / dz_j = -p_j (log p_j + H);   dz/ds = 1 / T.
The two GEMMs that remain (dL/dh = G W, dL/dW = G^T h) go to cuBLAS in the wrapper.

Masked columns (j >= V) get z = -1e30, a finite stand-in for -inf: exp() of it is 0 and
0 * (-1e30) is 0, where -inf would give NaN in the t update.
"""
from __future__ import annotations

import functools
import os

import triton
import triton.language as tl

_NEG = tl.constexpr(-1e30)  # a global read inside @triton.jit must be a constexpr


def fwd_kernel(
    H, W, Bias, Y, M_out, S_out, T_out, ZY_out,
    N, V, K, stride_hn, stride_hk, stride_wv, stride_wk, inv_temp, num_splits,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows64 = rows.to(tl.int64)  # int64 offsets: V x H or N x H may pass 2^31 elements
    row_ok = rows < N
    y = tl.load(Y + rows, mask=row_ok, other=-1)
    m = tl.full([BLOCK_N], _NEG, tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    t = tl.zeros([BLOCK_N], tl.float32)
    zy = tl.zeros([BLOCK_N], tl.float32)
    n_tiles = tl.cdiv(V, BLOCK_V)
    per_split = tl.cdiv(n_tiles, num_splits)
    first = pid_s * per_split
    last = tl.minimum(first + per_split, n_tiles)
    for tile in range(first, last):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        cols64 = cols.to(tl.int64)
        col_ok = cols < V
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            h = tl.load(H + rows64[:, None] * stride_hn + ks[None, :] * stride_hk,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(W + cols64[None, :] * stride_wv + ks[:, None] * stride_wk,  # [BLOCK_K, BLOCK_V]
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if IEEE:  # float32 inputs: no TF32 rounding, so results match the fp32 reference
                acc = tl.dot(h, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(h, w, acc)
        if HAS_BIAS:
            acc += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        z = tl.where(col_ok[None, :], acc * inv_temp, _NEG)
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        a = tl.exp(m - m_new)
        d = z - m_new[:, None]
        e = tl.exp(d)
        if WITH_ENTROPY:
            t = a * (t + (m - m_new) * s) + tl.sum(e * d, axis=1)
        s = a * s + tl.sum(e, axis=1)
        m = m_new
    out = pid_s.to(tl.int64) * N + rows64
    tl.store(M_out + out, m, mask=row_ok)
    tl.store(S_out + out, s, mask=row_ok)
    tl.store(ZY_out + out, zy, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(T_out + out, t, mask=row_ok)


def grad_logits_kernel(
    H, W, Bias, Y, LSE, ENT, GLOGP, GENT, G,
    N, V, K, stride_hn, stride_hk, stride_wv, stride_wk, stride_gn, stride_gv, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_GLOGP: tl.constexpr, HAS_GENT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
):
    # Grouped program order (as in Triton's matmul tutorial): GROUP_N row blocks sweep the
    # vocabulary together, so each W tile is read from DRAM once per group, not per block.
    pid = tl.program_id(0)
    blocks_n = tl.cdiv(N, BLOCK_N)
    blocks_v = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * blocks_v
    first_n = (pid // per_group) * GROUP_N
    group_n = tl.minimum(blocks_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_n
    pid_v = (pid % per_group) // group_n

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)
    row_ok = rows < N
    col_ok = cols < V
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        h = tl.load(H + rows64[:, None] * stride_hn + ks[None, :] * stride_hk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W + cols64[None, :] * stride_wv + ks[:, None] * stride_wk,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(h, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(h, w, acc)
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    logp = acc * inv_temp - lse[:, None]
    p = tl.exp(logp)
    g = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    if HAS_GLOGP:
        gl = tl.load(GLOGP + rows, mask=row_ok, other=0.0)
        y = tl.load(Y + rows, mask=row_ok, other=-1)
        g += tl.where(cols[None, :] == y[:, None], gl[:, None], 0.0) - p * gl[:, None]
    if HAS_GENT:
        ge = tl.load(GENT + rows, mask=row_ok, other=0.0)
        ent = tl.load(ENT + rows, mask=row_ok, other=0.0)
        g -= ge[:, None] * p * (logp + ent[:, None])
    g = g * inv_temp
    tl.store(G + rows64[:, None] * stride_gn + cols64[None, :] * stride_gv, g.to(G.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _configs(group: bool, autotune: bool) -> list:
    """A small autotuning space of tensor-core friendly tiles for Hopper/Ampere GEMMs; the
    first is the one used with autotuning off."""
    out = []
    shapes = ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 8, 3), (128, 128, 64, 4, 4))
    for bn, bv, bk, warps, stages in shapes if autotune else shapes[:1]:
        kw = dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk)
        if group:
            kw["GROUP_N"] = 8
        out.append(triton.Config(kw, num_warps=warps, num_stages=stages))
    return out


# The interpreter (TRITON_INTERPRET=1, CPU tensors, numpy) needs tl.dot tiles >= 16; small
# tiles keep its per-program Python loop short. One config: nothing to tune there.
INTERPRET_BLOCKS = dict(BLOCK_N=32, BLOCK_V=64, BLOCK_K=32)
INTERPRET_GROUP = 2


@functools.cache
def compiled(interpret: bool):
    """(fwd, grad_logits) as launchable kernels: autotuned JIT on GPUs, plain interpreted
    functions under TRITON_INTERPRET=1 (triton.jit reads that variable when it decorates,
    which is why decoration happens here and not at import)."""
    fwd, bwd = triton.jit(fwd_kernel), triton.jit(grad_logits_kernel)
    if interpret:
        return fwd, bwd
    # RLHF_TRITON_AUTOTUNE=0: one config, no tuning (GPU correctness tests: compiling and
    # timing every config for every flag combination would dominate their run time).
    tune = os.environ.get("RLHF_TRITON_AUTOTUNE", "1") != "0"
    # Key: shapes that change the best tile, and the flags that change the kernel body.
    fwd = triton.autotune(_configs(False, tune), key=["V", "K", "HAS_BIAS", "WITH_ENTROPY", "IEEE"])(fwd)
    bwd = triton.autotune(_configs(True, tune), key=["V", "K", "HAS_BIAS", "HAS_GLOGP", "HAS_GENT", "IEEE"])(bwd)
    return fwd, bwd
