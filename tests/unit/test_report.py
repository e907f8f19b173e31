"""Round report files, policy evaluation (win rate by hand) and the process-tree memory watcher."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from rlhf.orchestrator.run.memwatch import MemoryWatcher, tree_rss_bytes
from rlhf.orchestrator.recipe.report import (EVAL_KEYS, distinct_n, evaluate_policies, sequence_logprobs, win_rate,
                                             write_round_report)
from rlhf.orchestrator.models.tiny import build_tiny_from_corpus, sample_corpus

EVAL = {"rm_pairwise_accuracy": 0.75, "labeler_score/sft": -0.5, "labeler_score/final": 0.25,
        "win_rate_vs_sft": 0.625, "win_rate_vs_start": 0.875, "kl_to_sft/final": 3.5, "distinct2/final": 0.5,
        "eval/prompts": 8.0}


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
    with pytest.raises(ValueError, match=r"\['win_rate_vs_sft', 'win_rate_vs_start', 'kl_to_sft/final'\]"):
        write_round_report(tmp_path, 1, [], {"rm_pairwise_accuracy": 0.5, "labeler_score/sft": 0.0,
                                             "labeler_score/final": 0.0})


def test_win_rate_counts_ties_as_half():
    # prompt 1: final wins (1), prompt 2: tie (0.5), prompt 3: sft wins (0) -> 1.5 / 3
    assert win_rate([1.0, 0.0, 2.0], [0.0, 0.0, 3.0]) == 0.5
    assert win_rate([1.5, 1.5], [-1.0, 0.5]) == 1.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_from_corpus(sample_corpus(), tmp_path_factory.mktemp("tiny") / "tiny")


def test_win_rate_of_identical_models_is_one_half(tiny):
    prompts = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "a longer question here"}]]
    # The fake labeler scores by reply length; identical models with one seed give identical
    # replies, so every prompt is a tie: win rate = mean(0.5, 0.5) = 0.5. The KL of a model to
    # itself is 0 on any reply, and equal reply sets have equal distinct-2.
    judge = SimpleNamespace(score=lambda messages, reply: float(len(reply)))
    out = evaluate_policies(tiny, tiny, prompts, judge, n_samples=2, max_new_tokens=4, temperature=1.0, seed=3,
                            start_dir=tiny, n_examples=5)
    assert out["win_rate_vs_sft"] == out["win_rate_vs_start"] == 0.5
    assert out["labeler_score/final"] == out["labeler_score/sft"] == out["labeler_score/start"]
    assert out["kl_to_sft/final"] == 0.0
    assert out["distinct2/final"] == out["distinct2/sft"] == out["distinct2/start"]
    assert out["eval/prompts"] == 2.0
    (first, second) = out["samples"]  # n_examples is capped by the prompts
    assert list(first) == ["prompt", "start", "sft", "final"] and first["prompt"] == "hi"
    assert second["prompt"] == "a longer question here" and second["start"] == second["sft"] == second["final"]
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    no_start = evaluate_policies(tiny, tiny, [turns], judge, max_new_tokens=4, seed=3)
    assert "win_rate_vs_start" not in no_start and list(no_start["samples"][0]) == ["prompt", "sft", "final"]
    assert no_start["samples"][0]["prompt"] == "user: a / assistant: b / user: c"  # every turn of a conversation


def test_distinct_2_by_hand():
    # Bigrams: (a b) (b c) | (a b) (b d) | none in "x": 3 unique of 4.
    assert distinct_n(["a b c", "a b d", "x"]) == 0.75
    assert distinct_n(["yes yes"] * 4) == 0.25  # a collapsed policy: one bigram, four times
    assert distinct_n(["one", ""]) == 0.0 and distinct_n([]) == 0.0  # no bigram at all
    assert distinct_n(["a b", "b a"]) == 1.0  # n-grams never span two replies
    assert distinct_n(["a b c", "a b c"], n=3) == 0.5


def test_sequence_logprobs_are_unaffected_by_padding_and_scale_with_temperature(tiny):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    prompts, replies = [[5, 6, 7], [8]], [[9, 10], [11, 12, 13, 14]]

    def by_hand(p, r, t):  # one unpadded sequence: sum_j log softmax(logits_{j-1} / t)[token_j]
        seq = torch.tensor([p + r])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=seq).logits[0].float() / t, dim=-1)
        return sum(float(logp[j - 1, seq[0, j]]) for j in range(len(p), len(p) + len(r)))

    for t in (1.0, 0.7):
        got = sequence_logprobs(model, prompts, replies, temperature=t, batch_size=2)
        want = [by_hand(p, r, t) for p, r in zip(prompts, replies)]
        assert got == pytest.approx(want, abs=1e-4) and all(x < 0 for x in got)
    assert sequence_logprobs(model, [[5]], [[]]) == [0.0]  # an empty reply


def test_report_shows_sample_replies(tmp_path):
    samples = [{"prompt": "What is 2 + 3?", "start": "", "sft": "5 | five\nok", "final": "2 + 3 = 5."}]
    paths = write_round_report(tmp_path, 1, [], EVAL, samples)
    md = paths["markdown"].read_text()
    assert "## Sample replies (1 held-out prompts, first sample of each policy)" in md
    assert "**Prompt 1:** What is 2 + 3?" in md
    assert "| start | (empty) |\n| sft | 5 \\| five ok |\n| final | 2 + 3 = 5. |" in md
    assert "| kl_to_sft/final | 3.5 |" in md and "| win_rate_vs_start | 0.875 |" in md
    assert json.loads(paths["eval"].read_text())["samples"] == samples
    assert "Sample replies" not in write_round_report(tmp_path / "none", 1, [], EVAL)["markdown"].read_text()


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
