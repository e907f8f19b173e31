"""An LLM as the labeler (`labeler.kind: llm_judge`): a chat model is shown the conversation
and two replies and asked which one is better, for every pair, in both orders.

    labeler:
      kind: llm_judge
      path: smollm2-135m-instruct     # a model folder, a known name (`rlhf model list`), a hub name
      template: null                  # or a file with {conversation}, {reply_a} and {reply_b}

How a comparison of K replies is ranked:
1. The K replies are shuffled with an RNG seeded by (seed, the conversation, the replies),
   so a comparison is always asked the same way, whatever else is ranked with it.
2. For every pair {i, j} the judge is asked twice, with i shown first (as A) and with j
   shown first. Asking both orders cancels the judge's position bias: a judge that always
   says "A" gives each reply one win per pair, i.e. all K replies tie. Because both orders
   are asked, the shuffle decides only the order of the questions, never the votes.
3. Each answer is parsed for "A" or "B" (`parse_choice`); an answer with neither is no vote.
4. A reply's score is its number of won questions; ranks follow the scores
   (`ranks_from_wins`: 0 = best, equal wins tie).

The model itself is not here: this is the data layer, so the judge gets its generator
injected, `judge.attach(generate)` with `generate(chats) -> replies` (one greedy reply per
chat, each chat a list of {role, content}). rlhf.orchestrator.recipe.judge_engine attaches a
rollout engine (vLLM or HF) on the judge model; tests attach plain functions. Counters
(`stats()`): questions asked, answers parsed, how often the reply shown first won
(`position_bias` = first_shown_wins / parsed: 0.5 = none, 1.0 = always "A").

Same on one CPU machine (SmolLM2-135M: weak, but it shows the mechanism) and on a cluster
(any chat model the engines can load).
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import string
from itertools import combinations
from pathlib import Path
from typing import Callable

from rlhf.orchestrator.errors import BadInput

Dialogue = list[dict]
GenerateFn = Callable[[list[Dialogue]], list[str]]
FIELDS = ("conversation", "reply_a", "reply_b")

DEFAULT_TEMPLATE = """\
Below is a conversation between a user and an assistant, and two candidate replies for the \
assistant's next turn. Which reply is better: correct, helpful, polite and to the point?

Conversation:
{conversation}

Reply A:
{reply_a}

Reply B:
{reply_b}

Answer with one letter only: A or B."""

# "Reply B", "answer: A", "option (B)", "Assistant A": a letter named as a choice.
_NAMED = re.compile(r"\b(?:reply|response|answer|option|assistant|choice)\s*[:#\-]?\s*[(\[*\"']*([AB])\b", re.I)
# A bare capital A or B as a word; "A" followed by a lowercase word is read as the article
# ("A better reply is B"), except before a verb that makes it the answer ("A is better").
_BARE = re.compile(r"(?<![A-Za-z0-9])(?:B|A(?! (?!(?:is|was|wins|seems|looks)\b)[a-z]))(?![A-Za-z0-9])")


def ranks_from_wins(wins: list[int]) -> list[int]:
    """Dense ranks, more wins = better: [3, 1, 3, 0] -> [0, 1, 0, 2]. The same rule as
    labelers.ranks_from_scores, restated here because labelers.py builds this class (an
    import back would be a cycle; tests/unit/test_llm_judge.py checks that they agree)."""
    order = sorted(set(wins), reverse=True)
    return [order.index(w) for w in wins]


def parse_choice(answer: str) -> str | None:
    """"A", "B" or None (no vote) from a judge's free-text answer.

    The first letter named as a choice ("Reply B is better", "Answer: A") wins; else the
    first bare capital A or B ("B.", "**A**", "(B)", "A is better"); "A" followed by a
    lowercase word is the article, not a choice. Anything else is None.
    """
    named = _NAMED.search(answer)
    if named:
        return named.group(1).upper()
    bare = _BARE.search(answer)
    return bare.group(0) if bare else None


def render_conversation(messages: Dialogue) -> str:
    """"User: ...\\nAssistant: ..." lines, one per turn (system turns as "System: ...")."""
    return "\n".join(f"{str(m.get('role', '')).capitalize()}: {m.get('content', '')}" for m in messages)


def load_template(template: str | None, key: str = "labeler") -> str:
    """The template text: the built-in one for None, else the file's, checked to hold exactly
    the fields {conversation}, {reply_a}, {reply_b} (literal braces doubled: {{ }})."""
    if template is None:
        return DEFAULT_TEMPLATE
    path = Path(template).expanduser()
    where = f"{key}.template"
    if not path.is_file():
        raise BadInput(f"{where}: no such template file: {path}")
    try:
        text = path.read_text()
        fields = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except (OSError, UnicodeDecodeError) as err:
        raise BadInput(f"{where}: cannot read {path}: {type(err).__name__}: {err}") from None
    except ValueError as err:  # a lone { or }
        raise BadInput(f"{where}: {path}: not a valid template ({err}); "
                       "write literal braces as {{ and }}") from None
    missing, unknown = [f for f in FIELDS if f not in fields], sorted(fields - set(FIELDS))
    if missing or unknown:
        what = "; ".join(([f"missing {', '.join('{' + f + '}' for f in missing)}"] if missing else [])
                         + ([f"unknown field(s) {', '.join(repr(f) for f in unknown)}"] if unknown else []))
        raise BadInput(f"{where}: {path}: {what}; a template uses exactly {{conversation}}, {{reply_a}}, {{reply_b}}")
    return text


def resolve_judge_model(path: str | None, key: str = "labeler") -> str:
    """The judge model: a known name -> its imported folder; a folder must hold config.json;
    a hub name (org/name, not on disk) passes through for clusters that reach a hub."""
    where = f"{key}.path"
    if not path:
        raise BadInput(f"{where}: kind llm_judge needs the judge model (a folder, or a known name such as "
                       "smollm2-135m-instruct)")
    from rlhf.orchestrator.models.registry import resolve_model

    resolved = resolve_model(path, where)
    folder = Path(resolved).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise BadInput(f"{where}: {folder} is not a model folder (no config.json)")
        return str(folder.resolve())  # engines run in other working directories
    if folder.exists():
        raise BadInput(f"{where}: {folder} is a file, not a model folder")
    if folder.is_absolute() or resolved.startswith((".", "~")) or resolved.count("/") != 1:
        raise BadInput(f"{where}: no such model folder: {folder}")
    return resolved  # a hub name such as Qwen/Qwen2.5-0.5B-Instruct


class LLMJudge:
    """Ranks K replies by pairwise questions to a chat model (see the module docstring).

    `path`: the judge model (folder, known name or hub name); `template`: a template file or
    None (built-in); `key`: the config section named in errors ("labeler" or
    "pipeline.judge"); `seed`: seeds the per-comparison shuffle.
    """

    def __init__(self, path: str | None, template: str | None = None, key: str = "labeler", seed: int = 0) -> None:
        self.key, self.seed = key, seed
        self.template = load_template(template, key)  # cheap checks first, the model import last
        self.model = resolve_judge_model(path, key)
        self._generate: GenerateFn | None = None
        self.asked = self.parsed = self.first_shown_wins = 0

    # ---- the generator -------------------------------------------------------------------
    def attach(self, generate: GenerateFn | None) -> None:
        """`generate(chats) -> one greedy reply per chat`; None detaches (the engine is gone)."""
        self._generate = generate

    @property
    def attached(self) -> bool:
        return self._generate is not None

    # ---- ranking ---------------------------------------------------------------------------
    def question(self, messages: Dialogue, reply_a: str, reply_b: str) -> Dialogue:
        """The judge's chat for one ordered pair: one user turn, the filled template."""
        text = self.template.format(conversation=render_conversation(messages), reply_a=reply_a, reply_b=reply_b)
        return [{"role": "user", "content": text}]

    def order(self, messages: Dialogue, replies: list[str]) -> list[int]:
        """The shuffled reply indices of one comparison (seeded by seed, conversation, replies)."""
        salt = hashlib.sha1(json.dumps([self.seed, messages, replies], sort_keys=True).encode()).hexdigest()
        order = list(range(len(replies)))
        random.Random(salt).shuffle(order)
        return order

    def _pairs(self, messages: Dialogue, replies: list[str]) -> list[tuple[int, int]]:
        """(first shown, second shown) reply indices: every pair of the shuffled order, both ways."""
        order = self.order(messages, replies)
        return [p for i, j in combinations(order, 2) for p in ((i, j), (j, i))]

    def ask(self, chats: list[Dialogue]) -> list[str]:
        """The judge's raw answers, one per chat (no counters touched)."""
        if self._generate is None:
            raise RuntimeError("LLMJudge.rank called before attach(generate): run it inside "
                               "rlhf.orchestrator.recipe.judge_engine.judge_engine(cfg, judge)")
        answers = list(self._generate(chats)) if chats else []
        if len(answers) != len(chats):
            raise RuntimeError(f"judge generate returned {len(answers)} answers for {len(chats)} questions")
        return answers

    def rank_many(self, items: list[tuple[Dialogue, list[str]]]) -> list[list[int]]:
        """Ranks each (messages, replies) comparison; one `generate` call for all questions."""
        pairs = [self._pairs(messages, replies) for messages, replies in items]
        chats = [self.question(messages, replies[a], replies[b])
                 for (messages, replies), ps in zip(items, pairs) for a, b in ps]
        answers = self.ask(chats)
        out, at = [], 0
        for (messages, replies), ps in zip(items, pairs):
            wins = [0] * len(replies)
            for a, b in ps:
                choice = parse_choice(answers[at])
                at += 1
                self.asked += 1
                if choice is None:
                    continue
                self.parsed += 1
                self.first_shown_wins += choice == "A"
                wins[a if choice == "A" else b] += 1
            out.append(ranks_from_wins(wins))
        return out

    def rank(self, messages: Dialogue, replies: list[str]) -> list[int]:
        if len(replies) < 2:
            raise ValueError(f"a comparison needs >= 2 replies, got {len(replies)}")
        return self.rank_many([(messages, list(replies))])[0]

    def stats(self) -> dict:
        """asked, parsed, parse_rate, first_shown_wins and position_bias (None before any parse)."""
        return {"asked": self.asked, "parsed": self.parsed,
                "parse_rate": self.parsed / self.asked if self.asked else None,
                "first_shown_wins": self.first_shown_wins,
                "position_bias": self.first_shown_wins / self.parsed if self.parsed else None}
