"""Demonstration dialogues for supervised fine-tuning, and their tokenization.

InstructGPT's SFT data are labeler-written demonstrations; here they are, in this order:
  - the built-in task's demonstrations (`data.task`, `data.task_size` of them), if a task is set;
  - every `data.sft` source (JSONL or a local Hugging Face dataset; formats messages,
    prompt_response, or preference, whose chosen reply counts as the demonstration), mixed in by
    weight: a source of weight w and N rows contributes round(w * N) of them (data/sources.py).
Malformed rows are bad input naming file:line (or dataset row).

Tokenization uses the model's chat template; its `{% generation %}` blocks give the mask
of assistant tokens, the only tokens the SFT loss trains on.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from rlhf.orchestrator.config import ExperimentConfig
from rlhf.orchestrator.data.sources import Dialogue, load_dialogues
from rlhf.orchestrator.errors import BadInput

_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass
class EncodedDialogues:
    """Tokenized demonstrations, as the SFT workers consume them."""

    rows: list[tuple[list[int], list[int]]]  # (token ids [T], assistant mask [T] of 0/1) per dialogue
    truncated: int = 0  # dialogues cut to max_tokens that still hold assistant tokens (kept)
    skipped: int = 0    # dialogues with no assistant token left after the cut (dropped, counted)


def load_sft_dialogues(cfg: ExperimentConfig, task, seed: int) -> list[Dialogue]:
    """The SFT demonstrations of an experiment: `task.demonstrations(data.task_size, seed)` when
    `task` (a `rlhf.orchestrator.tasks.Task`) is given, then the data.sft sources mixed by weight."""
    base = task.demonstrations(cfg.data.task_size, seed) if task is not None else []
    dialogues = load_dialogues(cfg.data.sft, "data.sft", seed, base=base)
    if not dialogues:
        raise BadInput("data.sft: no demonstrations (set data.task or data.sft)")
    return dialogues


def encode_dialogues(tokenizer, dialogues: list[Dialogue], max_tokens: int) -> EncodedDialogues:
    """Chat-templated token ids and assistant-token masks, cut to `max_tokens`.

    A dialogue with no assistant token left to predict (none at all, or all cut off) is
    dropped and counted in `skipped`. Raises BadInput if the tokenizer has no chat template
    or one without `{% generation %}` blocks (no assistant mask), or if nothing is left.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise BadInput("model: the tokenizer has no chat template; SFT needs one with {% generation %} "
                       "blocks around assistant turns")
    if not _GENERATION_BLOCK.search(template if isinstance(template, str) else json.dumps(template)):
        raise BadInput("model: the tokenizer's chat template has no {% generation %} block, so assistant "
                       "tokens cannot be told apart; add one around each assistant turn's content")
    out = EncodedDialogues(rows=[])
    for dialogue in dialogues:
        enc = tokenizer.apply_chat_template(dialogue, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
        cut = len(ids) > max_tokens
        ids, mask = ids[:max_tokens], mask[:max_tokens]
        # Position 0 is never a target (nothing predicts it), so it does not count.
        if not any(mask[1:]):
            out.skipped += 1
            continue
        out.truncated += cut
        out.rows.append((ids, mask))
    if not out.rows:
        raise BadInput(f"sft.max_tokens: no dialogue has an assistant token within the first {max_tokens} "
                       f"tokens ({out.skipped} dialogues skipped)")
    return out
