"""Python reward functions and Sparrow-style rules, registered by name, weighted in config.

    reward:
      functions: {arithmetic: 1.0, forbidden_phrase: 0.5, no_repetition: 0.2}
      forbidden_phrases: ["as an ai", "i cannot"]

Each function scores one reply: `fn(prompt_messages, reply_text, reply_ids) -> float`.
Two kinds share the registry:
- preference functions (`digit_fraction`, and each built-in task's simulated labeler under
  the task's name: `arithmetic`, `instruct`): what a labeler would reward;
- rules (`forbidden_phrase`, `no_repetition`): penalties, always <= 0, 0 for a clean reply.
  Sparrow (Glaese et al., 2022) scores rule violations apart from preference and adds them
  with their own weights, so each rule stays visible as its own metric.

Some rules take parameters from config (`forbidden_phrase` needs the phrase list). The
registry holds them unbound (with harmless defaults) so config validation can check names;
`build_reward_functions` / `bind_reward_functions` return closures with the parameters
bound, which is what the reward actor calls. The reward actor logs each component as
`reward/<name>` and sums them with their weights.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Callable, Iterable

from rlhf.orchestrator.evidence.rewards import EvidenceChecker, evidence_plausible, evidence_supported
from rlhf.orchestrator.tasks import TASKS, Task, load_task

RewardFn = Callable[[list[dict], str, list[int]], float]

# n of the word n-grams `no_repetition` counts (Welleck et al., 2019, "rep-n").
REPETITION_NGRAM = 3


def digit_fraction(prompt: list[dict], reply: str, reply_ids: list[int]) -> float:
    """Share of the reply's characters that are digits (0 for an empty reply).

    A deliberately easy rule: a policy learns it in tens of PPO steps, which makes it the
    smoke test of the whole PPO engine (configs/ppo-tiny.yaml).
    """
    text = reply.strip()
    return sum(ch.isdigit() for ch in text) / len(text) if text else 0.0


def task_score(task: Task, prompt: list[dict], reply: str, reply_ids: list[int]) -> float:
    """A task's simulated labeler as a reward function (bound with functools.partial, so it pickles)."""
    return float(task.score(prompt, reply))


def forbidden_phrase(prompt: list[dict], reply: str, reply_ids: list[int], *,
                     phrases: tuple[str, ...] = ()) -> float:
    """Rule: -1 per occurrence of any forbidden phrase in the reply, case-insensitive.

    Occurrences are counted without overlap per phrase (str.count), summed over phrases.
    Unbound (no phrases) it scores 0; `bind_reward_functions` binds `reward.forbidden_phrases`.
    """
    text = reply.lower()
    return -float(sum(text.count(phrase.lower()) for phrase in phrases))


def no_repetition(prompt: list[dict], reply: str, reply_ids: list[int]) -> float:
    """Rule: minus the share of repeated word n-grams, -(1 - unique/total), in [-1, 0].

    Words are the reply's lower-cased whitespace-separated tokens; n = REPETITION_NGRAM.
    A reply with fewer than n words has no n-gram and scores 0.
    """
    words = reply.lower().split()
    grams = [tuple(words[i: i + REPETITION_NGRAM]) for i in range(len(words) - REPETITION_NGRAM + 1)]
    return -(1.0 - len(set(grams)) / len(grams)) if grams else 0.0


REWARD_FUNCTIONS: dict[str, RewardFn] = {
    "digit_fraction": digit_fraction,
    "forbidden_phrase": forbidden_phrase,
    "no_repetition": no_repetition,
    "evidence_supported": evidence_supported,  # Sparrow's evidence (orchestrator/evidence/rewards.py)
    "evidence_plausible": evidence_plausible,
} | {name: functools.partial(task_score, factory()) for name, factory in TASKS.items()}  # built-in tasks' labelers


@dataclass(frozen=True)
class RuleParams:
    """Parameters rules take from config (`reward.*`), as plain values."""

    forbidden_phrases: tuple[str, ...] = ()  # phrases `forbidden_phrase` penalises
    evidence: dict | None = None  # evidence.* keys plus `task` (the data.task spec): the evidence_* rewards


def _bind_forbidden_phrase(params: RuleParams) -> RewardFn:
    phrases = tuple(params.forbidden_phrases)
    if not phrases:
        raise ValueError("reward function forbidden_phrase needs reward.forbidden_phrases (got none)")
    if any(not p.strip() for p in phrases):
        raise ValueError(f"reward.forbidden_phrases must not hold empty phrases, got {list(phrases)!r}")
    return functools.partial(forbidden_phrase, phrases=phrases)


@functools.lru_cache(maxsize=4)
def _checker(key: str) -> EvidenceChecker:
    from rlhf.orchestrator.evidence.retrieval import load_retriever

    evidence = json.loads(key)
    return EvidenceChecker(load_retriever(evidence), load_task(evidence["task"]), top_k=evidence["top_k"],
                           min_quote_chars=evidence["min_quote_chars"], penalty=evidence["penalty"])


def evidence_checker(evidence: dict) -> EvidenceChecker:
    """The retriever, task and limits of `evidence` (launch.evidence_spec), loaded once per process."""
    return _checker(json.dumps(evidence, sort_keys=True))  # plain values: the spec is its own cache key


def _bind_evidence(fn: RewardFn) -> Callable[[RuleParams], RewardFn]:
    def bind(params: RuleParams) -> RewardFn:
        if not params.evidence:
            raise ValueError(f"reward function {fn.__name__} needs the evidence.* settings (got none)")
        return functools.partial(fn, checker=evidence_checker(params.evidence))
    return bind


# Rules with parameters: name -> binder (params -> bound function). Others are used as is.
_BINDERS: dict[str, Callable[[RuleParams], RewardFn]] = {
    "forbidden_phrase": _bind_forbidden_phrase,
    "evidence_supported": _bind_evidence(evidence_supported),
    "evidence_plausible": _bind_evidence(evidence_plausible),
}


def bind_reward_functions(names: Iterable[str], params: RuleParams = RuleParams()) -> dict[str, RewardFn]:
    """`{name: fn}` for each registered name, rules bound to `params`.

    Raises ValueError for an unknown name, or a rule whose parameters are missing.
    """
    names = list(names)
    unknown = sorted(set(names) - set(REWARD_FUNCTIONS))
    if unknown:
        raise ValueError(f"unknown reward functions: {unknown}; known: {sorted(REWARD_FUNCTIONS)}")
    return {name: _BINDERS[name](params) if name in _BINDERS else REWARD_FUNCTIONS[name] for name in names}


def build_reward_functions(reward_cfg) -> dict[str, RewardFn]:
    """The configured functions (`reward.functions` names) bound to `reward.*` parameters.

    `reward_cfg` is a `RewardConfig` (orchestrator/config.py).
    """
    params = RuleParams(forbidden_phrases=tuple(reward_cfg.forbidden_phrases))
    return bind_reward_functions(reward_cfg.functions, params)
