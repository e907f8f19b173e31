"""Best-of-N rejection sampling end to end: a real vLLM engine samples, a reward-model folder scores,
Ray Train SFT fine-tunes on the kept replies.

The policy is the quickstart-sized tiny model (untrained, so its replies vary a lot); the reward model
is that model as a sequence classifier with a seeded random head (any fixed scorer shows the mechanism).
Checks: each kept reply is its prompt's best by the stored scores, and a freshly loaded reward model
gives those same scores; the kept mean is above the all-samples mean; kept.jsonl is well formed; the
SFT'd folder loads and gives the kept replies a higher log-likelihood than the starting policy did.
The sampling also covers seeded vLLM generation past one CPU scheduler step (see the fixture).
One run per module (~60-80 s on two busy cores: the vLLM engine and the Ray Train worker start).

    .venv/bin/pytest tests/integration/test_best_of_n.py
"""
from __future__ import annotations

import json

import pytest
import torch

from rlhf.orchestrator.config import load_config
from rlhf.orchestrator.data.labelers import RewardModelLabeler
from rlhf.orchestrator.models.tiny import TinyModelSpec, build_tiny_from_corpus
from rlhf.orchestrator.recipe.best_of_n import run_best_of_n
from rlhf.orchestrator.tasks import load_task

pytestmark = pytest.mark.slow

N, PROMPTS = 8, 16
OVERRIDES = [f"best_of_n.n={N}", f"best_of_n.prompts={PROMPTS}", "rollout.max_new_tokens=12",
             "sft.batch_size=8", "sft.micro_batch_size=8", "sft.epochs=4", "sft.lr=3.0e-3"]


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = load_config("configs/quickstart.yaml", OVERRIDES)
    task = load_task("arithmetic")
    root = tmp_path_factory.mktemp("best_of_n")
    corpus = ["\n".join(f"{m['role']}: {m['content']}" for m in d) for d in task.demonstrations(512, seed=0)]
    policy = build_tiny_from_corpus(corpus, root / "policy", spec=TinyModelSpec(**cfg.model.tiny.model_dump()))
    torch.manual_seed(0)  # the score head is freshly initialised: seed it
    rm = root / "rm"
    AutoModelForSequenceClassification.from_pretrained(str(policy), num_labels=1).save_pretrained(rm)
    AutoTokenizer.from_pretrained(str(policy)).save_pretrained(rm)
    # Multi-turn prompts (42-52 tokens): one engine chunk of 16 prompts x 8 samples then holds over
    # 5,000 prompt tokens, more than one vLLM CPU scheduler step (4,096): the seeded-sampling
    # regression guarded in actors/rollout.py (no chunked prefill on CPU).
    prompts = [p for p in task.prompts(256, seed=3) if len(p) > 1]
    result = run_best_of_n(cfg, policy, rm, prompts, root / "out")
    rows = [json.loads(line) for line in result.kept_path.read_text().splitlines()]
    return result, rows, policy, rm


def test_kept_rows_are_each_prompts_best_and_well_formed(run):
    result, rows, _, rm = run
    assert result.kept == len(rows) == PROMPTS
    for row in rows:
        assert set(row) == {"prompt", "reply", "score", "mean_score", "scores", "finished"}
        assert row["prompt"][-1]["role"] == "user" and isinstance(row["reply"], str)
        assert len(row["scores"]) == N and row["score"] == max(row["scores"])
        assert row["mean_score"] == pytest.approx(sum(row["scores"]) / N)
    # The stored score is the reward model's: a fresh load scores the kept replies the same.
    fresh = RewardModelLabeler(rm)
    assert [fresh.score(r["prompt"], r["reply"]) for r in rows] == pytest.approx([r["score"] for r in rows], abs=1e-4)


def test_kept_mean_beats_the_mean_of_all_samples(run):
    result, rows, _, _ = run
    assert result.mean_best_score == pytest.approx(sum(r["score"] for r in rows) / len(rows))
    assert result.mean_score == pytest.approx(sum(r["mean_score"] for r in rows) / len(rows))
    assert any(len(set(r["scores"])) > 1 for r in rows)  # so the inequality below must be strict
    assert result.mean_best_score > result.mean_score


def test_sft_on_kept_replies_makes_them_likelier(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.orchestrator.models.scoring import turn_end_ids
    from rlhf.orchestrator.recipe.report import sequence_logprobs

    result, rows, policy, _ = run
    assert result.sft_steps == 8  # ceil(4 epochs x 16 rows / batch 8)
    tok = AutoTokenizer.from_pretrained(str(result.checkpoint))
    end = turn_end_ids(str(policy), tok)  # what the SFT template closes the reply with
    prompt_ids = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True,
                                          return_dict=True)["input_ids"] for r in rows]
    reply_ids = [tok.encode(r["reply"], add_special_tokens=False) + end for r in rows]

    def total(folder) -> float:
        model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        return sum(sequence_logprobs(model, prompt_ids, reply_ids, pad_id=tok.pad_token_id or 0))

    before, after = total(policy), total(result.checkpoint)
    assert after > before, (before, after)
