"""Config sections of the recipe's stages (SFT, reward models, DPO, best-of-N, the pipeline,
labeling, evidence). Their fields are keys of the experiment YAML like every other section's;
orchestrator/config.py assembles them into `ExperimentConfig` and re-exports them.
"""
from __future__ import annotations

from typing import Literal, Optional

from rlhf.orchestrator.config_base import LabelerConfig, LoraConfig, Section, _f


class SFTConfig(Section):
    num_workers: int = _f(1, "Ray Train workers (DeepSpeed data-parallel ranks)", gt=0)
    zero_stage: Literal[0, 1, 2, 3] = _f(2, "DeepSpeed ZeRO stage")
    lr: float = _f(1e-3, "AdamW learning rate", gt=0)
    batch_size: int = _f(16, "dialogues per optimizer step", gt=0)
    micro_batch_size: int = _f(8, "dialogues per forward/backward on one worker", gt=0)
    epochs: int = _f(1, "passes over the demonstration data", gt=0)
    max_steps: Optional[int] = _f(None, "stop after this many optimizer steps; null = epochs decide", gt=0)
    max_tokens: int = _f(256, "dialogues are cut to this many tokens", gt=0)
    lora: Optional[LoraConfig] = _f(None, "train low-rank adapters (merged into the saved model); null = full fine-tuning")


class RewardModelConfig(Section):
    num_workers: int = _f(1, "Ray Train workers (DeepSpeed data-parallel ranks)", gt=0)
    zero_stage: Literal[0, 1, 2, 3] = _f(2, "DeepSpeed ZeRO stage")
    lr: float = _f(1e-4, "AdamW learning rate", gt=0)
    prompts_per_batch: int = _f(8, "prompts per optimizer step (each with all its K replies)", gt=0)
    epochs: int = _f(1, "passes over the comparisons (InstructGPT: 1, to avoid overfitting)", gt=0)
    replies_per_prompt: int = _f(4, "K replies ranked per prompt (InstructGPT: 4 to 9)", ge=4, le=9)
    prompts_per_round: int = _f(64, "prompts whose K replies are ranked in each round", gt=0)
    held_out_fraction: float = _f(0.1, "share of compared prompts kept out of training for accuracy", ge=0, lt=1)
    lora: Optional[LoraConfig] = _f(None, "adapters on the backbone (the value head trains whole; merged into the "
                                    "saved model); null = full fine-tuning")


class DPOConfig(Section):
    """Direct preference optimisation and its relatives on the comparisons (`rlhf dpo`)."""

    loss: Literal["dpo", "ipo", "cdpo", "simpo", "kto"] = _f(
        "dpo", "dpo: sigmoid (Rafailov et al. 2023); ipo: squared (Azar et al. 2023); cdpo: dpo with label "
        "smoothing; simpo: reference-free, length-normalised, margin gamma (Meng et al. 2024); kto: unpaired "
        "desirable/undesirable (Ethayarajh et al. 2024)")
    beta: float = _f(0.1, "strength of the implicit KL to the reference (simpo: reward scale)", gt=0)
    label_smoothing: float = _f(0.1, "cdpo: assumed share of flipped preference labels", ge=0, lt=0.5)
    gamma: float = _f(0.5, "simpo: target reward margin", ge=0)
    pairs: Literal["all", "best_worst"] = _f("all", "from a K-reply comparison: every (better, worse) pair, or "
                                             "only best against worst")
    reference: Optional[bool] = _f(None, "use the reference model's log-probs (the starting policy); null = "
                                   "the loss decides (all but simpo); true with simpo is an error")
    desirable_weight: float = _f(1.0, "kto: weight of desirable replies", gt=0)
    undesirable_weight: float = _f(1.0, "kto: weight of undesirable replies", gt=0)
    num_workers: int = _f(1, "Ray Train workers (DeepSpeed data-parallel ranks)", gt=0)
    zero_stage: Literal[0, 1, 2, 3] = _f(2, "DeepSpeed ZeRO stage")
    lr: float = _f(5e-5, "AdamW learning rate (quickstart: 5e-4 drags chosen log-probs down, loses to SFT)", gt=0)
    batch_size: int = _f(16, "preference pairs per optimizer step", gt=0)
    micro_batch_size: int = _f(8, "pairs per forward/backward on one worker", gt=0)
    epochs: int = _f(2, "passes over the pairs", gt=0)
    max_steps: Optional[int] = _f(None, "stop after this many optimizer steps; null = epochs decide", gt=0)
    max_tokens: int = _f(256, "prompt + reply cut to this many tokens", gt=0)
    held_out_fraction: float = _f(0.1, "share of compared prompts kept out for implicit-reward accuracy", ge=0, lt=1)
    lora: Optional[LoraConfig] = _f(None, "train low-rank adapters (merged into the saved model); null = full")


class BestOfNConfig(Section):
    """Rejection sampling (RAFT / Llama 2): N replies per prompt, the reward model keeps the best, SFT on them."""

    n: int = _f(8, "replies sampled per prompt", ge=2)
    prompts: int = _f(128, "prompts per round", gt=0)
    temperature: float = _f(1.0, "sampling temperature", gt=0)


class PipelineConfig(Section):
    method: Literal["ppo", "dpo", "best_of_n"] = _f("ppo", "how each round trains the policy on its comparisons: "
                                                     "reward model + PPO, (online) DPO, or best-of-N + SFT")
    rounds: int = _f(2, "rounds of (collect comparisons -> train reward model -> PPO) after SFT", gt=0)
    eval_prompts: int = _f(64, "held-out prompts for the per-round evaluation", gt=0)
    eval_samples: int = _f(4, "sampled replies per held-out prompt (each prompt's score is their mean)", gt=0)
    judge: Optional[LabelerConfig] = _f(None, "who scores held-out replies (same keys as labeler); null = the labeler")
    eval_every: int = _f(5, "during PPO, score the policy's replies to a fixed held-out sample with the judge "
                         "every N steps (eval/labeler_score), and before step 1 and after the last; 0 = only those two", ge=0)
    eval_subset: int = _f(16, "held-out prompts in that fixed sample (the first ones of the eval prompts)", gt=0)
    select: Literal["best", "last"] = _f("best", "policy a PPO stage hands on: the best by that judge score "
                                         "(the starting policy counts as step 0), or the last step's; and "
                                         "between rounds the best so far by the held-out judge (SFT counts), "
                                         "or the newest")
    patience: int = _f(3, "stop PPO early once the judge score has fallen for this many evaluations in a "
                       "row; 0 = never", ge=0)
    kl_target: Optional[float] = _f(3.0, "adaptive KL target (nats per reply) the pipeline's PPO stages use when "
                                    "ppo.kl.target is null; null = keep ppo.kl.coef fixed", gt=0)
    kl_horizon: int = _f(512, "horizon (samples) of that adaptive controller; the pipeline's short PPO stages need "
                         "one far below ppo.kl.horizon's 10,000 for the coefficient to move at all", gt=0)


class LabelConfig(Section):
    """The labeling web app (`rlhf label serve RUN_DIR`), read from the run folder's config.yaml."""

    order: Literal["uncertainty", "random", "fifo"] = _f(
        "uncertainty", "queue order: smallest reward-model score margin between replies first (the run's newest "
        "RM; fifo until there is one), a fixed shuffle per labeler, or oldest first")
    overlap: float = _f(0.1, "share of comparisons handed to a second labeler, for agreement", ge=0, le=1)
    lease_s: float = _f(600.0, "seconds a labeler holds a handed-out comparison before others may take it", gt=0)
    k: int = _f(4, "alternatives sampled per chat-and-compare", ge=2, le=9)
    max_body_kb: int = _f(64, "largest request body in KiB (413 above it)", gt=0)
    rules: dict[str, str] = _f({}, "rule name -> text labelers can tick as violated; {} = the task's rules")
    seed: int = _f(0, "seed of the overlap draw and the random order", ge=0)


class EvidenceConfig(Section):
    """The search tool's corpus (rollout.tools: [search]) and the evidence rewards (orchestrator/evidence/)."""

    corpus: Optional[str] = _f(None, "JSONL of {title, text} documents; null = the task's own corpus (the "
                               "evidence task writes it to OUT/evidence/corpus.jsonl)")
    top_k: int = _f(1, "passages the search tool inserts per query", gt=0)
    passage_words: int = _f(48, "documents are split into passages of about this many words", gt=0)
    max_corpus_mb: float = _f(256.0, "largest corpus file accepted, in MB (the index is built in memory)", gt=0)
    min_quote_chars: int = _f(8, "shortest quote that counts as evidence", gt=0)
    penalty: float = _f(0.5, "evidence_supported of a reply that cites with no answer, or quotes or names a "
                        "passage that was not retrieved, is minus this", ge=0)


class RuleRMConfig(Section):
    """One reward model that scores (dialogue, rule text) -> P(violation) (Sparrow's rule RM)."""

    enabled: bool = _f(False, "the pipeline trains it each round (from the SFT model) and PPO adds its reward")
    weights: dict[str, float] = _f({}, "rule name -> weight of its log(1 - P(violation)) in the reward; {} = 1 each")
    num_workers: int = _f(1, "Ray Train workers (DeepSpeed data-parallel ranks)", gt=0)
    zero_stage: Literal[0, 1, 2, 3] = _f(2, "DeepSpeed ZeRO stage")
    lr: float = _f(1e-3, "AdamW learning rate", gt=0)
    batch_size: int = _f(32, "(dialogue, rule) examples per optimizer step", gt=0)
    micro_batch_size: int = _f(32, "examples per forward/backward on one worker", gt=0)
    epochs: int = _f(2, "passes over the examples", gt=0)
    max_tokens: int = _f(256, "rule + dialogue + reply cut to this many tokens", gt=0)
    held_out_fraction: float = _f(0.1, "share of examples kept out for accuracy", ge=0, lt=1)
