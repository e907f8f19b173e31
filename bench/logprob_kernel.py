"""Benchmark: token log-probs naive vs chunked vs torch.compile vs Triton, side by side.

For each variant: forward time (no grad, as the reference actor and old-log-prob passes
run it), forward+backward time (of the summed log-probs, plus the summed entropy with
--entropy), extra peak memory of each above the inputs, and the largest |difference|
of log-probs and entropies from an fp32 reference computed from the same values. The
issue's goals are printed in the last row (fwd <= 8 ms, <= 512 MiB extra, error < 1e-3
at N=16,384, H=896, V=151,936, bf16).

On a GPU (the issue's shape is the default there; needs `rlhf` importable, e.g. the shim
in bench/gpu_check.sh or an editable install):
    python bench/logprob_kernel.py                     # + --entropy, --no-compile, --repeats
On one CPU machine it still runs: a small shape, the PyTorch variants only, and a line
saying why Triton is not measured (about 20 s on 2 cores):
    .venv/bin/python bench/logprob_kernel.py
Times are medians after one warm-up call (which includes Triton's autotuning and
torch.compile's compilation; their time is printed separately). CPU memory is not
measured here (bench/bench_logprobs.py does that, per subprocess).
"""
from __future__ import annotations

import argparse
import time

import torch

from rlhf.kernels.logprobs import naive_token_logprobs, token_logprobs
from rlhf.kernels.logprobs_triton import triton_token_logprobs, triton_unavailable_reason

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIB = 2**20
GOALS = {"fwd_ms": 8.0, "fwd_mib": 512.0, "dlogp": 1e-3}
GPU_SHAPE = dict(n=16384, hidden=896, vocab=151936, dtype="bf16", chunk=2048)
CPU_SHAPE = dict(n=1024, hidden=128, vocab=8192, dtype="fp32", chunk=256)


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--n", type=int, help="tokens (default: 16384 on CUDA, 1024 on CPU)")
    p.add_argument("--hidden", type=int, help="hidden size H (default: 896 / 128)")
    p.add_argument("--vocab", type=int, help="vocabulary V (default: 151936 / 8192)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--chunk", type=int, help="rows per block: chunked variants, Triton backward (2048 / 256)")
    p.add_argument("--repeats", type=int, help="timed runs (default 10 on CUDA, 2 on CPU)")
    p.add_argument("--entropy", action="store_true", help="also compute and differentiate the entropy")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--temperature", type=float, default=1.0)
    args = p.parse_args(argv)
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    defaults = GPU_SHAPE if args.device == "cuda" else CPU_SHAPE
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.repeats = args.repeats or (10 if args.device == "cuda" else 2)
    return args


def _compiled_chunked():
    """torch.compile of the chunked formula: one compiled graph per [chunk, V] block
    (logits in fp32, log_softmax, gather, entropy), the loop over blocks in Python."""
    @torch.compile(dynamic=False)
    def block(h, w, y, temperature: float):
        logp = torch.log_softmax((h @ w.t()).float() / temperature, dim=-1)
        return logp.gather(-1, y[:, None])[:, 0], -(logp.exp() * logp).sum(-1)

    def fn(hidden, weight, targets, *, bias=None, temperature=1.0, chunk_size=2048, with_entropy=False):
        n = hidden.shape[0]
        # dynamic=False: a last, shorter block compiles a second graph (none at 16,384 / 2,048).
        parts = [block(hidden[s:s + chunk_size], weight, targets[s:s + chunk_size], temperature)
                 for s in range(0, n, chunk_size)]
        logp = torch.cat([p[0] for p in parts])
        return (logp, torch.cat([p[1] for p in parts])) if with_entropy else logp

    return fn


def _variants(args) -> tuple[dict, list[str]]:
    out = {"naive": naive_token_logprobs, "chunked": token_logprobs}
    notes = []
    if args.device == "cuda" and not args.no_compile:
        out["chunked+compile"] = _compiled_chunked()
    reason = triton_unavailable_reason(torch.device(args.device))
    if reason is None:
        out["triton"] = triton_token_logprobs
    else:
        notes.append(f"triton: not measured ({reason})")
    return out, notes


def _inputs(args):
    g = torch.Generator().manual_seed(0)
    dt = DTYPES[args.dtype]
    hidden = torch.randn(args.n, args.hidden, generator=g, dtype=dt)
    # Logits of order 1-3, like a trained LM head.
    weight = torch.randn(args.vocab, args.hidden, generator=g, dtype=dt).mul_(2.0 / args.hidden**0.5)
    targets = torch.randint(0, args.vocab, (args.n,), generator=g)
    return hidden.to(args.device), weight.to(args.device), targets.to(args.device)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _call(fn, args, hidden, weight, targets, backward: bool):
    hidden.requires_grad_(backward)
    weight.requires_grad_(backward)
    hidden.grad = weight.grad = None
    with torch.set_grad_enabled(backward):
        out = fn(hidden, weight, targets, temperature=args.temperature, chunk_size=args.chunk,
                 with_entropy=args.entropy)
        logp, ent = out if args.entropy else (out, None)
        if backward:
            (logp.sum() + (ent.sum() if ent is not None else 0)).backward()
    return logp.detach(), None if ent is None else ent.detach()


def _measure(fn, args, inputs, backward: bool) -> dict:
    """Warm-up (timed separately), then median time and extra peak memory (CUDA)."""
    _sync(args.device)
    t0 = time.perf_counter()
    _call(fn, args, *inputs, backward)
    _sync(args.device)
    first = time.perf_counter() - t0
    inputs[0].grad = inputs[1].grad = None
    if args.device == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        _sync(args.device)
        t0 = time.perf_counter()
        _call(fn, args, *inputs, backward)
        _sync(args.device)
        times.append(time.perf_counter() - t0)
    mib = (torch.cuda.max_memory_allocated() - base) / MIB if args.device == "cuda" else float("nan")
    inputs[0].grad = inputs[1].grad = None
    return {"ms": sorted(times)[len(times) // 2] * 1e3, "mib": mib, "first_s": first}


def _reference(args, inputs):
    """fp32 log-probs and entropies of the same values (chunked, so it fits at any size;
    fp32 GEMMs, TF32 off)."""
    hidden, weight, targets = inputs
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        return token_logprobs(hidden.float(), weight.float(), targets, temperature=args.temperature,
                              chunk_size=1024, with_entropy=True)


def _row(name, fn, args, inputs, ref) -> dict:
    fwd, fwd_bwd = _measure(fn, args, inputs, False), _measure(fn, args, inputs, True)
    with torch.no_grad():
        logp, ent = fn(*inputs, temperature=args.temperature, chunk_size=args.chunk, with_entropy=True)
    return {"fwd_ms": fwd["ms"], "fwd_mib": fwd["mib"], "fwd_bwd_ms": fwd_bwd["ms"], "fwd_bwd_mib": fwd_bwd["mib"],
            "dlogp": (logp.float() - ref[0]).abs().max().item(), "dent": (ent.float() - ref[1]).abs().max().item(),
            "first_s": fwd["first_s"] + fwd_bwd["first_s"]}


COLS = [("fwd_ms", "fwd ms"), ("fwd_mib", "fwd MiB"), ("fwd_bwd_ms", "fwd+bwd ms"), ("fwd_bwd_mib", "fwd+bwd MiB"),
        ("dlogp", "max|dlogp|"), ("dent", "max|dH|"), ("first_s", "warm-up s")]


def _fmt(col, value) -> str:
    if value != value:  # NaN: not measured
        return f"{'n/a':>13}"
    return f"{value:13.2e}" if col.startswith("d") else f"{value:13,.1f}"


def _print(args, rows, notes, device_name):
    flops = 2 * args.n * args.hidden * args.vocab
    print(f"token log-probs: N={args.n} H={args.hidden} V={args.vocab} dtype={args.dtype} chunk={args.chunk} "
          f"T={args.temperature} entropy={args.entropy} repeats={args.repeats} (median) on {device_name}")
    print(f"GEMM h@W^T: {flops / 1e9:,.1f} GFLOP forward; [N,V] fp32 logits would be "
          f"{args.n * args.vocab * 4 / MIB:,.0f} MiB. Memory: peak allocated above the inputs (CUDA).")
    print(f"errors: vs fp32 log-probs/entropies of the same {args.dtype} values (entropy always computed for it)")
    print(f"{'variant':<17}" + "".join(f"{h:>13}" for _, h in COLS))
    for name, row in rows.items():
        print(f"{name:<17}" + "".join(_fmt(c, row[c]) for c, _ in COLS))
    goal = {c: GOALS.get(c, float("nan")) for c, _ in COLS}
    print(f"{'goal (triton)':<17}" + "".join(_fmt(c, goal[c]) for c, _ in COLS))
    if "triton" in rows:
        t = rows["triton"]
        verdict = {c: ("met" if t[c] <= g else "MISSED") for c, g in GOALS.items()}
        print("triton vs goals: " + ", ".join(f"{c} {t[c]:.3g} ({verdict[c]})" for c in GOALS))
    for note in notes:
        print(note)


def main(argv=None) -> None:
    args = _parse(argv)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    inputs = _inputs(args)
    ref = _reference(args, inputs)
    variants, notes = _variants(args)
    rows = {}
    for name, fn in variants.items():
        try:
            rows[name] = _row(name, fn, args, inputs, ref)
        except Exception as e:  # e.g. torch.compile or OOM on a smaller card: report, go on
            notes.append(f"{name}: failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        if args.device == "cuda":
            torch.cuda.empty_cache()
    _print(args, rows, notes, device_name)


if __name__ == "__main__":
    main()
