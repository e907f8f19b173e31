"""`rlhf eval` end to end: real tiny models, real generation, the arithmetic task's judge.

A model against itself ties on every prompt (same seed, same replies), so its win rate is
exactly 0.5 with ties == n; two differently seeded models give some well-formed interval.

    .venv/bin/pytest tests/integration/test_eval.py      # a few seconds on 2 cores
"""
from __future__ import annotations

import json

import pytest

from rlhf.orchestrator.cli import main
from rlhf.orchestrator.models.tiny import TinyModelSpec, build_tiny_from_corpus
from rlhf.orchestrator.tasks import load_task

pytestmark = pytest.mark.slow

CONFIG = "configs/quickstart.yaml"
ARGS = ["pipeline.eval_prompts=16", "rollout.max_new_tokens=8", "--samples", "2"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny untrained models on the arithmetic corpus, differing only in their seed."""
    dialogues = load_task("arithmetic").demonstrations(256, seed=0)
    corpus = ["\n".join(f"{m['role']}: {m['content']}" for m in d) for d in dialogues]
    root = tmp_path_factory.mktemp("eval")
    spec = TinyModelSpec(hidden_size=64, num_layers=1, intermediate_size=128, vocab_size=384)
    return [str(build_tiny_from_corpus(corpus, root / f"m{seed}", spec=spec, seed=seed)) for seed in (0, 1)]


def test_a_model_against_itself_ties_everywhere(models, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", CONFIG, models[0], models[0], *ARGS, "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("A over B: win rate 50.0 % (95 % CI 50.0-50.0 %), n=16 prompts x 2 samples, 16 ties")
    assert line.endswith("judge: task (arithmetic)")
    result = json.loads(out.read_text())
    assert (result["win_rate"], result["ties"], result["n"]) == (0.5, 16, 16)
    assert result["ci_low"] <= 0.5 <= result["ci_high"]
    assert result["scores_a"] == result["scores_b"]


def test_two_different_models_give_a_well_formed_interval(models, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", CONFIG, models[0], models[1], *ARGS, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"win_rate", "ci_low", "ci_high", "n", "wins", "ties", "losses", "judge", "samples"} <= result.keys()
    assert 0 <= result["ci_low"] <= result["win_rate"] <= result["ci_high"] <= 1
    assert result["wins"] + result["ties"] + result["losses"] == result["n"] == 16
    assert "A over B: win rate" in capsys.readouterr().out
