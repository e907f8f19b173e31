"""Evidence rewards (Sparrow, Glaese et al. 2022, section 2.4): supported and plausible, with guards.

    reward:
      functions: {evidence_supported: 1.0, evidence_plausible: 1.0}

Both read the reply in the transcript format of format.py. `evidence_supported` is:

-  1  the reply searched, every Search Result line under each query is exactly what the
      retriever returns for that query (its top_k in order, or fewer, the reply's last Search
      Result line possibly cut short by rollout.tool_token_budget), the answer is not
      empty, and it ends with `Source: <title> "<quote>"` where the title is that of a retrieved
      passage and the quote (at least min_quote_chars after whitespace normalisation) is a
      verbatim substring of that passage that contains what the task's checker needs
      (`task.evidence_needed(messages)`, compared case-insensitively; None = any real quote);
-  0  no citation, a quote shorter than min_quote_chars, or a real quote that lacks what the
      checker needs;
- -penalty  the known hacks: a Search Result line the policy wrote itself (one that is not
      what the retriever returns, or one with no query before it), a citation with no answer,
      a citation without a search, a title that no retrieved passage has, a quote found in
      no retrieved passage of that title.

`evidence_plausible` is 1 when the answer (citation removed) is on topic and correct by the
task: `task.plausible(messages, answer)`, or for a task without it `task.score(messages, reply) > 0`;
else 0. It does not look at the evidence: Sparrow's raters judge the two apart.

The functions take the checker as a keyword (unbound they score 0); orchestrator/tasks/rewards.py
binds it from `RuleParams.evidence`. `EvidenceChecker.metrics` gives the batch's evidence/*
metrics the PPO trainer logs. Pure functions of text: no model, no Ray.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlhf.orchestrator.evidence.format import Passage, Transcript, normalize, parse
from rlhf.orchestrator.evidence.retrieval import Retriever

# Verdict.status values.
SUPPORTED, NO_CITATION, SHORT_QUOTE, NOT_NEEDED = "supported", "no_citation", "short_quote", "lacks_needed"
FABRICATED_RESULT, NO_ANSWER, NO_SEARCH = "fabricated_result", "no_answer", "cited_without_search"
FABRICATED_TITLE, QUOTE_NOT_FOUND = "fabricated_title", "quote_not_in_passage"
HACKS = frozenset({FABRICATED_RESULT, NO_ANSWER, NO_SEARCH, FABRICATED_TITLE, QUOTE_NOT_FOUND})


@dataclass(frozen=True)
class Verdict:
    status: str          # one of the constants above
    searched: bool
    quote_chars: int     # length of the normalised quote (0: no citation)
    cited: bool

    @property
    def supported(self) -> bool:
        return self.status == SUPPORTED

    @property
    def hack(self) -> bool:
        return self.status in HACKS


@dataclass
class EvidenceChecker:
    retriever: Retriever
    task: Any | None          # the data.task object (None: no checker, no plausibility)
    top_k: int = 1
    min_quote_chars: int = 8
    penalty: float = 0.5

    def verdict(self, messages: list[dict], reply: str) -> Verdict:
        """What the reply's evidence is worth (see the module docstring)."""
        t = parse(reply)
        cited = t.quote is not None
        quote = t.quote or ""
        status = self._status(messages, t, quote) if cited or t.stray_results or t.searched else NO_CITATION
        return Verdict(status, t.searched, len(quote) if cited else 0, cited)

    def _status(self, messages: list[dict], t: Transcript, quote: str) -> str:
        if t.stray_results or not self._results_are_real(t):
            return FABRICATED_RESULT
        if t.quote is None:
            return NO_CITATION
        if not t.searched:
            return NO_SEARCH
        if not t.answer:
            return NO_ANSWER
        sources = [p for p in t.retrieved if p.title == t.cited_title]
        if not sources:
            return FABRICATED_TITLE
        if len(quote) < self.min_quote_chars:
            return SHORT_QUOTE
        if not any(quote in normalize(p.text) for p in sources):
            return QUOTE_NOT_FOUND
        needed = getattr(self.task, "evidence_needed", None)
        needed = needed(messages) if callable(needed) else None
        if needed is not None and normalize(needed).casefold() not in quote.casefold():
            return NOT_NEEDED
        return SUPPORTED

    def _results_are_real(self, t: Transcript) -> bool:
        """Each query's Search Result lines are the retriever's answer to it: its top_k passages in
        order, or fewer, the very last line shown cut short (the tool cuts inserted tokens at
        rollout.tool_token_budget), never other ones."""
        last = (len(t.queries) - 1, len(t.results[-1]) - 1) if t.results and t.results[-1] else None
        for q, (query, shown) in enumerate(zip(t.queries, t.results)):
            expected = self.retriever.search(query, self.top_k)
            if len(shown) > len(expected):
                return False
            for i, (got, want) in enumerate(zip(shown, expected)):
                same = got.title == normalize(want.title) and got.text == normalize(want.text)
                if not same and not ((q, i) == last and _cut_short(got, want)):
                    return False
        return True

    def supported(self, messages: list[dict], reply: str) -> float:
        v = self.verdict(messages, reply)
        return 1.0 if v.supported else -self.penalty if v.hack else 0.0

    def plausible(self, messages: list[dict], reply: str) -> float:
        if self.task is None:
            return 0.0
        answer = parse(reply).answer
        if not answer:
            return 0.0
        judge = getattr(self.task, "plausible", None)
        ok = judge(messages, answer) if callable(judge) else self.task.score(messages, reply) > 0
        return 1.0 if ok else 0.0

    def metrics(self, prompts: list[list[dict]], replies: list[str]) -> dict[str, float]:
        """evidence/* over a batch: search_rate, supported_rate, supported_and_plausible_rate (shares
        of all replies) and quote_chars (mean quote length of the replies that cite; 0 if none)."""
        verdicts = [self.verdict(m, r) for m, r in zip(prompts, replies)]
        both = [v.supported and self.plausible(m, r) > 0 for v, m, r in zip(verdicts, prompts, replies)]
        quotes = [v.quote_chars for v in verdicts if v.cited]
        n = max(len(verdicts), 1)
        return {"evidence/search_rate": sum(v.searched for v in verdicts) / n,
                "evidence/supported_rate": sum(v.supported for v in verdicts) / n,
                "evidence/supported_and_plausible_rate": sum(both) / n,
                "evidence/quote_chars": sum(quotes) / len(quotes) if quotes else 0.0}


def _cut_short(got: Passage, want: Passage) -> bool:
    """`got` (a parsed Search Result line) is the start of `want`'s line, cut anywhere."""
    line = f"{normalize(want.title)} | {normalize(want.text)}"
    return (got.title == normalize(want.title) and normalize(want.text).startswith(got.text)) or \
        (not got.title and line.startswith(got.text))


def evidence_supported(prompt: list[dict], reply: str, reply_ids: list[int], *,
                       checker: EvidenceChecker | None = None) -> float:
    """1 / 0 / -penalty as in the module docstring (unbound: 0)."""
    return checker.supported(prompt, reply) if checker is not None else 0.0


def evidence_plausible(prompt: list[dict], reply: str, reply_ids: list[int], *,
                       checker: EvidenceChecker | None = None) -> float:
    """1 when the answer is on topic and correct by the task, else 0 (unbound: 0)."""
    return checker.plausible(prompt, reply) if checker is not None else 0.0


def evidence_metrics(prompts: list[list[dict]], replies: list[str], checker: EvidenceChecker) -> dict[str, float]:
    return checker.metrics(prompts, replies)
