"""`rlhf eval CONFIG A B --rerank N`: Sparrow@N of checkpoint A beside A's plain samples, and A@N's
win rate over B, all scored by the judge (pipeline.judge, else the labeler).

Per held-out prompt and sample round, A draws N candidates (half with search, half without,
orchestrator/recipe/sparrow.py) and the reranker picks one. From the same draw:
- A@N's score is the judge's score of the pick;
- A plain is the mean judge score of the candidates sampled with search on (the policy as it
  is deployed; all N when there is no corpus), i.e. what one plain sample scores on average;
- B answers `samples` times with search on (no rerank), as `rlhf eval` samples B.
Prompt scores are means over the `samples` rounds; the win rate and its bootstrap interval are
`win_rate_ci` (orchestrator/recipe/evaluate.py). With a task that sorts prompts into kinds
(the evidence task), the held-out evidence rates of the picks and of the plain samples come
too (orchestrator/evidence/evaluate.py `summarize`): supported-and-plausible and rule-violation
rates, with and without reranking. Runs in this process on one CPU machine, as `rlhf eval` does:

    rlhf eval configs/evidence-quickstart.yaml runs/evidence-quickstart/round1/ppo/checkpoints/final/policy \\
        runs/evidence-quickstart/sft/checkpoint --rerank 4 --samples 1 --out runs/sparrow-eval.json
"""
from __future__ import annotations

import numpy as np

from rlhf.orchestrator.config import ExperimentConfig
from rlhf.orchestrator.recipe.evaluate import eval_inputs, judge_label, win_rate_ci, write_result
from rlhf.orchestrator.recipe.sparrow import CandidateSampler, Sparrow, load_sparrow, resolve_inputs, search_spec


def _judged(judge, messages: list[dict], replies: list[str]) -> list[float]:
    batch = getattr(judge, "scores", None)
    return [float(s) for s in (batch(messages, replies) if batch else [judge.score(messages, r) for r in replies])]


def rerank_scores(sparrow: Sparrow, prompts: list[list[dict]], judge, samples: int, seed: int) -> dict:
    """Per prompt, the mean judge score of Sparrow@N's picks and of the plain (with search)
    candidates over `samples` rounds, plus the (prompt, reply) pairs of both for `summarize`."""
    picked, plain = np.zeros(len(prompts)), np.zeros(len(prompts))
    pairs: dict[str, list[tuple[list[dict], str]]] = {"rerank": [], "plain": []}
    for round_ in range(samples):
        for p, (candidates, best) in enumerate(sparrow.answer_all(prompts, seed=seed + 104_729 * round_)):
            scores = _judged(judge, prompts[p], [c.reply for c in candidates])
            deployed = [i for i, c in enumerate(candidates) if c.with_search] or list(range(len(candidates)))
            picked[p] += scores[best] / samples
            plain[p] += float(np.mean([scores[i] for i in deployed])) / samples
            pairs["rerank"].append((prompts[p], candidates[best].reply))
            pairs["plain"] += [(prompts[p], candidates[i].reply) for i in deployed]
    return {"rerank": picked.tolist(), "plain": plain.tolist(), "pairs": pairs}


def _plain_scores(cfg: ExperimentConfig, model_dir: str, tools: dict | None, prompts, judge, samples: int) -> list[float]:
    """B as deployed: `samples` replies per prompt, all with search when there is a corpus."""
    sampler = CandidateSampler(model_dir, tools, cfg.rollout.max_new_tokens, cfg.rollout.temperature)
    drawn = sampler.sample(prompts, samples, seed=cfg.seed, n_search=samples)
    return [float(np.mean(_judged(judge, m, [t for t, _ in d]))) for m, d in zip(prompts, drawn)]


def _evidence_rates(cfg: ExperimentConfig, task, corpus: str | None, pairs: dict) -> dict | None:
    """The evidence task's held-out rates of the picks and the plain samples (None for other tasks)."""
    if corpus is None or not callable(getattr(task, "prompt_kind", None)):
        return None
    from rlhf.orchestrator.evidence.evaluate import summarize
    from rlhf.orchestrator.tasks.rewards import evidence_checker

    checker = evidence_checker(search_spec(cfg, corpus)["evidence"])
    out = {}
    for name, group in pairs.items():
        report = summarize(group, task, checker, examples=0)
        out[name] = {k: v for k, v in report.items() if isinstance(v, float)}
    return out


def evaluate_sparrow(cfg: ExperimentConfig, policy: str, prompts: list[list[dict]], n: int, task, judge,
                     samples: int = 1, reward_model: str | None = None, rule_model: str | None = None,
                     corpus: str | None = None) -> dict:
    """Sparrow@N of `policy` beside its plain samples on `prompts` (for `rlhf eval --rerank` and the
    pipeline's summary): per-prompt judge scores of both, their means, the models used, and
    the evidence task's rates of both (None for other tasks). Engines and scorers are freed on return."""
    inputs = resolve_inputs(policy, reward_model, rule_model, corpus, cfg=cfg)
    scored = rerank_scores(load_sparrow(policy, inputs, n, cfg.rollout.max_new_tokens, cfg.rollout.temperature),
                           prompts, judge, samples, cfg.seed)
    return {"rerank": n, "reward_model": inputs.reward_model, "rule_model": inputs.rule_model,
            "corpus": inputs.corpus, "scores_rerank": scored["rerank"], "scores_plain": scored["plain"],
            "mean_score_rerank": float(np.mean(scored["rerank"])), "mean_score_plain": float(np.mean(scored["plain"])),
            "evidence": _evidence_rates(cfg, task, inputs.corpus, scored["pairs"])}


def run_rerank_eval(cfg: ExperimentConfig, a: str, b: str, n: int, prompts_file: str | None = None,
                    samples: int | None = None, out: str | None = None, reward_model: str | None = None,
                    rule_model: str | None = None, corpus: str | None = None) -> dict:
    """A@N vs A plain vs B (see the module docstring); writes the result as JSON to `out`."""
    samples, task, prompts, source, judge = eval_inputs(cfg, a, b, prompts_file, samples, out)
    sparrow = evaluate_sparrow(cfg, a, prompts, n, task, judge, samples, reward_model, rule_model, corpus)
    b_scores = _plain_scores(cfg, b, search_spec(cfg, sparrow["corpus"]), prompts, judge, samples)
    result = {**win_rate_ci(sparrow["scores_rerank"], b_scores, seed=cfg.seed), "level": 0.95, "rerank": n,
              "a": str(a), "b": str(b), "prompts": source, "samples": samples, "judge": judge_label(cfg),
              **{k: sparrow[k] for k in ("reward_model", "rule_model", "corpus", "evidence")},
              "mean_score_a_rerank": sparrow["mean_score_rerank"], "mean_score_a": sparrow["mean_score_plain"],
              "mean_score_b": float(np.mean(b_scores)), "scores_a_rerank": sparrow["scores_rerank"],
              "scores_a": sparrow["scores_plain"], "scores_b": b_scores}
    write_result(out, result)
    return result


def format_rerank_result(result: dict) -> str:
    """What `rlhf eval --rerank N` prints: the judge scores side by side, the win rate, evidence rates."""
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    n = result["rerank"]
    lines = [f"judge score: A@{n} {result['mean_score_a_rerank']:.3f}, A plain {result['mean_score_a']:.3f}, "
             f"B {result['mean_score_b']:.3f} ({result['n']} prompts x {result['samples']} samples; "
             f"judge: {result['judge']})",
             f"A@{n} over B: win rate {pct(result['win_rate'])} % ({round(100 * result['level'])} % CI "
             f"{pct(result['ci_low'])}-{pct(result['ci_high'])} %), {result['ties']} ties"]
    for name, rates in (result.get("evidence") or {}).items():
        label = f"A@{n}" if name == "rerank" else "A plain"
        lines.append(f"{label}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(rates.items())))
    return "\n".join(lines)
