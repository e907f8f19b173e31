"""Benchmark: naive vs chunked token log-probs, time and peak extra memory, side by side.

For each variant it reports forward and forward+backward (of the summed log-probs, plus
the summed entropy with --entropy) wall time, the peak memory above what the inputs
already hold, and the largest |difference| from the float32 formula on the same values.

Run on one CPU machine (defaults take about 40 s on 2 cores; keep fp32 there, CPU bf16
GEMMs are ~10x slower):
    .venv/bin/python bench/bench_logprobs.py
Run on a GPU (the shape measured in shared/ENVIRONMENT.md; needs `rlhf` importable, e.g.
`pip install --no-deps --no-build-isolation -e .`):
    python bench/bench_logprobs.py --device cuda --dtype bf16 --n 16384 --hidden 896 \
        --vocab 151936 --chunk 2048 --repeats 10

Memory is measured honestly on each device:
  * CUDA: torch.cuda.max_memory_allocated() minus the allocation before the call.
  * CPU: torch keeps no peak counter for host memory, so each variant runs in a fresh
    subprocess and we report the growth of its peak resident set size
    (resource.getrusage(RUSAGE_SELF).ru_maxrss) from just before to just after its runs,
    with glibc told to mmap every block over 1 MiB (so freed tensors leave the RSS). It
    includes allocator and thread-pool overhead, so small numbers are approximate.
Times on a shared 2-core machine are noisy; compare ratios from one run, not across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from rlhf.kernels.logprobs import naive_token_logprobs, token_logprobs

VARIANTS = {"naive": naive_token_logprobs, "chunked": token_logprobs}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIB = 2**20


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2048, help="tokens (rows of hidden)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size H")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size V")
    p.add_argument("--chunk", type=int, default=256, help="rows per block in the chunked variant")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of hidden and weight")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto = cuda if available")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (after one warm-up on CUDA)")
    p.add_argument("--entropy", action="store_true", help="also compute (and differentiate) the entropy")
    p.add_argument("--worker", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # CPU subprocess mode
    return p.parse_args(argv)


def _inputs(args, device):
    # Built in place at the target dtype so no transient copy inflates the RSS baseline.
    g = torch.Generator().manual_seed(0)
    dt = DTYPES[args.dtype]
    hidden = torch.randn(args.n, args.hidden, generator=g, dtype=dt)
    weight = torch.randn(args.vocab, args.hidden, generator=g, dtype=dt).mul_(2.0 / args.hidden**0.5)
    targets = torch.randint(0, args.vocab, (args.n,), generator=g)
    return hidden.to(device), weight.to(device), targets.to(device)


def _call(fn, args, hidden, weight, targets, backward):
    hidden.requires_grad_(backward)
    weight.requires_grad_(backward)
    hidden.grad = weight.grad = None
    with torch.set_grad_enabled(backward):
        out = fn(hidden, weight, targets, chunk_size=args.chunk, with_entropy=args.entropy)
        logp, ent = out if args.entropy else (out, None)
        if backward:
            (logp.sum() + (ent.sum() if ent is not None else 0)).backward()
    return logp.detach(), None if ent is None else ent.detach()


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _measure(fn, args, device, backward, inputs):
    """(median ms, peak extra MiB or None on CPU) over args.repeats runs.

    CUDA gets one untimed warm-up (cuBLAS handles, allocator pools); CPU runs are cold-free
    enough that a warm-up would only cost the 2-core machine time.
    """
    times = []
    if device == "cuda":
        _call(fn, args, *inputs, backward)
        inputs[0].grad = inputs[1].grad = None  # counted in the peak, not in the baseline
        _sync(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.repeats):
        _sync(device)
        t0 = time.perf_counter()
        _call(fn, args, *inputs, backward)
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / MIB if device == "cuda" else None
    return sorted(times)[len(times) // 2] * 1e3, peak


def _max_diff(fn, args, device, inputs):
    """Largest |logp - ref| and |entropy - ref| vs the float32 formula on the same values."""
    hidden, weight, targets = inputs
    with torch.no_grad():
        got = fn(hidden, weight, targets, chunk_size=args.chunk, with_entropy=True)
        ref = naive_token_logprobs(hidden.float(), weight.float(), targets, with_entropy=True)
    return [(a.float() - b).abs().max().item() for a, b in zip(got, ref)]


def _bench_variant(name, args, device) -> dict:
    fn = VARIANTS[name]
    inputs = _inputs(args, device)
    torch.ones(64, 64) @ torch.ones(64, 64)  # load the BLAS before taking the RSS baseline
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    row = {}
    for key, backward in (("fwd", False), ("fwd_bwd", True)):
        ms, peak = _measure(fn, args, device, backward, inputs)
        if peak is None:  # CPU: how far the process's RSS high-water mark rose above rss0
            peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
        row[key + "_ms"], row[key + "_mib"] = ms, peak
    row["dlogp"], row["dent"] = _max_diff(fn, args, device, inputs)
    return row


def _worker_argv(args, name) -> list[str]:
    flags = ["--n", args.n, "--hidden", args.hidden, "--vocab", args.vocab, "--chunk", args.chunk,
             "--dtype", args.dtype, "--repeats", args.repeats, "--device", "cpu", "--worker", name]
    return [str(f) for f in flags] + (["--entropy"] if args.entropy else [])


def _run_cpu_worker(name, args) -> dict:
    cmd = [sys.executable, __file__, *_worker_argv(args, name)]
    # glibc raises its mmap threshold (up to 32 MiB) after the first large free and then
    # keeps freed blocks in its heap, so RSS would count tensors torch already released and
    # chunk-sized numbers would swing 2x between runs. A fixed 1 MiB threshold returns every
    # large tensor to the OS when freed: the RSS peak then tracks live tensors, as on CUDA.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MIB)}
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{name} worker failed (exit {res.returncode}):\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _print_table(args, device, rows):
    method = ("torch.cuda.max_memory_allocated above the inputs" if device == "cuda"
              else "peak RSS growth (ru_maxrss) of a fresh subprocess per variant")
    print(f"token log-probs: N={args.n} H={args.hidden} V={args.vocab} chunk={args.chunk} "
          f"dtype={args.dtype} device={device} entropy={args.entropy} repeats={args.repeats} (median)")
    print(f"memory: {method}; naive [N,V] fp32 logits alone = {args.n * args.vocab * 4 / MIB:,.0f} MiB")
    print(f"accuracy: max |diff| vs the fp32 formula on the same {args.dtype} values")
    cols = ["fwd_ms", "fwd_mib", "fwd_bwd_ms", "fwd_bwd_mib", "dlogp", "dent"]
    heads = ["fwd ms", "fwd MiB", "fwd+bwd ms", "fwd+bwd MiB", "max|dlogp|", "max|dH|"]
    print(f"{'variant':<16}" + "".join(f"{h:>13}" for h in heads))
    for name, row in rows.items():
        cells = [f"{row[c]:13.2e}" if c.startswith("d") else f"{row[c]:13,.1f}" for c in cols]
        print(f"{name:<16}" + "".join(cells))
    ratio = [rows["chunked"][c] / rows["naive"][c] if rows["naive"][c] else float("nan") for c in cols[:4]]
    print(f"{'chunked/naive':<16}" + "".join(f"{r:13.2f}" for r in ratio))


def main(argv=None) -> None:
    args = _parse(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:  # inside a CPU subprocess: measure one variant, print one JSON line
        print(json.dumps(_bench_variant(args.worker, args, device)))
        return
    rows = {}
    for name in VARIANTS:
        rows[name] = _run_cpu_worker(name, args) if device == "cpu" else _bench_variant(name, args, device)
        if device == "cuda":
            torch.cuda.empty_cache()
    _print_table(args, device, rows)


if __name__ == "__main__":
    main()
