"""Prompts for PPO: conversations whose last turn is the user's, tokenized with the chat template.

Sources: the built-in task (`data.task`) or a JSONL file (`data.train`) with one
`{"messages": [{"role": ..., "content": ...}, ...]}` per line; a trailing assistant turn is
dropped (the policy writes that one). Malformed lines are bad input naming file:line.
"""
from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.tasks import arithmetic

ROLES = ("system", "user", "assistant")


@dataclass
class PromptSet:
    messages: list[list[dict]]  # conversations ending with a user turn
    token_ids: list[list[int]]  # chat-templated, with the assistant generation prompt
    truncated: int = 0          # prompts cut to max_prompt_tokens (data.prompt_overflow: truncate)
    rejected: int = 0           # prompts dropped for being longer (data.prompt_overflow: reject)


def read_dialogues(path: str | Path) -> list[list[dict]]:
    """Reads a dialogue JSONL file; raises BadInput naming file:line on the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"data: no such file: {path}")
    dialogues = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
            if not isinstance(messages, list) or not messages:
                raise ValueError("'messages' must be a non-empty list")
            for m in messages:
                if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                    raise ValueError(f"each message needs role in {ROLES} and string content, got {m!r}"[:160])
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise BadInput(f"{path}:{lineno}: malformed dialogue: {err}") from None
        dialogues.append(messages)
    if not dialogues:
        raise BadInput(f"{path}: empty dataset (no dialogues)")
    return dialogues


def task_dialogues(task: str, n: int, seed: int) -> list[list[dict]]:
    if task != "arithmetic":
        raise BadInput(f"data.task: unknown task {task!r}; known: arithmetic")
    return arithmetic.make_dialogues(n, seed=seed)


def build_prompts(dialogues: list[list[dict]], tokenizer, max_tokens: int, overflow: str) -> PromptSet:
    """Cuts each dialogue before its last assistant turn and tokenizes it for generation."""
    messages, ids, truncated, rejected = [], [], 0, 0
    for dialogue in dialogues:
        prompt = dialogue[:-1] if dialogue[-1]["role"] == "assistant" else dialogue
        if not prompt or prompt[-1]["role"] != "user":
            continue
        tokens = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        if len(tokens) > max_tokens:
            if overflow == "reject":
                rejected += 1
                continue
            truncated += 1
            tokens = tokens[-max_tokens:]  # keep the end: the question and the generation prompt
        messages.append(prompt)
        ids.append(tokens)
    if not ids:
        raise BadInput(f"data: no usable prompts ({rejected} of {len(dialogues)} longer than data.max_prompt_tokens = "
                       f"{max_tokens} and rejected; the rest empty or not ending with a user turn)")
    return PromptSet(messages, ids, truncated, rejected)


def prompt_batches(n_prompts: int, per_step: int, seed: int) -> Iterator[list[int]]:
    """Endless stream of prompt-index batches: shuffled epochs, reproducible from `seed`."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        batch = []
        while len(batch) < per_step:
            if not order:
                order = list(range(n_prompts))
                rng.shuffle(order)
            batch.append(order.pop())
        yield batch
