"""Reward actor: scores replies with a reward model and/or named Python reward functions.

Several sources combine with weights (preference functions, Sparrow-style rules and the
reward model); each component is returned unweighted so the driver logs it
(`reward/<name>`). A plain class: the driver wraps it with `ray.remote` at launch.
"""
from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from rlhf.actors.threads import torch_threads
from rlhf.orchestrator.experience import Samples
from rlhf.orchestrator.models.scoring import (load_rule_model, reward_offset, rule_reward, rule_violation_probs,
                                              score_sequences)
from rlhf.orchestrator.tasks.rewards import RuleParams, bind_reward_functions, evidence_checker


@dataclass
class RewardScores:
    total: list[float]                   # B: weighted sum of the components (clipped if asked)
    components: dict[str, list[float]]   # name -> B unweighted scores
    scorer: str = ""                     # id of the scorer process (changes when Ray restarts it)
    metrics: dict[str, float] = field(default_factory=dict)  # batch metrics, e.g. evidence/* (logged as is)


class RewardScorer:
    def __init__(self, tokenizer_path: str, functions: dict[str, float], model_path: str | None = None,
                 model_weight: float = 1.0, clip: float | None = None, dtype: str = "float32",
                 forbidden_phrases: list[str] | None = None, evidence: dict | None = None,
                 rule_model_path: str | None = None, rule_weights: dict[str, float] | None = None,
                 num_threads: int | None = None) -> None:
        """`functions`: name -> weight (orchestrator/tasks/rewards.py); `forbidden_phrases` feeds the
        `forbidden_phrase` rule (required when that rule is named); `evidence` (the evidence.* keys plus
        `task`, the data.task spec) feeds the evidence_* rewards and the evidence/* metrics.
        `rule_model_path`: a rule reward model folder (recipe/rule_rm.py); component `rules_rm` =
        sum over its rules.json of rule_weights[rule] (default 1) * log(1 - P(violation)).
        `num_threads`: torch threads while scoring (None: the process's count)."""
        from transformers import AutoTokenizer

        if not functions and model_path is None and rule_model_path is None:
            raise ValueError("no reward source: give a reward model or at least one function")
        # Bind rule parameters once here; raises ValueError for unknown names or missing params.
        self.evidence = dict(evidence) if evidence else None
        self.bound = bind_reward_functions(functions, RuleParams(forbidden_phrases=tuple(forbidden_phrases or ()),
                                                                 evidence=self.evidence))
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.functions, self.model_weight, self.clip = dict(functions), model_weight, clip
        self.instance = uuid.uuid4().hex  # a restarted actor is a new instance: restarts are counted
        self.num_threads = num_threads
        self.model = None
        if model_path is not None:
            from transformers import AutoModelForSequenceClassification

            self.model = AutoModelForSequenceClassification.from_pretrained(
                model_path, num_labels=1, dtype=getattr(torch, dtype)).eval()
        self.rule_model = self.rule_tokenizer = None
        self.rules, self.rule_weights = {}, dict(rule_weights or {})
        if rule_model_path is not None:
            self.rule_model, self.rule_tokenizer, self.rules = load_rule_model(rule_model_path, dtype)
            unknown = sorted(set(self.rule_weights) - set(self.rules))
            if unknown:
                raise ValueError(f"rule_rm.weights: rules {unknown} are not in {rule_model_path}'s rules.json "
                                 f"({', '.join(sorted(self.rules))})")

    def score(self, samples: Samples, prompts: Sequence[list[dict]] | Mapping[int, list[dict]]) -> RewardScores:
        """Scores sample i as the reply to `prompts[samples.prompt_index[i]]`: a list of every
        prompt, or (as PPO sends them) a dict of the batch's own."""
        with torch_threads(self.num_threads):
            return self._score(samples, prompts)

    def _score(self, samples: Samples, prompts: Sequence[list[dict]] | Mapping[int, list[dict]]) -> RewardScores:
        replies = self.tokenizer.batch_decode(samples.response_ids, skip_special_tokens=True)
        components: dict[str, list[float]] = {}
        for name, fn in self.bound.items():
            components[name] = [float(fn(prompts[p], text, ids)) for p, text, ids in
                                zip(samples.prompt_index, replies, samples.response_ids)]
        weights = dict(self.functions)
        if self.model is not None:
            components["model"] = self._model_scores(samples)
            weights["model"] = self.model_weight
        if self.rule_model is not None:
            components["rules_rm"] = self._rule_scores(samples, prompts, replies)
            weights["rules_rm"] = 1.0  # the per-rule weights are inside the component
        total = [sum(weights[name] * components[name][i] for name in components) for i in range(len(samples))]
        if self.clip is not None:
            total = [max(-self.clip, min(self.clip, t)) for t in total]
        metrics = {}
        if self.evidence:  # evidence/* rates of the batch: search, supported, supported and plausible, quote length
            metrics = evidence_checker(self.evidence).metrics([prompts[p] for p in samples.prompt_index], replies)
        return RewardScores(total=total, components=components, scorer=self.instance, metrics=metrics)

    def _model_scores(self, samples: Samples) -> list[float]:
        """The reward model's scalar at the last token of prompt + reply, minus the model's
        `config.reward_offset` (set by the RM stage so demonstrations score 0 on average)."""
        seqs = [p + r for p, r in zip(samples.prompt_ids, samples.response_ids)]
        raw = score_sequences(self.model, seqs, self.tokenizer.pad_token_id)
        return (raw - reward_offset(self.model)).tolist()

    def _rule_scores(self, samples: Samples, prompts: Sequence[list[dict]] | Mapping[int, list[dict]],
                     replies: list[str]) -> list[float]:
        """rules_rm of each sample: the rule model judges the replies to one prompt together."""
        by_prompt: dict[int, list[int]] = {}
        for i, p in enumerate(samples.prompt_index):
            by_prompt.setdefault(p, []).append(i)
        out = [0.0] * len(replies)
        for p, rows in by_prompt.items():
            probs = rule_violation_probs(self.rule_model, self.rule_tokenizer, prompts[p], [replies[i] for i in rows],
                                         self.rules)
            for i, value in zip(rows, rule_reward(probs, self.rule_weights)):
                out[i] = value
        return out
