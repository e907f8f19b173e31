"""The foundation quickstart end to end, shortened: model built, warm-up learns, files written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.orchestrator.config import load_config
from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.quickstart import run_quickstart

ROOT = Path(__file__).resolve().parents[2]
SHORT = ["data.task_size=512", "rollout.n_samples=2", "rollout.max_new_tokens=12", "ppo.train_batch_size=8",
         "sft.batch_size=32", "sft.micro_batch_size=32"]


@pytest.mark.slow
def test_quickstart_runs_and_learns(tmp_path):
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", SHORT)
    result = run_quickstart(cfg, tmp_path / "run", max_steps=16)

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["sft/loss"] for r in rows if "sft/loss" in r]
    assert len(losses) == 16 == result["steps"]
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4  # the warm-up really trains
    assert "eval/labeler_score_after" in rows[-1]
    assert (tmp_path / "run" / "config.yaml").is_file()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy = result["policy_dir"]
    tok = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]

    # The same folder refuses a different experiment instead of mixing runs.
    other = load_config(ROOT / "configs" / "quickstart.yaml", SHORT + ["name=other"])
    with pytest.raises(BadInput, match="different experiment"):
        run_quickstart(other, tmp_path / "run", max_steps=1)
