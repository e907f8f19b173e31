"""Best-of-N selection: the best of each prompt's n consecutive samples, and the kept.jsonl rows.

Run: .venv/bin/pytest tests/unit/test_best_of_n.py -q   (no Ray, no model)
"""

import pytest

from rlhf.orchestrator.recipe.best_of_n import _pick_prompts, best_per_prompt, kept_rows


def test_best_per_prompt_takes_the_max_of_each_group_and_the_earliest_on_ties():
    # prompt 0: (0.1, 0.7, 0.3) -> 1; prompt 1: (2, 2, -1) tie -> 0; prompt 2: (-3, -2, -5) -> 1
    assert best_per_prompt([0.1, 0.7, 0.3, 2.0, 2.0, -1.0, -3.0, -2.0, -5.0], 3) == [1, 0, 1]
    assert best_per_prompt([5.0], 1) == [0]
    with pytest.raises(ValueError, match="not a whole number of groups of n = 3"):
        best_per_prompt([1.0, 2.0], 3)


def test_kept_rows_hold_the_best_reply_its_score_and_the_group_mean():
    messages = [[{"role": "user", "content": "a?"}], [{"role": "user", "content": "b?"}]]
    replies = ["a0", "a1", "b0", "b1"]
    rows = kept_rows(messages, replies, [1.0, 3.0, -1.0, -2.0], [True, False, True, True], n=2)
    assert rows == [
        {"prompt": messages[0], "reply": "a1", "score": 3.0, "mean_score": 2.0, "scores": [1.0, 3.0],
         "finished": False},
        {"prompt": messages[1], "reply": "b0", "score": -1.0, "mean_score": -1.5, "scores": [-1.0, -2.0],
         "finished": True},
    ]
    with pytest.raises(ValueError, match="2 prompts x n = 2"):
        kept_rows(messages, replies[:3], [1.0, 3.0, -1.0], [True] * 3, n=2)


def test_prompt_draw_is_seeded_per_round_and_capped():
    prompts = [[{"role": "user", "content": str(i)}] for i in range(20)]
    first = _pick_prompts(prompts, 5, seed=0, round_=1)
    assert first == _pick_prompts(prompts, 5, seed=0, round_=1) and len(first) == 5
    assert first != _pick_prompts(prompts, 5, seed=0, round_=2)
    assert _pick_prompts(prompts, 50, seed=0, round_=1) == prompts  # fewer than asked: all, in order
