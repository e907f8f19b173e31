"""The reward-model stage's Ray Train worker: DeepSpeed ZeRO training of r(x, y), then the shift.

`rlhf.orchestrator.recipe.rm.run_rm` (the driver) builds the prompt groups (`RMData`), puts
them in the object store once and starts `_train_worker` on every worker of a `TorchTrainer`.
As in InstructGPT (Ouyang et al. 2022, sec. 3.5 and appendix C.2):
- The reward model is the SFT model with a scalar head (`AutoModelForSequenceClassification
  (num_labels=1)`); the score is the head's output at the last real token (right padding,
  rlhf.orchestrator.models.scoring, the same scorer `RewardScorer` uses).
- One prompt with all its K ranked replies is one batch element: each reply gets one
  forward pass, and the C(K, 2) pairs share them (`pairwise_rm_loss`).
- Cosine learning-rate decay to 10 % of the initial rate by the end of training.
- Rank 0 saves the model, scores the held-out groups and the offset sequences, stores the
  mean as `config.reward_offset` and writes value_head.safetensors (head bias - offset) for
  the PPO critic (`_finalise`), then reports the folder as the Ray Train checkpoint.

Under ZeRO-3 the model is partitioned while loading (rlhf.actors.deepspeed_rank), so a
reward model larger than one GPU never sits whole on one rank.

Runs under Ray Train on one CPU machine (gloo) or a GPU cluster (nccl); see run_rm.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from rlhf.actors import deepspeed_rank
from rlhf.actors.deepspeed_rank import AdamW
from rlhf.actors.lora import LoraArgs, apply_lora, merged_state_dict
from rlhf.orchestrator.models.scoring import last_token_scores, score_sequences
from rlhf.orchestrator.models.scoring import pad_right as pad_sequences
from rlhf.orchestrator.rl.losses import pairwise_rm_loss

LR_FINAL_RATIO = 0.1  # InstructGPT: cosine decay to 10 % of the initial learning rate
EVAL_FILE = "rm_eval.json"  # accuracy, offset and sizes, saved next to the weights
DATA_TIMEOUT_S = 600.0


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
    lora: LoraArgs | None = None  # adapters on the backbone, the score head trains whole; None = all weights


class LastTokenReward(nn.Module):
    """Sequence-classification model -> one scalar per sequence, read at its last real token."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[B, T] right-padded -> [B] float32."""
        return last_token_scores(self.model, input_ids, attention_mask)


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


def scalar_head_worker_start(a):
    """The start every scalar-head Ray Train worker shares (this RM's and the rule RM's): join the
    training group, set threads and seed, fetch the data, load the tokenizer and the model with one
    new score head. `a` has num_threads, seed, data_ref, tokenizer_path, model_path and dtype.
    Returns (rank, world, data, tokenizer, model)."""
    import ray
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rank, world = deepspeed_rank.join_train_group()
    torch.set_num_threads(a.num_threads)
    torch.manual_seed(a.seed)  # the new score head starts identical on every worker
    data = ray.get(a.data_ref, timeout=DATA_TIMEOUT_S)
    tokenizer = AutoTokenizer.from_pretrained(a.tokenizer_path)
    model = AutoModelForSequenceClassification.from_pretrained(a.model_path, num_labels=1, dtype=getattr(torch, a.dtype))
    model.config.pad_token_id = tokenizer.pad_token_id or 0
    return rank, world, data, tokenizer, model


def _train_worker(config: dict) -> None:
    """Ray Train loop on every worker: DeepSpeed ZeRO training, then rank 0 saves and evaluates."""
    import deepspeed
    import ray.train

    a: RMWorkerArgs = config["args"]
    rank, world, data, tokenizer, model = scalar_head_worker_start(a)
    pad_id = model.config.pad_token_id
    if a.lora is not None:
        apply_lora(model, a.lora, trainable=("score",))
    module = LastTokenReward(model)
    per_worker = max(1, min(a.prompts_per_batch, len(data.train)) // world)
    batches = _epoch_batches(len(data.train), per_worker * world, a.epochs, a.seed)
    total = len(batches) if a.max_steps is None else min(len(batches), a.max_steps)
    # per_worker prompts per micro-batch; under ZeRO-3 the model is partitioned while loading.
    ds_config = deepspeed_rank.ds_config(zero_stage=a.zero_stage, micro_batch_size=per_worker, dtype=a.dtype,
                                         adamw=AdamW(lr=a.lr), grad_clip=a.grad_clip)
    deepspeed_rank.partition_while_loading(module, ds_config)
    engine, *_ = deepspeed.initialize(
        model=module, model_parameters=[p for p in module.parameters() if p.requires_grad], config=ds_config,
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
        tokenizer.save_pretrained(str(folder))
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
    """The reward model's full state dict on rank 0 (every worker must call: ZeRO-3 gathers),
    LoRA adapters merged in: what the plain class's save_pretrained expects."""
    import contextlib

    import deepspeed

    model = engine.module.model
    gather = (deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
              if zero_stage == 3 else contextlib.nullcontext())
    with gather:
        state = merged_state_dict(model) if rank == 0 else {}
    return state


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
