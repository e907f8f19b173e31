"""Sparrow@N end to end on real parts: a tiny policy taught (a few seconds of plain next-token
training) to search before it answers, a tiny preference RM and rule RM, a real BM25 corpus
and the real tool loop of the HF engine.

- in-process: N = 4 candidates, the first two through the search tool (their Search Result
  lines are what the retriever returns for their query), the last two without; the totals are
  what the two reward models say when asked directly, and the pick is their argmax;
- `rlhf chat POLICY --rerank 4 --once ...` in a run folder (the defaults come from it): exit 0,
  the chosen reply printed as an evidence card and an answer, the choice logged on stderr.

Run: .venv/bin/pytest tests/integration/test_sparrow_chat.py -q   (about 30 s on one CPU)
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf.orchestrator.evidence.format import parse, result_lines
from rlhf.orchestrator.models.tiny import TinyModelSpec, build_tiny_from_corpus

pytestmark = pytest.mark.slow

DOCS = [{"title": "Veltra", "text": "Veltra is a river nation. Its capital is Osk."},
        {"title": "Morrow", "text": "Morrow is a mountain town. It is known for its bells."},
        {"title": "Quill", "text": "Quill is a small island. Its people fish for eels."}]
QUESTION = "What is the capital of Veltra?"
DEMO = (f"Search Query: capital of Veltra\nSearch Result: Veltra | {DOCS[0]['text']}\n"
        'Osk is the capital of Veltra. Source: Veltra "Its capital is Osk."')
RULES = {"no_human_claims": "Do not pretend to be human.", "stay_on_topic": "Stay on the user's topic."}


def _teach(folder: Path) -> None:
    """Next-token training on the one demonstration until the policy reproduces it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    convo = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": DEMO}]
    ids = torch.tensor([tokenizer.apply_chat_template(convo, tokenize=True, return_dict=True)["input_ids"]])
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(120):
        loss = model(input_ids=ids, labels=ids).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
    assert loss.item() < 0.1, f"the tiny policy did not learn the demonstration (loss {loss.item():.3f})"
    model.save_pretrained(folder)


def _scorer(policy: Path, out: Path, rules: dict | None = None, seed: int | None = None) -> Path:
    """A scalar-head model from the policy: a random head (seeded), or a zero one (seed None: every
    reply scores 0, P(violation) = 0.5, so every candidate ties and the earliest wins)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed or 0)
    model = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1)
    if seed is None:
        torch.nn.init.zeros_(model.score.weight)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(policy).save_pretrained(out)
    if rules is not None:
        (out / "rules.json").write_text(json.dumps(rules))
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run folder as the pipeline leaves it: config.yaml, round1/{rm,rule_rm} (zero heads),
    evidence/corpus.jsonl, a policy; and random-head models beside it (random_rm, random_rule_rm)."""
    run = tmp_path_factory.mktemp("sparrow-run")
    (run / "config.yaml").write_text("name: sparrow-chat\ndata:\n  task: rules\nevidence:\n  top_k: 1\n")
    (run / "evidence").mkdir()
    (run / "evidence" / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    policy = run / "round1" / "ppo" / "checkpoints" / "final" / "policy"
    texts = [QUESTION, DEMO, *[d["text"] for d in DOCS]] * 20
    build_tiny_from_corpus(texts, policy, spec=TinyModelSpec(hidden_size=64, num_layers=1, intermediate_size=128,
                                                             vocab_size=384))
    _teach(policy)
    _scorer(policy, run / "round1" / "rm" / "checkpoint")
    _scorer(policy, run / "round1" / "rule_rm" / "checkpoint", RULES)
    _scorer(policy, run.parent / f"{run.name}-random_rm", seed=1)
    _scorer(policy, run.parent / f"{run.name}-random_rule_rm", RULES, seed=2)
    return run


def test_candidates_with_and_without_search_ranked_by_both_models(run):
    from rlhf.orchestrator.data.labelers import RewardModelLabeler
    from rlhf.orchestrator.evidence.retrieval import load_retriever
    from rlhf.orchestrator.models.scoring import load_rule_model, rule_reward, rule_violation_probs
    from rlhf.orchestrator.recipe.sparrow import load_sparrow, resolve_inputs, search_spec

    policy = run / "round1" / "ppo" / "checkpoints" / "final" / "policy"
    inputs = resolve_inputs(str(policy), reward_model=str(run.parent / f"{run.name}-random_rm"),
                            rule_model=str(run.parent / f"{run.name}-random_rule_rm"))
    sparrow = load_sparrow(str(policy), inputs, 4, max_new_tokens=48, temperature=0.7)
    [(candidates, best)] = sparrow.answer_all([[{"role": "user", "content": QUESTION}]], seed=3)
    assert [c.with_search for c in candidates] == [True, True, False, False]
    retriever = load_retriever(search_spec(inputs.cfg, inputs.corpus)["evidence"])
    for c in candidates[:2]:
        t = parse(c.reply)
        assert t.searched, c.reply
        # The Search Result line is the real tool's, for the query this sample wrote.
        assert result_lines(retriever.search(t.queries[0], 1)).strip() in c.reply
    # Scored again, directly by the two models: the same totals, and the pick is their argmax.
    messages, replies = [{"role": "user", "content": QUESTION}], [c.reply for c in candidates]
    pref = RewardModelLabeler(inputs.reward_model).scores(messages, replies)
    model, tokenizer, rules = load_rule_model(inputs.rule_model)
    assert rules == RULES
    rule_terms = rule_reward(rule_violation_probs(model, tokenizer, messages, replies, rules,
                                                  inputs.cfg.rule_rm.max_tokens), {})
    totals = [p + r for p, r in zip(pref, rule_terms)]
    assert [c.total for c in candidates] == pytest.approx(totals, abs=1e-5)
    assert best == max(range(4), key=lambda i: (totals[i], -i))
    assert all(r < 0 for r in rule_terms)  # log(1 - P) of a real probability


def test_chat_rerank_once_prints_the_evidence_card_and_the_answer(run):
    """Defaults from the run folder; its zero-head models tie every candidate, so the first one
    (sampled with search) is shown: its card, then its answer."""
    from rlhf.orchestrator.recipe.sparrow import CandidateSampler, render_turn, resolve_inputs, search_spec

    policy = run / "round1" / "ppo" / "checkpoints" / "final" / "policy"
    rlhf = str(Path(sys.executable).with_name("rlhf"))
    done = subprocess.run([rlhf, "chat", str(policy), "--rerank", "4", "--once", QUESTION, "--max-new-tokens", "48",
                           "--seed", "3"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    log = done.stderr.splitlines()
    assert log[0] == (f"sparrow@4: reward model {run / 'round1' / 'rm' / 'checkpoint'}; rule model "
                      f"{run / 'round1' / 'rule_rm' / 'checkpoint'}; corpus {run / 'evidence' / 'corpus.jsonl'}")
    assert log[1].startswith("sparrow@4: reply 1 of 4 (2 sampled with search; this one with), preference +0.000")
    lines = done.stdout.rstrip("\n").splitlines()
    assert lines[:3] == ["Search Query: capital of Veltra", "  ┌─ Veltra",
                         "  │  Veltra is a river nation. «Its capital is Osk.»"], done.stdout
    assert lines[3] == '  └─ Source: Veltra "Its capital is Osk."' and lines[4] == "Osk is the capital of Veltra."
    # The same draw in-process (same seed: the chat's first turn), rendered: what the chat printed.
    inputs = resolve_inputs(str(policy))
    sampler = CandidateSampler(str(policy), search_spec(inputs.cfg, inputs.corpus), 48, 0.7)
    [drawn] = sampler.sample([[{"role": "user", "content": QUESTION}]], 4, seed=3)
    assert render_turn(drawn[0][0]) == "\n".join(lines)


def test_eval_rerank_reports_a_at_n_beside_a_plain_and_b(run, tmp_path):
    """`rlhf eval CONFIG A B --rerank 4`'s function on the rules task's held-out prompts (judge: the
    task): with the zero-head models every pick is each draw's first candidate, so A@4's score of a
    prompt is the judge's score of that candidate, which the JSON file holds as printed."""
    from rlhf.orchestrator.config import load_config
    from rlhf.orchestrator.recipe.sparrow_eval import format_rerank_result, run_rerank_eval

    policy = str(run / "round1" / "ppo" / "checkpoints" / "final" / "policy")
    cfg = load_config(str(run / "config.yaml"), ["pipeline.eval_prompts=2", "rollout.max_new_tokens=48",
                                                  "rollout.temperature=0.7"])
    out = tmp_path / "sparrow-eval.json"
    result = run_rerank_eval(cfg, policy, policy, 4, samples=1, out=str(out))
    assert json.loads(out.read_text()) == result
    assert result["n"] == 2 and result["rerank"] == 4 and result["evidence"] is None  # the rules task has no kinds
    assert result["reward_model"] == str(run / "round1" / "rm" / "checkpoint")
    assert len(result["scores_a_rerank"]) == len(result["scores_a"]) == len(result["scores_b"]) == 2
    assert all(-1.0 <= s <= 1.0 for s in result["scores_a_rerank"] + result["scores_a"] + result["scores_b"])
    assert 0.0 <= result["ci_low"] <= result["win_rate"] <= result["ci_high"] <= 1.0
    lines = format_rerank_result(result).splitlines()
    assert lines[0].startswith(f"judge score: A@4 {result['mean_score_a_rerank']:.3f}, A plain ")
    assert lines[1].startswith("A@4 over B: win rate ")
