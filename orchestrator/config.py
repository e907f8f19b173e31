"""Typed experiment configuration: the one documented place for every default.

Every key an experiment YAML may hold is a field below, with its default and a one-line
description (`rlhf config keys` prints them all). `load_config` reads a YAML file, applies
dotted `key=value` overrides, and validates everything before Ray or any model starts;
problems raise `ConfigError` naming the dotted key (the CLI prints it and exits 2).

Builders turn sections into plain constructor arguments; actors never see the whole config.
"""
from __future__ import annotations

import copy
import difflib
import typing
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from rlhf.orchestrator.config_base import LabelerConfig, LoraConfig, Section, _f  # noqa: F401 (re-exported)
from rlhf.orchestrator.config_stages import (BestOfNConfig, DPOConfig, EvidenceConfig, LabelConfig,  # noqa: F401
                                             PipelineConfig, RewardModelConfig, RuleRMConfig, SFTConfig)
from rlhf.orchestrator.errors import ConfigError


class TinyModelConfig(Section):
    """Architecture of a model built from scratch when `model.policy` is `tiny`."""

    arch: Literal["qwen2", "llama"] = _f("qwen2", "decoder architecture (Hugging Face config class)")
    hidden_size: int = _f(128, "width of the residual stream", gt=0)
    num_layers: int = _f(2, "number of transformer blocks", gt=0)
    num_heads: int = _f(2, "attention heads", gt=0)
    num_kv_heads: int = _f(1, "key/value heads (grouped-query attention); must divide num_heads", gt=0)
    head_dim: int = _f(64, "per-head width; vLLM's CPU attention needs >= 64", ge=64)
    intermediate_size: int = _f(256, "MLP hidden width", gt=0)
    vocab_size: int = _f(512, "target size of the byte-level BPE tokenizer trained on the task corpus", ge=300)
    max_position_embeddings: int = _f(512, "longest sequence (prompt + response) in tokens", gt=0)
    tie_word_embeddings: bool = _f(False, "share input embedding and output projection")


class ModelConfig(Section):
    policy: str = _f("tiny", "initial policy: Hugging Face name or folder; `tiny` builds one from model.tiny")
    reward: Optional[str] = _f(None, "reward model name or folder; null = score with the task's reward function")
    rule_reward: Optional[str] = _f(None, "rule-conditional reward model folder (P(violation | dialogue, rule)); "
                                    "its log(1 - P) per rule enters the reward with rule_rm.weights")
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "parameter dtype in learners and engines")
    tiny: TinyModelConfig = _f(TinyModelConfig(), "architecture used when policy is `tiny`")
    packing: bool = _f(False, "learner and reference forwards pack each micro-batch's sequences into one row: "
                       "no compute on padding, and on CPU the replies of one prompt share one copy of it")


class DataSourceConfig(Section):
    """One input file or local Hugging Face dataset. A plain string is shorthand for `{path: ...}`."""

    path: str = _f(..., "JSONL file, a folder written by datasets' save_to_disk, or parquet/json/csv file(s); "
                   "relative paths resolve against the config file's folder, then the working directory")
    format: Literal["messages", "prompt_response", "preference", "rule_labels"] = _f(
        "messages", "messages: {messages: [{role, content}]}; prompt_response: {prompt, response} (one turn); "
        "preference: {prompt or messages, chosen, rejected}; rule_labels: {messages, reply, rule, violated}")
    weight: float = _f(1.0, "mixing ratio of this source among the sources of the same list", gt=0)
    column: dict[str, str] = _f({}, "our field name -> the dataset's column, e.g. {prompt: instruction, "
                                "response: output}")
    split: Optional[str] = _f(None, "split of a saved DatasetDict (default: train, or the only one)")


def _source_list(value):
    """`demos.jsonl`, `[demos.jsonl, {path: x, weight: 2}]` or null -> a list of source mappings."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    return [{"path": item} if isinstance(item, str) else item for item in items]


SourceList = Annotated[list[DataSourceConfig], BeforeValidator(_source_list)]


class DataConfig(Section):
    task: Optional[str] = _f("arithmetic", "built-in task by name (tasks registry: arithmetic, evidence, instruct, "
                             "rules) or a user's `pkg.module:Factory` / `path/to/file.py:Factory`; null = everything "
                             "from files")
    task_size: int = _f(4096, "demonstration dialogues the built-in task generates", gt=0)
    sft: SourceList = _f([], "demonstrations: dialogues ending with the demonstrated assistant turn")
    prompts: SourceList = _f([], "conversations ending with a user turn, for comparisons and PPO")
    eval: SourceList = _f([], "held-out conversations ending with a user turn")
    comparisons: SourceList = _f([], "preference pairs loaded into the comparison store as round 0")
    rule_labels: SourceList = _f([], "per-rule violation labels (format rule_labels) for the rule reward model")
    max_prompt_tokens: int = _f(256, "longest prompt in tokens", gt=0)
    prompt_overflow: Literal["truncate", "reject"] = _f("truncate", "what to do with longer prompts (counted either way)")


class RolloutConfig(Section):
    backend: Literal["vllm", "hf"] = _f("vllm", "rollout engine: vllm, or hf (transformers generate; "
                                        "no vLLM needed, one device per engine)")
    engines: int = _f(1, "number of vLLM engines (Ray actors)", gt=0)
    tensor_parallel_size: int = _f(1, "GPUs per engine", gt=0)
    n_samples: int = _f(1, "completions sampled per prompt (>= 2 for critic-free advantages)", gt=0)
    max_new_tokens: int = _f(64, "longest response in tokens", gt=0)
    temperature: float = _f(1.0, "sampling temperature", gt=0)
    top_p: float = _f(1.0, "nucleus sampling mass", gt=0, le=1)
    gpu_memory_utilization: float = _f(0.5, "fraction of a GPU an engine may take", gt=0, le=1)
    kv_cache_gib: int = _f(1, "KV cache size per engine on CPU in whole GiB (VLLM_CPU_KVCACHE_SPACE)", gt=0)
    max_restarts: int = _f(2, "times Ray restarts a dead engine per run; its unfinished prompts are re-issued", ge=0)
    overlap: bool = _f(False, "generate step k+1 while the learners train on step k (one step off-policy, "
                             "importance-weighted against the sampler's log-probs)")
    tools: list[Literal["search"]] = _f([], "tools the policy may call inside a reply: search (a `Search Query:` "
                                        "line; the system inserts the retrieved passages, see evidence.*)")
    max_tool_calls: int = _f(1, "tool calls per reply at most; later ones are left as plain text", ge=0)
    tool_token_budget: int = _f(96, "tokens the system may insert into one reply (tool results), in all", gt=0)
    overlap_is_cap: float = _f(2.0, "truncation of those importance weights pi_learner / pi_sampler", gt=0)


class KLConfig(Section):
    coef: float = _f(0.05, "initial KL penalty coefficient beta in r_t = -beta*KL_t (+ score at EOS)", ge=0)
    estimator: Literal["k1", "k2", "k3"] = _f("k1", "per-token KL estimator (Schulman's k1/k2/k3)")
    target: Optional[float] = _f(None, "target KL for the adaptive controller; null keeps coef fixed", gt=0)
    horizon: int = _f(10000, "adaptive controller horizon in samples", gt=0)
    clamp: Optional[float] = _f(10.0, "clamp each token's KL estimate to [-clamp, clamp] (k3 grows like "
                                "exp(|log-ratio|)); null = unbounded", gt=0)


class RewardConfig(Section):
    functions: dict[str, float] = _f({}, "named reward functions and rules (orchestrator/tasks/rewards.py) with weights")
    forbidden_phrases: list[str] = _f([], "phrases the `forbidden_phrase` rule penalises (Sparrow-style rule)")
    model_weight: float = _f(1.0, "weight of the reward model's score (when model.reward is set)", ge=0)
    clip: Optional[float] = _f(None, "clip the combined score to [-clip, clip]; null = off", gt=0)
    scorer: Literal["auto", "actor"] = _f(
        "auto", "where replies are scored: auto = reward functions alone in the driver's own process while the "
        "learners' forwards run (no actor to start, no call a step), a reward model or rule model in an actor "
        "of its own; actor = always an actor of its own, which Ray restarts and retries if it dies")


class PPOConfig(Section):
    steps: int = _f(100, "PPO steps (generate -> score -> update -> sync) in a run", gt=0)
    prompts_per_step: int = _f(8, "prompts sampled per PPO step (times rollout.n_samples = samples)", gt=0)
    train_batch_size: int = _f(8, "samples per optimizer step; must divide the step's samples", gt=0)
    micro_batch_size: int = _f(4, "samples per forward/backward on one rank (gradient accumulation)", gt=0)
    epochs: int = _f(1, "passes over each step's experience", gt=0)
    advantage: Literal["gae", "grpo", "rloo", "reinforce_pp"] = _f("gae", "advantage estimator")
    gamma: float = _f(1.0, "discount", ge=0, le=1)
    lam: float = _f(0.95, "GAE lambda", ge=0, le=1)
    clip: float = _f(0.2, "PPO ratio clip epsilon", gt=0)
    dual_clip: Optional[float] = _f(None, "dual-clip constant c > 1 for negative advantages; null = off", gt=1)
    value_clip: Optional[float] = _f(0.2, "value-function clip; null = unclipped", gt=0)
    entropy_coef: float = _f(0.0, "entropy bonus coefficient", ge=0)
    whiten_advantages: bool = _f(True, "normalise advantages over the batch (masked)")
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] = _f(
        "token_mean", "how token losses are averaged (exact under micro-batching and data parallelism)")
    ptx_coef: float = _f(0.0, "PPO-ptx: weight of the SFT log-likelihood mixed into the policy loss", ge=0)
    kl: KLConfig = _f(KLConfig(), "KL penalty to the reference (SFT) policy")
    abort_kl: Optional[float] = _f(50.0, "stop the run (exit 1) when a step's mean KL to the reference exceeds "
                                   "this many nats per reply: the policy has left its starting model, e.g. a "
                                   "learning rate far too high for a pretrained model; null = never", gt=0)
    max_nonfinite_skips: int = _f(3, "abort after this many consecutive updates skipped for a non-finite "
                                  "loss, advantage or gradient norm", gt=0)
    old_logprobs: Literal["learner", "sampler"] = _f(
        "learner", "PPO's old log-probs: learner (a policy forward over the batch) or sampler (the engines' "
        "log-probs of the sampled tokens, no forward; checked every step on the first mini-batch, and the "
        "run falls back to learner once the gap exceeds ppo.old_logprobs_max_gap)")
    old_logprobs_max_gap: float = _f(1e-3, "largest mean |sampler - learner| log-prob gap per token that "
                                     "ppo.old_logprobs=sampler accepts", gt=0)


class LearnerConfig(Section):
    num_ranks: int = _f(1, "data-parallel DeepSpeed ranks", gt=0)
    zero_stage: Literal[0, 1, 2, 3] = _f(2, "DeepSpeed ZeRO stage")
    lr: float = _f(1e-5, "AdamW learning rate", gt=0)
    weight_decay: float = _f(0.0, "AdamW weight decay", ge=0)
    grad_clip: Optional[float] = _f(1.0, "max global gradient norm; null = off", gt=0)
    warmup_steps: int = _f(0, "linear learning-rate warm-up in optimizer steps", ge=0)
    offload: bool = _f(False, "offload optimizer states to CPU (ZeRO-Offload)")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward")
    lora: Optional[LoraConfig] = _f(None, "train low-rank adapters instead of every weight; null = full fine-tuning")


class CriticConfig(LearnerConfig):
    lr: float = _f(5e-6, "AdamW learning rate", gt=0)
    init: Literal["reward", "policy"] = _f("reward", "initialise the critic from the reward model or the policy")


def _auto_or_bool(value):
    if value is True or value is False or value == "auto":
        return value
    raise ValueError("must be auto, true or false")


class ReferenceConfig(Section):
    num_ranks: int = _f(1, "reference actors; each scores an equal slice of the batch", gt=0)
    zero_stage: Literal[0, 3] = _f(0, "0 = every rank holds the whole model; 3 = parameters partitioned over "
                                   "the ranks (DeepSpeed ZeRO-3 inference), for a reference larger than one GPU")
    offload: bool = _f(False, "keep the ZeRO-3 parameter partitions in CPU memory (needs zero_stage 3)")
    colocate: Annotated[Union[Literal["auto"], bool], BeforeValidator(_auto_or_bool)] = _f(
        "auto", "run the reference as a second frozen model inside each policy rank's process (no actor of "
        "its own, no object-store hop); auto = on CPU runs when reference.num_ranks equals policy.num_ranks "
        "and reference.zero_stage is 0; true forces it (same conditions), false never")


class SyncConfig(Section):
    backend: Literal["object_store", "gloo", "nccl", "cuda_ipc"] = _f(
        "object_store", "how new policy weights reach the rollout engines")
    bucket_mb: float = _f(64.0, "weights are sent in buckets of about this many MB", gt=0)


class CheckpointConfig(Section):
    every: int = _f(10, "save a resumable checkpoint every N PPO steps (and at the end); 0 = only at the end", ge=0)
    keep: int = _f(2, "keep the newest K step checkpoints; older ones are deleted", gt=0)
    verify: Literal["full", "size", "off"] = _f("size", "on resume, check the newest checkpoint against its "
                                                "manifest (full: sizes and checksums; size: sizes only) and "
                                                "fall back to the newest one that passes")


class PlacementConfig(Section):
    mode: Literal["colocated", "disaggregated"] = _f("disaggregated", "share GPUs between roles or not")
    gpus_per_node: int = _f(0, "GPUs per node to plan for; 0 = CPU-only run", ge=0)
    timeout_s: float = _f(60.0, "give up waiting for placement groups after this many seconds", gt=0)
    cpu_threads: Optional[int] = _f(None, "torch threads per actor on a CPU run; null = planned per phase: "
                                    "the machine's cores shared by the actors that compute at once", gt=0)


class LoggerConfig(Section):
    backend: Literal["wandb", "tensorboard", "none"] = _f("wandb", "where metrics go besides metrics.jsonl")
    project: str = _f("rlhf", "wandb project / tensorboard sub-folder")
    wandb_mode: Literal["auto", "online", "offline"] = _f("auto", "auto = online with WANDB_API_KEY, else offline")


class ExperimentConfig(Section):
    """A whole experiment: one YAML file in configs/, plus command-line overrides."""

    name: str = _f("experiment", "run name (output folder, logger run name)")
    seed: int = _f(0, "seed for data order, sampling and initialisation", ge=0)
    model: ModelConfig = _f(ModelConfig(), "models")
    data: DataConfig = _f(DataConfig(), "prompts and dialogues")
    rollout: RolloutConfig = _f(RolloutConfig(), "generation with vLLM")
    reward: RewardConfig = _f(RewardConfig(), "how replies are scored")
    ppo: PPOConfig = _f(PPOConfig(), "PPO algorithm")
    policy: LearnerConfig = _f(LearnerConfig(), "policy learner (DeepSpeed)")
    critic: CriticConfig = _f(CriticConfig(), "critic learner (DeepSpeed); used with ppo.advantage=gae")
    reference: ReferenceConfig = _f(ReferenceConfig(), "frozen reference policy for the KL penalty")
    sync: SyncConfig = _f(SyncConfig(), "policy -> engine weight sync")
    checkpoint: CheckpointConfig = _f(CheckpointConfig(), "resumable checkpoints (weights, optimizer, RNG, data position)")
    placement: PlacementConfig = _f(PlacementConfig(), "where roles run")
    logger: LoggerConfig = _f(LoggerConfig(), "metric logging")
    sft: SFTConfig = _f(SFTConfig(), "supervised fine-tuning stage")
    rm: RewardModelConfig = _f(RewardModelConfig(), "reward-model stage")
    labeler: LabelerConfig = _f(LabelerConfig(), "who ranks sampled replies for the reward model")
    label: LabelConfig = _f(LabelConfig(), "the labeling web app for people (rlhf label serve)")
    dpo: DPOConfig = _f(DPOConfig(), "DPO-family training on comparisons (rlhf dpo, pipeline.method dpo)")
    best_of_n: BestOfNConfig = _f(BestOfNConfig(), "rejection sampling (pipeline.method best_of_n)")
    pipeline: PipelineConfig = _f(PipelineConfig(), "the SFT -> (comparisons -> RM -> PPO) x rounds recipe")
    evidence: EvidenceConfig = _f(EvidenceConfig(), "Sparrow-style evidence: the search tool's corpus and the "
                                  "evidence rewards")
    rule_rm: RuleRMConfig = _f(RuleRMConfig(), "the rule-conditional reward model (one model, every rule)")


def max_sequence_tokens(cfg: ExperimentConfig) -> int:
    """Longest prompt + reply a rollout can make: the prompt, the policy's tokens and, with tools,
    the tokens the system inserts (rollout.tool_token_budget)."""
    tools = cfg.rollout.tool_token_budget if cfg.rollout.tools else 0
    return cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens + tools


def check_consistency(cfg: ExperimentConfig) -> None:
    """Checks that span several keys; each error names the key to change."""
    ppo, rollout = cfg.ppo, cfg.rollout
    samples = ppo.prompts_per_step * rollout.n_samples
    if samples % ppo.train_batch_size:
        raise ConfigError("ppo.train_batch_size", f"must divide the samples per step "
                          f"(ppo.prompts_per_step x rollout.n_samples = {samples}), got {ppo.train_batch_size}")
    for role in ("policy", "critic"):
        ranks = getattr(cfg, role).num_ranks
        if ppo.train_batch_size % (ppo.micro_batch_size * ranks):
            raise ConfigError("ppo.micro_batch_size", f"micro_batch_size x {role}.num_ranks = "
                              f"{ppo.micro_batch_size * ranks} must divide ppo.train_batch_size = {ppo.train_batch_size}")
    if samples % cfg.reference.num_ranks:
        raise ConfigError("reference.num_ranks", f"must divide the samples per step "
                          f"(ppo.prompts_per_step x rollout.n_samples = {samples}), got {cfg.reference.num_ranks}")
    if ppo.old_logprobs == "sampler" and rollout.overlap:
        raise ConfigError("ppo.old_logprobs", "sampler needs on-policy batches, but rollout.overlap samples each "
                          "batch one step behind the learner; use ppo.old_logprobs=learner")
    if cfg.reference.colocate is True and (cfg.reference.zero_stage != 0
                                           or cfg.reference.num_ranks != cfg.policy.num_ranks):
        raise ConfigError("reference.colocate", f"a reference inside the policy ranks needs reference.zero_stage 0 "
                          f"and reference.num_ranks = policy.num_ranks ({cfg.policy.num_ranks}); got zero_stage "
                          f"{cfg.reference.zero_stage}, {cfg.reference.num_ranks} rank(s)")
    if cfg.reference.offload and cfg.reference.zero_stage != 3:
        raise ConfigError("reference.offload", "offloads ZeRO-3 parameter partitions; set reference.zero_stage=3")
    if ppo.advantage != "gae" and rollout.n_samples < 2:
        raise ConfigError("rollout.n_samples", f"ppo.advantage={ppo.advantage} compares replies to the same "
                          f"prompt and needs n_samples >= 2, got {rollout.n_samples}")
    tiny = cfg.model.tiny
    if tiny.num_heads % tiny.num_kv_heads:
        raise ConfigError("model.tiny.num_kv_heads", f"must divide model.tiny.num_heads = {tiny.num_heads}")
    longest = max_sequence_tokens(cfg)
    if cfg.model.policy == "tiny" and longest > tiny.max_position_embeddings:
        raise ConfigError("data.max_prompt_tokens", f"data.max_prompt_tokens + rollout.max_new_tokens "
                          f"(+ rollout.tool_token_budget with rollout.tools) = {longest} "
                          f"exceeds model.tiny.max_position_embeddings = {tiny.max_position_embeddings}")
    if cfg.sync.backend in ("nccl", "cuda_ipc") and cfg.placement.gpus_per_node == 0:
        raise ConfigError("sync.backend", f"{cfg.sync.backend} needs GPUs (placement.gpus_per_node is 0); "
                          "use object_store or gloo on CPU")
    if rollout.backend == "hf" and rollout.tensor_parallel_size != 1:
        raise ConfigError("rollout.tensor_parallel_size", f"rollout.backend=hf runs one device per engine, "
                          f"got {rollout.tensor_parallel_size}")
    if rollout.backend == "hf" and cfg.sync.backend == "nccl":
        raise ConfigError("sync.backend", "rollout.backend=hf receives weights by object_store, gloo or cuda_ipc "
                          "(the nccl route uses vLLM's communicator)")
    from rlhf.orchestrator.tasks.rewards import REWARD_FUNCTIONS  # lazy: config sits below tasks

    for name in cfg.reward.functions:
        if name not in REWARD_FUNCTIONS:
            near = difflib.get_close_matches(name, list(REWARD_FUNCTIONS), n=1, cutoff=0.5)
            hint = f"did you mean '{near[0]}'?" if near else f"known: {', '.join(sorted(REWARD_FUNCTIONS))}"
            raise ConfigError(f"reward.functions.{name}", f"unknown reward function; {hint}")
    if "forbidden_phrase" in cfg.reward.functions and not all(p.strip() for p in cfg.reward.forbidden_phrases or [""]):
        raise ConfigError("reward.forbidden_phrases", "the forbidden_phrase rule needs at least one non-empty phrase")
    sft = cfg.sft
    if sft.batch_size % (sft.micro_batch_size * sft.num_workers):
        raise ConfigError("sft.micro_batch_size", f"micro_batch_size x sft.num_workers = "
                          f"{sft.micro_batch_size * sft.num_workers} must divide sft.batch_size = {sft.batch_size}")
    for key, lab in (("labeler", cfg.labeler), ("pipeline.judge", cfg.pipeline.judge)):
        if lab is None:
            continue
        if lab.kind == "python" and not lab.target:
            raise ConfigError(f"{key}.target", f"{key}.kind=python needs target: pkg.module:name or file.py:name")
        if lab.kind in ("file", "reward_model") and not lab.path:
            raise ConfigError(f"{key}.path", f"{key}.kind={lab.kind} needs a path")
    if cfg.dpo.loss == "simpo" and cfg.dpo.reference is True:
        raise ConfigError("dpo.reference", "simpo is reference-free; set dpo.reference to null or false, "
                          "or choose another dpo.loss")
    if cfg.pipeline.judge is not None and cfg.pipeline.judge.kind == "human":
        raise ConfigError("pipeline.judge.kind", "a judge scores replies on its own; human is not a judge")
    if cfg.rm.prompts_per_batch % cfg.rm.num_workers:
        raise ConfigError("rm.num_workers", f"must divide rm.prompts_per_batch = {cfg.rm.prompts_per_batch}")


# --------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict:
    """Reads a YAML mapping; any problem is a one-line `ConfigError` naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"no such config file: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError("", f"{where}: invalid YAML: {err.problem or err.context}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError("", f"{path}: invalid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Returns a copy of `data` with each `dotted.key=value` applied (value parsed as YAML)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError("", f"override '{item}' is not of the form dotted.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw  # not YAML (e.g. an unbalanced bracket): let the type check judge the string
        node, parts = data, key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict) or _is_leaf(tuple(parts[: depth + 1])):
                raise ConfigError(key, f"{'.'.join(parts[:depth + 1])} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def _section_type(annotation) -> type[BaseModel] | None:
    """The section class of a field's annotation (`Section` or `Optional[Section]`), else None."""
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = inner[0] if len(inner) == 1 else None
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _is_section(annotation) -> bool:
    return _section_type(annotation) is not None


def _is_leaf(path: tuple) -> bool:
    """True if `path` names an existing key of the schema that holds a value, not a section."""
    section = _section_at(path)
    field = section.model_fields.get(path[-1]) if section else None
    return field is not None and not _is_section(field.annotation) and typing.get_origin(field.annotation) is not dict


def _section_at(loc: tuple) -> type[BaseModel] | None:
    """The config class that holds the field at `loc` (a pydantic error location)."""
    cls: type[BaseModel] = ExperimentConfig
    for part in loc[:-1]:
        field = cls.model_fields.get(str(part))
        if field is None or not _is_section(field.annotation):
            return None
        cls = _section_type(field.annotation)
    return cls


# Keys that moved: naming one gives a one-line error that names its replacement.
RENAMED = {
    "data.train": "data.prompts (PPO and comparison prompts) and data.sft (demonstrations), each a list of sources",
    "sft.sources": "data.sft (a list of sources: path, format, weight, column)",
    "rm.labeler": "labeler.kind (task | python | file | reward_model | human)",
    "rm.rankings_file": "labeler.path with labeler.kind: file",
}


def _one_line(err: ValidationError) -> ConfigError:
    """Turns the first pydantic error into a `ConfigError` naming the dotted key."""
    first = err.errors()[0]
    loc = tuple(first["loc"])
    key = ".".join(str(p) for p in loc)
    more = f" (and {err.error_count() - 1} more problem(s))" if err.error_count() > 1 else ""
    if first["type"] == "extra_forbidden" and key in RENAMED:
        return ConfigError(key, f"this key was replaced by {RENAMED[key]}")
    if first["type"] == "extra_forbidden":
        section = _section_at(loc)
        names = list(section.model_fields) if section else []
        near = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.5)
        prefix = ".".join(str(p) for p in loc[:-1])
        hint = f"; did you mean '{prefix + '.' if prefix else ''}{near[0]}'?" if near else (
            f"; valid keys here: {', '.join(names)}" if names else "")
        return ConfigError(key, f"unknown key{hint}{more}")
    if first["type"] in ("model_type", "model_attributes_type"):
        return ConfigError(key, f"must be a section (mapping of keys), got {first['input']!r}{more}")
    return ConfigError(key, f"{first['msg']}, got {first['input']!r}{more}")


def build_config(data: dict, source: str | None = None) -> ExperimentConfig:
    """Validates a plain mapping into an `ExperimentConfig` (types, ranges, cross-key checks)."""
    try:
        cfg = ExperimentConfig.model_validate(data)
        check_consistency(cfg)
    except ValidationError as err:
        raise _one_line(err).at(source) from None
    except ConfigError as err:
        raise err.at(source) from None
    return cfg


def load_config(path: str | Path, overrides: list[str] = ()) -> ExperimentConfig:
    """Reads a YAML experiment, applies overrides, validates, and makes every file path in it
    absolute (see `resolve_paths`). Raises `ConfigError`."""
    cfg = build_config(apply_overrides(read_yaml(path), list(overrides)), source=str(path))
    return resolve_paths(cfg, Path(path).resolve().parent)


def resolve_path(value: str, base: Path) -> str:
    """An absolute path for `value`: against `base` (the config's folder) if it exists there,
    else against the working directory. Absolute paths and bare names are kept as given."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    for root in (base, Path.cwd()):
        if (root / path).exists():
            return str((root / path).resolve())
    return str(Path.cwd() / path)


def _resolve_target(target: str | None, base: Path) -> str | None:
    """`path/to/file.py:name` -> absolute file part; `pkg.module:name` unchanged."""
    if not target or ":" not in target:
        return target
    module, _, name = target.rpartition(":")
    if module.endswith(".py") or "/" in module:
        return f"{resolve_path(module, base)}:{name}"
    return target


def resolve_paths(cfg: ExperimentConfig, base: Path) -> ExperimentConfig:
    """The config with data sources, labeler/judge paths and file targets made absolute, so that
    the run's config.yaml (and every actor, whatever its working directory) sees the same files."""
    def labeler(lab: LabelerConfig | None) -> LabelerConfig | None:
        if lab is None:
            return None
        path = resolve_path(lab.path, base) if lab.path else None
        if lab.kind == "llm_judge" and lab.path and not (lab.path.startswith(".") or (base / lab.path).exists()):
            path = lab.path  # a model, as model.policy: a known or hub name stays a name
        return lab.model_copy(update={"path": path, "template": resolve_path(lab.template, base) if lab.template
                                      else None, "target": _resolve_target(lab.target, base)})

    data = cfg.data.model_copy(update={
        key: [s.model_copy(update={"path": resolve_path(s.path, base)}) for s in getattr(cfg.data, key)]
        for key in ("sft", "prompts", "eval", "comparisons", "rule_labels")} | {"task": _resolve_target(cfg.data.task, base)})
    model = cfg.model
    for key in ("policy", "reward", "rule_reward"):
        value = getattr(model, key)
        if value and value != "tiny" and (value.startswith(".") or (base / value).exists()):
            model = model.model_copy(update={key: resolve_path(value, base)})
    evidence = cfg.evidence.model_copy(update={"corpus": resolve_path(cfg.evidence.corpus, base)}) \
        if cfg.evidence.corpus else cfg.evidence
    return cfg.model_copy(update={"data": data, "model": model, "labeler": labeler(cfg.labeler), "evidence": evidence,
                                  "pipeline": cfg.pipeline.model_copy(update={"judge": labeler(cfg.pipeline.judge)})})


def to_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML, every key present, in schema order."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def describe_keys(cls: type[BaseModel] = ExperimentConfig, prefix: str = ""):
    """Yields (dotted key, type, default, description) for every leaf key, in schema order."""
    for name, field in cls.model_fields.items():
        key = f"{prefix}{name}"
        if _is_section(field.annotation):
            if field.get_default() is None:  # an optional section (null = off): the key itself, then its keys
                yield key, _section_type(field.annotation).__name__ + " | None", None, field.description or ""
            yield from describe_keys(_section_type(field.annotation), key + ".")
            continue
        default = field.get_default(call_default_factory=True)
        kind = str(field.annotation).replace("typing.", "")
        if isinstance(field.annotation, type):
            kind = field.annotation.__name__
        yield key, kind, default, field.description or ""
