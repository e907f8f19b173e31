"""This system vs TRL's GRPOTrainer on the same tiny RLHF task: samples/s side by side.

The work is configs/ppo-tiny.yaml with GRPO: arithmetic prompts, the `digit_fraction`
reward, one tiny model folder (built once and given to both), 8 prompts x 4 samples = 32
samples per step, 16 new tokens, optimizer steps of 16 samples in micro-batches of 8, one
epoch, lr 1e-3, KL coefficient 0.01 to a frozen reference, the same number of steps.
TRL runs it in this process (HF `generate`, one optimizer, 2 torch threads); this system
runs it through `run_ppo` on an embedded local Ray (rollout engine, policy learner on
DeepSpeed, reference and reward actors), once per `--ours` variant.

What it prints, for each run: start-up seconds (building the trainer / starting Ray and
the actors), seconds for all steps, samples/s over all steps and over steps 2..N (the first
step pays one-time costs such as vLLM's first call), and the ratio ours / TRL. For our
runs, where a step's time goes (timing/* metrics). Goal: ratio >= 1.0 on the 2-core machine.

TRL is a bench-only dependency (`pip install -e .[bench]`, or `.venv/bin/pip install
trl==1.16.0 --no-deps` plus accelerate and datasets; see pyproject.toml):

    .venv/bin/python bench/vs_trl.py                    # 10 steps; ours with vllm, then hf rollout
    .venv/bin/python bench/vs_trl.py --steps 20 --ours hf,hf+overlap

On a machine shared with other jobs, run it with OMP_WAIT_POLICY=PASSIVE: TRL computes with
two torch threads, and OpenMP's default spin-waiting makes them crawl when other jobs hold
the cores (see bench/rollout.py); our actors run one thread each and barely notice.
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


def trl_version() -> str | None:
    try:
        import trl
    except ImportError:
        return None
    return trl.__version__


def base_config(steps: int, overrides: list[str]):
    from rlhf.orchestrator.config import load_config

    return load_config(CONFIG, ["ppo.advantage=grpo", "logger.backend=none", f"ppo.steps={steps}", *overrides])


def build_task(cfg, out: Path) -> tuple[str, list[list[dict]]]:
    """The tiny model folder (as `rlhf ppo` builds it) and the prompt conversations."""
    from transformers import AutoTokenizer

    from rlhf.orchestrator.ppo.launch import resolve_policy
    from rlhf.orchestrator.data.prompts import build_prompts
    from rlhf.orchestrator.tasks import load_task

    dialogues = load_task(cfg.data.task).demonstrations(cfg.data.task_size, cfg.seed)
    model_dir = resolve_policy(cfg, out, dialogues)
    prompts = build_prompts(dialogues, AutoTokenizer.from_pretrained(model_dir), cfg.data.max_prompt_tokens,
                            cfg.data.prompt_overflow)
    return model_dir, prompts.messages


def run_ours(cfg, model_dir: str, variant: str, out: Path) -> dict:
    """`run_ppo` on a fresh embedded Ray; `variant` is a rollout backend, optionally
    "+overlap" (rollout.overlap). Start-up = wall time not spent in steps."""
    import ray

    from rlhf.orchestrator.ppo.launch import run_ppo

    backend, _, extra = variant.partition("+")
    rollout = {"backend": backend, **({"overlap": True} if extra == "overlap" else {})}
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"policy": model_dir}),
                                 "rollout": cfg.rollout.model_copy(update=rollout)})
    start = time.perf_counter()
    try:
        history = run_ppo(cfg, out / f"ours-{variant}")["history"]
    finally:
        ray.shutdown()
    wall = time.perf_counter() - start
    step_s = [m["timing/step_s"] for m in history]
    tail = history[1:] or history
    names = [k.removeprefix("timing/").removesuffix("_s") for k in tail[0]
             if k.startswith("timing/") and k != "timing/step_s"]
    phases = {p: statistics.mean(m.get(f"timing/{p}_s", 0.0) for m in tail) for p in names}
    return {"step_s": step_s, "startup_s": wall - sum(step_s), "phases": phases}


def run_trl(cfg, model_dir: str, messages: list[list[dict]], steps: int, out: Path) -> dict:
    """The same work through trl.GRPOTrainer; per-step wall times from a callback."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlhf.orchestrator.tasks.rewards import digit_fraction

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

    args = GRPOConfig(
        output_dir=str(out / "trl"), seed=cfg.seed, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        logging_steps=opt_steps_per_step, disable_tqdm=True,
        # Batch shape: micro-batches of ppo.micro_batch_size, optimizer steps of train_batch_size,
        # one generation of prompts_per_step x n_samples per `steps_per_generation` micro-batches.
        per_device_train_batch_size=ppo.micro_batch_size,
        gradient_accumulation_steps=ppo.train_batch_size // ppo.micro_batch_size,
        steps_per_generation=samples // ppo.micro_batch_size, num_generations=rollout.n_samples,
        max_steps=steps * opt_steps_per_step, num_iterations=ppo.epochs,
        max_completion_length=rollout.max_new_tokens, temperature=rollout.temperature, top_p=rollout.top_p,
        learning_rate=cfg.policy.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=cfg.policy.weight_decay,
        adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=cfg.policy.grad_clip or 0.0,
        beta=ppo.kl.coef, epsilon=ppo.clip, model_init_kwargs={"dtype": torch.float32})
    start = time.perf_counter()
    clock = StepClock()
    trainer = GRPOTrainer(model=model_dir, reward_funcs=[digit_reward], args=args,
                          train_dataset=Dataset.from_list([{"prompt": m} for m in messages]),
                          processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[clock])
    trainer.train()
    wall = time.perf_counter() - start
    step_s = [b - a for a, b in zip(clock.marks, clock.marks[1:])]
    return {"step_s": step_s, "startup_s": wall - sum(step_s), "phases": {}}


def report(runs: dict[str, dict], samples_per_step: int, steps: int, version: str | None) -> None:
    print(f"\nsame task, {steps} steps x {samples_per_step} samples, {os.cpu_count()} cores "
          f"(configs/ppo-tiny.yaml, GRPO, digit_fraction reward); trl = trl {version} GRPOTrainer; "
          f"load average before: {LOAD_BEFORE}")
    print(f"{'run':<14}{'start-up s':>11}{'steps s':>9}{'samples/s':>11}{'steps 2..N':>12}"
          f"{'ratio':>8}{'ratio 2..N':>12}")
    trl = runs.get("trl")

    def rates(r):
        tail = r["step_s"][1:] or r["step_s"]
        return samples_per_step * len(r["step_s"]) / sum(r["step_s"]), samples_per_step * len(tail) / sum(tail)

    for name, r in runs.items():
        all_rate, tail_rate = rates(r)
        ratio = f"{all_rate / rates(trl)[0]:>7.2f}x{tail_rate / rates(trl)[1]:>11.2f}x" if trl and name != "trl" else ""
        print(f"{name:<14}{r['startup_s']:>11.1f}{sum(r['step_s']):>9.2f}{all_rate:>11.1f}{tail_rate:>12.1f}{ratio}")
    for name, r in runs.items():
        if r["phases"]:
            total = sum(r["phases"].values())
            print(f"{name}: where a step's time goes (mean of steps 2..N): " + ", ".join(
                f"{p} {s:.3f}s ({s / total:.0%})" for p, s in r["phases"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="PPO/GRPO steps for every run")
    parser.add_argument("--ours", default="vllm,hf", help="our runs, comma-separated: a rollout backend "
                        "(vllm, hf), optionally +overlap (rollout.overlap), e.g. vllm,hf,hf+overlap")
    parser.add_argument("--skip-trl", action="store_true", help="run only this system")
    args = parser.parse_args()
    version = trl_version()
    if version is None and not args.skip_trl:
        print("TRL is not installed: `.venv/bin/pip install -e '.[bench]'` (or pass --skip-trl to run only "
              "this system)", file=sys.stderr)
        sys.exit(2)

    cfg = base_config(args.steps, [])
    samples_per_step = cfg.ppo.prompts_per_step * cfg.rollout.n_samples
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        model_dir, messages = build_task(cfg, out)
        # Ours first: TRL/accelerate set process-wide state that Ray workers would inherit.
        for variant in args.ours.split(","):
            runs[f"ours ({variant})"] = run_ours(cfg, model_dir, variant, out)
        if not args.skip_trl:
            runs["trl"] = run_trl(cfg, model_dir, messages, args.steps, out)
    report(runs, samples_per_step, args.steps, version)


LOAD_BEFORE = ", ".join(f"{x:.1f}" for x in os.getloadavg())

if __name__ == "__main__":  # vLLM's engine spawns processes: the guard is required
    main()
