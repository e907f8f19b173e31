"""Benchmark: one plain-torch PPO policy learner step, padded vs packed, tokens/s and MFU.

What the policy learner does per micro-batch, without DeepSpeed (not installed on the
GPU machine): log-probs and entropy through rlhf.actors.modeling.sequence_logprobs (the
fused Triton log-prob kernel on CUDA), the PPO clipped loss minus an entropy bonus,
backward, fused AdamW. Random weights; the default model is Qwen2.5-0.5B-shaped
(494 M parameters, tied embeddings), the default batch 8 x 2,048 tokens.

Cases, each after warm-up steps (Triton autotuning, varlen set-up):
  full     every sequence 2,048 tokens: packing can only cost here (issue's anchor shape)
  ragged   lengths uniform in [T/4, T] (as PPO responses are), padded to T
each padded and packed, and the full batch once more with the chunked PyTorch log-prob
reference instead of Triton. tokens/s counts real tokens only.
MFU = 6 x parameters x tokens/s / peak, with the peak 787 TFLOP/s measured for bf16
GEMMs on the H200 (ENVIRONMENT.md, the anchor's 86,700 tokens/s = 32.5 % used it) and
also against this card's own measured GEMM peak.

GPU:  python bench/learner_step.py                 (rlhf importable: see bench/gpu_check.sh)
CPU:  .venv/bin/python bench/learner_step.py --tiny  (a 2-layer model, seconds; checks it runs)
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from rlhf.actors.modeling import sequence_logprobs
from rlhf.orchestrator.experience import SequenceBatch
from rlhf.orchestrator.rl import aggregate_loss, policy_loss

ANCHOR_PEAK_TFLOPS = 787.0  # bf16 GEMM measured on the H200 (ENVIRONMENT.md)
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1e6, tie_word_embeddings=True, rms_norm_eps=1e-6)
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=64, max_position_embeddings=512, tie_word_embeddings=True)


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="2-layer model, batch 4 x 128 (a CPU smoke run)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--chunk", type=int, default=2048, help="rows per block of the log-prob kernel")
    args = p.parse_args(argv)
    if args.tiny:
        args.batch, args.seq, args.steps, args.warmup = 4, 128, 2, 1
    return args


def _batch(b, t, ragged, vocab, device, seed=0) -> SequenceBatch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(t // 4, t + 1, (b,), generator=g) if ragged else torch.full((b,), t)
    lengths[0] = t  # the padded width is T either way
    ids = torch.randint(0, vocab, (b, t), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    action = mask[:, 1:].clone()
    action[:, : t // 8] = 0  # a prompt: no loss on its tokens
    return SequenceBatch((ids * mask).to(device), mask.to(device), action.to(device))


def _gemm_peak_tflops(device, dtype) -> float:
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        a @ a
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (time.perf_counter() - t0) / 1e12


def _step(model, opt, batch, packing, backend, chunk):
    mask = batch.action_mask
    logp, ent = sequence_logprobs(model, batch, 1.0, chunk, with_entropy=True, packing=packing, backend=backend)
    old = logp.detach() + 0.01 * torch.randn_like(logp)  # a ratio slightly off 1, as after one update
    adv = torch.randn_like(logp)
    n_tok = int(mask.sum())
    loss, _ = policy_loss(logp, old, adv, mask, 0.2, None, "token_mean", n_tok, len(mask))
    loss = loss - 0.01 * aggregate_loss(ent, mask, "token_mean", n_tok, len(mask))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _run_case(model, opt, batch, packing, backend, args, device) -> dict:
    for _ in range(args.warmup):
        _step(model, opt, batch, packing, backend, args.chunk)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        _step(model, opt, batch, packing, backend, args.chunk)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"s": dt, "tok_s": int(batch.attention_mask.sum()) / dt, "gib": peak}


def main(argv=None) -> None:
    args = _parse(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = Qwen2Config(**(TINY if args.tiny else QWEN25_05B), attn_implementation="sdpa")
    model = Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda")
    peak = _gemm_peak_tflops(device, dtype)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"learner step: {n_params / 1e6:.1f} M parameters, batch {args.batch} x {args.seq}, {dtype}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, on {name} (bf16 GEMM peak {peak:.0f} TFLOP/s)")
    cases = [("full", False, False, "reference"), ("full", False, False, "auto"), ("full", True, False, "auto"),
             ("ragged", False, True, "auto"), ("ragged", True, True, "auto")]
    print(f"{'batch':<8}{'packing':<9}{'log-probs':<11}{'real tok':>10}{'step s':>9}{'tokens/s':>11}"
          f"{'MFU@787':>9}{'MFU@card':>10}{'peak GiB':>10}")
    for label, packing, ragged, backend in cases:
        batch = _batch(args.batch, args.seq, ragged, cfg.vocab_size, device)
        # Attention stays sdpa for padded runs: a packed run switches the model to varlen.
        model.set_attn_implementation("sdpa")
        try:
            r = _run_case(model, opt, batch, packing, backend, args, device)
        except Exception as e:  # e.g. OOM: report and go on with the other cases
            print(f"{label:<8}{str(packing):<9}{backend:<11} failed: {type(e).__name__}: {str(e)[:160]}")
            opt.zero_grad(set_to_none=True)
            continue
        flops = 6 * n_params * r["tok_s"] / 1e12
        print(f"{label:<8}{str(packing):<9}{backend:<11}{int(batch.attention_mask.sum()):>10,}{r['s']:>9.3f}"
              f"{r['tok_s']:>11,.0f}{100 * flops / ANCHOR_PEAK_TFLOPS:>8.1f}%{100 * flops / peak:>9.1f}%"
              f"{r['gib']:>10.1f}")
    print("anchor (H200, plain torch, HF logits, full 8 x 2,048): 86,700 tokens/s = 32.5 % MFU@787; goal >= 40 %")


if __name__ == "__main__":
    main()
