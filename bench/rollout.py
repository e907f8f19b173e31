"""Rollout backends side by side: vLLM vs Hugging Face `generate`, tokens/s, same work.

Two models, both built locally like the quickstart does (orchestrator/models/tiny.py, the
arithmetic task's corpus for the tokenizer): the quickstart model (configs/quickstart.yaml
model.tiny, ~0.4 M parameters) and a ~20 M-parameter one (hidden 512, 6 layers). Each
backend generates for the same quickstart prompts, one sample each, with the same
new-token limit: one warm-up call (vLLM's first call allocates), then `--repeats` timed
calls, the fastest reported (on a shared machine it is the least disturbed one).
Tokens/s counts generated tokens (responses end early on a stop token, so the two
backends' counts differ a little; each is divided by its own time). Both use all of the
machine's cores: vLLM-CPU in its engine process, HF in this one.

    .venv/bin/python bench/rollout.py                      # 256 prompts x 64 new tokens
    .venv/bin/python bench/rollout.py --prompts 64 --new-tokens 32 --backends hf

On a machine shared with other jobs, run it with OMP_WAIT_POLICY=PASSIVE (both backends'
processes inherit it): with OpenMP's default spin-waiting, two torch threads competing with
other jobs for two cores ran HF `generate` 20x slower (measured: 188 vs 3,929 tokens/s).

On a GPU machine the same command runs both backends on the GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LARGER = dict(hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=8, head_dim=64, intermediate_size=1536)


def build_models(out: Path) -> tuple[list[tuple[str, str]], list[list[int]]]:
    """[(label, folder)] for the quickstart model and the ~20 M one, and the quickstart prompts."""
    from transformers import AutoTokenizer

    from rlhf.orchestrator.config import load_config
    from rlhf.orchestrator.ppo.launch import resolve_policy
    from rlhf.orchestrator.data.prompts import build_prompts
    from rlhf.orchestrator.tasks import load_task
    from rlhf.orchestrator.models.tiny import TinyModelSpec, build_tiny_model

    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    dialogues = load_task(cfg.data.task).demonstrations(cfg.data.task_size, cfg.seed)
    quick = resolve_policy(cfg, out, dialogues)  # out/init_model, exactly as the quickstart builds it
    tokenizer = AutoTokenizer.from_pretrained(quick)
    spec = dataclasses.replace(TinyModelSpec(**cfg.model.tiny.model_dump()), **LARGER)
    larger = build_tiny_model(spec, tokenizer, out / "larger", seed=cfg.seed, overwrite=True)
    prompts = build_prompts(dialogues, tokenizer, cfg.data.max_prompt_tokens, cfg.data.prompt_overflow)
    return [("quickstart", quick), ("~20M", str(larger))], prompts.token_ids


def param_count(folder: str) -> int:
    from safetensors import safe_open

    with safe_open(str(Path(folder) / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def make_engine(backend: str, folder: str, max_model_len: int, hf_threads: int):
    if backend == "vllm":
        from rlhf.actors.rollout import RolloutEngine

        return RolloutEngine(folder, dtype="float32", max_model_len=max_model_len, seed=0, kv_cache_gib=2,
                             enforce_eager=True)
    from rlhf.actors.rollout_hf import HFRolloutEngine

    return HFRolloutEngine(folder, dtype="float32", max_model_len=max_model_len, seed=0, num_threads=hf_threads,
                           max_batch_rows=256)


def measure(backend: str, folder: str, prompts: list[list[int]], new_tokens: int, repeats: int,
            hf_threads: int) -> list[float]:
    """tokens/s of each of `repeats` timed calls, after one warm-up call."""
    engine = make_engine(backend, folder, max(map(len, prompts)) + new_tokens, hf_threads)
    rates = []
    try:
        index = list(range(len(prompts)))
        # Unseeded: vLLM-CPU 0.32 fails seeded requests whose prompts get split by chunked
        # prefill ("CPU Generator does not use offset"), which a batch this large triggers.
        engine.generate(prompts[:8], index[:8], 1, 1.0, 1.0, new_tokens, None)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            samples = engine.generate(prompts, index, 1, 1.0, 1.0, new_tokens, None)
            rates.append(sum(len(r) for r in samples.response_ids) / (time.perf_counter() - start))
    finally:
        engine.shutdown()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=256, help="prompts per timed call (one sample each)")
    parser.add_argument("--new-tokens", type=int, default=64, help="max new tokens per sample")
    parser.add_argument("--backends", default="vllm,hf", help="comma-separated: vllm,hf")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per backend; the fastest is reported "
                        "(the machine may be shared: the fastest call is the least disturbed)")
    parser.add_argument("--hf-threads", type=int, default=os.cpu_count(), help="torch threads of the HF engine")
    parser.add_argument("--out", default=None, help="folder for the built models (default: a temporary one)")
    args = parser.parse_args()
    backends = args.backends.split(",")

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        models, all_prompts = build_models(out)
        prompts = all_prompts[: args.prompts]
        rows = []
        for label, folder in models:
            rates = {b: measure(b, folder, prompts, args.new_tokens, args.repeats, args.hf_threads) for b in backends}
            rows.append((label, param_count(folder), {b: max(r) for b, r in rates.items()}))
            print(f"{label}: " + "; ".join(f"{b} " + ", ".join(f"{x:,.0f}" for x in r) + " tokens/s"
                                           for b, r in rates.items()), flush=True)

    print(f"\nrollout tokens/s (generated tokens), {len(prompts)} prompts x {args.new_tokens} new tokens, "
          f"float32, {os.cpu_count()} cores (HF: {args.hf_threads} threads), fastest of {args.repeats} calls "
          f"after a warm-up; load average before: {LOAD_BEFORE}")
    header = f"{'model':<12}{'params':>12}" + "".join(f"{b + ' tok/s':>14}" for b in backends)
    both = set(backends) == {"vllm", "hf"}
    print(header + (f"{'hf / vllm':>12}" if both else ""))
    for label, params, best in rows:
        line = f"{label:<12}{params / 1e6:>11.2f}M" + "".join(f"{best[b]:>14,.0f}" for b in backends)
        print(line + (f"{best['hf'] / best['vllm']:>11.2f}x" if both else ""))


LOAD_BEFORE = ", ".join(f"{x:.1f}" for x in os.getloadavg())

if __name__ == "__main__":  # vLLM's engine spawns processes: the guard is required
    main()
