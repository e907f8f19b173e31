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
import math
import random
import shutil
import tempfile
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from rlhf.orchestrator.recipe.comparisons import Comparison
from rlhf.orchestrator.config import ExperimentConfig
from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.rl.losses import pairwise_rm_loss

LR_FINAL_RATIO = 0.1  # InstructGPT: cosine decay to 10 % of the initial learning rate
EVAL_FILE = "rm_eval.json"  # accuracy, offset and sizes, saved next to the weights
DATA_TIMEOUT_S = 600.0


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


@dataclass(frozen=True)
class PromptGroup:
    """One batch element: the K replies of one prompt, tokenized with the prompt."""

    sequences: list[list[int]]  # K lists: prompt ids + reply ids
    ranks: list[int]            # K ranks, 0 = best, equal = tie


@dataclass(frozen=True)
class RMData:
    train: list[PromptGroup]
    heldout: list[PromptGroup]
    offset_sequences: list[list[int]]  # prompt + demonstration (or best) reply, scored for the shift
    offset_source: str


@dataclass(frozen=True)
class RMWorkerArgs:
    """What each Ray Train worker needs (built from the config by `run_rm`)."""

    model_path: str          # SFT folder the reward model starts from
    tokenizer_path: str
    metrics_path: str        # rank 0 appends one JSON line per step
    data_ref: object         # ObjectRef of RMData (ray.put once, fetched by every worker)
    zero_stage: int
    lr: float
    prompts_per_batch: int   # global, over all workers
    epochs: int
    max_steps: int | None
    seed: int
    dtype: str
    backend: str             # "gloo" (CPU) or "nccl"
    grad_clip: float = 1.0
    num_threads: int = 1     # torch intra-op threads per worker (workers share few cores on CPU)


# --------------------------------------------------------------------------- driver side


def run_rm(cfg: ExperimentConfig, init_model_path: str, comparisons: list[Comparison],
           demonstrations: dict[str, str] | None, tokenizer_path: str, out_dir: str | Path,
           max_steps: int | None = None) -> RMResult:
    """Trains a reward model on `comparisons` and saves it to <out_dir>/checkpoint.

    demonstrations: prompt id -> the demonstration reply text for that prompt (the SFT
    data), used for the score shift. Returns accuracies, the offset and the folder.
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = build_rm_data(cfg, comparisons, demonstrations, tokenizer_path, init_model_path)
    use_gpu = cfg.placement.gpus_per_node > 0
    args = RMWorkerArgs(
        model_path=str(init_model_path), tokenizer_path=str(tokenizer_path), metrics_path=str(out / "metrics.jsonl"),
        data_ref=ray.put(data), zero_stage=cfg.rm.zero_stage, lr=cfg.rm.lr, prompts_per_batch=cfg.rm.prompts_per_batch,
        epochs=cfg.rm.epochs, max_steps=max_steps, seed=cfg.seed, dtype=cfg.model.dtype,
        backend="nccl" if use_gpu else "gloo")
    trainer = TorchTrainer(
        _train_worker, train_loop_config={"args": args},
        scaling_config=ScalingConfig(num_workers=cfg.rm.num_workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend=args.backend),
        run_config=RunConfig(name=f"rm-{uuid.uuid4().hex[:8]}", storage_path=str(out / "ray_train")))
    try:
        result = trainer.fit()
    except Exception as err:  # Ray wraps the worker's exception; keep its first line
        first = next((ln for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
        raise RuntimeError(f"reward-model training (Ray Train workers) failed: {first}") from err
    if result.checkpoint is None:
        raise RuntimeError("reward-model training (Ray Train workers) finished without a checkpoint")
    final = out / "checkpoint"
    with result.checkpoint.as_directory() as src:
        _install_folder(Path(src), final)
    summary = json.loads((final / EVAL_FILE).read_text())
    return RMResult(checkpoint=str(final), **summary)


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
    max_len = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    turn_end = _turn_end_ids(model_path, tokenizer)
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


def _turn_end_ids(model_path: str, tokenizer) -> list[int]:
    """The id a reply ends with when the policy stops on its own: the generation config's
    first eos id (<|im_end|> for the tiny models), else the tokenizer's eos."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(str(model_path)).eos_token_id
    except OSError:
        eos = None
    eos = tokenizer.eos_token_id if eos is None else eos
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    return [] if eos is None else [int(eos)]


def _install_folder(src: Path, dest: Path) -> None:
    """Copies `src` next to `dest`, then renames it into place (replacing an old `dest`)."""
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    shutil.copytree(src, tmp)
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        dest.rename(old)
    tmp.rename(dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- worker side


class LastTokenReward(nn.Module):
    """Sequence-classification model -> one scalar per sequence, read at its last real token."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[B, T] right-padded -> [B] float32."""
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                       use_cache=False).last_hidden_state
        last = attention_mask.sum(1) - 1
        return self.model.score(hidden[torch.arange(len(last), device=hidden.device), last]).squeeze(-1).float()


def pad_sequences(seqs: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pads token lists -> input_ids [B, T], attention_mask [B, T]."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attn[i, : len(s)] = 1
    return ids, attn


def group_tensors(groups: list[PromptGroup], pad_id: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Flattens P prompt groups: input_ids, attention_mask [P*K, T]; ranks, valid [P, K]
    (K = the largest group; shorter groups are padded with invalid replies)."""
    k = max(len(g.sequences) for g in groups)
    ranks = torch.zeros((len(groups), k), dtype=torch.long)
    valid = torch.zeros((len(groups), k), dtype=torch.bool)
    seqs = []
    for p, g in enumerate(groups):
        ranks[p, : len(g.ranks)] = torch.tensor(g.ranks)
        valid[p, : len(g.ranks)] = True
        seqs += g.sequences + [g.sequences[0]] * (k - len(g.sequences))  # padding rows, masked by `valid`
    ids, attn = pad_sequences(seqs, pad_id)
    return ids, attn, ranks, valid


def cosine_lr_lambda(total_steps: int, final_ratio: float = LR_FINAL_RATIO):
    """lr(step) / lr0: cosine from 1 at step 0 to `final_ratio` at the last step."""
    def factor(step: int) -> float:
        progress = min(1.0, step / max(1, total_steps - 1))
        return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def _ds_config(a: RMWorkerArgs, micro_batch: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,  # prompts per worker per step
        "gradient_accumulation_steps": 1,
        "gradient_clipping": a.grad_clip,
        "zero_optimization": {"stage": a.zero_stage},
        "bf16": {"enabled": a.dtype == "bfloat16"},
        "optimizer": {"type": "AdamW", "params": {"lr": a.lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": 0.0, "torch_adam": True}},
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _train_worker(config: dict) -> None:
    """Ray Train loop on every worker: DeepSpeed ZeRO training, then rank 0 saves and evaluates."""
    import deepspeed
    import ray
    import ray.train
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    a: RMWorkerArgs = config["args"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(a.num_threads)
    torch.manual_seed(a.seed)  # the new score head starts identical on every worker
    data: RMData = ray.get(a.data_ref, timeout=DATA_TIMEOUT_S)
    pad_id = AutoTokenizer.from_pretrained(a.tokenizer_path).pad_token_id or 0

    model = AutoModelForSequenceClassification.from_pretrained(a.model_path, num_labels=1, dtype=getattr(torch, a.dtype))
    model.config.pad_token_id = pad_id
    module = LastTokenReward(model)
    per_worker = max(1, min(a.prompts_per_batch, len(data.train)) // world)
    batches = _epoch_batches(len(data.train), per_worker * world, a.epochs, a.seed)
    total = len(batches) if a.max_steps is None else min(len(batches), a.max_steps)
    engine, *_ = deepspeed.initialize(
        model=module, model_parameters=[p for p in module.parameters() if p.requires_grad],
        config=_ds_config(a, per_worker),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, cosine_lr_lambda(total)))

    last_epoch = batches[total - 1][0] if total else 0
    correct_pairs = n_pairs = 0.0
    metrics_file = open(a.metrics_path, "a") if rank == 0 else None
    engine.train()
    for step in range(total):
        epoch, index = batches[step]
        groups = [data.train[i] for i in index[rank::world]]  # this worker's share of the step's prompts
        stats = _train_step(engine, groups, pad_id)
        if epoch == last_epoch:
            correct_pairs, n_pairs = correct_pairs + stats["correct"], n_pairs + stats["pairs"]
        if metrics_file is not None:
            metrics_file.write(json.dumps({"step": step + 1, "rm/loss": stats["loss"],
                                           "rm/accuracy": stats["accuracy"], "rm/lr": stats["lr"]}) + "\n")
            metrics_file.flush()
    if metrics_file is not None:
        metrics_file.close()

    state = _full_state(engine, a.zero_stage, rank)
    summary = {"train_accuracy": correct_pairs / n_pairs if n_pairs else float("nan"), "steps": total,
               "train_prompts": len(data.train), "heldout_prompts": len(data.heldout)}
    if rank == 0:
        folder = Path(tempfile.mkdtemp(prefix="rm-checkpoint-"))
        model.save_pretrained(str(folder), state_dict=state)
        AutoTokenizer.from_pretrained(a.tokenizer_path).save_pretrained(str(folder))
        summary.update(_finalise(folder, data, pad_id))
        (folder / EVAL_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        ray.train.report(summary, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
        shutil.rmtree(folder, ignore_errors=True)  # report has persisted it to the run's storage
    else:
        ray.train.report(summary)


def _epoch_batches(n: int, batch: int, epochs: int, seed: int) -> list[tuple[int, list[int]]]:
    """(epoch, prompt indices) per optimizer step: a seeded shuffle per epoch, cut into full
    batches (the remainder of an epoch is dropped so every worker gets equal shares)."""
    out = []
    for epoch in range(epochs):
        order = list(range(n))
        random.Random(seed * 1000 + epoch).shuffle(order)
        out += [(epoch, order[s: s + batch]) for s in range(0, n - batch + 1, batch)]
    return out


def _train_step(engine, groups: list[PromptGroup], pad_id: int) -> dict[str, float]:
    """One optimizer step on this worker's prompt groups; returns global (all-reduced) stats."""
    ids, attn, ranks, valid = group_tensors(groups, pad_id)
    device = engine.device
    rewards = engine(ids.to(device), attn.to(device)).view(ranks.shape)  # [P, K]
    ranks, valid = ranks.to(device), valid.to(device)
    loss, accuracy = pairwise_rm_loss(rewards, ranks, valid)
    lr = float(engine.get_lr()[0])
    # DeepSpeed averages gradients over workers: equal prompts per worker make it the global mean.
    engine.backward(loss)
    engine.step()
    pairs = float(((ranks.unsqueeze(2) < ranks.unsqueeze(1)) & valid.unsqueeze(2) & valid.unsqueeze(1)).sum())
    totals = torch.tensor([float(loss) * len(groups), float(len(groups)), float(accuracy) * pairs, pairs],
                          dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    loss_sum, prompts, correct, n_pairs = totals.tolist()
    return {"loss": loss_sum / prompts, "accuracy": correct / n_pairs, "lr": lr, "correct": correct, "pairs": n_pairs}


def _full_state(engine, zero_stage: int, rank: int) -> dict[str, Tensor]:
    """The reward model's full state dict on rank 0 (every worker must call: ZeRO-3 gathers)."""
    import contextlib

    import deepspeed

    model = engine.module.model
    gather = (deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
              if zero_stage == 3 else contextlib.nullcontext())
    with gather:
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()} if rank == 0 else {}
    return state


@torch.no_grad()
def score_sequences(model: nn.Module, seqs: list[list[int]], pad_id: int, batch_size: int = 64) -> Tensor:
    """Raw scores [N] of token sequences under a sequence-classification model (eval mode)."""
    scorer = LastTokenReward(model).eval()
    parts = [scorer(*pad_sequences(seqs[s: s + batch_size], pad_id)) for s in range(0, len(seqs), batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0)


def _finalise(folder: Path, data: RMData, pad_id: int) -> dict:
    """Rank 0, on the saved folder: held-out accuracy, the score shift (stored in config.json
    as `reward_offset`), and value_head.safetensors for the critic."""
    from safetensors.torch import save_file
    from transformers import AutoModelForSequenceClassification

    from rlhf.actors.modeling import VALUE_HEAD_FILE

    model = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=1).eval()
    heldout_accuracy = None
    if data.heldout:
        k = max(len(g.sequences) for g in data.heldout)
        _, _, ranks, valid = group_tensors(data.heldout, pad_id)
        flat = [g.sequences[min(j, len(g.sequences) - 1)] for g in data.heldout for j in range(k)]
        rewards = score_sequences(model, flat, pad_id).view(ranks.shape)
        heldout_accuracy = float(pairwise_rm_loss(rewards, ranks, valid)[1])
    offset = float(score_sequences(model, data.offset_sequences, pad_id).mean())
    model.config.reward_offset = offset
    model.config.save_pretrained(str(folder))
    weight = model.score.weight.detach().to(torch.float32).reshape(1, -1).contiguous()
    bias = (model.score.bias.detach().reshape(1).float() if model.score.bias is not None
            else torch.zeros(1)) - offset  # the critic starts as the shifted reward model
    save_file({"weight": weight, "bias": bias.contiguous()}, str(folder / VALUE_HEAD_FILE))
    return {"heldout_accuracy": heldout_accuracy, "offset": offset, "offset_source": data.offset_source}
