"""Per-rule violation labels for the rule-conditional reward model (Sparrow, Glaese et al. 2022).

One example is one reply judged against one rule: `RuleExample(messages, reply, rule,
rule_text, violated)`. They come from three places:
  - files: data.rule_labels, format rule_labels, one JSON object a line
        {"messages": [{role, content}, ...], "reply": "...", "rule": "no_verdicts", "violated": true}
    (`load_rule_labels`; a bad line is one BadInput naming file:line, a rule with no text too);
  - the task's simulated labels, `task.rule_violations(messages, reply) -> {rule: bool}`
    (`simulated_labels`; applied by the recipe to every stored reply of the comparison store);
  - people, the labeling page's per-reply rule checkboxes (`people_labels`: a ranking's
    violations as JSON {"<reply index>": [rule names]}, every shown reply judged against every
    rule; an old plain list, which does not say which reply broke the rule, is skipped).

Pure Python on the driver (no model, no Ray):

    examples = load_rule_labels(cfg.data.rule_labels, "data.rule_labels", rules)
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from rlhf.orchestrator.config import DataSourceConfig
from rlhf.orchestrator.data.sources import _located_rows, _messages, _parsed, _RowError
from rlhf.orchestrator.errors import BadInput


@dataclass(frozen=True)
class RuleExample:
    messages: list[dict]  # the conversation before the reply (ends with a user turn)
    reply: str            # the assistant reply judged
    rule: str             # rule name, a key of the rules {name: text}
    rule_text: str        # what the model reads: system turn "Rule: <rule_text>"
    violated: bool        # True = the reply breaks the rule


def load_rule_labels(sources: list[DataSourceConfig], key: str, rules: dict[str, str]) -> list[RuleExample]:
    """Every source's rows as examples (weights mix as elsewhere: whole copies, no sampling
    needed for labels, so a weight must be a whole number)."""
    out: list[RuleExample] = []
    for index, src in enumerate(sources):
        where = f"{key}.{index}"
        if src.format != "rule_labels":
            raise BadInput(f"{where}.format: {key} holds per-rule labels; use format: rule_labels "
                           f"(fields messages, reply, rule, violated), not {src.format}")
        if src.weight != int(src.weight):
            raise BadInput(f"{where}.weight: rule labels are repeated whole; give a whole number, not {src.weight}")
        examples = [_parsed("rule_labels", row, at, lambda _fmt, r: _example(r, rules))
                    for at, row in _located_rows(src, where)]
        out += examples * int(src.weight)
    return out


def _example(row: dict, rules: dict[str, str]) -> RuleExample:
    messages = _messages(row["messages"], "messages")
    if messages[-1]["role"] != "user":
        raise _RowError("'messages' must end with the user turn the reply answers")
    if not isinstance(row["reply"], str):
        raise _RowError(f"'reply' must be a string, got {type(row['reply']).__name__}")
    rule = row["rule"]
    if not isinstance(rule, str) or rule not in rules:
        known = ", ".join(sorted(rules)) or "none (set label.rules or use a task with rules)"
        raise _RowError(f"unknown rule {rule!r}; rules with a text: {known}")
    if not isinstance(row["violated"], bool):
        raise _RowError(f"'violated' must be true or false, got {row['violated']!r}")
    return RuleExample(messages, row["reply"], rule, rules[rule], row["violated"])


def simulated_labels(rule_violations, dialogues: list[tuple[list[dict], str]],
                     rules: dict[str, str]) -> list[RuleExample]:
    """One example per (reply, rule) that `rule_violations(messages, reply) -> {rule: bool}` judges
    (rules it does not name are not labeled; names outside `rules` are ignored)."""
    out = []
    for messages, reply in dialogues:
        for rule, violated in rule_violations(messages, reply).items():
            if rule in rules:
                out.append(RuleExample(messages, reply, rule, rules[rule], bool(violated)))
    return out


def people_labels(messages: list[dict], replies: list[str], violations_json: str,
                  rules: dict[str, str]) -> list[RuleExample]:
    """Examples from one ranking's rule checkboxes, JSON {"<reply index>": [rule names ticked]}: the
    page shows the boxes under every reply, so every reply is judged against every rule (ticked =
    violated, unticked = kept; {} = none broken). An old plain list says no reply: no examples."""
    try:
        ticked = json.loads(violations_json or "[]")
    except json.JSONDecodeError:
        return []
    if not isinstance(ticked, dict):
        return []
    broken = {str(k): set(v) for k, v in ticked.items() if isinstance(v, list)}
    return [RuleExample(messages, reply, rule, text, rule in broken.get(str(i), ()))
            for i, reply in enumerate(replies) for rule, text in rules.items()]
