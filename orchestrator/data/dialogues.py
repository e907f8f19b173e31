"""Demonstration dialogues for supervised fine-tuning, and their tokenization.

InstructGPT's SFT data are labeler-written demonstrations; here they are, in this order:
  - the built-in task's demonstrations (`data.task`, `data.task_size` of them), if a task is set;
  - every `data.sft` source (JSONL or a local Hugging Face dataset; formats messages,
    prompt_response, or preference, whose chosen reply counts as the demonstration), mixed in by
    weight: a source of weight w and N rows contributes round(w * N) of them (data/sources.py).
Malformed rows are bad input naming file:line (or dataset row).

Tokenization uses the model's chat template. The SFT loss trains only on assistant tokens: each
assistant reply and the end-of-turn token(s) after it (the policy must learn to stop), never the
assistant header the prompt supplies. A template with `{% generation %}` blocks marks them
itself; for any other (SmolLM2's ChatML, most real models') the mask comes from rendering
prefixes of the conversation: the tokens between `messages[:i]` with the generation prompt
and `messages[:i+1]` are assistant turn i (`prefix_assistant_mask`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from rlhf.orchestrator.config import ExperimentConfig
from rlhf.orchestrator.data.sources import Dialogue, load_dialogues
from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.evidence.format import RESULT

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
    dropped and counted in `skipped`. Raises BadInput if the tokenizer has no chat template,
    if the template's prefixes cannot be lined up with the full conversation (see
    `prefix_assistant_mask`), or if nothing is left.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise BadInput("model: the tokenizer has no chat template; SFT needs one to tell assistant turns apart")
    marked = bool(_GENERATION_BLOCK.search(template if isinstance(template, str) else json.dumps(template)))
    out = EncodedDialogues(rows=[])
    for dialogue in dialogues:
        if marked:
            enc = tokenizer.apply_chat_template(dialogue, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
            ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
        else:
            ids, mask = prefix_assistant_mask(tokenizer, dialogue)
        mask = mask_tool_results(tokenizer, dialogue, ids, mask)
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


def mask_tool_results(tokenizer, dialogue: Dialogue, ids: list[int], mask: list[int]) -> list[int]:
    """`mask` with the tokens of tool results inside assistant turns set to 0: the system inserts
    those lines at rollout (orchestrator/evidence/format.py, `Search Result: ...`), so SFT does not
    teach the policy to write them, as PPO's loss mask does not. A token counts when it lies wholly
    inside such a line (its newline included); a token that straddles the line's edge stays a target.
    Dialogues without tool results, and tokenizers without offsets, are returned unchanged."""
    if not any(m["role"] == "assistant" and RESULT in m["content"] for m in dialogue):
        return mask
    full = _render(tokenizer, dialogue, False)
    spans = [(m.start(), m.end()) for m in re.finditer(rf"(?m)^{re.escape(RESULT)}[^\n]*\n?", full)]
    try:
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        return mask
    if list(enc["input_ids"]) != list(ids):
        return mask  # the template tokenized differently: leave the mask as the template made it
    inside = [any(s <= a and b <= e for s, e in spans) for a, b in enc["offset_mapping"]]
    return [0 if hidden else m for m, hidden in zip(mask, inside)]


def _render(tokenizer, messages: Dialogue, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _reply_spans(tokenizer, dialogue: Dialogue) -> tuple[str, list[tuple[int, int]]]:
    """The rendered dialogue and the [start, end) character span of each assistant turn.

    Turn i spans from the end of `messages[:i]` rendered with the generation prompt (so the
    assistant header is prompt) to the end of `messages[:i+1]`, less trailing whitespace (the
    "\n" ChatML puts after <|im_end|> is never generated: sampling stops at <|im_end|>). An
    assistant turn that opens the dialogue has no prompt to render and is context only.
    """
    full = _render(tokenizer, dialogue, False)
    spans = []
    for i, message in enumerate(dialogue):
        if message["role"] != "assistant" or i == 0:
            continue
        before, through = _render(tokenizer, dialogue[:i], True), _render(tokenizer, dialogue[: i + 1], False)
        if not (through.startswith(before) and full.startswith(through)):
            raise BadInput("model: the tokenizer's chat template does not render a conversation's first turns as "
                           "the start of the whole (so assistant turns cannot be told apart); add {% generation %} "
                           "blocks around each assistant turn's content")
        spans.append((len(before), max(len(before), len(through.rstrip()))))
    return full, spans


def prefix_assistant_mask(tokenizer, dialogue: Dialogue) -> tuple[list[int], list[int]]:
    """Token ids [T] of the chat-templated dialogue and its assistant mask [T] of 0/1, for a
    template without `{% generation %}` blocks.

    Token level first: the ids of each rendered prefix must be a true prefix of the full ids
    (a tokenizer may merge tokens across a boundary, and then they are not). Failing that,
    character offsets (`return_offsets_mapping`, fast tokenizers): a token is assistant if it
    overlaps an assistant span.
    """
    full, spans = _reply_spans(tokenizer, dialogue)
    ids = _encode(tokenizer, full)
    mask = [0] * len(ids)
    for start, end in spans:
        head, turn = _encode(tokenizer, full[:start]), _encode(tokenizer, full[:end])
        if ids[: len(head)] != head or ids[: len(turn)] != turn:
            return _offset_mask(tokenizer, full, spans)
        mask[len(head): len(turn)] = [1] * (len(turn) - len(head))
    return ids, mask


def _encode(tokenizer, text: str) -> list[int]:
    # As apply_chat_template tokenizes: the template writes any special tokens itself.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _offset_mask(tokenizer, full: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    try:
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise BadInput("model: the tokenizer merges tokens across chat-template turns and gives no character "
                       "offsets (not a fast tokenizer), so assistant turns cannot be told apart; add "
                       "{% generation %} blocks around each assistant turn's content") from None
    mask = [int(any(a < e and b > s for s, e in spans)) for a, b in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask
