"""Built-in task `instruct`: the user asks for a FORM of answer; the labeler checks form and content.

Three kinds of request over a small vocabulary (4 categories of 6 one-word items), so a
tiny model trained from scratch learns it in minutes on a CPU:

    "List 3 fruits."       -> "Plum, apple, pear."   exactly N items (N in 1..4) of the category
    "Name an animal."      -> "Fox."                 exactly one item of the category
    "Greet me formally."   -> "Good evening."        a greeting of the asked register
    "Greet me casually."   -> "Hey there!"

A conversation holds one or two requests; the reply answers the last one.

The "human preference" the simulated labeler encodes is three terms of +-0.5 each, so a
score is one of -1.5, -0.5, 0.5, 1.5 (ties are common, as with several human labelers):
- form: the answer has the asked shape (N comma-separated one-word items; one such item;
  a greeting);
- content: every item is of the named category and none repeats (a greeting of the asked
  register);
- brevity: the reply is the answer alone: one sentence of at most 60 characters.
Demonstrations follow the form only `exact_rate` of the time (else N +- 1 items, or a
greeting of the other register) and add a chatty second sentence `chatty_rate` of the
time, so SFT imitates a mix and the rest of the preference is left for the reward model
and PPO to learn from rankings (as arithmetic leaves its politeness).

Held out: a conversation is on the evaluation side when the sha1 of its canonical JSON
falls in one of EVAL_SHARE (drawn.py) buckets; demonstrations and prompts come from the others, so
`eval_prompts` never repeats a training prompt. Everything is generated from a seed.
"""
from __future__ import annotations

import random
import re

from rlhf.orchestrator.tasks.drawn import DrawnTask, in_eval_bucket

CATEGORIES: dict[str, tuple[str, ...]] = {
    "fruit": ("apple", "pear", "plum", "grape", "lemon", "mango"),
    "color": ("red", "blue", "green", "pink", "gray", "black"),
    "animal": ("cat", "dog", "cow", "fox", "owl", "horse"),
    "drink": ("tea", "milk", "juice", "water", "coffee", "soda"),
}
GREETINGS: dict[str, tuple[str, ...]] = {
    "formally": ("Good morning.", "Good evening.", "Good day to you."),
    "casually": ("Hi!", "Hey!", "Hey there!"),
}
CHATTY = ("Hope that helps!", "Ask me for more!", "Nice to chat.")
MAX_ITEMS = 4
MAX_REPLY_CHARS = 60

_LIST = re.compile(r"List ([1-9]) (\w+)\.")
_NAME = re.compile(r"Name an? (\w+)\.")
_GREET = re.compile(r"Greet me (formally|casually)\.")
_SENTENCE = re.compile(r"[^.!?]*[.!?]+|[^.!?]+$")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _request(rng: random.Random) -> tuple[str, tuple]:
    """(user turn, parsed request) for a random request; lists are half of all requests."""
    kind = rng.choice(("list", "list", "name", "greet"))
    if kind == "greet":
        register = rng.choice(sorted(GREETINGS))
        return f"Greet me {register}.", ("greet", register)
    category = rng.choice(sorted(CATEGORIES))
    if kind == "name":
        return f"Name {_article(category)} {category}.", ("items", 1, category)
    n = rng.randint(1, MAX_ITEMS)
    return f"List {n} {category}{'s' if n > 1 else ''}.", ("items", n, category)


def _reply(rng: random.Random, request: tuple, exact_rate: float, chatty_rate: float) -> str:
    exact = rng.random() < exact_rate
    if request[0] == "greet":
        register = request[1] if exact else next(r for r in sorted(GREETINGS) if r != request[1])
        answer = rng.choice(GREETINGS[register])
    else:
        _, n, category = request
        count = n if exact else (n + 1 if n == 1 else n + rng.choice((-1, 1)))
        answer = ", ".join(rng.sample(CATEGORIES[category], count)).capitalize() + "."
    return f"{answer} {rng.choice(CHATTY)}" if rng.random() < chatty_rate else answer


def make_dialogue(rng: random.Random, max_turns: int = 2, exact_rate: float = 0.5,
                  chatty_rate: float = 0.5) -> list[dict]:
    """One demonstration conversation of 1..max_turns requests, each with its reply."""
    messages: list[dict] = []
    for _ in range(rng.randint(1, max_turns)):
        text, request = _request(rng)
        messages += [{"role": "user", "content": text},
                     {"role": "assistant", "content": _reply(rng, request, exact_rate, chatty_rate)}]
    return messages


def is_held_out(prompt: list[dict]) -> bool:
    """True for the conversations reserved for evaluation (a fixed hash bucket)."""
    return in_eval_bucket(prompt)


def parse_request(messages: list[dict]) -> tuple:
    """The last user turn as ("items", n, category) or ("greet", register); ValueError otherwise."""
    user = [m["content"] for m in messages if m["role"] == "user"]
    if not user:
        raise ValueError("conversation has no request")
    text = user[-1]
    if (m := _LIST.fullmatch(text)) and m[2].removesuffix("s") in CATEGORIES:
        return ("items", int(m[1]), m[2].removesuffix("s"))
    if (m := _NAME.fullmatch(text)) and m[1] in CATEGORIES:
        return ("items", 1, m[1])
    if m := _GREET.fullmatch(text):
        return ("greet", m[1])
    raise ValueError(f"not an instruct-task turn: {text!r}")


def sentences(reply: str) -> list[str]:
    """The reply's sentences, each with its end punctuation: "A, b. Hi!" -> ["A, b.", "Hi!"]."""
    return [s.strip() for s in _SENTENCE.findall(reply.strip()) if s.strip()]


def _bare(text: str) -> str:
    return text.strip().rstrip(".!? ").lower()


def _form_and_content(request: tuple, answer: str) -> tuple[bool, bool]:
    if request[0] == "greet":
        said = _bare(answer)  # "Hey there." greets as well as "Hey there!"
        return (any(said == _bare(g) for gs in GREETINGS.values() for g in gs),
                any(said == _bare(g) for g in GREETINGS[request[1]]))
    _, n, category = request
    parts = [p.strip() for p in _bare(answer).split(",")]
    form = len(parts) == n and all(p and " " not in p for p in parts)  # N one-word items
    content = all(parts) and len(set(parts)) == len(parts) and all(p in CATEGORIES[category] for p in parts)
    return form, content


def score_reply(messages: list[dict], reply: str) -> float:
    """Simulated labeler's score in {-1.5, -0.5, 0.5, 1.5} of `reply` to the last request.

    +-0.5 each for form (the asked shape), content (right category, no repeats / right
    register) and brevity (one sentence, at most 60 characters); the answer is the reply's
    first sentence.
    """
    request = parse_request(messages)
    said = sentences(reply)
    form, content = _form_and_content(request, said[0]) if said else (False, False)
    brief = len(said) == 1 and len(reply.strip()) <= MAX_REPLY_CHARS
    return sum(0.5 if ok else -0.5 for ok in (form, content, brief))


class InstructTask(DrawnTask):
    """The registry's `instruct` task (orchestrator/tasks/__init__.py: Task)."""

    name = "instruct"

    def __init__(self, max_turns: int = 2, exact_rate: float = 0.5, chatty_rate: float = 0.5) -> None:
        self.max_turns, self.exact_rate, self.chatty_rate = max_turns, exact_rate, chatty_rate

    def make_dialogue(self, rng: random.Random) -> list[dict]:
        return make_dialogue(rng, self.max_turns, self.exact_rate, self.chatty_rate)

    def score(self, messages: list[dict], reply: str) -> float:
        return score_reply(messages, reply)
