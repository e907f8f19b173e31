"""Demonstration dialogues for supervised fine-tuning, and their tokenization.

Sources (InstructGPT's SFT data: labeler-written demonstrations, here any mix of):
  - the built-in task's dialogues (`data.task`, `data.task_size` of them);
  - `data.train`: a JSONL of `{"messages": [...]}` dialogues (its assistant turns count);
  - each `sft.sources` entry, mixed in by weight: a source of weight w contributes
    round(w * N_base) dialogues, N_base being the number of dialogues above (or, with none
    above, w times its own size), drawn with a seeded RNG, with replacement only when the
    file holds fewer than that.
A source file is either `dialogue` format (`{"messages": [...]}`) or `instruction` format
(`{"instruction": str, "response": str}`, which becomes one user turn and one assistant
turn). Malformed lines are bad input naming file:line.

Tokenization uses the model's chat template; its `{% generation %}` blocks give the mask
of assistant tokens, the only tokens the SFT loss trains on.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from rlhf.orchestrator.config import DataSourceConfig, ExperimentConfig
from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.data.prompts import read_dialogues, task_dialogues

Dialogue = list[dict]  # [{"role": "system"|"user"|"assistant", "content": str}, ...]
_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass
class EncodedDialogues:
    """Tokenized demonstrations, as the SFT workers consume them."""

    rows: list[tuple[list[int], list[int]]]  # (token ids [T], assistant mask [T] of 0/1) per dialogue
    truncated: int = 0  # dialogues cut to max_tokens that still hold assistant tokens (kept)
    skipped: int = 0    # dialogues with no assistant token left after the cut (dropped, counted)


def read_instructions(path: str | Path) -> list[Dialogue]:
    """Reads `{"instruction", "response"}` JSONL as two-turn dialogues; BadInput names file:line."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"sft.sources: no such file: {path}")
    dialogues = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            pair = json.loads(line)
            if not isinstance(pair, dict):
                raise ValueError(f"expected an object, got {type(pair).__name__}")
            instruction, response = pair["instruction"], pair["response"]
            if not isinstance(instruction, str) or not isinstance(response, str):
                raise ValueError("'instruction' and 'response' must be strings")
        except (ValueError, KeyError, TypeError) as err:
            raise BadInput(f"{path}:{lineno}: malformed instruction pair: {err}") from None
        dialogues.append([{"role": "user", "content": instruction},
                          {"role": "assistant", "content": response}])
    if not dialogues:
        raise BadInput(f"{path}: empty dataset (no instruction pairs)")
    return dialogues


def read_source(source: DataSourceConfig, index: int) -> list[Dialogue]:
    """All dialogues of one `sft.sources` entry."""
    if not source.path or not Path(source.path).is_file():
        raise BadInput(f"sft.sources.{index}.path: no such file: {source.path!r}")
    if source.format == "instruction":
        return read_instructions(source.path)
    return read_dialogues(source.path)


def mix_source(dialogues: list[Dialogue], weight: float, n_base: int, rng: random.Random) -> list[Dialogue]:
    """round(weight * n_base) dialogues of a source (weight x its own size when n_base is 0):
    a sample without replacement when the source is large enough, with replacement if not."""
    n = round(weight * (n_base or len(dialogues)))
    if n <= len(dialogues):
        return rng.sample(dialogues, n)
    return rng.choices(dialogues, k=n)


def load_sft_dialogues(cfg: ExperimentConfig, seed: int) -> list[Dialogue]:
    """The SFT demonstrations of an experiment: task and data.train dialogues, then every
    sft.sources entry mixed in by weight (reproducible from `seed`)."""
    base: list[Dialogue] = []
    if cfg.data.task:
        base += task_dialogues(cfg.data.task, cfg.data.task_size, seed)
    if cfg.data.train:
        base += read_dialogues(cfg.data.train)
    mixed = list(base)
    rng = random.Random(seed)
    for index, source in enumerate(cfg.sft.sources):
        mixed += mix_source(read_source(source, index), source.weight, len(base), rng)
    if not mixed:
        raise BadInput("sft: no demonstration dialogues (set data.task, data.train or sft.sources, "
                       "and check that sft.sources weights are not too small to draw one dialogue)")
    return mixed


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
