"""Held-out evidence evaluation: Sparrow's supported-and-plausible rate and rule-violation rate.

    report = evaluate_evidence(generate, task.eval_prompts(64, seed=1), task, checker, n_samples=1,
                               max_new_tokens=96, temperature=0.0, seed=0)   # generate: see below
    report["evidence/supported_and_plausible_rate"]   # Sparrow: 0.78 on factual questions
    report["rules/violation_rate"]                    # Sparrow: 0.08 under adversarial probing

`generate(prompts, n, max_new_tokens, temperature, seed) -> list[list[str]]` answers each prompt
n times through the tool loop (the policy writes `Search Query:`, the search tool inserts the
results, the policy goes on). This module is below the actors layer, so the caller builds the
engine from the model folder and hands it in; in-process on one CPU:

    engine = HFRolloutEngine(model_dir, dtype="float32", tools=launch.tool_spec(cfg))  # actors/rollout_hf.py
    report = evaluate_evidence(engine_generate(engine), prompts, task, evidence_checker(launch.evidence_spec(cfg)))

(`evidence_checker`: orchestrator/tasks/rewards.py.)

The task sorts prompts with `prompt_kind(messages)`: "factual" (needs the corpus), "direct"
(needs no search), "probe" (tries to make the reply break a rule). Rates, over replies:
- evidence/supported_and_plausible_rate, evidence/supported_rate: factual replies;
- evidence/search_rate/factual and evidence/search_rate/direct: how often each kind searched
  (a good policy searches for the first and not for the second);
- rules/violation_rate: share of probe replies breaking any rule (`task.rule_violations`), and
  rules/violation_rate/<rule> per rule.
A kind with no prompt gets no rate (absent, not 0). Runs in-process on one CPU.
"""
from __future__ import annotations

from typing import Any, Callable

from rlhf.orchestrator.evidence.rewards import EvidenceChecker

Generate = Callable[[list[list[dict]], int, int, float, int], list[list[str]]]
KINDS = ("factual", "direct", "probe")


def evaluate_evidence(generate: Generate, prompts: list[list[dict]], task: Any, checker: EvidenceChecker,
                      n_samples: int = 1, max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0,
                      examples: int = 3) -> dict:
    """Samples `n_samples` replies per held-out prompt and scores them (see the module docstring)."""
    replies = generate(prompts, n_samples, max_new_tokens, temperature, seed)
    if len(replies) != len(prompts) or any(len(r) != n_samples for r in replies):
        raise ValueError(f"generate returned {[len(r) for r in replies]} replies for {len(prompts)} prompts "
                         f"x {n_samples} samples")
    pairs = [(messages, reply) for messages, group in zip(prompts, replies) for reply in group]
    return summarize(pairs, task, checker, examples=examples)


def engine_generate(engine) -> Generate:
    """`generate` for an engine with the rollout engines' `generate(prompt_ids, prompt_index, n, ...)`
    and a `tokenizer` (actors/rollout_hf.py's HFRolloutEngine built with tools=launch.tool_spec(cfg)):
    chat template with the generation prompt, replies decoded without special tokens."""
    def generate(prompts, n, max_new_tokens, temperature, seed):
        tok = engine.tokenizer
        ids = [list(tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)
                    ["input_ids"]) for p in prompts]
        samples = engine.generate(ids, list(range(len(ids))), n=n, temperature=temperature,
                                  max_new_tokens=max_new_tokens, seed=seed)
        texts = tok.batch_decode(samples.response_ids, skip_special_tokens=True)
        return [texts[i * n: (i + 1) * n] for i in range(len(prompts))]  # the n of one prompt are consecutive
    return generate


def summarize(pairs: list[tuple[list[dict], str]], task: Any, checker: EvidenceChecker, examples: int = 3) -> dict:
    """The rates, counts and a few transcripts of (prompt, reply) pairs."""
    by_kind: dict[str, list[tuple[list[dict], str]]] = {kind: [] for kind in KINDS}
    for messages, reply in pairs:
        by_kind.setdefault(task.prompt_kind(messages), []).append((messages, reply))
    out: dict = {"counts": {kind: len(group) for kind, group in by_kind.items()}}
    factual = by_kind["factual"]
    if factual:
        verdicts = [checker.verdict(m, r) for m, r in factual]
        both = [v.supported and checker.plausible(m, r) > 0 for v, (m, r) in zip(verdicts, factual)]
        out["evidence/supported_and_plausible_rate"] = _rate(both)
        out["evidence/supported_rate"] = _rate(v.supported for v in verdicts)
        out["evidence/hack_rate"] = _rate(v.hack for v in verdicts)
    for kind in ("factual", "direct"):
        if by_kind[kind]:
            out[f"evidence/search_rate/{kind}"] = _rate(checker.verdict(m, r).searched for m, r in by_kind[kind])
    if by_kind["probe"]:
        broken = [task.rule_violations(m, r) for m, r in by_kind["probe"]]
        out["rules/violation_rate"] = _rate(any(v.values()) for v in broken)
        for rule in sorted({name for v in broken for name in v}):
            out[f"rules/violation_rate/{rule}"] = _rate(v.get(rule, False) for v in broken)
    out["examples"] = [{"kind": kind, "prompt": group[i][0][-1]["content"], "reply": group[i][1]}
                       for kind, group in by_kind.items() for i in range(min(examples, len(group)))]
    return out


def _rate(flags) -> float:
    flags = [bool(f) for f in flags]
    return sum(flags) / len(flags) if flags else 0.0


def format_report(report: dict) -> str:
    """The rates as `name value` lines, then the counts (for the pipeline's summary)."""
    lines = [f"{name} {value:.3f}" for name, value in sorted(report.items()) if isinstance(value, float)]
    counts = report.get("counts", {})
    return "\n".join(lines + ["prompts " + ", ".join(f"{kind} {n}" for kind, n in counts.items())])
