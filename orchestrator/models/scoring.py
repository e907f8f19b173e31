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

import math

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


# --------------------------------------------------------------------------- the rule reward model
# A rule-model folder (orchestrator/recipe/rule_rm.py) is an AutoModelForSequenceClassification
# (num_labels=1) checkpoint plus rules.json {name: text}; sigmoid(score) = P(violation).
RULES_FILE = "rules.json"
MIN_NO_VIOLATION = 1e-6  # log(1 - P) is read at 1 - P >= this, so a sure violation is finite


def rule_messages(messages: list[dict], reply: str, rule_text: str) -> list[dict]:
    """The rule model's input conversation: [system "Rule: <text>", *messages, assistant reply]
    (a system turn of the dialogue is kept, after the rule, in the one system turn)."""
    system = f"Rule: {rule_text}"
    if messages and messages[0]["role"] == "system":
        system, messages = f"{system}\n\n{messages[0]['content']}", messages[1:]
    return [{"role": "system", "content": system}, *messages, {"role": "assistant", "content": reply}]


def rule_sequence_ids(tokenizer, messages: list[dict], reply: str, rule_text: str, max_tokens: int) -> list[int]:
    """Token ids of `rule_messages`, at most `max_tokens`: a long dialogue loses its middle, so the
    rule (the system turn at the start) and the reply (at the end, where the score is read) stay."""
    convo = rule_messages(messages, reply, rule_text)
    ids = list(tokenizer.apply_chat_template(convo, tokenize=True, return_dict=True)["input_ids"])
    if len(ids) <= max_tokens:
        return ids
    head = list(tokenizer.apply_chat_template(convo[:1], tokenize=True, return_dict=True)["input_ids"])
    if ids[: len(head)] != head or len(head) >= max_tokens // 2:
        return ids[-max_tokens:]  # no clean system prefix (or a huge rule): keep the end
    return head + ids[len(ids) - (max_tokens - len(head)):]


@torch.no_grad()
def rule_violation_probs(model: nn.Module, tokenizer, messages: list[dict], replies: list[str],
                         rules: dict[str, str], max_tokens: int | None = None) -> dict[str, list[float]]:
    """P(violation) of each reply (to the same `messages`) against each rule: rule name -> [N].
    Used by the reward actor (rules_rm) and in-process by chat/eval reranking (Sparrow@N).
    Sequences are cut as in training (`config.rule_max_tokens`, 512 when absent) unless given."""
    max_tokens = max_tokens or int(getattr(model.config, "rule_max_tokens", 512) or 512)
    names = list(rules)
    seqs = [rule_sequence_ids(tokenizer, messages, r, rules[n], max_tokens) for n in names for r in replies]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    probs = torch.sigmoid(score_sequences(model, seqs, pad)).view(len(names), len(replies)) if seqs else None
    return {n: probs[i].tolist() for i, n in enumerate(names)}


def rule_reward(probs: dict[str, list[float]], weights: dict[str, float]) -> list[float]:
    """rules_rm per reply: sum_rule w_rule * log(max(1 - P_rule, MIN_NO_VIOLATION)); a rule
    missing from `weights` has weight 1 ({} = every rule at 1)."""
    n = len(next(iter(probs.values()), []))
    return [sum(weights.get(rule, 1.0) * math.log(max(1.0 - p[i], MIN_NO_VIOLATION)) for rule, p in probs.items())
            for i in range(n)]


def load_rule_model(path: str, dtype: str = "float32"):
    """(model in eval mode, tokenizer, rules {name: text}) of a rule-model folder."""
    import json
    from pathlib import Path

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.orchestrator.errors import BadInput

    rules_file = Path(path) / RULES_FILE
    if not rules_file.is_file():
        raise BadInput(f"model.rule_reward: {path} is not a rule reward model folder (no {RULES_FILE})")
    rules = json.loads(rules_file.read_text())
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1,
                                                               dtype=getattr(torch, dtype)).eval()
    return model, AutoTokenizer.from_pretrained(str(path)), rules
