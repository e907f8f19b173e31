"""`rlhf compare`: method names, the matched budget, the table."""
from __future__ import annotations

import json

import pytest

from rlhf.orchestrator.config import load_config
from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.recipe.compare import format_table, matched_config, parse_methods, policy_updates


def test_methods_are_checked_and_deduplicated():
    assert parse_methods("dpo, ppo,dpo") == ["dpo", "ppo"]
    with pytest.raises(BadInput, match="--methods: unknown method"):
        parse_methods("ppo,rlaif")


def test_budget_matches_ppo():
    cfg = load_config("configs/quickstart.yaml", ["ppo.epochs=2"])
    # 40 steps x 2 epochs x (16 prompts x 4 samples / 32 per optimizer step)
    assert policy_updates(cfg) == 40 * 2 * 2
    assert matched_config(cfg, "dpo").dpo.max_steps == 160
    bon = matched_config(cfg, "best_of_n").best_of_n
    assert (bon.prompts, bon.n) == (40 * 16, 4)  # the samples PPO draws: 640 prompts x 4
    fixed = load_config("configs/quickstart.yaml", ["dpo.max_steps=7"])
    assert matched_config(fixed, "dpo").dpo.max_steps == 7
    assert matched_config(cfg, "ppo") is cfg


def test_table_row():
    row = {"method": "dpo", "win_rate_vs_sft": 0.625, "ci_low": 0.5, "ci_high": 0.75, "judge_score": -0.41,
           "kl_to_sft": 1.234, "rm_score": None, "length_words": 3.25, "updates": 80, "seconds": 61.2}
    assert format_table({"methods": [row]}).splitlines()[-1] == (
        "| dpo | 62% (50%-75%) | -0.41 | 1.23 | n/a | 3.2 | 80 | 61 s |")


def test_report_files(tmp_path):
    from rlhf.orchestrator.recipe.compare import write_report

    rows = [{"method": m, "win_rate_vs_sft": w, "ci_low": w - 0.1, "ci_high": min(w + 0.1, 1.0), "judge_score": -0.5,
             "kl_to_sft": kl, "rm_score": None if m == "dpo" else 0.3, "length_words": 4.0, "updates": 80,
             "seconds": 10.0} for m, w, kl in (("sft", 0.5, 0.0), ("ppo", 0.7, 2.1), ("dpo", 0.6, 0.4))]
    write_report(tmp_path, {"methods": rows, "comparisons": 128, "policy_updates/ppo_max": 80,
                            "rm_heldout_accuracy": 0.61, "eval_prompts": 64, "eval_samples": 4})
    md = (tmp_path / "compare.md").read_text()
    assert "| ppo | 70% (60%-80%) |" in md and "same 128 comparisons" in md and "accuracy 61%" in md
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert [r["method"] for r in json.loads((tmp_path / "compare.json").read_text())["methods"]] == [
        "sft", "ppo", "dpo"]
