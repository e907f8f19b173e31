"""Tasks whose dialogues come from a seeded generator, with a fixed hash bucket held out.

`instruct` and `rules` draw each dialogue from `make_dialogue(rng)` and keep it for training
or for evaluation by a hash of its prompt, so the held-out prompts are disjoint from the
training ones by construction, whatever the seeds:

    class MyTask(DrawnTask):
        name = "mine"
        def make_dialogue(self, rng): ...        # ends with the demonstrated assistant turn
        def score(self, messages, reply): ...
"""
from __future__ import annotations

import hashlib
import json
import random

EVAL_SHARE = 8  # 1 conversation in 8 is held out for evaluation


def in_eval_bucket(prompt: list[dict], share: int = EVAL_SHARE) -> bool:
    """True for the conversations reserved for evaluation: a fixed bucket of a hash of `prompt`."""
    canon = json.dumps(prompt, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return int(hashlib.sha1(canon.encode()).hexdigest()[:8], 16) % share == 0


class DrawnTask:
    """The Task methods for a dialogue generator; subclasses give `make_dialogue` and `score`."""

    name = "drawn"
    eval_seed_offset = 10_000

    def make_dialogue(self, rng: random.Random) -> list[dict]:
        raise NotImplementedError

    def _draw(self, n: int, seed: int, held_out: bool) -> list[list[dict]]:
        rng, out = random.Random(seed), []
        while len(out) < n:
            dialogue = self.make_dialogue(rng)
            if in_eval_bucket(dialogue[:-1]) == held_out:
                out.append(dialogue)
        return out

    def demonstrations(self, n: int, seed: int) -> list[list[dict]]:
        return self._draw(n, seed, held_out=False)

    def prompts(self, n: int, seed: int) -> list[list[dict]]:
        """The demonstrations of `seed`, cut before their last assistant turn."""
        return [d[:-1] for d in self.demonstrations(n, seed)]

    def eval_prompts(self, n: int, seed: int) -> list[list[dict]]:
        """Held-out conversations (the hash bucket `prompts` never draws from)."""
        return [d[:-1] for d in self._draw(n, seed + self.eval_seed_offset, held_out=True)]
