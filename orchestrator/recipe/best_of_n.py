"""Best-of-N rejection sampling: sample N replies per prompt, keep the reward model's favourite, SFT on it.

    for each prompt x:  y_1..y_N ~ pi(. | x)                (the rollout engines, best_of_n.temperature)
                        y* = argmax_i r(x, y_i)             (a reward-model folder)
    pi <- SFT(pi, {(x, y*)})                                (the SFT stage's learner and settings)

This is RAFT (Dong et al. 2023, "RAFT: Reward rAnked FineTuning", Algorithm 1, with one kept reply per
prompt) and the rejection-sampling fine-tuning Llama 2 ran before PPO (Touvron et al. 2023, sec. 3.2.3).
Why SFT and not PPO: the update is plain maximum likelihood on the kept replies, so it needs no critic,
no reference model and no KL controller; the price is the N-fold sampling and that it only moves the
policy towards replies it can already sample.

Writes <out>/kept.jsonl (one row per prompt: prompt, reply, score, mean_score, scores, finished) and
<out>/checkpoint (the SFT'd policy, Hugging Face folder) with <out>/metrics.jsonl from the SFT stage.

Run on one CPU machine (Ray started by the caller):
    ray.init(); run_best_of_n(cfg, "runs/x/sft/checkpoint", "runs/x/round1/rm/checkpoint", prompts,
                              Path("runs/x/round1/best_of_n"))
On a cluster the same call places the engine (rollout.tensor_parallel_size GPUs) and the SFT workers on
the cluster; the reward model scores in the driver process, as the held-out judge does.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from rlhf.orchestrator.config import ExperimentConfig
from rlhf.orchestrator.data.labelers import RewardModelLabeler
from rlhf.orchestrator.data.prompts import build_prompts
from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.ppo.launch import sampling_rollout
from rlhf.orchestrator.recipe.sft import load_tokenizer, run_sft
from rlhf.orchestrator.run.rundir import write_atomic

KEPT_FILE = "kept.jsonl"


@dataclass(frozen=True)
class BestOfNResult:
    checkpoint: Path        # Hugging Face folder of the policy after SFT on the kept replies
    kept: int               # prompts kept (one reply each)
    mean_best_score: float  # mean over prompts of the kept reply's reward-model score
    mean_score: float       # mean over prompts and all N samples (what plain sampling scores)
    kept_path: Path         # kept.jsonl
    sft_steps: int          # optimizer steps of the SFT on the kept replies


def best_per_prompt(scores: list[float], n: int) -> list[int]:
    """Index (0..n-1) of the highest score within each run of `n` consecutive scores; ties keep
    the earliest sample. [P * n] -> [P]."""
    if n < 1 or len(scores) % n:
        raise ValueError(f"{len(scores)} scores are not a whole number of groups of n = {n}")
    return [max(range(n), key=lambda i, s=scores[p: p + n]: (s[i], -i)) for p in range(0, len(scores), n)]


def kept_rows(messages: list[list[dict]], replies: list[str], scores: list[float], finished: list[bool],
              n: int) -> list[dict]:
    """One kept.jsonl row per prompt: its best reply by score, that score, and the mean of its N scores.
    messages [P]; replies, scores, finished [P * n], the n samples of prompt p consecutive."""
    if not len(replies) == len(scores) == len(finished) == n * len(messages):
        raise ValueError(f"{len(messages)} prompts x n = {n} need as many replies/scores/flags, got "
                         f"{len(replies)}, {len(scores)}, {len(finished)}")
    rows = []
    for p, best in enumerate(best_per_prompt(scores, n)):
        group = scores[p * n: (p + 1) * n]
        rows.append({"prompt": messages[p], "reply": replies[p * n + best], "score": group[best],
                     "mean_score": sum(group) / n, "scores": group, "finished": finished[p * n + best]})
    return rows


def _pick_prompts(prompts: list[list[dict]], count: int, seed: int, round_: int) -> list[list[dict]]:
    """`count` prompts drawn without replacement, the same ones for the same (seed, round)."""
    rng = random.Random(f"best_of_n/{seed}/{round_}")  # str seeds are hashed deterministically
    return [prompts[i] for i in sorted(rng.sample(range(len(prompts)), min(count, len(prompts))))]


def run_best_of_n(cfg: ExperimentConfig, policy_dir: str | Path, rm_dir: str | Path, prompts: list[list[dict]],
                  out_dir: str | Path, max_steps: int | None = None, *, round_: int = 0) -> BestOfNResult:
    """One best-of-N round on best_of_n.prompts of `prompts` (conversations ending with a user turn);
    `round_` varies the prompt draw and the sampling seed between rounds. Ray must be running."""
    bon, out = cfg.best_of_n, Path(out_dir).resolve()
    if not prompts:
        raise BadInput("best_of_n: no prompts to sample replies for")
    # Everything that can be wrong with the inputs fails here, before an engine starts.
    if not (Path(rm_dir) / "config.json").is_file():
        raise BadInput(f"best_of_n: {rm_dir} is not a reward-model folder (no config.json)")
    scorer = RewardModelLabeler(str(rm_dir), key="best_of_n reward model")
    tokenizer = load_tokenizer(str(policy_dir))
    chosen = build_prompts(_pick_prompts(prompts, bon.prompts, cfg.seed, round_), tokenizer,
                           cfg.data.max_prompt_tokens, cfg.data.prompt_overflow)

    # Phase 1, sample: one generate call for all prompts; the n samples of a prompt come back consecutive.
    rollout = sampling_rollout(cfg, str(policy_dir), seed=cfg.seed + round_)
    try:
        samples = rollout.generate(chosen.token_ids, n=bon.n, temperature=bon.temperature,
                                   max_new_tokens=cfg.rollout.max_new_tokens, seed=cfg.seed * 7919 + round_ + 1)
    finally:
        rollout.shutdown()  # frees its CPUs/GPUs for the SFT workers
    if len(samples) != bon.n * len(chosen.messages):
        raise RuntimeError(f"rollout returned {len(samples)} samples, expected {bon.n} x {len(chosen.messages)}")
    replies = tokenizer.batch_decode(samples.response_ids, skip_special_tokens=True)

    # Phase 2, reject: score every sample with the reward model, keep each prompt's best.
    scores = [s for p, messages in enumerate(chosen.messages)
              for s in scorer.scores(messages, replies[p * bon.n: (p + 1) * bon.n])]
    del scorer
    rows = kept_rows(chosen.messages, replies, scores, samples.finished, bon.n)
    kept_path = out / KEPT_FILE
    write_atomic(kept_path, "".join(json.dumps(r) + "\n" for r in rows))
    mean_best = sum(r["score"] for r in rows) / len(rows)
    mean_all = sum(scores) / len(scores)

    # Phase 3, fine-tune: maximum likelihood on (prompt, kept reply), with the sft section's settings.
    dialogues = [r["prompt"] + [{"role": "assistant", "content": r["reply"]}] for r in rows]
    sft = run_sft(cfg, str(policy_dir), out, max_steps=max_steps, dialogues=dialogues)
    print(f"best-of-{bon.n}: kept {len(rows)} replies, reward-model score {mean_best:.3f} (kept) vs {mean_all:.3f} "
          f"(all samples); SFT {sft.steps} steps; policy in {sft.checkpoint}")
    return BestOfNResult(checkpoint=sft.checkpoint, kept=len(rows), mean_best_score=mean_best, mean_score=mean_all,
                         kept_path=kept_path, sft_steps=sft.steps)
