"""The PPO-time judge: best-step selection and early stopping by hand, and the held-out
score as the mean over prompts of each prompt's mean reply score."""
from __future__ import annotations

from types import SimpleNamespace

from rlhf.orchestrator.ppo.judging import HeldOutJudge, JudgePlan, Selection


def test_selection_keeps_the_best_step_and_counts_falls_below_it():
    sel = Selection(patience=2)
    assert sel.update(0, 0.30)            # the starting policy is the first best
    assert sel.update(5, 0.40)            # better: new best, falls reset
    assert not sel.update(10, 0.35)       # below the best: 1 fall
    assert not sel.should_stop
    assert not sel.update(15, 0.40)       # equal to the best: not a fall, the count resets
    assert sel.falls == 0
    assert not sel.update(20, 0.10) and not sel.update(25, 0.20)
    assert sel.falls == 2 and sel.should_stop
    assert (sel.best_step, sel.best_score) == (5, 0.40)


def test_patience_zero_never_stops():
    sel = Selection(patience=0)
    for step, score in enumerate([1.0, 0.0, -1.0, -2.0]):
        sel.update(step, score)
    assert sel.falls == 3 and not sel.should_stop and sel.best_step == 0


def test_replay_rebuilds_the_state_from_logged_rows():
    rows = [{"step": 0, "eval/labeler_score": 0.1}, {"step": 1, "reward/mean": 2.0},
            {"step": 2, "eval/labeler_score": 0.5}, {"step": 4, "eval/labeler_score": 0.2}]
    sel = Selection.replay(3, rows)
    assert (sel.best_step, sel.best_score, sel.falls) == (2, 0.5, 1)
    assert sel.history == [(0, 0.1), (2, 0.5), (4, 0.2)]


def test_held_out_score_is_the_mean_of_per_prompt_means():
    # Two prompts, two samples each; the fake rollout returns replies "a", "bb" for prompt 0 and
    # "ccc", "dddd" for prompt 1; the judge scores by length: prompt means 1.5 and 3.5 -> 2.5.
    class Rollout:
        def generate(self, prompt_ids, n, **kwargs):
            self.kwargs = kwargs
            return SimpleNamespace(prompt_index=[0, 0, 1, 1], response_ids=[[1], [2, 2], [3] * 3, [4] * 4])

    class Tok:
        def batch_decode(self, ids, skip_special_tokens):
            return [" " + "abcd"[row[0] - 1] * len(row) for row in ids]  # stripped by the judge

    judge = HeldOutJudge([[{"role": "user", "content": "x"}]] * 2, [[1], [2]], lambda m, r: float(len(r)),
                         samples=2, temperature=1.0, max_new_tokens=8, seed=7)
    rollout = Rollout()
    assert judge.evaluate(rollout, Tok()) == 2.5
    assert rollout.kwargs["seed"] == 7  # the same seed every time: only the policy changes


def test_plan_is_due_every_n_steps_and_at_the_last():
    plan = JudgePlan(judge=None, every=5, select="best", patience=3)
    assert [s for s in range(1, 13) if plan.due(s, 12)] == [5, 10, 12]
    assert [s for s in range(1, 4) if JudgePlan(None, 0, "best", 0).due(s, 3)] == [3]
