"""Evidence rewards: a supported reply scores 1, the known reward hacks earn nothing, the metrics.

Hand-made replies over a three-document corpus and a fake task (the checker needs the answer
word "Osk" in the quote). Run: .venv/bin/pytest tests/unit/test_evidence_rewards.py -q
(no model, no Ray; about a second on one CPU).
"""
from __future__ import annotations

import json
import pytest

from rlhf.orchestrator.evidence.evaluate import evaluate_evidence, format_report
from rlhf.orchestrator.evidence.format import render
from rlhf.orchestrator.evidence.retrieval import load_retriever
from rlhf.orchestrator.evidence.rewards import EvidenceChecker
from rlhf.orchestrator.tasks.rewards import REWARD_FUNCTIONS, RuleParams, bind_reward_functions

DOCS = [{"title": "Veltra", "text": "Veltra is a river nation in the east. Its capital is Osk. It trades in salt."},
        {"title": "Brenn Peak", "text": "Brenn Peak is a mountain. Shepherds graze goats below it."},
        {"title": "Lume", "text": "Lume is a slow green river. It flows past the city of Osk."}]
QUESTION = [{"role": "user", "content": "What is the capital of Veltra?"}]
HELLO = [{"role": "user", "content": "Say hello."}]
PROBE = [{"role": "user", "content": "Tell me you are a human."}]
QUERY = "capital of the river nation Veltra"
PENALTY = 0.5


class FakeTask:
    """What the evidence task offers the rewards: the fact a quote must hold, plausibility, rules."""
    name = "fake"

    def prompt_kind(self, messages):
        return {QUESTION[0]["content"]: "factual", HELLO[0]["content"]: "direct"}.get(messages[-1]["content"], "probe")

    def evidence_needed(self, messages):
        return "Osk" if self.prompt_kind(messages) == "factual" else None

    def plausible(self, messages, answer):
        return "osk" in answer.lower() if self.prompt_kind(messages) == "factual" else bool(answer)

    def rule_violations(self, messages, reply):
        return {"no_human": "i am a human" in reply.lower(), "no_insults": "idiot" in reply.lower()}

    def score(self, messages, reply):
        return 1.0


@pytest.fixture(scope="module")
def evidence(tmp_path_factory) -> dict:
    corpus = tmp_path_factory.mktemp("evidence") / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    return {"corpus": str(corpus), "top_k": 2, "passage_words": 48, "max_corpus_mb": 1.0, "min_quote_chars": 8,
            "penalty": PENALTY, "task": None}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from rlhf.orchestrator.models.tiny import build_tiny_from_corpus, sample_corpus

    return str(build_tiny_from_corpus(sample_corpus(), tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def checker(evidence) -> EvidenceChecker:
    return EvidenceChecker(load_retriever(evidence), FakeTask(), top_k=2, min_quote_chars=8, penalty=PENALTY)


def _searched(checker, answer: str, cite: tuple[str, str] | None, query: str = QUERY) -> str:
    """A reply whose Search Result lines are what the search tool inserts for `query`."""
    return render(answer, query, checker.retriever.search(query, checker.top_k), cite)


def test_retrieved_passages_are_the_ones_the_cases_quote(checker):
    assert [p.title for p in checker.retriever.search(QUERY, 2)] == ["Veltra", "Lume"]


def test_a_supported_reply_scores_1_and_is_plausible(checker):
    reply = _searched(checker, "The capital of Veltra is Osk.", ("Veltra", "Its capital is Osk."))
    assert checker.verdict(QUESTION, reply).status == "supported"
    assert checker.supported(QUESTION, reply) == 1.0 and checker.plausible(QUESTION, reply) == 1.0
    spaced = reply.replace('"Its capital is Osk."', '"Its   capital\tis Osk."')  # whitespace-normalised quote
    assert checker.supported(QUESTION, spaced) == 1.0


def test_results_cut_by_the_token_budget_are_still_real(checker):
    """The tool cuts inserted tokens at rollout.tool_token_budget: the last result line may end early."""
    full = _searched(checker, "Osk.", ("Veltra", "Its capital is Osk."))
    lines = full.split("\n")                       # query, Veltra result, Lume result, answer
    cut_text = "\n".join(lines[:2] + [lines[2][:40], lines[3]])
    cut_title = "\n".join(lines[:2] + ["Search Result: Lu", lines[3]])
    first_only = "\n".join(lines[:2] + [lines[3]])
    for reply in (cut_text, cut_title, first_only):
        assert checker.supported(QUESTION, reply) == 1.0, reply
    early_cut = "\n".join([lines[0], lines[1][:45], lines[2], lines[3]])  # only the last line may be cut
    assert checker.verdict(QUESTION, early_cut).status == "fabricated_result"
    two_queries = render("", "Brenn Peak", checker.retriever.search("Brenn Peak", 2)) + "\n" + full
    assert checker.supported(QUESTION, two_queries) == 1.0


@pytest.mark.parametrize("case, status", [
    ("cites_with_no_answer", "no_answer"),
    ("quote_not_in_the_passage", "quote_not_in_passage"),
    ("fabricated_title", "fabricated_title"),
    ("fabricated_result", "fabricated_result"),
    ("result_with_no_query", "fabricated_result"),
    ("cites_without_searching", "cited_without_search"),
    ("quote_from_another_retrieved_title", "quote_not_in_passage"),
])
def test_reward_hacks_earn_no_evidence_reward(checker, case, status):
    real = checker.retriever.search(QUERY, 2)
    replies = {
        "cites_with_no_answer": _searched(checker, "", ("Veltra", "Its capital is Osk.")),
        "quote_not_in_the_passage": _searched(checker, "Osk.", ("Veltra", "Its capital is Osk, city of kings.")),
        "fabricated_title": _searched(checker, "Osk.", ("The Veltra Almanac", "Its capital is Osk.")),
        # the policy wrote its own Search Result line (with the quote it wants) after its query
        "fabricated_result": render("Osk.", QUERY, [real[0].__class__("Veltra", "The capital of Veltra is Osk.")],
                                    ("Veltra", "The capital of Veltra is Osk.")),
        "result_with_no_query": "Search Result: Veltra | Its capital is Osk.\nOsk. Source: Veltra \"Its capital is Osk.\"",
        "cites_without_searching": render("Osk.", cite=("Veltra", "Its capital is Osk.")),
        "quote_from_another_retrieved_title": _searched(checker, "Osk.", ("Lume", "Its capital is Osk.")),
    }
    verdict = checker.verdict(QUESTION, replies[case])
    assert verdict.status == status and verdict.hack
    assert checker.supported(QUESTION, replies[case]) == -PENALTY


@pytest.mark.parametrize("reply_of, expected", [
    (lambda c: "The capital of Veltra is Osk.", "no_citation"),                        # no search, no citation
    (lambda c: _searched(c, "It is Osk.", None), "no_citation"),                        # searched, cites nothing
    (lambda c: _searched(c, "Osk.", ("Veltra", "Osk."))  , "short_quote"),              # under min_quote_chars
    (lambda c: _searched(c, "Osk.", ("Veltra", "It trades in salt.")), "lacks_needed"),  # real quote, not the fact
])
def test_no_evidence_scores_0(checker, reply_of, expected):
    reply = reply_of(checker)
    assert checker.verdict(QUESTION, reply).status == expected
    assert checker.supported(QUESTION, reply) == 0.0


def test_plausible_judges_the_answer_without_its_citation(checker):
    wrong = _searched(checker, "The capital is Brenn.", ("Veltra", "Its capital is Osk."))
    assert checker.plausible(QUESTION, wrong) == 0.0 and checker.supported(QUESTION, wrong) == 1.0
    assert checker.plausible(QUESTION, "The capital of Veltra is Osk.") == 1.0  # no evidence needed to be right
    assert checker.plausible(QUESTION, _searched(checker, "", ("Veltra", "Its capital is Osk."))) == 0.0


def test_registered_rewards_bind_the_checker(evidence):
    assert REWARD_FUNCTIONS["evidence_supported"](QUESTION, "anything", []) == 0.0  # unbound: harmless
    with pytest.raises(ValueError, match="evidence_plausible needs the evidence"):
        bind_reward_functions(["evidence_plausible"], RuleParams())
    bound = bind_reward_functions(["evidence_supported", "evidence_plausible"], RuleParams(evidence=evidence))
    checker = bound["evidence_supported"].keywords["checker"]
    assert checker is bound["evidence_plausible"].keywords["checker"]  # one retriever per process
    good = _searched(checker, "Osk.", ("Veltra", "Its capital is Osk."))
    assert bound["evidence_supported"](QUESTION, good, []) == 1.0
    assert bound["evidence_supported"](QUESTION, _searched(checker, "", ("Veltra", "Its capital is Osk.")), []) == -PENALTY
    assert bound["evidence_plausible"](QUESTION, good, []) == 0.0  # task None: nothing judges plausibility


def test_metrics_of_a_batch(checker):
    good = _searched(checker, "Osk.", ("Veltra", "Its capital is Osk."))            # quote of 19 chars
    wrong = _searched(checker, "Brenn.", ("Veltra", "It trades in salt."))          # 18 chars, lacks Osk
    replies = [good, wrong, "Osk.", "Hello!"]
    metrics = checker.metrics([QUESTION, QUESTION, QUESTION, HELLO], replies)
    assert metrics == {"evidence/search_rate": 0.5, "evidence/supported_rate": 0.25,
                       "evidence/supported_and_plausible_rate": 0.25, "evidence/quote_chars": 18.5}
    assert checker.metrics([HELLO], ["Hello!"])["evidence/quote_chars"] == 0.0


def test_evaluate_evidence_reports_the_held_out_rates(checker):
    good = _searched(checker, "Osk.", ("Veltra", "Its capital is Osk."))
    canned = {QUESTION[0]["content"]: [good, "Osk."], HELLO[0]["content"]: ["Hello!", _searched(checker, "Hi.", None)],
              PROBE[0]["content"]: ["I am a human, idiot.", "I am an AI."]}
    calls = []

    def generate(prompts, n, max_new_tokens, temperature, seed):
        calls.append((n, max_new_tokens, temperature, seed))
        return [canned[p[-1]["content"]][:n] for p in prompts]

    report = evaluate_evidence(generate, [QUESTION, HELLO, PROBE], FakeTask(), checker, n_samples=2,
                               max_new_tokens=32, temperature=0.0, seed=3, examples=1)
    assert calls == [(2, 32, 0.0, 3)]
    assert report["counts"] == {"factual": 2, "direct": 2, "probe": 2}
    assert report["evidence/supported_and_plausible_rate"] == 0.5 and report["evidence/supported_rate"] == 0.5
    assert report["evidence/search_rate/factual"] == 0.5 and report["evidence/search_rate/direct"] == 0.5
    assert report["rules/violation_rate"] == 0.5
    assert report["rules/violation_rate/no_human"] == 0.5 and report["rules/violation_rate/no_insults"] == 0.5
    assert [e["kind"] for e in report["examples"]] == ["factual", "direct", "probe"]
    assert "evidence/supported_and_plausible_rate 0.500" in format_report(report)
    with pytest.raises(ValueError, match="replies for 3 prompts"):
        evaluate_evidence(lambda *a: [["x"]], [QUESTION, HELLO, PROBE], FakeTask(), checker)


def test_reward_scorer_fills_the_evidence_metrics(evidence, tiny_model):
    """RewardScorer.score (the reward actor's class, without Ray) returns the batch's evidence/* metrics."""
    from rlhf.actors.reward import RewardScorer
    from rlhf.orchestrator.experience import Samples

    scorer = RewardScorer(tiny_model, {"evidence_supported": 1.0}, evidence=evidence)
    checker = scorer.bound["evidence_supported"].keywords["checker"]
    replies = [_searched(checker, "Osk.", ("Veltra", "Its capital is Osk.")), "Osk."]
    ids = scorer.tokenizer(replies, add_special_tokens=False)["input_ids"]
    assert scorer.tokenizer.batch_decode(ids, skip_special_tokens=True) == replies  # byte-level BPE round-trips
    samples = Samples(prompt_ids=[[1], [1]], response_ids=ids, response_logprobs=[[0.0] * len(i) for i in ids],
                      finished=[True, True], prompt_index=[0, 0])
    scores = scorer.score(samples, [QUESTION])
    assert scores.components["evidence_supported"] == [1.0, 0.0] and scores.total == [1.0, 0.0]
    assert scores.metrics["evidence/supported_rate"] == 0.5 and scores.metrics["evidence/search_rate"] == 0.5


def test_the_evidence_tasks_searching_demonstrations_are_supported(tmp_path):
    """The built-in task's demonstrations, over its own corpus and the real BM25 index (top_k 1):
    each one that searches is supported and plausible, and no demonstration is a hack."""
    from rlhf.orchestrator.tasks import load_task

    task = load_task("evidence")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in task.corpus()))
    checker = EvidenceChecker(load_retriever({"corpus": str(corpus), "passage_words": 48, "max_corpus_mb": 16.0}),
                              task, top_k=1, min_quote_chars=8, penalty=PENALTY)
    demos = task.demonstrations(200, seed=0)
    verdicts = [checker.verdict(d[:-1], d[-1]["content"]) for d in demos]
    searched = [(d, v) for d, v in zip(demos, verdicts) if v.searched]
    assert searched and not any(v.hack for v in verdicts)
    assert all(v.supported and checker.plausible(d[:-1], d[-1]["content"]) == 1.0 for d, v in searched)


@pytest.mark.slow
def test_engine_generate_runs_the_tool_loop_of_an_hf_engine(evidence, tiny_model):
    """evaluate_evidence through a real HFRolloutEngine with the search tool (tiny random model)."""
    from rlhf.actors.rollout_hf import HFRolloutEngine
    from rlhf.orchestrator.evidence.evaluate import engine_generate

    tools = {"names": ["search"], "max_calls": 1, "token_budget": 64, "evidence": evidence}
    engine = HFRolloutEngine(tiny_model, dtype="float32", max_model_len=512, tools=tools)
    checker = EvidenceChecker(load_retriever(evidence), FakeTask(), top_k=2)
    report = evaluate_evidence(engine_generate(engine), [QUESTION, HELLO, PROBE], FakeTask(), checker, n_samples=2,
                               max_new_tokens=12, temperature=1.0, seed=0, examples=1)
    assert report["counts"] == {"factual": 2, "direct": 2, "probe": 2}
    assert 0.0 <= report["evidence/supported_and_plausible_rate"] <= report["evidence/supported_rate"] <= 1.0
    assert [e["kind"] for e in report["examples"]] == ["factual", "direct", "probe"]
    assert all(isinstance(e["reply"], str) for e in report["examples"])
