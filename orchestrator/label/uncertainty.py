"""Which comparisons people should rank first: those the current reward model is least sure of.

The margin of a comparison is the smallest gap between the scores the run's newest reward
model gives its replies (two replies it scores nearly alike are the ones a ranking teaches
it most about). Oat (Liu et al. 2024) selects queries the same way for offline data; with
an ensemble, disagreement would stand in for the margin (one RM per run here).
"""
from __future__ import annotations

import re
from pathlib import Path


def newest_reward_model(run: Path) -> Path | None:
    """RUN/roundN/rm/checkpoint of the highest N, else RUN/rm/checkpoint (`rlhf rm`), else None."""
    rounds = sorted((int(m.group(1)), p) for p in run.glob("round*/rm/checkpoint")
                    if (m := re.fullmatch(r"round(\d+)", p.parent.parent.name)) and (p / "config.json").is_file())
    if rounds:
        return rounds[-1][1]
    single = run / "rm" / "checkpoint"
    return single if (single / "config.json").is_file() else None


def reward_margins(rm_dir: Path, comparisons) -> dict[int, float]:
    """Comparison id -> smallest gap between the RM's scores of its replies."""
    from rlhf.orchestrator.data.labelers import RewardModelLabeler

    scorer = RewardModelLabeler(rm_dir, key="label.order uncertainty")
    margins = {}
    for c in comparisons:
        scores = sorted(scorer.scores(c.prompt_messages, c.replies))
        margins[c.id] = min(b - a for a, b in zip(scores, scores[1:]))
    return margins
