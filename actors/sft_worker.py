"""The SFT stage's Ray Train worker: one DeepSpeed ZeRO rank fine-tuning on its shard.

`rlhf.orchestrator.recipe.sft.run_sft` (the driver) starts `train_loop` on every worker of a
`TorchTrainer` with the same rows; each worker then, for step 1..S:

    B  = next global batch of batch_size dialogues (seeded shuffle, epochs; `global_batches`)
    N  = assistant target tokens in B                    (every worker knows all of B)
    worker r: for each micro-batch m of its shard B_r:
        L_m = sum_{tokens of m} -log p(x_t | x_<t) * mask_t / N;  backward(W * L_m)
    optimizer step: DeepSpeed averages gradients over the W workers, so the update is
    that of the single-process loss L = sum_m L_m = token-mean NLL of B, exactly.

Rank 0 appends one metrics row per step (METRIC_KEYS) and, at the end, writes the model and
tokenizer as a Hugging Face folder (ZeRO-3 parameters are gathered first; the folder appears
atomically). Under ZeRO-3 the model is partitioned while loading (rlhf.actors.deepspeed_rank).

Runs under Ray Train on one CPU machine (gloo) or a GPU cluster (nccl); see run_sft.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf.actors import deepspeed_rank
from rlhf.actors.learner import LearnerArgs, PolicyLearner
from rlhf.actors.lora import LoraArgs
from rlhf.orchestrator.data.prompts import prompt_batches
from rlhf.orchestrator.experience import dialogue_batch
from rlhf.orchestrator.rl import aggregate_loss
from rlhf.orchestrator.run.rundir import replace_folder

METRIC_KEYS = ("step", "sft/loss", "sft/lr", "sft/grad_norm", "sft/tokens")
Row = tuple[list[int], list[int]]  # (token ids [T], assistant mask [T])


@dataclass(frozen=True)
class SFTLoopArgs:
    """What every Ray Train worker gets (plain values: it travels as train_loop_config)."""

    model_path: str
    rows: list          # [(ids [T], assistant mask [T])] of every dialogue, identical on all workers
    total_steps: int    # optimizer steps to take
    batch_size: int     # dialogues per optimizer step, over all workers
    micro_batch_size: int
    zero_stage: int
    lr: float
    dtype: str
    seed: int
    pad_id: int
    metrics_path: str
    checkpoint_path: str
    lora: dict | None = None  # asdict(LoraArgs) (it travels as plain values), None = full fine-tuning


def global_batches(n_rows: int, batch_size: int, seed: int, steps: int) -> list[list[int]]:
    """Row indices of each step's global batch: seeded shuffled epochs (same on all workers)."""
    stream = prompt_batches(n_rows, batch_size, seed)
    return [next(stream) for _ in range(steps)]


def target_tokens(rows: list[Row]) -> int:
    """Assistant tokens that are prediction targets (position 0 never is)."""
    return sum(sum(mask[1:]) for _, mask in rows)


def sft_nll_part(logp: torch.Tensor, target_mask: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """logp [B, T-1] of targets ids[:, 1:]; target_mask [B, T-1] (1 on assistant targets, as in
    `dialogue_batch(...).action_mask`). Returns this micro-batch's part of the global
    token-mean NLL: sum(-logp * target_mask) / num_tokens."""
    return aggregate_loss(-logp, target_mask, "token_mean", num_tokens=num_tokens)


class SFTLearner(PolicyLearner):
    """A policy learner rank inside a Ray Train worker, plus the SFT update.

    Reuses PolicyLearner's engine set-up (torch AdamW, our own accumulation boundary,
    partition-while-loading under ZeRO-3), its log-prob module (no [B, T, V] logits) and
    its ZeRO-3-aware save_pretrained.
    """

    def __init__(self, args: LearnerArgs, total_steps: int, pad_id: int) -> None:
        super().__init__(args)
        self.total_steps, self.pad_id = total_steps, pad_id

    def join_train_group(self) -> None:
        """Builds the engine in the process group Ray Train made (no rendezvous of our own)."""
        self.rank, self.world_size = deepspeed_rank.join_train_group()
        self._build_engine()

    def _scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        """Linear decay from lr to lr / total_steps over the run."""
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / self.total_steps)

    def sft_step(self, shard: list[Row], num_tokens: int) -> tuple[float, float, float]:
        """One optimizer step on this worker's shard (all workers call). num_tokens: target
        tokens of the GLOBAL batch. Returns (global batch loss, lr used, grad norm)."""
        self.engine.train()
        local = 0.0
        for sl in self._micro_slices(len(shard)):
            mb = dialogue_batch(shard[sl], self.pad_id)
            logp = self.engine(mb.input_ids.to(self.device), mb.attention_mask.to(self.device))
            loss = sft_nll_part(logp, mb.action_mask.to(self.device), num_tokens)
            self.engine.backward(loss * self.world_size)  # DeepSpeed averages over ranks; we want the sum
            local += float(loss.detach())
        lr, grad_norm = self._step()
        total = torch.tensor([local], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(total)
        return float(total), lr, grad_norm


def train_loop(config: dict) -> None:
    """The Ray Train worker function (every worker runs it)."""
    from rlhf.orchestrator.run.rundir import MetricsLog

    a = SFTLoopArgs(**config)
    learner = SFTLearner(LearnerArgs(model_path=a.model_path, dtype=a.dtype, zero_stage=a.zero_stage, lr=a.lr,
                                     micro_batch_size=a.micro_batch_size, seed=a.seed,
                                     backend=torch.distributed.get_backend(),
                                     lora=LoraArgs(**a.lora) if a.lora else None),
                         total_steps=a.total_steps, pad_id=a.pad_id)
    learner.join_train_group()
    rank, world = learner.rank, learner.world_size
    per_rank = a.batch_size // world
    log = MetricsLog(a.metrics_path, append=True) if rank == 0 else None
    try:
        for step, batch in enumerate(global_batches(len(a.rows), a.batch_size, a.seed, a.total_steps), start=1):
            rows = [a.rows[i] for i in batch]
            tick = time.perf_counter()
            loss, lr, grad_norm = learner.sft_step(rows[rank * per_rank:(rank + 1) * per_rank], target_tokens(rows))
            if log:
                log.log({"step": step, "sft/loss": loss, "sft/lr": lr, "sft/grad_norm": grad_norm,
                         "sft/tokens": target_tokens(rows), "timing/step_s": time.perf_counter() - tick})
    finally:
        if log:
            log.close()
    save_atomically(learner, Path(a.checkpoint_path))


def save_atomically(learner: SFTLearner, dest: Path) -> None:
    """All workers call (ZeRO-3 gathers); rank 0 writes a hidden sibling, then renames it."""
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    learner.save_pretrained(str(tmp))  # rank 0 writes; ends with a barrier
    if learner.rank == 0:
        replace_folder(tmp, dest)
