"""The built-in quickstart task: a polite arithmetic assistant over several turns.

A conversation opens with "What is A op B?" and may continue with follow-ups that act
on the previous answer ("Now add 3 to that."). The "human preference" that the simulated
labeler encodes: the last number in the reply is the right answer, and the reply is
polite (one of a few courteous phrases) without rambling.

Everything is generated from a seed, so the task needs no files and no download.
"""
from __future__ import annotations

import random
import re

POLITE = ("Happy to help!", "Glad I could help.", "You're welcome!")
_FIRST = re.compile(r"What is (\d+) ([+\-*]) (\d+)\?")
_FOLLOW = re.compile(r"Now (add|subtract|multiply) (\d+) (?:to|from|by) that\.")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_VERBS = {"add": ("+", "to"), "subtract": ("-", "from"), "multiply": ("*", "by")}


def _question(rng: random.Random) -> tuple[str, int, str]:
    a, b, op = rng.randint(0, 20), rng.randint(0, 20), rng.choice("+-*")
    return f"What is {a} {op} {b}?", _OPS[op](a, b), f"{a} {op} {b}"


def _follow_up(rng: random.Random, value: int) -> tuple[str, int, str]:
    verb = rng.choice(sorted(_VERBS))
    op, prep = _VERBS[verb]
    d = rng.randint(1, 9)
    return f"Now {verb} {d} {prep} that.", _OPS[op](value, d), f"{value} {op} {d}"


def _reply(rng: random.Random, expr: str, value: int, polite_rate: float) -> str:
    answer = f"{expr} = {value}."
    return f"{answer} {rng.choice(POLITE)}" if rng.random() < polite_rate else answer


def make_dialogue(rng: random.Random, max_turns: int = 2, polite_rate: float = 0.5) -> list[dict]:
    """One demonstration conversation: list of {"role", "content"} messages."""
    question, value, expr = _question(rng)
    messages = [{"role": "user", "content": question},
                {"role": "assistant", "content": _reply(rng, expr, value, polite_rate)}]
    for _ in range(rng.randint(1, max_turns) - 1):
        question, value, expr = _follow_up(rng, value)
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": _reply(rng, expr, value, polite_rate)}]
    return messages


def make_dialogues(n: int, seed: int, max_turns: int = 2, polite_rate: float = 0.5) -> list[list[dict]]:
    """`n` demonstration conversations, reproducible from `seed`."""
    rng = random.Random(seed)
    return [make_dialogue(rng, max_turns, polite_rate) for _ in range(n)]


def expected_answer(messages: list[dict]) -> int:
    """Replays the user turns of a conversation to find the number the next reply should give."""
    value = None
    for msg in messages:
        if msg["role"] != "user":
            continue
        if first := _FIRST.fullmatch(msg["content"]):
            value = _OPS[first[2]](int(first[1]), int(first[3]))
        elif (follow := _FOLLOW.fullmatch(msg["content"])) and value is not None:
            value = _OPS[_VERBS[follow[1]][0]](value, int(follow[2]))
        else:
            raise ValueError(f"not an arithmetic-task turn: {msg['content']!r}")
    if value is None:
        raise ValueError("conversation has no question")
    return value


def is_correct(messages: list[dict], reply: str) -> bool:
    """The last number in `reply` is the answer the conversation asks for."""
    numbers = re.findall(r"-?\d+", reply)
    return bool(numbers) and int(numbers[-1]) == expected_answer(messages)


def is_polite(reply: str) -> bool:
    return any(phrase in reply for phrase in POLITE)


def score_reply(messages: list[dict], reply: str) -> float:
    """Simulated labeler's score in [-1.5, 1.5] of `reply` as the next assistant turn.

    +1 if the last number in the reply is the right answer, else -1; +0.5 for a courteous
    phrase; -0.5 if the reply rambles past 60 characters.
    """
    score = 1.0 if is_correct(messages, reply) else -1.0
    score += 0.5 if is_polite(reply) else 0.0
    score -= 0.5 if len(reply) > 60 else 0.0
    return score


EVAL_SEED_OFFSET = 10_000  # held-out prompts come from another seed of the same generator


class ArithmeticTask:
    """The registry's `arithmetic` task (orchestrator/tasks/__init__.py: Task)."""

    name = "arithmetic"

    def __init__(self, max_turns: int = 2, polite_rate: float = 0.5) -> None:
        self.max_turns, self.polite_rate = max_turns, polite_rate

    def demonstrations(self, n: int, seed: int) -> list[list[dict]]:
        return make_dialogues(n, seed, self.max_turns, self.polite_rate)

    def prompts(self, n: int, seed: int) -> list[list[dict]]:
        """The demonstrations of `seed`, cut before their last assistant turn."""
        return [d[:-1] for d in self.demonstrations(n, seed)]

    def eval_prompts(self, n: int, seed: int) -> list[list[dict]]:
        """Prompts of seed + EVAL_SEED_OFFSET (the quickstart's held-out set since its first
        version). The question space is small, so some of them also occur in `prompts`."""
        return self.prompts(n, seed + EVAL_SEED_OFFSET)

    def score(self, messages: list[dict], reply: str) -> float:
        return score_reply(messages, reply)
