"""The LLM judge on a real vLLM engine: SmolLM2-135M-Instruct (`labeler.kind: llm_judge`,
built by build_labeler from the quickstart config) ranks comparisons through `judge_engine`.

Checks: valid ranks for two comparisons and consistent counters; the engine answers
greedily (the same answer as transformers' greedy `generate` on the same chat-templated
question, and the same ranks when asked again); on exit the engine is gone and the judge
detached. SmolLM2-135M is a weak judge: its answers are not checked for quality here
(bench/llm_judge.py measures its agreement with the task's labeler). One engine per module,
about 40-60 s on two busy cores (mostly the engine start).

    .venv/bin/pytest tests/integration/test_llm_judge.py
"""
from __future__ import annotations

import pytest

from rlhf.orchestrator.config import load_config
from rlhf.orchestrator.data.labelers import build_labeler
from rlhf.orchestrator.data.llm_judge import LLMJudge
from rlhf.orchestrator.recipe.judge_engine import ANSWER_TOKENS, judge_engine, load_judge_tokenizer

pytestmark = pytest.mark.slow

Q1 = [{"role": "user", "content": "What is 2 + 3?"}]
Q2 = [{"role": "user", "content": "What is 4 * 5?"}, {"role": "assistant", "content": "4 * 5 = 20."},
      {"role": "user", "content": "Now add 1 to that."}]
ITEMS = [(Q1, ["2 + 3 = 5. Happy to help!", "2 + 3 = 7.", "banana banana banana"]),
         (Q2, ["20 + 1 = 21. You're welcome!", "21"])]


@pytest.fixture(scope="module")
def judged(ray_local, smollm2_dir):
    cfg = load_config("configs/quickstart.yaml", ["labeler.kind=llm_judge", f"labeler.path={smollm2_dir}"])
    judge = build_labeler(cfg.labeler, None)
    question = judge.question(Q1, *ITEMS[0][1][:2])
    with judge_engine(cfg, judge) as inside:
        attached = inside is judge and judge.attached
        ranks = judge.rank_many(ITEMS)
        stats = judge.stats()
        again = judge.rank_many(ITEMS)
        one = judge.rank(*ITEMS[1])
        answer = judge.ask([question])[0]
    return dict(judge=judge, attached=attached, ranks=ranks, stats=stats, again=again, one=one,
                question=question, answer=answer)


def test_ranks_are_valid_and_counters_add_up(judged):
    assert judged["attached"] and isinstance(judged["judge"], LLMJudge)
    for ranks, (_, replies) in zip(judged["ranks"], ITEMS):
        assert len(ranks) == len(replies) and all(isinstance(r, int) and 0 <= r < len(replies) for r in ranks)
        assert min(ranks) == 0  # dense ranks: someone is best
    stats = judged["stats"]
    assert stats["asked"] == 2 * 3 + 2 * 1  # C(3, 2) + C(2, 2) pairs, both orders
    assert 0 <= stats["first_shown_wins"] <= stats["parsed"] <= stats["asked"]
    assert stats["parsed"] > 0, "SmolLM2 answered no question with A or B"
    assert stats["position_bias"] == stats["first_shown_wins"] / stats["parsed"]


def test_answers_are_greedy(judged, smollm2_dir):
    """Asked again, the same ranks; one answer equals transformers' greedy decode."""
    import torch
    from transformers import AutoModelForCausalLM

    assert judged["again"] == judged["ranks"] and judged["one"] == judged["ranks"][1]
    tokenizer = load_judge_tokenizer(judged["judge"])
    ids = tokenizer.apply_chat_template(judged["question"], add_generation_prompt=True, tokenize=True,
                                        return_dict=True, return_tensors="pt")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=ANSWER_TOKENS, do_sample=False)
    assert judged["answer"] == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_the_engine_is_gone_after_the_block(judged):
    judge = judged["judge"]
    assert not judge.attached
    with pytest.raises(RuntimeError, match="before attach"):
        judge.rank(*ITEMS[1])
