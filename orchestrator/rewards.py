"""Python reward functions, registered by name and combined with weights in config.

    reward:
      functions: {arithmetic: 1.0, digit_fraction: 0.5}

Each function scores one reply: `fn(prompt_messages, reply_text, reply_ids) -> float`.
The reward actor evaluates every configured function (and the reward model, if any), logs
each component as `reward/<name>`, and sums them with their weights.
"""
from __future__ import annotations

from typing import Callable

from rlhf.orchestrator.tasks import arithmetic

RewardFn = Callable[[list[dict], str, list[int]], float]


def digit_fraction(prompt: list[dict], reply: str, reply_ids: list[int]) -> float:
    """Share of the reply's characters that are digits (0 for an empty reply).

    A deliberately easy rule: a policy learns it in tens of PPO steps, which makes it the
    smoke test of the whole PPO engine (configs/ppo-tiny.yaml).
    """
    text = reply.strip()
    return sum(ch.isdigit() for ch in text) / len(text) if text else 0.0


def arithmetic_labeler(prompt: list[dict], reply: str, reply_ids: list[int]) -> float:
    """The quickstart task's simulated labeler (correct answer, polite, not rambling)."""
    return arithmetic.score_reply(prompt, reply)


REWARD_FUNCTIONS: dict[str, RewardFn] = {
    "digit_fraction": digit_fraction,
    "arithmetic": arithmetic_labeler,
}
