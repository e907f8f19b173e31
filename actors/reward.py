"""Reward actor: scores replies with a reward model and/or named Python reward functions.

Several sources combine with weights (preference functions, Sparrow-style rules and the
reward model); each component is returned unweighted so the driver logs it
(`reward/<name>`). A plain class: the driver wraps it with `ray.remote` at launch.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import torch

from rlhf.orchestrator.experience import Samples
from rlhf.orchestrator.models.scoring import reward_offset, score_sequences
from rlhf.orchestrator.tasks.rewards import RuleParams, bind_reward_functions


@dataclass
class RewardScores:
    total: list[float]                   # B: weighted sum of the components (clipped if asked)
    components: dict[str, list[float]]   # name -> B unweighted scores
    scorer: str = ""                     # id of the scorer process (changes when Ray restarts it)
    metrics: dict[str, float] = field(default_factory=dict)  # batch metrics, e.g. evidence/* (logged as is)


class RewardScorer:
    def __init__(self, tokenizer_path: str, functions: dict[str, float], model_path: str | None = None,
                 model_weight: float = 1.0, clip: float | None = None, dtype: str = "float32",
                 forbidden_phrases: list[str] | None = None, evidence: dict | None = None) -> None:
        """`functions`: name -> weight (orchestrator/tasks/rewards.py); `forbidden_phrases` feeds the
        `forbidden_phrase` rule (required when that rule is named); `evidence` (the evidence.* keys plus
        `task`, the data.task spec) feeds the evidence_* rewards and the evidence/* metrics."""
        from transformers import AutoTokenizer

        if not functions and model_path is None:
            raise ValueError("no reward source: give a reward model or at least one function")
        # Bind rule parameters once here; raises ValueError for unknown names or missing params.
        self.evidence = dict(evidence) if evidence else None
        self.bound = bind_reward_functions(functions, RuleParams(forbidden_phrases=tuple(forbidden_phrases or ()),
                                                                 evidence=self.evidence))
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.functions, self.model_weight, self.clip = dict(functions), model_weight, clip
        self.instance = uuid.uuid4().hex  # a restarted actor is a new instance: restarts are counted
        self.model = None
        if model_path is not None:
            from transformers import AutoModelForSequenceClassification

            self.model = AutoModelForSequenceClassification.from_pretrained(
                model_path, num_labels=1, dtype=getattr(torch, dtype)).eval()

    def score(self, samples: Samples, prompts: list[list[dict]]) -> RewardScores:
        """Scores sample i as the reply to `prompts[samples.prompt_index[i]]`."""
        replies = self.tokenizer.batch_decode(samples.response_ids, skip_special_tokens=True)
        components: dict[str, list[float]] = {}
        for name, fn in self.bound.items():
            components[name] = [float(fn(prompts[p], text, ids)) for p, text, ids in
                                zip(samples.prompt_index, replies, samples.response_ids)]
        weights = dict(self.functions)
        if self.model is not None:
            components["model"] = self._model_scores(samples)
            weights["model"] = self.model_weight
        total = [sum(weights[name] * components[name][i] for name in components) for i in range(len(samples))]
        if self.clip is not None:
            total = [max(-self.clip, min(self.clip, t)) for t in total]
        return RewardScores(total=total, components=components, scorer=self.instance)

    def _model_scores(self, samples: Samples) -> list[float]:
        """The reward model's scalar at the last token of prompt + reply, minus the model's
        `config.reward_offset` (set by the RM stage so demonstrations score 0 on average)."""
        seqs = [p + r for p, r in zip(samples.prompt_ids, samples.response_ids)]
        raw = score_sequences(self.model, seqs, self.tokenizer.pad_token_id)
        return (raw - reward_offset(self.model)).tolist()
