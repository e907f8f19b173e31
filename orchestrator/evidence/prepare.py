"""Getting a run's evidence ready before any actor starts: the corpus file and its index.

    cfg = prepare_evidence(cfg, task, out)   # rlhf pipeline / rlhf ppo, after the run folder exists

With `rollout.tools: [search]` (or an `evidence_*` reward) the search tool needs a corpus:
`evidence.corpus` if set, else the task's own (`task.corpus()`, e.g. the built-in evidence
task's synthetic encyclopedia), written once to OUT/evidence/corpus.jsonl. The index is built
here, in the driver, and cached beside the corpus, so the engines, the reward actor and the
evaluator only load it. A bad corpus is a one-line BadInput (exit 2) before Ray starts.
"""
from __future__ import annotations

import json
from pathlib import Path

from rlhf.orchestrator.config import ExperimentConfig
from rlhf.orchestrator.errors import BadInput

CORPUS_FILE = Path("evidence") / "corpus.jsonl"


def needs_evidence(cfg: ExperimentConfig) -> bool:
    return "search" in cfg.rollout.tools or any(n.startswith("evidence_") for n in cfg.reward.functions)


def evidence_spec(cfg: ExperimentConfig) -> dict | None:
    """The evidence.* keys plus the task spec, as plain values for actors: the search tool's corpus
    and the evidence rewards' settings. None when nothing searches or rewards evidence."""
    return {**cfg.evidence.model_dump(), "task": cfg.data.task} if needs_evidence(cfg) else None


def tool_spec(cfg: ExperimentConfig) -> dict | None:
    """What a rollout engine needs to run rollout.tools (None: no tools): names, limits, evidence."""
    if not cfg.rollout.tools:
        return None
    return {"names": list(cfg.rollout.tools), "max_calls": cfg.rollout.max_tool_calls,
            "token_budget": cfg.rollout.tool_token_budget, "evidence": evidence_spec(cfg)}


def check_evidence_source(cfg: ExperimentConfig, task) -> None:
    """Fails (before anything is written) when the run searches but has no corpus to search, or
    when evidence.corpus is bad (file:line, empty, too big); a good one is indexed now."""
    if not needs_evidence(cfg):
        return
    if cfg.evidence.corpus is None and not callable(getattr(task, "corpus", None)):
        raise BadInput("evidence.corpus: rollout.tools has search (or reward.functions an evidence_* reward) but "
                       "there is no corpus: set evidence.corpus to a JSONL of {title, text}, or use a task that "
                       "brings one (data.task: evidence)")
    if cfg.evidence.corpus is not None:
        from rlhf.orchestrator.evidence.retrieval import load_retriever

        load_retriever(evidence_spec(cfg))  # the checks, and the cached index beside the corpus


def prepare_evidence(cfg: ExperimentConfig, task, out: Path) -> ExperimentConfig:
    """`cfg` with evidence.corpus set (the task's corpus written to OUT/evidence/corpus.jsonl when
    it is null) and the corpus checked and indexed. Unchanged when nothing needs evidence."""
    if not needs_evidence(cfg):
        return cfg
    check_evidence_source(cfg, task)
    if cfg.evidence.corpus is None:
        from rlhf.orchestrator.run.rundir import write_atomic

        path = Path(out) / CORPUS_FILE
        text = "".join(json.dumps({"title": d["title"], "text": d["text"]}) + "\n" for d in task.corpus())
        if not path.is_file() or path.read_text() != text:
            write_atomic(path, text)
        cfg = cfg.model_copy(update={"evidence": cfg.evidence.model_copy(update={"corpus": str(path)})})
    from rlhf.orchestrator.evidence.retrieval import load_retriever

    load_retriever(evidence_spec(cfg))  # checks the corpus, builds (or reuses) the cached index
    return cfg
