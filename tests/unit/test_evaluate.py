"""`rlhf eval`: the win rate and its bootstrap interval by hand, and run_eval with stand-in
generation (the real models: tests/integration/test_eval.py)."""
from __future__ import annotations

import json

import pytest

from rlhf.orchestrator.cli import main
from rlhf.orchestrator.config import load_config
from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.recipe import evaluate, report
from rlhf.orchestrator.recipe.evaluate import format_result, run_eval, win_rate_ci

CONFIG = "configs/quickstart.yaml"


def test_all_wins_is_one_with_a_point_interval():
    assert win_rate_ci([2.0, 3.0, 1.0], [1.0, 0.0, 0.5]) == {
        "win_rate": 1.0, "ci_low": 1.0, "ci_high": 1.0, "n": 3, "wins": 3, "ties": 0, "losses": 0}


def test_all_ties_is_one_half():
    result = win_rate_ci([0.3] * 5, [0.3] * 5)
    assert (result["win_rate"], result["ci_low"], result["ci_high"], result["ties"]) == (0.5, 0.5, 0.5, 5)


def test_a_known_mix():
    # Outcomes 1, 1, 1, 0.5: win rate 3.5/4. A resample's mean is 0.5 + k/8 with k ~ Bin(4, 3/4)
    # wins: P(k=0) = 0.004 and P(k<=1) = 0.051 put the 2.5 % quantile at k=1 (0.625);
    # P(k=4) = 0.32 puts the 97.5 % quantile at 1.
    result = win_rate_ci([1, 2, 3, 4], [0, 1, 2, 4])
    assert result == {"win_rate": 0.875, "ci_low": 0.625, "ci_high": 1.0, "n": 4, "wins": 3, "ties": 1,
                      "losses": 0}
    # One win, one loss: resample means 0, 0.5, 1 with P 1/4, 1/2, 1/4 -> the interval is [0, 1].
    even = win_rate_ci([1, 0], [0, 1])
    assert (even["win_rate"], even["ci_low"], even["ci_high"], even["losses"]) == (0.5, 0.0, 1.0, 1)


def test_seeded_and_narrower_with_more_prompts():
    a, b = [1, 0, 1, 1, 0, 1] * 5, [0] * 30
    assert win_rate_ci(a, b, seed=3) == win_rate_ci(a, b, seed=3)
    small, large = win_rate_ci(a[:6], b[:6]), win_rate_ci(a, b)
    assert small["win_rate"] == large["win_rate"] == pytest.approx((4 + 0.5 * 2) / 6)  # a == 0 ties
    assert large["ci_high"] - large["ci_low"] < small["ci_high"] - small["ci_low"]


def test_unequal_or_empty_scores_are_refused():
    with pytest.raises(ValueError, match="as many scores"):
        win_rate_ci([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="as many scores"):
        win_rate_ci([], [])


# ---------------------------------------------------------------- run_eval with stand-ins


def _model_dir(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return str(path)


@pytest.fixture
def stand_in(monkeypatch, tmp_path):
    """Generation replaced by a stand-in: model folder `good` answers every prompt correctly,
    `bad` never; each reply set is recorded with the seed it was sampled with."""
    calls = []

    def fake_generate(model_dir, prompts, n_samples=1, max_new_tokens=64, temperature=1.0, seed=0, batch_size=32):
        calls.append({"model": model_dir, "n": len(prompts), "samples": n_samples, "seed": seed,
                      "max_new_tokens": max_new_tokens, "temperature": temperature})
        good = model_dir.endswith("good")
        return [_answer(p) if good else "no idea" for p in prompts for _ in range(n_samples)]

    monkeypatch.setattr(report, "generate_replies", fake_generate)
    return calls, _model_dir(tmp_path / "good"), _model_dir(tmp_path / "bad")


def _answer(messages) -> str:
    from rlhf.orchestrator.tasks.arithmetic import expected_answer

    return str(expected_answer(messages))  # what the arithmetic task's judge scores as correct


def test_run_eval_compares_with_one_seed_and_writes_json(stand_in, tmp_path, capsys):
    calls, good, bad = stand_in
    out = tmp_path / "deep" / "eval.json"
    assert main(["eval", CONFIG, bad, bad, "pipeline.eval_prompts=8", "seed=4", "--samples", "3",
                 "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert line == ("A over B: win rate 50.0 % (95 % CI 50.0-50.0 %), n=8 prompts x 3 samples, 8 ties; "
                    "judge: task (arithmetic)")
    assert [c["model"] for c in calls] == [bad, bad] and {c["seed"] for c in calls} == {4}
    cfg = load_config(CONFIG, [])
    assert calls[0] | {"model": None} == {"model": None, "n": 8, "samples": 3, "seed": 4,
                                          "max_new_tokens": cfg.rollout.max_new_tokens,
                                          "temperature": cfg.rollout.temperature}
    written = json.loads(out.read_text())
    assert written["ties"] == 8 and written["a"] == bad and len(written["scores_a"]) == 8


def test_run_eval_default_samples_and_prompts_file(stand_in, tmp_path):
    calls, good, bad = stand_in
    prompts = tmp_path / "p.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"}]},
            {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "dropped"}]}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(CONFIG, [])
    result = run_eval(cfg, bad, bad, prompts_file=str(prompts))
    assert (result["n"], result["samples"], result["prompts"]) == (2, cfg.pipeline.eval_samples, str(prompts))
    assert calls[0]["samples"] == cfg.pipeline.eval_samples


def test_the_right_answers_win_by_the_task_judge(stand_in):
    calls, good, bad = stand_in
    cfg = load_config(CONFIG, ["pipeline.eval_prompts=6"])
    result = run_eval(cfg, good, bad, samples=2)
    assert (result["win_rate"], result["wins"], result["ci_low"], result["judge"]) == (1.0, 6, 1.0, "task (arithmetic)")
    assert result["mean_score_a"] > result["mean_score_b"]
    flipped = run_eval(cfg, bad, good, samples=2)
    assert (flipped["win_rate"], flipped["losses"], flipped["ci_high"]) == (0.0, 6, 0.0)
    assert format_result(flipped).startswith("A over B: win rate 0.0 % (95 % CI 0.0-0.0 %), n=6 prompts x 2")


def test_prompt_scores_use_a_batch_scorer_when_the_judge_has_one(stand_in):
    calls, good, bad = stand_in

    class BatchJudge:
        def __init__(self):
            self.batches = []

        def scores(self, messages, replies):
            self.batches.append(len(replies))
            return [1.0, 3.0][:len(replies)]

    judge = BatchJudge()
    prompts = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]
    assert evaluate.prompt_scores(bad, prompts, judge, 2, 8, 1.0, 0) == [2.0, 2.0]
    assert judge.batches == [2, 2]


@pytest.mark.parametrize("which", ["A", "B"])
def test_a_missing_checkpoint_is_named(capsys, stand_in, tmp_path, which):
    calls, good, bad = stand_in
    missing = str(tmp_path / "nope")
    a, b = (missing, bad) if which == "A" else (bad, missing)
    assert main(["eval", CONFIG, a, b]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: checkpoint {which} {missing}: no such folder"
    assert calls == []  # nothing generated


def test_bad_prompts_and_out_fail_before_generating(stand_in, tmp_path):
    calls, good, bad = stand_in
    cfg = load_config(CONFIG, [])
    with pytest.raises(BadInput, match="--prompts .*missing.jsonl: no such file"):
        run_eval(cfg, bad, bad, prompts_file=str(tmp_path / "missing.jsonl"))
    ends_with_system = tmp_path / "p.jsonl"
    ends_with_system.write_text(json.dumps({"messages": [{"role": "system", "content": "x"}]}) + "\n")
    with pytest.raises(BadInput, match="conversation 1 does not end with a user turn"):
        run_eval(cfg, bad, bad, prompts_file=str(ends_with_system))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(BadInput, match="--out .*cannot create its folder"):
        run_eval(cfg, bad, bad, out=str(blocker / "eval.json"))
    with pytest.raises(BadInput, match="is a folder"):
        run_eval(cfg, bad, bad, out=str(tmp_path))
    assert calls == []
