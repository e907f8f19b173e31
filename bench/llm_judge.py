"""The LLM judge against the task's simulated labeler, on the quickstart (arithmetic task).

A quickstart SFT model samples K replies for N prompts (one vLLM engine, the pipeline's
comparison sampling: rollout.temperature, rollout.max_new_tokens); the engine goes, then
SmolLM2-135M-Instruct (or --judge) ranks every comparison through `judge_engine` (every
pair asked in both orders), and the task's labeler (ArithmeticTask.score) ranks them too.
Printed: pairwise agreement (share of reply pairs both order the same way, ties included)
and mean Kendall tau-b between the two (rlhf.orchestrator.label.agreement; tau is undefined
where either side tied everything, those comparisons are counted), the parse rate, the
position bias (share of parsed answers where the reply shown first won; 0.5 = none), and
seconds per phase. Two baselines put the agreement in context: a judge that ties
everything, and a uniformly random ranking (mean of 200 draws per comparison).

    .venv/bin/python bench/llm_judge.py                                 # 32 prompts x K=4
    .venv/bin/python bench/llm_judge.py --policy runs/quickstart/sft/checkpoint --prompts 64

--policy: a quickstart SFT folder (`rlhf sft configs/quickstart.yaml --out runs/sft-only`
writes one to runs/sft-only/sft/checkpoint). On a GPU machine the same command; any chat
model folder or known name works as --judge.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_POLICY = ROOT / "runs" / "people" / "sft" / "checkpoint"


def sample(cfg, policy: str, prompts: list[list[dict]], k: int):
    """K replies per prompt from `policy`: (messages, K decoded replies) per prompt."""
    from transformers import AutoTokenizer

    from rlhf.orchestrator.data.prompts import build_prompts
    from rlhf.orchestrator.ppo.launch import sampling_rollout

    tokenizer = AutoTokenizer.from_pretrained(policy)
    built = build_prompts(prompts, tokenizer, cfg.data.max_prompt_tokens, cfg.data.prompt_overflow)
    group = sampling_rollout(cfg, policy, seed=cfg.seed)
    try:
        samples = group.generate(built.token_ids, n=k, temperature=cfg.rollout.temperature,
                                 max_new_tokens=cfg.rollout.max_new_tokens, seed=cfg.seed * 7919)
    finally:
        group.shutdown()
    texts = tokenizer.batch_decode(samples.response_ids, skip_special_tokens=True)
    return [(messages, texts[i * k:(i + 1) * k]) for i, messages in enumerate(built.messages)]


def agreement(judge_ranks: list[list[int]], task_ranks: list[list[int]], seed: int) -> dict:
    from rlhf.orchestrator.label.agreement import kendall_tau_b, pairwise_agreement

    taus = [kendall_tau_b(j, t) for j, t in zip(judge_ranks, task_ranks)]
    rng = random.Random(seed)

    def random_agreement(t: list[int]) -> float:
        return statistics.mean(pairwise_agreement([rng.random() for _ in t], t) for _ in range(200))

    return {"pairwise_agreement": statistics.mean(pairwise_agreement(j, t) for j, t in zip(judge_ranks, task_ranks)),
            "kendall_tau_b": statistics.mean(t for t in taus if t is not None) if any(t is not None for t in taus)
            else None,
            "tau_defined": sum(t is not None for t in taus),
            "judge_all_tied": sum(len(set(j)) == 1 for j in judge_ranks),
            "task_all_tied": sum(len(set(t)) == 1 for t in task_ranks),
            "baseline_all_tied": statistics.mean(pairwise_agreement([0] * len(t), t) for t in task_ranks),
            "baseline_random": statistics.mean(random_agreement(t) for t in task_ranks)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--policy", default=str(DEFAULT_POLICY), help="a quickstart SFT model folder")
    parser.add_argument("--judge", default="smollm2-135m-instruct", help="judge model: folder or known name")
    parser.add_argument("--template", default=None, help="judge prompt template file (default: built-in)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--k", type=int, default=4, help="replies per prompt")
    parser.add_argument("--show", type=int, default=3, help="print the judge's raw answer to this many questions")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)

    from rlhf.orchestrator.config import load_config
    from rlhf.orchestrator.data.labelers import SimulatedLabeler, build_labeler
    from rlhf.orchestrator.data.prompts import load_prompts
    from rlhf.orchestrator.errors import BadInput
    from rlhf.orchestrator.ppo.launch import start_ray
    from rlhf.orchestrator.recipe.judge_engine import judge_engine
    from rlhf.orchestrator.tasks import load_task

    if not (Path(args.policy) / "config.json").is_file():
        print(f"--policy: {args.policy} is not a model folder; make one with "
              "`rlhf sft configs/quickstart.yaml --out runs/sft-only` (then runs/sft-only/sft/checkpoint)")
        return 2
    overrides = ["labeler.kind=llm_judge", f"labeler.path={args.judge}"] + (
        [f"labeler.template={args.template}"] if args.template else [])
    try:
        cfg = load_config(args.config, overrides)
        task = load_task(cfg.data.task)
        judge = build_labeler(cfg.labeler, task)
    except BadInput as err:
        print(err)
        return 2
    truth = SimulatedLabeler(task.score, "task", f"task {task.name}")
    dialogues = load_prompts(cfg, task)
    chosen = random.Random(cfg.seed).sample(range(len(dialogues)), min(args.prompts, len(dialogues)))

    start_ray(None, 2)
    t0 = time.perf_counter()
    items = sample(cfg, str(Path(args.policy).resolve()), [dialogues[i] for i in chosen], args.k)
    t1 = time.perf_counter()
    with judge_engine(cfg, judge):
        t2 = time.perf_counter()
        judge_ranks = judge.rank_many(items)
        t3 = time.perf_counter()
        shown = [judge.question(m, r[0], r[1]) for m, r in items[:args.show]]
        examples = list(zip(shown, judge.ask(shown)))  # not counted in the stats
    task_ranks = [truth.rank(messages, replies) for messages, replies in items]
    figures = {"prompts": len(items), "k": args.k, "judge": args.judge, "policy": args.policy,
               **agreement(judge_ranks, task_ranks, cfg.seed), **judge.stats(),
               "seconds": {"sample": round(t1 - t0, 1), "judge_start": round(t2 - t1, 1),
                           "judge_rank": round(t3 - t2, 1), "total": round(time.perf_counter() - t0, 1)}}
    n = figures["prompts"]
    print(f"llm judge {args.judge} vs the task's labeler: {n} prompts x K={args.k}, {figures['asked']} questions")
    print(f"  pairwise agreement  {figures['pairwise_agreement']:.3f}   (judge tying everything: "
          f"{figures['baseline_all_tied']:.3f}, random ranking: {figures['baseline_random']:.3f})")
    tau = figures["kendall_tau_b"]
    print(f"  mean Kendall tau-b  {'undefined' if tau is None else f'{tau:+.3f}'}   "
          f"(defined on {figures['tau_defined']} of {n}; judge tied all on {figures['judge_all_tied']}, "
          f"task on {figures['task_all_tied']})")
    print(f"  parse rate          {figures['parse_rate']:.3f}   ({figures['parsed']} of {figures['asked']} answers "
          "gave A or B)")
    bias = figures["position_bias"]
    print(f"  position bias       {'n/a' if bias is None else f'{bias:.3f}'}   (first-shown reply won "
          f"{figures['first_shown_wins']} of {figures['parsed']} parsed; 0.5 = none)")
    s = figures["seconds"]
    print(f"  seconds             sample {s['sample']}, judge start {s['judge_start']}, judge ranking "
          f"{s['judge_rank']}, total {s['total']}")
    for (messages, replies), (_, answer) in zip(items, examples):
        print(f"  e.g. {messages[-1]['content']!r}: A={replies[0]!r} B={replies[1]!r} -> judge said {answer!r}")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
