"""The judge during PPO: a guard against reward over-optimisation (Goodhart's law).

PPO climbs the reward model's score, and a reward model is only a proxy: past some KL
from the SFT model the proxy keeps rising while the true preference falls (Gao et al.
2022, "Scaling laws for reward model overoptimization"). So every `pipeline.eval_every`
steps the engines answer a fixed held-out sample of prompts (same seed each time, so the
policy is the only thing that changes), the judge scores the replies, and the score is
logged as `eval/labeler_score` next to the RM's `reward/mean`. `Selection` keeps the best
step by that score (the starting policy is step 0) and says when to stop: once the score
has stayed below the best for `patience` evaluations in a row.

    judge = HeldOutJudge(prompts.messages, prompts.token_ids, judge.score, samples=4,
                         temperature=1.0, max_new_tokens=64, seed=0)
    score = judge.evaluate(roles.rollout, tokenizer)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

ScoreFn = Callable[[list[dict], str], float]  # (prompt messages, reply text) -> judge score


@dataclass(frozen=True)
class HeldOutJudge:
    """A fixed held-out sample and the judge that scores the policy's replies to it."""

    messages: list[list[dict]]   # P conversations ending with a user turn
    token_ids: list[list[int]]   # P chat-templated prompts (with the generation prompt)
    score: ScoreFn
    samples: int                 # replies per prompt; a prompt's score is their mean
    temperature: float
    max_new_tokens: int
    seed: int

    def evaluate(self, rollout, tokenizer) -> float:
        """Mean over prompts of the mean judge score of each prompt's replies (rollout: a
        RolloutGroup holding the current policy's weights)."""
        out = rollout.generate(self.token_ids, n=self.samples, temperature=self.temperature, top_p=1.0,
                               max_new_tokens=self.max_new_tokens, seed=self.seed)
        texts = tokenizer.batch_decode(out.response_ids, skip_special_tokens=True)
        per_prompt: list[list[float]] = [[] for _ in self.messages]
        for i, text in zip(out.prompt_index, texts):
            per_prompt[i].append(float(self.score(self.messages[i], text.strip())))
        return sum(sum(s) / len(s) for s in per_prompt) / len(per_prompt)


@dataclass
class Selection:
    """Best step by judge score and the early-stopping count (pure bookkeeping, no Ray).

    `update(step, score)` returns True when `score` is a new best (strictly higher).
    `falls` counts consecutive evaluations strictly below the best; `should_stop` once it
    reaches `patience` (0 = never)."""

    patience: int
    best_step: int = -1
    best_score: float = -math.inf
    falls: int = 0
    history: list[tuple[int, float]] = field(default_factory=list)

    def update(self, step: int, score: float) -> bool:
        self.history.append((step, score))
        if score > self.best_score:
            self.best_step, self.best_score, self.falls = step, score, 0
            return True
        self.falls = self.falls + 1 if score < self.best_score else 0
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.falls >= self.patience

    @classmethod
    def replay(cls, patience: int, rows: list[dict], key: str = "eval/labeler_score") -> "Selection":
        """The state after the logged evaluations in `rows` (used on resume)."""
        sel = cls(patience)
        for row in rows:
            if row.get(key) is not None:
                sel.update(int(row["step"]), float(row[key]))
        return sel


@dataclass(frozen=True)
class JudgePlan:
    """What `run_ppo` does with the judge (built from pipeline.* by the pipeline)."""

    judge: HeldOutJudge
    every: int        # evaluate every N steps (and before step 1); 0 = only before step 1 and at the end
    select: str       # "best": hand on the best step's policy; "last": the last step's
    patience: int     # stop after this many evaluations in a row below the best; 0 = never

    def due(self, step: int, last_step: int) -> bool:
        return step == last_step or (self.every > 0 and step % self.every == 0)
