"""The reward model's score of a token sequence: its scalar head at the last real token.

One scorer for every reader of a reward-model folder: the RM stage (training forward,
held-out accuracy, the score shift; orchestrator/recipe/rm.py), the reward actor
(actors/reward.py) and the `reward_model` labeler/judge (orchestrator/data/labelers.py).
A reward-model folder is an `AutoModelForSequenceClassification(num_labels=1)` checkpoint
whose `config.reward_offset` is subtracted from raw scores (set by the RM stage so that
demonstrations score 0 on average). Sequences are right-padded.

Runs on CPU as is; on a GPU the caller moves the model (inputs follow its device).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pads token lists -> input_ids [B, T], attention_mask [B, T]."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attn[i, : len(s)] = 1
    return ids, attn


def last_token_scores(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """[B, T] right-padded -> [B] float32 raw scores (keeps the graph: the RM trains through it)."""
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    last = attention_mask.sum(1) - 1
    return model.score(hidden[torch.arange(len(last), device=hidden.device), last]).squeeze(-1).float()


@torch.no_grad()
def score_sequences(model: nn.Module, seqs: list[list[int]], pad_id: int, batch_size: int = 64) -> Tensor:
    """Raw scores [N] of token sequences (the model in eval mode), `batch_size` at a time."""
    device = next(model.parameters()).device
    parts = [last_token_scores(model, *(t.to(device) for t in pad_right(seqs[s: s + batch_size], pad_id)))
             for s in range(0, len(seqs), batch_size)]
    return torch.cat(parts).cpu() if parts else torch.zeros(0)


def reward_offset(model: nn.Module) -> float:
    """The shift the RM stage stored in `config.reward_offset` (0 when there is none)."""
    return float(getattr(model.config, "reward_offset", 0.0) or 0.0)


def turn_end_ids(model_path: str, tokenizer) -> list[int]:
    """The id a reply ends with when the policy stops on its own: the generation config's
    first eos id (<|im_end|> for the tiny models), else the tokenizer's eos."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(str(model_path)).eos_token_id
    except OSError:
        eos = None
    eos = tokenizer.eos_token_id if eos is None else eos
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    return [] if eos is None else [int(eos)]
