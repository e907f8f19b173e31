"""Sparrow@N's choice with fake scorers (values worked out by hand), the chat's evidence card and
history, the run-folder defaults, and the bad-input lines of `rlhf chat --rerank`.

Run: .venv/bin/pytest tests/unit/test_sparrow.py -q   (no model is loaded; a few seconds)
"""
from __future__ import annotations

import io
import math
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.recipe.sparrow import (Candidate, Reranker, Sparrow, SparrowChat, best_index, history_text,
                                              render_turn, resolve_inputs, score_candidates, search_spec)

SEARCHED = ('Search Query: capital of Veltra\nSearch Result: Veltra | Veltra is a river nation. Its capital is Osk.\n'
            'Osk is the capital of Veltra. Source: Veltra "Its capital is Osk."')
ASK = [{"role": "user", "content": "What is the capital of Veltra?"}]


def test_total_is_preference_plus_weighted_log_no_violation():
    # Hand-computed: total_i = r_i + 1 * log(1 - Pa_i) + 2 * log(1 - Pb_i)
    #   0: 1.0 + log 0.5          = 1.0 - 0.693147 = 0.306853
    #   1: 2.0 + log 0.1          = 2.0 - 2.302585 = -0.302585
    #   2: 0.5 + 2 log 0.8        = 0.5 - 0.446287 = 0.053713
    probs = {"a": [0.5, 0.9, 0.0], "b": [0.0, 0.0, 0.2]}
    cands = score_candidates(["x", "y", "z"], [True, True, False], [1.0, 2.0, 0.5], probs, {"a": 1.0, "b": 2.0})
    assert [c.total for c in cands] == pytest.approx([0.306853, -0.302585, 0.053713], abs=1e-6)
    assert cands[2].rules == pytest.approx(2 * math.log(0.8)) and cands[2].violation == {"a": 0.0, "b": 0.2}
    assert best_index(cands) == 0  # the RM's favourite (1) breaks rule a with P = 0.9
    # Without a rule model the preference RM alone decides.
    alone = score_candidates(["x", "y", "z"], [True, True, False], [1.0, 2.0, 0.5], {}, {})
    assert [c.rules for c in alone] == [0.0, 0.0, 0.0] and best_index(alone) == 1
    # A rule missing from the weights counts 1 ({} = every rule at 1): 0 -> 1 + log .5 = .3069, 2 -> .5 + log .8 = .2769
    unweighted = score_candidates(["x", "z"], [True, False], [1.0, 0.5], {"a": [0.5, 0.0], "b": [0.0, 0.2]}, {})
    assert [c.total for c in unweighted] == pytest.approx([0.306853, 0.276856], abs=1e-6)


def test_ties_keep_the_earliest_and_a_sure_violation_is_finite():
    tied = [Candidate("a", True, 0.5, 0.0), Candidate("b", False, 0.5, 0.0), Candidate("c", False, 0.1, 0.0)]
    assert best_index(tied) == 0
    [sure] = score_candidates(["x"], [False], [3.0], {"a": [1.0]}, {})
    assert sure.rules == pytest.approx(math.log(1e-6)) and math.isfinite(sure.total)
    with pytest.raises(ValueError, match="no candidates"):
        best_index([])
    with pytest.raises(ValueError, match="2 replies"):
        score_candidates(["x", "y"], [True, False], [1.0], {}, {})


def test_reranker_scores_one_prompts_candidates_with_both_models():
    seen = []

    def preference(messages, replies):
        seen.append(("pref", messages, list(replies)))
        return [len(r) / 10 for r in replies]          # 0.3, 0.5

    def rule_probs(messages, replies):
        seen.append(("rules", messages, list(replies)))
        return {"no_lies": [0.0 if r == "abc" else 0.75 for r in replies]}

    ranked = Reranker(preference, rule_probs).rank(ASK, ["abc", "abcde"], [True, False])
    # 0: 0.3 + log 1 = 0.3; 1: 0.5 + log 0.25 = -0.886294
    assert [c.total for c in ranked] == pytest.approx([0.3, 0.5 + math.log(0.25)])
    assert best_index(ranked) == 0 and [c.with_search for c in ranked] == [True, False]
    assert seen == [("rules", ASK, ["abc", "abcde"]), ("pref", ASK, ["abc", "abcde"])]


def test_evidence_card_marks_the_quote_and_the_history_keeps_the_answer():
    assert render_turn(SEARCHED) == "\n".join([
        "Search Query: capital of Veltra",
        "  ┌─ Veltra",
        "  │  Veltra is a river nation. «Its capital is Osk.»",
        '  └─ Source: Veltra "Its capital is Osk."',
        "Osk is the capital of Veltra."])
    assert "\x1b[1;4mIts capital is Osk.\x1b[0m" in render_turn(SEARCHED, color=True)
    fake = SEARCHED.replace('"Its capital is Osk."', '"Its capital is Rune."')
    assert render_turn(fake).splitlines()[2].endswith("Its capital is Osk.")  # nothing marked
    assert render_turn(fake).splitlines()[3].endswith("(not in the passages shown)")
    uncited = SEARCHED.split(" Source:")[0]
    assert render_turn(uncited).splitlines()[-2:] == ["  └─ (no source cited)", "Osk is the capital of Veltra."]
    assert render_turn("  Osk, I think.  ") == "Osk, I think."
    assert render_turn(SEARCHED, retrieved=False).splitlines()[1] == "  ┌─ Veltra (written by the model, not retrieved)"
    assert history_text(SEARCHED) == "Osk is the capital of Veltra." and history_text("Plain. ") == "Plain."


class _FakeSampler:
    """Two candidates per call (with and without search); records the seeds and conversations."""

    def __init__(self):
        self.calls = []

    def prompt_ids(self, messages):
        return [1, 2, 3], list(messages)

    def sample(self, conversations, n, seed, n_search=None):
        self.calls.append((seed, [list(m) for m in conversations]))
        return [[(SEARCHED, True), ("Osk.", False)] for _ in conversations]


def test_sparrow_chat_shows_the_card_logs_the_choice_and_keeps_answers_in_the_history():
    sampler, log = _FakeSampler(), io.StringIO()
    reranker = Reranker(lambda m, replies: [1.0 if "Search" in r else 2.0 for r in replies],
                        lambda m, replies: {"cite": [0.0 if "Source" in r else 0.99 for r in replies]})
    chat = SparrowChat(Sparrow(sampler, reranker, 2), system="Be brief.", seed=5, log=log)
    shown = chat.send("What is the capital of Veltra?")
    assert shown == render_turn(SEARCHED)  # 1.0 + log 1 beats 2.0 + log 0.01 = -2.605
    assert chat.messages == [{"role": "system", "content": "Be brief."}, *ASK,
                             {"role": "assistant", "content": "Osk is the capital of Veltra."}]
    assert log.getvalue().startswith("sparrow@2: reply 1 of 2 (1 sampled with search; this one with)")
    chat.send("Thanks!")
    chat.reset()
    chat.send("What is the capital of Veltra?")
    assert [seed for seed, _ in sampler.calls] == [5, 5 + 7919, 5]  # a reset replays the same draws
    assert sampler.calls[1][1][0][-1] == {"role": "user", "content": "Thanks!"}


def _model_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_defaults_come_from_the_run_folder_above_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: sparrow-test\ndata:\n  task: rules\nrule_rm:\n  weights: {no_human_claims: 2.0}\n")
    for r in (1, 2, 10):
        _model_dir(run / f"round{r}" / "rm" / "checkpoint")
    _model_dir(run / "round2" / "rule_rm" / "checkpoint")
    (run / "evidence").mkdir()
    (run / "evidence" / "corpus.jsonl").write_text('{"title": "Veltra", "text": "Its capital is Osk."}\n')
    policy = _model_dir(run / "round10" / "ppo" / "checkpoints" / "final" / "policy")
    got = resolve_inputs(str(policy))
    assert got.run_dir == run.resolve() and got.cfg.name == "sparrow-test"
    assert got.reward_model == str(run.resolve() / "round10" / "rm" / "checkpoint")  # 10 > 2 numerically
    assert got.rule_model == str(run.resolve() / "round2" / "rule_rm" / "checkpoint")
    assert got.corpus == str(run.resolve() / "evidence" / "corpus.jsonl")
    spec = search_spec(got.cfg, got.corpus)
    assert spec["names"] == ["search"] and spec["evidence"]["corpus"] == got.corpus
    assert spec["evidence"]["task"] == "rules" and spec["max_calls"] >= 1
    # Flags win over the run folder.
    other = _model_dir(tmp_path / "other_rm")
    assert resolve_inputs(str(policy), reward_model=str(other)).reward_model == str(other)
    with pytest.raises(BadInput, match="--rule-model .*nope: not a model folder"):
        resolve_inputs(str(policy), rule_model=str(tmp_path / "nope"))
    with pytest.raises(BadInput, match="--corpus .*: no such file"):
        resolve_inputs(str(policy), corpus=str(tmp_path / "missing.jsonl"))


def test_outside_a_run_folder_a_reward_model_is_required(tmp_path):
    policy = _model_dir(tmp_path / "policy")
    with pytest.raises(BadInput, match="--reward-model: not given, and no reward model"):
        resolve_inputs(str(policy))
    got = resolve_inputs(str(policy), reward_model=str(_model_dir(tmp_path / "rm")))
    assert got.run_dir is None and got.rule_model is None and got.corpus is None


def _rlhf(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("rlhf")), *args], capture_output=True, text=True,
                          timeout=120)


def test_chat_rerank_bad_input_is_one_line_exit_2(tmp_path):
    missing = _rlhf("chat", str(tmp_path / "nowhere"), "--rerank", "4", "--once", "hi")
    assert (missing.returncode, missing.stderr.splitlines()) == (
        2, [f"error: chat: no such model folder: {tmp_path / 'nowhere'}"])
    no_template = _rlhf("chat", str(_model_dir(tmp_path / "bare")), "--rerank", "2", "--once", "hi")
    assert (no_template.returncode, no_template.stderr.splitlines()) == (
        2, [f"error: chat: the tokenizer in {tmp_path / 'bare'} has no chat template"])
    zero = _rlhf("chat", str(tmp_path), "--rerank", "0")
    assert zero.returncode == 2 and zero.stderr.splitlines()[-1].startswith("error: rlhf chat: argument --rerank")


class _FakeSparrow:
    """answer_all with fixed candidates: prompt p's replies are "p:i", totals favour reply 2."""

    def answer_all(self, conversations, seed):
        out = []
        for p, _ in enumerate(conversations):
            cands = [Candidate(f"{p}:{i}", i < 2, float(i == 2), 0.0) for i in range(4)]
            out.append((cands, best_index(cands)))
        return out


class _Judge:
    def scores(self, messages, replies):  # reply "p:i" scores i / 10 + p
        return [int(r.split(":")[1]) / 10 + int(r.split(":")[0]) for r in replies]


def test_rerank_eval_judges_the_pick_beside_the_plain_with_search_samples():
    from rlhf.orchestrator.recipe.sparrow_eval import rerank_scores

    prompts = [[{"role": "user", "content": "a?"}], [{"role": "user", "content": "b?"}]]
    got = rerank_scores(_FakeSparrow(), prompts, _Judge(), samples=2, seed=0)
    # pick = reply 2: 0.2 (+1 for prompt 1); plain = the with-search replies 0 and 1: mean 0.05 (+1)
    assert got["rerank"] == pytest.approx([0.2, 1.2]) and got["plain"] == pytest.approx([0.05, 1.05])
    assert got["pairs"]["rerank"] == [(prompts[0], "0:2"), (prompts[1], "1:2")] * 2
    assert len(got["pairs"]["plain"]) == 2 * 2 * 2
