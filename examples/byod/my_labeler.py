"""The example's labeler: the preference, written as a function.

`labeler: {kind: python, target: my_labeler.py:score}` in my.yaml points here. The pipeline
calls score(messages, reply) for each of the K sampled replies to a prompt and ranks them
by the scores (higher = better, equal scores tie). With no pipeline.judge it is also the
judge of the held-out prompts (eval.jsonl).
"""
import re


def score(messages, reply):
    """Prefers the right sum, then a polite close; long replies lose."""
    a, b = map(int, re.findall(r"\d+", messages[-1]["content"])[:2])
    numbers = re.findall(r"-?\d+", reply)
    value = 1.0 if numbers and int(numbers[-1]) == a + b else -1.0
    value += 0.5 if "Thanks for asking" in reply else 0.0
    return value - (0.5 if len(reply) > 40 else 0.0)
