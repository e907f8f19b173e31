"""This system vs TRL's GRPOTrainer on the same GRPO work: samples/s, start-up, where time goes.

Workloads (`--workloads`, comma-separated), each the same work on both sides:
  tiny          configs/ppo-tiny.yaml's model (~0.4 M parameters, built once for both)
  20m           the same task on a ~17 M-parameter model (hidden 512, 6 layers)
  smollm2-lora  SmolLM2-135M-Instruct (`rlhf model list`) with LoRA adapters (rank 16, alpha 32,
                q/k/v/o), TRL with the same peft LoraConfig; 16 samples per step
The work: arithmetic prompts, the `digit_fraction` reward, 8 prompts x 4 samples = 32 samples
per step (tiny, 20m), 16 new tokens, optimizer steps of 16 samples in micro-batches of 8, one
epoch, a constant learning rate, KL coefficient 0.01 to a frozen reference, the same number of
steps. TRL runs in this process (HF `generate`, one optimizer, torch threads = cores); this
system runs `run_ppo` on a fresh embedded local Ray per run, with its rollout backend(s)
(`--ours`, e.g. hf,vllm) and the config's other settings (reference inside the policy rank,
threads per phase, and `--set` overrides such as ppo.old_logprobs=sampler).

Every side runs `--repeats` times (default 2), alternating (ours, TRL, ours, TRL, ...), so one
noisy moment cannot decide a ratio; the ratio is of the medians. Printed per workload: each
run's start-up seconds (from the call to the first step's start, in this already-imported
process), samples/s over all steps and over steps 2..N, the load average when it started, and
for our runs where a step's time goes (timing/* metrics, mean of steps 2..N). Goals on the
2-core machine: tiny >= 1.0x (HF and vLLM rollout), 20m >= 1.2x, smollm2-lora >= 1.2x.

TRL is a bench-only dependency (`pip install -e .[bench]`, or `.venv/bin/pip install
trl==1.16.0 --no-deps`; accelerate and datasets are already there):

    .venv/bin/python bench/vs_trl.py                                  # tiny, 20m: hf and vllm
    .venv/bin/python bench/vs_trl.py --workloads smollm2-lora --ours hf --steps 3
    .venv/bin/python bench/vs_trl.py --workloads tiny --set ppo.old_logprobs=sampler

Run it with OMP_WAIT_POLICY=PASSIVE on a machine shared with other jobs (OpenMP's default
spin-waiting makes multi-threaded torch crawl when other processes hold the cores).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "ppo-tiny.yaml"
TWENTY_M = ["model.tiny.hidden_size=512", "model.tiny.num_layers=6", "model.tiny.num_heads=8",
            "model.tiny.num_kv_heads=2", "model.tiny.head_dim=64", "model.tiny.intermediate_size=1376"]
LORA = dict(rank=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
WORKLOADS = {
    "tiny": [],
    "20m": TWENTY_M,
    "smollm2-lora": ["model.policy=smollm2-135m-instruct", "ppo.prompts_per_step=4", "policy.lr=4e-4",
                     "policy.lora.rank=16", "policy.lora.alpha=32",
                     "policy.lora.target_modules=[q_proj,k_proj,v_proj,o_proj]"],
}


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def base_config(workload: str, steps: int, overrides: list[str]):
    from rlhf.orchestrator.config import load_config

    return load_config(CONFIG, ["ppo.advantage=grpo", "logger.backend=none", f"ppo.steps={steps}",
                                "checkpoint.every=0", *WORKLOADS[workload], *overrides])


def build_task(cfg, out: Path) -> tuple[str, list[list[dict]]]:
    """The model folder (as `rlhf ppo` resolves it: built for tiny, imported for a known name)
    and the prompt conversations, both given to both sides."""
    from transformers import AutoTokenizer

    from rlhf.orchestrator.data.prompts import build_prompts
    from rlhf.orchestrator.ppo.launch import resolve_policy
    from rlhf.orchestrator.tasks import load_task

    dialogues = load_task(cfg.data.task).demonstrations(cfg.data.task_size, cfg.seed)
    model_dir = resolve_policy(cfg, out, dialogues)
    prompts = build_prompts(dialogues, AutoTokenizer.from_pretrained(model_dir), cfg.data.max_prompt_tokens,
                            cfg.data.prompt_overflow)
    return model_dir, prompts.messages


def run_ours(cfg, model_dir: str, backend: str, out: Path) -> dict:
    """`run_ppo` on a fresh embedded Ray with `rollout.backend=backend`."""
    import ray

    from rlhf.orchestrator.ppo.launch import run_ppo

    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"policy": model_dir}),
                                 "rollout": cfg.rollout.model_copy(update={"backend": backend})})
    try:
        result = run_ppo(cfg, out)
    finally:
        ray.shutdown()
    history = result["history"]
    tail = history[1:] or history
    names = [k for k in tail[0] if k.startswith("timing/") and k != "timing/step_s"]
    phases = {k.removeprefix("timing/").removesuffix("_s"): statistics.mean(m.get(k, 0.0) for m in tail)
              for k in names}
    return {"step_s": [m["timing/step_s"] for m in history], "startup_s": result["startup_s"], "phases": phases}


def run_trl(cfg, model_dir: str, messages: list[list[dict]], out: Path) -> dict:
    """The same work through trl.GRPOTrainer; per-step wall times from a callback."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlhf.orchestrator.tasks.rewards import digit_fraction

    torch.set_num_threads(os.cpu_count() or 1)  # a Ray run in this process may have left it at 1
    ppo, rollout = cfg.ppo, cfg.rollout
    samples = ppo.prompts_per_step * rollout.n_samples
    opt_steps_per_step = samples // ppo.train_batch_size

    def digit_reward(prompts, completions, **_):
        return [digit_fraction(p, c[0]["content"], []) for p, c in zip(prompts, completions)]

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % opt_steps_per_step == 0:  # one of our steps (all its samples) done
                self.marks.append(time.perf_counter())

    peft = None
    if cfg.policy.lora is not None:
        from peft import LoraConfig

        lora = cfg.policy.lora
        peft = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    args = GRPOConfig(
        output_dir=str(out / "trl"), seed=cfg.seed, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        logging_steps=10_000, disable_tqdm=True,
        # Batch shape: micro-batches of ppo.micro_batch_size, optimizer steps of train_batch_size,
        # one generation of prompts_per_step x n_samples per `steps_per_generation` micro-batches.
        per_device_train_batch_size=ppo.micro_batch_size,
        gradient_accumulation_steps=ppo.train_batch_size // ppo.micro_batch_size,
        steps_per_generation=samples // ppo.micro_batch_size, num_generations=rollout.n_samples,
        max_steps=ppo.steps * opt_steps_per_step, num_iterations=ppo.epochs,
        max_completion_length=rollout.max_new_tokens, temperature=rollout.temperature, top_p=rollout.top_p,
        learning_rate=cfg.policy.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=cfg.policy.weight_decay,
        adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=cfg.policy.grad_clip or 0.0,
        beta=ppo.kl.coef, epsilon=ppo.clip, model_init_kwargs={"dtype": torch.float32})
    start = time.perf_counter()
    clock = StepClock()
    trainer = GRPOTrainer(model=model_dir, reward_funcs=[digit_reward], args=args, peft_config=peft,
                          train_dataset=Dataset.from_list([{"prompt": m} for m in messages]),
                          processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[clock])
    trainer.train()
    step_s = [b - a for a, b in zip(clock.marks, clock.marks[1:])]
    return {"step_s": step_s, "startup_s": clock.marks[0] - start, "phases": {}}


def rates(run: dict, samples: int) -> tuple[float, float]:
    """Samples/s over all steps and over steps 2..N."""
    tail = run["step_s"][1:] or run["step_s"]
    return samples * len(run["step_s"]) / sum(run["step_s"]), samples * len(tail) / sum(tail)


def report(workload: str, runs: dict[str, list[dict]], samples: int, steps: int, model_params: str) -> None:
    print(f"\n== {workload}: {model_params}, {steps} steps x {samples} samples, {os.cpu_count()} cores; "
          "start-up = call to first step")
    print(f"{'run':<16}{'load avg':>16}{'start-up s':>11}{'samples/s':>10}{'2..N':>8}")
    for name, rs in runs.items():
        for i, r in enumerate(rs):
            all_rate, tail_rate = rates(r, samples)
            print(f"{name + f' #{i + 1}':<16}{r['load']:>16}{r['startup_s']:>11.1f}{all_rate:>10.1f}{tail_rate:>8.1f}")
    trl = runs.get("trl")
    med = {name: [statistics.median(rates(r, samples)[k] for r in rs) for k in (0, 1)] for name, rs in runs.items()}
    for name, rs in runs.items():
        start = statistics.median(r["startup_s"] for r in rs)
        line = f"{name}: median {med[name][0]:.1f} samples/s ({med[name][1]:.1f} over steps 2..N), start-up {start:.1f} s"
        if trl and name != "trl":
            line += f"; ratio vs trl {med[name][0] / med['trl'][0]:.2f}x ({med[name][1] / med['trl'][1]:.2f}x over 2..N)"
        print(line)
        phases = rs[-1]["phases"]
        if phases:
            total = sum(phases.values())
            print("  where a step's time goes (last run, steps 2..N): " + ", ".join(
                f"{p} {s:.3f}s ({s / total:.0%})" for p, s in phases.items()))


def count_params(model_dir: str) -> str:
    import json

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    h, layers, inter, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or h // heads
    per_layer = h * head_dim * (2 * heads + 2 * kv) + 3 * h * inter + 2 * h
    return f"{(layers * per_layer + vocab * h) / 1e6:.1f} M parameters"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="tiny,20m", help=f"comma-separated: {', '.join(WORKLOADS)}")
    parser.add_argument("--ours", default="hf,vllm", help="our rollout backends, comma-separated (hf, vllm)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: tiny 10, 20m 6, smollm2-lora 3)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side, alternating")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for both sides")
    parser.add_argument("--skip-trl", action="store_true", help="run only this system")
    args = parser.parse_args()
    try:
        import trl
    except ImportError:
        if not args.skip_trl:
            print("TRL is not installed: `.venv/bin/pip install -e '.[bench]'` (or pass --skip-trl)", file=sys.stderr)
            sys.exit(2)
    else:
        print(f"trl {trl.__version__} GRPOTrainer vs this system; load average at the start: {load()}")
    default_steps = {"tiny": 10, "20m": 6, "smollm2-lora": 3}
    for workload in args.workloads.split(","):
        cfg = base_config(workload, args.steps or default_steps[workload], args.set)
        samples = cfg.ppo.prompts_per_step * cfg.rollout.n_samples
        sides = [f"ours ({b})" for b in args.ours.split(",")] + ([] if args.skip_trl else ["trl"])
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            model_dir, messages = build_task(cfg, out)
            params = count_params(model_dir)
            for i in range(args.repeats):
                for side in sides:
                    before = load()
                    if side == "trl":
                        run = run_trl(cfg, model_dir, messages, out / f"trl-{i}")
                    else:
                        run = run_ours(cfg, model_dir, side[6:-1], out / f"{side[6:-1]}-{i}")
                    runs[side].append({**run, "load": before})
        report(workload, runs, samples, cfg.ppo.steps, params)


if __name__ == "__main__":  # vLLM's engine spawns processes: the guard is required
    main()
