"""Round report files, policy evaluation (win rate by hand) and the process-tree memory watcher."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from rlhf.orchestrator.run.memwatch import MemoryWatcher, tree_rss_bytes
from rlhf.orchestrator.recipe.report import EVAL_KEYS, evaluate_policies, win_rate, write_round_report
from rlhf.orchestrator.models.tiny import build_tiny_from_corpus, sample_corpus

EVAL = {"rm_pairwise_accuracy": 0.75, "labeler_score/sft": -0.5, "labeler_score/final": 0.25,
        "win_rate_vs_sft": 0.625, "eval/prompts": 8.0}


def test_round_report_files(tmp_path):
    rows = [{"step": s, "reward/mean": 0.1 * s, "kl/mean": 0.01 * s, "response_length/mean": 10 + s,
             "eval/labeler_score": -1.0 + 0.5 * s} for s in (1, 2, 3)]
    rows[1]["kl/mean"] = float("nan")  # non-finite values are shown as n/a, never crash
    paths = write_round_report(tmp_path / "round_1", 1, rows, EVAL)
    assert set(paths) == {"markdown", "plot", "eval"} and all(p.is_file() for p in paths.values())
    saved = json.loads(paths["eval"].read_text())
    assert set(EVAL_KEYS) <= set(saved) and saved["round"] == 1 and saved["win_rate_vs_sft"] == 0.625
    md = paths["markdown"].read_text()
    assert "| step | reward/mean | kl/mean | response_length/mean | eval/labeler_score |" in md
    assert "| 3 | 0.3 | 0.03 | 13 | 0.5 |" in md and "| 2 | 0.2 | n/a | 12 | 0 |" in md
    assert "| rm_pairwise_accuracy | 0.75 |" in md
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_round_report_needs_eval_keys(tmp_path):
    with pytest.raises(ValueError, match="win_rate_vs_sft"):
        write_round_report(tmp_path, 1, [], {"rm_pairwise_accuracy": 0.5, "labeler_score/sft": 0.0,
                                             "labeler_score/final": 0.0})


def test_win_rate_counts_ties_as_half():
    # prompt 1: final wins (1), prompt 2: tie (0.5), prompt 3: sft wins (0) -> 1.5 / 3
    assert win_rate([1.0, 0.0, 2.0], [0.0, 0.0, 3.0]) == 0.5
    assert win_rate([1.5, 1.5], [-1.0, 0.5]) == 1.0


def test_win_rate_of_identical_models_is_one_half(tmp_path):
    model = build_tiny_from_corpus(sample_corpus(), tmp_path / "tiny")
    prompts = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "a longer question here"}]]
    # The fake labeler scores by reply length; identical models with one seed give identical
    # replies, so every prompt is a tie: win rate = mean(0.5, 0.5) = 0.5.
    judge = SimpleNamespace(score=lambda messages, reply: float(len(reply)))
    out = evaluate_policies(model, model, prompts, judge, n_samples=2, max_new_tokens=4, temperature=1.0, seed=3)
    assert out["win_rate_vs_sft"] == 0.5
    assert out["labeler_score/final"] == out["labeler_score/sft"]
    assert out["eval/prompts"] == 2.0


def test_memory_watcher_sees_a_child_process():
    held = 200 * 2**20
    before = tree_rss_bytes()
    # bytes * n writes every page, so the child's RSS really grows by 200 MB.
    child = subprocess.Popen([sys.executable, "-c", f"import sys; b = b'x' * {held}; print('ready', flush=True); "
                              "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        with MemoryWatcher(interval_s=0.1) as mem:
            assert child.stdout.readline().strip() == "ready"
            time.sleep(0.3)
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    assert mem.samples >= 2
    assert mem.peak_bytes >= before + 0.9 * held
    assert mem.metrics()["memory/peak_rss_gib"] == mem.peak_bytes / 2**30


def test_over_optimisation_panels_take_only_steps_with_both_values(tmp_path):
    # Step 0 has the judge's score of the starting policy but no RM reward: it appears in the
    # judge-over-steps panel, not in the judge-vs-reward curve (which pairs values of one step).
    rows = [{"step": 0, "eval/labeler_score": 0.3}] + [
        {"step": s, "reward/mean": 0.5 * s, "kl/mean": 0.2 * s, "response_length/mean": 9.0,
         **({"eval/labeler_score": 0.3 - 0.1 * s} if s % 2 == 0 else {})} for s in (1, 2, 3, 4)]
    paths = write_round_report(tmp_path / "r", 1, rows, EVAL)
    md = paths["markdown"].read_text()
    assert "| 0 | n/a | n/a | n/a | 0.3 |" in md and "| 4 | 2 | 0.8 | 9 | -0.1 |" in md
    assert paths["plot"].stat().st_size > 10_000


def test_eval_json_keeps_flags_and_counts(tmp_path):
    paths = write_round_report(tmp_path, 2, [], {**EVAL, "selected_step": 0, "stopped_early": True,
                                                 "rm_pairwise_accuracy": float("nan")})
    saved = json.loads(paths["eval"].read_text())
    assert saved["selected_step"] == 0 and saved["stopped_early"] is True and saved["rm_pairwise_accuracy"] is None
    assert "| stopped_early | True |" in paths["markdown"].read_text()
