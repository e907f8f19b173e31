"""Where a PPO step's time goes: phases, orchestration overhead, weight sync, tokens/s.

Runs the quickstart-sized PPO run (configs/ppo-tiny.yaml) for a few steps on an embedded
local Ray and prints, side by side:
  - seconds per phase (generate, experience, train, weight_sync) and per step;
  - orchestration overhead: the share of step time not spent computing inside actors.
    Each actor method's own run time is recorded inside the actor (rlhf.actors.timing);
    per phase the critical path is the busiest actor (phases run their actors in parallel;
    the object-store sync runs export then load, so those two add up; it is queued behind
    training, so its wall time starts when the driver has the training results). Overhead =
    step time - sum of the phases' critical paths: serialisation, object transfer,
    scheduling and the driver's own arithmetic;
  - weight sync: seconds and bytes, against one plain in-memory copy of the same bytes;
  - tokens/s (prompt + response tokens processed per second of step time);
  - sync vs async (rollout.overlap: step k+1 generated while step k trains): step time of
    each, against max(generation, training) of the sync run.
Goals it reports against: overhead < 5 % of step time; weight sync < 3x the plain copy;
async step time at most 1.3x max(generation time, training time).

    .venv/bin/python bench/ppo_step.py                      # 8 steps, object_store sync
    .venv/bin/python bench/ppo_step.py --steps 12 sync.backend=gloo
    .venv/bin/python bench/ppo_step.py --no-async             # skip the second (overlapped) run
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import ray
import torch

from rlhf.orchestrator.config import load_config
from rlhf.orchestrator.ppo.launch import start_ppo

ROOT = Path(__file__).resolve().parents[1]
PHASE_OF = {"generate": "generate", "score": "experience", "compute_logprobs": "experience",
            "reference_logprobs": "experience",
            "compute_values": "experience", "train_step": "train", "export_weight_buckets": "sync_send",
            "weight_bucket_metas": "sync_send", "broadcast_weights": "sync_send",
            "load_weight_buckets": "sync_recv", "receive_weights": "sync_recv", "init_weight_group": "sync_recv"}


def actor_compute(session) -> dict[str, float]:
    """Critical-path compute seconds per phase since the last call, from every actor's clock."""
    roles = session.roles
    actors = list(roles.rollout.engines) + roles.policy.ranks + roles.reference.ranks
    actors += [] if roles.reward_in_driver else [roles.reward]  # the driver's own scoring is not an actor's
    actors += roles.critic.ranks if roles.critic else []
    actors = list({id(a): a for a in actors}.values())  # a reference inside the policy ranks is them
    logs = ray.get([a.pop_compute_seconds.remote() for a in actors], timeout=120)
    busiest: dict[str, float] = defaultdict(float)
    for log in logs:
        per_phase: dict[str, float] = defaultdict(float)
        for method, seconds in log:
            if method in PHASE_OF:
                per_phase[PHASE_OF[method]] += seconds
        for phase, seconds in per_phase.items():
            busiest[phase] = max(busiest[phase], seconds)
    sequential = session.cfg.sync.backend == "object_store"
    send, recv = busiest.pop("sync_send", 0.0), busiest.pop("sync_recv", 0.0)
    busiest["weight_sync"] = send + recv if sequential else max(send, recv)
    return dict(busiest)


def plain_copy_seconds(nbytes: int, repeats: int = 20) -> float:
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_steps(cfg, steps: int) -> list[tuple[dict, dict]]:
    """(metrics, actor compute per phase) of each step after the first (which pays one-time
    costs: the first vLLM call, allocations)."""
    with tempfile.TemporaryDirectory() as out:
        session = start_ppo(cfg, out)
        rows = []
        try:
            actor_compute(session)  # drop start-up calls
            batch = next(session.batches)
            for step in range(1, steps + 1):
                upcoming = next(session.batches)
                metrics = session.trainer.step(step, batch, next_prompt_index=upcoming if step < steps else None)
                batch = upcoming
                rows.append((metrics, actor_compute(session)))
        finally:
            session.close()
    return rows[1:] or rows


def mean(xs) -> float:
    return sum(xs) / len(xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "ppo-tiny.yaml"))
    parser.add_argument("--steps", type=int, default=8, help="measured steps (step 1 is warm-up, excluded)")
    parser.add_argument("--no-async", action="store_true", help="skip the rollout.overlap=true comparison run")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, ["logger.backend=none", *args.overrides, "rollout.overlap=false"])
    rows = run_steps(cfg, args.steps)
    phases = ["generate", "experience", "train", "weight_sync"]
    step_s = mean([m["timing/step_s"] for m, _ in rows])
    print(f"PPO step breakdown: {args.config} {' '.join(args.overrides)} | {len(rows)} measured steps, "
          f"sync={cfg.sync.backend}, {cfg.policy.num_ranks} policy rank(s), {cfg.rollout.engines} engine(s)")
    print(f"{'phase':<14}{'wall s':>10}{'actor s':>10}{'overhead s':>12}{'share of step':>15}")
    overhead_total = 0.0
    for phase in phases:
        wall = mean([m[f"timing/{phase}_s"] for m, _ in rows])
        compute = mean([c.get(phase, 0.0) for _, c in rows])
        overhead_total += wall - compute
        print(f"{phase:<14}{wall:>10.4f}{compute:>10.4f}{wall - compute:>12.4f}{wall / step_s:>14.1%}")
    print(f"{'step':<14}{step_s:>10.4f}")
    share = overhead_total / step_s
    print(f"orchestration overhead: {overhead_total:.4f} s/step = {share:.1%} of step time (goal < 5%)")
    sync_s = mean([m["timing/weight_sync_s"] for m, _ in rows])
    nbytes = int(rows[0][0]["sync/bytes"])
    copy_s = plain_copy_seconds(nbytes)
    print(f"weight sync: {sync_s:.4f} s for {nbytes / 2**20:.2f} MiB in {int(rows[0][0]['sync/buckets'])} buckets; "
          f"plain in-memory copy {copy_s * 1e3:.3f} ms; ratio {sync_s / copy_s:.0f}x (goal < 3x)")
    print(f"throughput: {mean([m['throughput/tokens_per_s'] for m, _ in rows]):.0f} tokens/s "
          f"(prompt + response tokens per second of step time)")
    if args.no_async:
        return
    # Overlap samples one step behind the learner: its old log-probs must be the learner's.
    overlapped = run_steps(cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={"overlap": True}),
                                                  "ppo": cfg.ppo.model_copy(update={"old_logprobs": "learner"})}),
                           args.steps)
    async_s = mean([m["timing/step_s"] for m, _ in overlapped])
    gen_s, train_s = mean([m["timing/generate_s"] for m, _ in rows]), mean([m["timing/train_s"] for m, _ in rows])
    bound = max(gen_s, train_s)
    wait_s = mean([m.get("timing/overlap_wait_s", 0.0) for m, _ in overlapped])
    print(f"sync vs async (rollout.overlap): sync step {step_s:.4f} s, async step {async_s:.4f} s "
          f"({step_s / async_s:.2f}x faster); max(generate {gen_s:.4f}, train {train_s:.4f}) = {bound:.4f} s; "
          f"async / max = {async_s / bound:.2f} (goal <= 1.3); async waited {wait_s:.4f} s/step for generation; "
          f"logprob gap (staleness) {mean([m['rollout/logprob_gap'] for m, _ in overlapped]):.2e}")


if __name__ == "__main__":
    main()
