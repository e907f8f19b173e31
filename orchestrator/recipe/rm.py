"""Reward-model stage: train r(x, y) on ranked comparisons with Ray Train + DeepSpeed.

InstructGPT (Ouyang et al. 2022, sec. 3.5 and appendix C.2), as done here:
- The reward model is the SFT model with the unembedding replaced by a scalar head
  (`AutoModelForSequenceClassification(num_labels=1)`); the score of a reply is the head's
  output at the last token of prompt + reply (right padding, as `RewardScorer` scores).
- One prompt with all its K ranked replies is one batch element: each reply gets one
  forward pass, and the C(K, 2) pairs share them (`pairwise_rm_loss`). This is what keeps
  the RM from overfitting to pairs seen many times; for the same reason one epoch.
- Cosine learning-rate decay to 10 % of the initial rate by the end of training.
- After training the scores are shifted so that the demonstration replies of the compared
  prompts score 0 on average ("so that the labeler demonstrations achieve a mean score of
  0 before doing RL"). When no demonstration is given for any compared prompt, the
  rank-0 (best) replies stand in for them (`RMResult.offset_source` says which). The shift
  is stored, not baked into the head: `config.reward_offset` in config.json, which
  `RewardScorer` subtracts. `value_head.safetensors` holds the head with bias
  -offset, so `ValueModel.from_pretrained(<checkpoint>)` starts the PPO critic from the
  (shifted) reward model, as InstructGPT initialises its value function.

This module is the driver half (split, tokenize, start the workers, install the folder);
the Ray Train worker (DeepSpeed rank, loss, score shift) is rlhf.actors.rm_worker.

Comparisons are split by prompt (all comparisons of one prompt id on the same side), so
held-out accuracy measures prompts the model never trained on; ties are excluded from
the accuracy. Sequences are cut to data.max_prompt_tokens + rollout.max_new_tokens tokens
(keeping the end, where the score is read).

Run on one CPU machine (local Ray, gloo) or a cluster (Ray Train workers, NCCL when
placement.gpus_per_node > 0) alike; Ray must be initialised by the caller:

    ray.init()
    result = run_rm(cfg, sft_dir, store.load(), demos, sft_dir, out_dir / "rm")

On a cluster, out_dir must be on storage rank 0's node can write (metrics.jsonl); the
checkpoint itself travels through Ray Train's storage (RunConfig.storage_path).
"""
from __future__ import annotations

import json
import random
import shutil
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from rlhf.actors.lora import LoraArgs, check_targets_for
from rlhf.actors.rm_worker import EVAL_FILE, PromptGroup, RMData, RMWorkerArgs, _train_worker
from rlhf.orchestrator.recipe.comparisons import Comparison
from rlhf.orchestrator.config import ExperimentConfig, max_sequence_tokens
from rlhf.orchestrator.errors import BadInput, RemoteCallFailed
from rlhf.orchestrator.models.scoring import turn_end_ids
from rlhf.orchestrator.run.rundir import replace_folder
from rlhf.orchestrator.recipe.sft import worker_failure


@dataclass(frozen=True)
class RMResult:
    checkpoint: str                 # HF folder: weights, tokenizer, value_head.safetensors
    heldout_accuracy: float | None  # pooled pairwise accuracy on held-out prompts (ties excluded); None if none held out
    train_accuracy: float           # pooled pairwise accuracy over the last epoch's steps, before each update
    offset: float                   # subtracted from every raw score (config.reward_offset)
    offset_source: str              # "demonstrations" or "best_replies"
    steps: int                      # optimizer steps taken
    train_prompts: int
    heldout_prompts: int


def run_rm(cfg: ExperimentConfig, init_model_path: str, comparisons: list[Comparison],
           demonstrations: dict[str, str] | None, tokenizer_path: str, out_dir: str | Path,
           max_steps: int | None = None) -> RMResult:
    """Trains a reward model on `comparisons` and saves it to <out_dir>/checkpoint.

    demonstrations: prompt id -> the demonstration reply text for that prompt (the SFT
    data), used for the score shift. Returns accuracies, the offset and the folder.
    """
    import ray

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = build_rm_data(cfg, comparisons, demonstrations, tokenizer_path, init_model_path)
    lora = LoraArgs.from_config(cfg.rm.lora, "rm.lora")
    check_targets_for(init_model_path, lora)  # before any worker starts
    use_gpu = cfg.placement.gpus_per_node > 0
    args = RMWorkerArgs(
        model_path=str(init_model_path), tokenizer_path=str(tokenizer_path), metrics_path=str(out / "metrics.jsonl"),
        data_ref=ray.put(data), zero_stage=cfg.rm.zero_stage, lr=cfg.rm.lr, prompts_per_batch=cfg.rm.prompts_per_batch,
        epochs=cfg.rm.epochs, max_steps=max_steps, seed=cfg.seed, dtype=cfg.model.dtype,
        backend="nccl" if use_gpu else "gloo", lora=lora)
    final, summary = fit_to_folder(_train_worker, args, cfg.rm.num_workers, use_gpu, out, "reward-model", EVAL_FILE)
    return RMResult(checkpoint=str(final), **summary)


def fit_to_folder(train_fn, args, num_workers: int, use_gpu: bool, out: Path, role: str,
                  eval_file: str) -> tuple[Path, dict]:
    """Runs `train_fn({"args": args})` on `num_workers` Ray Train workers (storage under
    out/ray_train) and installs rank 0's reported checkpoint as out/checkpoint; returns it
    and the summary rank 0 wrote to `eval_file` in it. Any worker failure is one line."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        train_fn, train_loop_config={"args": args},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend=args.backend),
        run_config=RunConfig(name=f"{role.replace(' ', '-')}-{uuid.uuid4().hex[:8]}",
                             storage_path=str(out / "ray_train")))
    try:
        result = trainer.fit()
    except Exception as err:  # noqa: BLE001 - every worker/controller failure becomes one line (exit 1)
        raise worker_failure(err, role=role) from err
    if result.checkpoint is None:
        raise RemoteCallFailed(f"{role} worker (rank 0) finished training without a checkpoint")
    final = out / "checkpoint"
    with result.checkpoint.as_directory() as src:
        _install_folder(Path(src), final)
    return final, json.loads((final / eval_file).read_text())


def build_rm_data(cfg: ExperimentConfig, comparisons: list[Comparison], demonstrations: dict[str, str] | None,
                  tokenizer_path: str, model_path: str) -> RMData:
    """Splits by prompt, tokenizes, and picks the sequences the score shift is computed on."""
    from transformers import AutoTokenizer

    usable = [c for c in comparisons if len(set(c.ranks)) > 1]  # all-tied: no pair to learn from
    if not usable:
        raise BadInput(f"reward model: none of the {len(comparisons)} comparisons has two differently ranked replies")
    train, heldout = split_by_prompt(usable, cfg.rm.held_out_fraction, cfg.seed)
    if len(train) < cfg.rm.num_workers:
        raise BadInput(f"rm.num_workers: {len(train)} training comparisons for {cfg.rm.num_workers} workers; "
                       "collect more (rm.prompts_per_round) or use fewer workers")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
    max_len = max_sequence_tokens(cfg)  # replies may hold inserted tool results
    turn_end = turn_end_ids(model_path, tokenizer)
    prompt_cache: dict[str, list[int]] = {}

    def prompt_ids(c: Comparison) -> list[int]:
        key = json.dumps(c.prompt_messages, sort_keys=True)
        if key not in prompt_cache:
            prompt_cache[key] = tokenizer.apply_chat_template(
                c.prompt_messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        return prompt_cache[key]

    def group(c: Comparison) -> PromptGroup:
        return PromptGroup([(prompt_ids(c) + list(ids))[-max_len:] for ids in c.reply_ids], list(c.ranks))

    # Score shift: the demonstration replies of the compared prompts, tokenized as the
    # policy would emit them (text, then the end-of-turn stop id), else the best replies.
    demos = {c.prompt_id: c for c in usable if demonstrations and c.prompt_id in demonstrations}
    if demos:
        offset_seqs = [(prompt_ids(c) + tokenizer.encode(demonstrations[pid], add_special_tokens=False)
                        + turn_end)[-max_len:] for pid, c in demos.items()]
        source = "demonstrations"
    else:
        offset_seqs = [(prompt_ids(c) + list(ids))[-max_len:] for c in usable
                       for ids, r in zip(c.reply_ids, c.ranks) if r == min(c.ranks)]
        source = "best_replies"
    return RMData([group(c) for c in train], [group(c) for c in heldout], offset_seqs, source)


def split_by_prompt(comparisons: list[Comparison], held_out_fraction: float,
                    seed: int) -> tuple[list[Comparison], list[Comparison]]:
    """(train, held-out): a seeded share of the prompt ids, with all their comparisons, is held out."""
    by_prompt: dict[str, list[Comparison]] = defaultdict(list)
    for c in comparisons:
        by_prompt[c.prompt_id].append(c)
    ids = sorted(by_prompt)
    random.Random(seed).shuffle(ids)
    n_held = 0
    if held_out_fraction > 0 and len(ids) >= 2:
        n_held = min(len(ids) - 1, max(1, round(held_out_fraction * len(ids))))
    held = set(ids[:n_held])
    return ([c for c in comparisons if c.prompt_id not in held], [c for c in comparisons if c.prompt_id in held])


def _install_folder(src: Path, dest: Path) -> None:
    """Copies `src` next to `dest`, then renames it into place (replacing an old `dest`)."""
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    shutil.copytree(src, tmp)
    replace_folder(tmp, dest)
