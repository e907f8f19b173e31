"""Prompts for comparisons, PPO and evaluation: conversations whose last turn is the user's,
tokenized with the chat template.

Where they come from (`load_prompts`): the data.prompts sources if any, else the built-in
task's prompts (`data.task`, `data.task_size` of them), else the data.sft demonstrations cut
before their reply. Held-out prompts (`load_eval_prompts`): the first n of data.eval in file
order, else the task's held-out prompts (another seed of its generator). Sources are JSONL
files or local Hugging Face datasets in any format of data/sources.py; a trailing assistant
turn is dropped (the policy writes that one). Malformed rows are bad input naming file:line.
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rlhf.orchestrator.config import DataSourceConfig, ExperimentConfig
from rlhf.orchestrator.data.sources import Dialogue, load_dialogues
from rlhf.orchestrator.errors import BadInput

EVAL_SEED_OFFSET = 10_000  # a task's held-out prompts come from another seed of its generator


@dataclass
class PromptSet:
    messages: list[list[dict]]  # conversations ending with a user turn
    token_ids: list[list[int]]  # chat-templated, with the assistant generation prompt
    truncated: int = 0          # prompts cut to max_prompt_tokens (data.prompt_overflow: truncate)
    rejected: int = 0           # prompts dropped for being longer (data.prompt_overflow: reject)


def read_dialogues(path: str | Path) -> list[Dialogue]:
    """All dialogues of one messages-format JSONL file (BadInput names file:line)."""
    return load_dialogues([DataSourceConfig(path=str(path))], "data", seed=0)


def drop_reply(dialogue: Dialogue) -> Dialogue:
    """The conversation before a trailing assistant turn (the one the policy writes)."""
    return dialogue[:-1] if dialogue and dialogue[-1]["role"] == "assistant" else dialogue


def load_prompts(cfg: ExperimentConfig, task) -> list[Dialogue]:
    """Prompts for comparisons and PPO: data.prompts, else `task.prompts(data.task_size, seed)`
    (`task` a `rlhf.orchestrator.tasks.Task` or None), else the data.sft dialogues."""
    if cfg.data.prompts:
        dialogues = load_dialogues(cfg.data.prompts, "data.prompts", cfg.seed)
    elif task is not None:
        dialogues = task.prompts(cfg.data.task_size, cfg.seed)
    elif cfg.data.sft:
        dialogues = load_dialogues(cfg.data.sft, "data.sft", cfg.seed)
    else:
        raise BadInput("data.prompts: no prompts (set data.prompts, data.task or data.sft)")
    return [drop_reply(d) for d in dialogues]


def load_eval_prompts(cfg: ExperimentConfig, task, n: int) -> list[Dialogue]:
    """`n` held-out prompts: the first n of data.eval (file order, so every run sees the same),
    else `task.eval_prompts(n, seed + EVAL_SEED_OFFSET)`."""
    if cfg.data.eval:
        prompts = [drop_reply(d) for d in load_dialogues(cfg.data.eval, "data.eval", cfg.seed)[:n]]
        bad = sum(not p or p[-1]["role"] != "user" for p in prompts)
        if bad:
            raise BadInput(f"data.eval: {bad} of the first {len(prompts)} conversations do not end with a user "
                           "turn (or an assistant reply after one)")
        return prompts
    if task is not None:
        return task.eval_prompts(n, cfg.seed + EVAL_SEED_OFFSET)
    raise BadInput("data.eval: no held-out prompts (set data.eval or data.task)")


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
