"""Writes the example's data files: demos.jsonl, prompts.jsonl, eval.jsonl (messages format)
and prefs.jsonl (preference format, for `rlhf rm` and data.comparisons).

The domain is small enough for a model trained from scratch on one CPU: the user asks
"Add A and B." (A, B in 0..9) and the assistant answers "A + B = C.", followed half the
time by the polite close " Thanks for asking!". The demonstrations are always right but
polite only half the time, so SFT imitates the mix; my_labeler.py prefers the polite close,
and the reward model and PPO learn that preference from its rankings. prefs.jsonl holds
pairs that encode the same preference: the polite right answer over a plain or wrong one.

Stdlib only and seeded: the same files every time.

    python examples/byod/make_data.py      # from anywhere; the files land next to this script
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
POLITE = " Thanks for asking!"
POLITE_RATE = 0.5  # share of demonstrations with the polite close
COUNTS = {"demos.jsonl": 300, "prompts.jsonl": 150, "eval.jsonl": 32, "prefs.jsonl": 200}
SEEDS = {"demos.jsonl": 0, "prompts.jsonl": 1, "eval.jsonl": 2, "prefs.jsonl": 3}  # one stream per file


def dialogue(rng: random.Random, with_reply: bool) -> dict:
    """One {"messages": [...]} row: the user's question, and the demonstrated reply if asked."""
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    messages = [{"role": "user", "content": f"Add {a} and {b}."}]
    if with_reply:
        close = POLITE if rng.random() < POLITE_RATE else ""
        messages.append({"role": "assistant", "content": f"{a} + {b} = {a + b}.{close}"})
    return {"messages": messages}


def preference(rng: random.Random) -> dict:
    """One {"prompt", "chosen", "rejected"} row: the polite right sum over the plain right one
    (half the pairs) or over a polite wrong one (the other half)."""
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    chosen = f"{a} + {b} = {a + b}.{POLITE}"
    wrong = a + b + rng.choice([-2, -1, 1, 2])
    rejected = f"{a} + {b} = {a + b}." if rng.random() < 0.5 else f"{a} + {b} = {wrong}.{POLITE}"
    return {"prompt": f"Add {a} and {b}.", "chosen": chosen, "rejected": rejected}


def main() -> None:
    for name, n in COUNTS.items():
        rng = random.Random(SEEDS[name])
        if name == "prefs.jsonl":
            rows = [preference(rng) for _ in range(n)]
        else:
            rows = [dialogue(rng, with_reply=name == "demos.jsonl") for _ in range(n)]
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{HERE / name}: {n} lines")


if __name__ == "__main__":
    main()
