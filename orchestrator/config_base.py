"""The base of every config section and the sections more than one module of the config shares.

`Section` forbids unknown keys and freezes values; `_f` is a field with its default and its
one-line description (what `rlhf config keys` prints). orchestrator/config.py re-exports all.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, defaults are documented."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _f(default, description: str, **constraints):
    return Field(default, description=description, **constraints)


class LabelerConfig(Section):
    """Who ranks sampled replies (and, by default, judges evaluations)."""

    kind: Literal["task", "python", "file", "reward_model", "human", "llm_judge"] = _f(
        "task", "task: the built-in task's simulated labeler; python: a function or object (target); "
        "file: rankings JSONL (path); reward_model: a trained RM folder (path); human: people rank in the store; "
        "llm_judge: a chat model (path: folder or known name) asked which reply is better, in both orders")
    target: Optional[str] = _f(None, "kind python: `pkg.module:name` or `path/to/file.py:name`, a function "
                               "score(messages, reply) -> float or an object with rank(messages, replies)")
    path: Optional[str] = _f(None, "kind file: rankings JSONL; kind reward_model: reward-model folder; "
                             "kind llm_judge: the judge model (folder or known name)")
    template: Optional[str] = _f(None, "kind llm_judge: prompt template file ({conversation}, {reply_a}, {reply_b}); "
                                 "null = the built-in one")
    min_ranked: int = _f(1, "kind human: comparisons of the round that must be ranked before --resume goes on",
                         gt=0)


class LoraConfig(Section):
    """Low-rank adapters (peft): only the adapters (and a value head) train; the base stays frozen."""

    rank: int = _f(16, "rank r of each adapter's A [r, in] and B [out, r]", gt=0)
    alpha: float = _f(32.0, "scale: the update is (alpha / rank) * B @ A", gt=0)
    dropout: float = _f(0.0, "dropout on the adapter's input", ge=0, lt=1)
    target_modules: list[str] = _f(["q_proj", "k_proj", "v_proj", "o_proj"],
                                   "module names (suffixes) that get adapters; an error if none matches")
