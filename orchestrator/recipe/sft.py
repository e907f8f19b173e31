"""Supervised fine-tuning (InstructGPT step 1) on Ray Train workers running DeepSpeed ZeRO.

The driver loads and tokenizes the demonstrations once (rlhf.orchestrator.data.dialogues) and
hands every worker the same rows; a `TorchTrainer` starts `sft.num_workers` workers that
each build a DeepSpeed engine and train on their shard of every global batch:

    for step in 1..S:
        B  = next global batch of sft.batch_size dialogues (seeded shuffle, epochs)
        N  = assistant target tokens in B                    (every worker knows all of B)
        worker r: for each micro-batch m of its shard B_r:
            L_m = sum_{tokens of m} -log p(x_t | x_<t) * mask_t / N;  backward(W * L_m)
        optimizer step: DeepSpeed averages gradients over the W workers, so the update is
        that of the single-process loss L = sum_m L_m = token-mean NLL of B, exactly.

Rank 0 appends one metrics row per step to <out>/metrics.jsonl and, at the end, writes the
model and tokenizer as a Hugging Face folder to <out>/checkpoint (ZeRO-3 parameters are
gathered first; the folder appears atomically).

Run on one CPU machine (gloo):
    ray.init(); run_sft(cfg, "path/to/model", Path("runs/x/sft"), max_steps=20)
On a cluster the same call uses NCCL when placement.gpus_per_node > 0; `out_dir` must then
be storage that rank 0's node and the driver share (it holds the checkpoint and metrics).
"""
from __future__ import annotations

import json
import math
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rlhf.actors.learner import LearnerArgs, PolicyLearner, param_groups
from rlhf.orchestrator.config import ExperimentConfig
from rlhf.orchestrator.data.dialogues import encode_dialogues, load_sft_dialogues
from rlhf.orchestrator.errors import BadInput, RemoteCallFailed
from rlhf.orchestrator.experience import dialogue_batch
from rlhf.orchestrator.data.prompts import prompt_batches
from rlhf.orchestrator.rl import aggregate_loss

METRIC_KEYS = ("step", "sft/loss", "sft/lr", "sft/grad_norm", "sft/tokens")
Row = tuple[list[int], list[int]]  # (token ids [T], assistant mask [T])


@dataclass(frozen=True)
class SFTResult:
    checkpoint: Path    # Hugging Face folder of the fine-tuned model (and tokenizer)
    steps: int          # optimizer steps taken
    final_loss: float   # token-mean NLL of the assistant tokens in the last global batch
    metrics_path: Path  # metrics.jsonl the steps were appended to


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


def plan_steps(n_rows: int, batch_size: int, epochs: int, cfg_max_steps: int | None,
               max_steps: int | None) -> int:
    """Optimizer steps: `epochs` passes (last batch wrapping into the next shuffle), or
    sft.max_steps when set (like HF's max_steps, it replaces epochs); --max-steps caps it."""
    total = cfg_max_steps or math.ceil(epochs * n_rows / batch_size)
    return min(total, max_steps) if max_steps else total


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

    Reuses PolicyLearner's DeepSpeed config (torch AdamW, our own accumulation boundary),
    its log-prob module (no [B, T, V] logits) and its ZeRO-3-aware save_pretrained.
    """

    def __init__(self, args: LearnerArgs, total_steps: int, pad_id: int) -> None:
        super().__init__(args)
        self.total_steps, self.pad_id = total_steps, pad_id

    def join_train_group(self) -> None:
        """Builds the engine in the process group Ray Train made (no rendezvous of our own;
        Ray Train has set RANK/LOCAL_RANK, which DeepSpeed reads to pick the device)."""
        import deepspeed

        self.rank, self.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        module = self._build_module()
        self.engine, *_ = deepspeed.initialize(
            model=module, model_parameters=param_groups(module, self.args.weight_decay),
            config=self._ds_config(), lr_scheduler=self._scheduler)
        self.device = self.engine.device
        self._after_initialize()

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
            local += float(loss)
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
                                     backend=torch.distributed.get_backend()),
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
    _save_atomically(learner, Path(a.checkpoint_path))


def _save_atomically(learner: SFTLearner, dest: Path) -> None:
    """All workers call (ZeRO-3 gathers); rank 0 writes a hidden sibling, then renames it."""
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    learner.save_pretrained(str(tmp))  # rank 0 writes; ends with a barrier
    if learner.rank != 0:
        return
    old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
    if dest.exists():
        dest.rename(old)  # rename cannot replace a non-empty folder
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def _is_model_dir(path: Path) -> bool:
    """config.json plus weights, in one file or sharded (large models)."""
    return (path / "config.json").is_file() and any(
        (path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json"))


def _load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as err:
        raise BadInput(f"model: cannot load a tokenizer from {model_path!r}: {str(err).splitlines()[0]}") from None


def _last_line(err: BaseException) -> str:
    """'Type: message' from the last line of an error (Ray appends tracebacks above it)."""
    lines = str(err).strip().splitlines()
    text, name = (lines[-1].strip() if lines else ""), type(err).__name__
    return text if text.startswith(name) else f"{name}: {text}"


def worker_failure(err: Exception) -> RemoteCallFailed:
    """One line naming the failing SFT worker (the lowest failed rank) and its root error."""
    failures = getattr(err, "worker_failures", None) or {}
    if failures:
        rank, cause = min(failures.items(), key=lambda item: item[0])
        return RemoteCallFailed(f"sft worker (rank {rank}) failed: {_last_line(cause)}"[:500])
    return RemoteCallFailed(f"sft worker group failed: {_last_line(err)}"[:500])


def run_sft(cfg: ExperimentConfig, model_path: str, out_dir: Path, max_steps: int | None = None) -> SFTResult:
    """Fine-tunes `model_path` on the experiment's demonstrations; Ray must be running."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if max_steps is not None and max_steps < 1:
        raise BadInput(f"--max-steps must be >= 1, got {max_steps}")
    if not ray.is_initialized():
        raise RuntimeError("run_sft needs Ray started by the caller (ray.init)")
    sft, out = cfg.sft, Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _load_tokenizer(model_path)
    data = encode_dialogues(tokenizer, load_sft_dialogues(cfg, cfg.seed), sft.max_tokens)
    steps = plan_steps(len(data.rows), sft.batch_size, sft.epochs, sft.max_steps, max_steps)
    metrics_path, checkpoint = out / "metrics.jsonl", out / "checkpoint"
    args = SFTLoopArgs(model_path=str(model_path), rows=data.rows, total_steps=steps, batch_size=sft.batch_size,
                       micro_batch_size=sft.micro_batch_size, zero_stage=sft.zero_stage, lr=sft.lr,
                       dtype=cfg.model.dtype, seed=cfg.seed,
                       pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                       metrics_path=str(metrics_path), checkpoint_path=str(checkpoint))
    on_gpu = cfg.placement.gpus_per_node > 0
    trainer = TorchTrainer(
        train_loop, train_loop_config=asdict(args),
        scaling_config=ScalingConfig(num_workers=sft.num_workers, use_gpu=on_gpu),
        torch_config=TorchConfig(backend="nccl" if on_gpu else "gloo"),
        run_config=RunConfig(storage_path=str(out / "ray_train"), name="sft"))
    try:
        trainer.fit()
    except Exception as err:  # noqa: BLE001 - every worker/controller failure becomes one line
        raise worker_failure(err) from err
    if not _is_model_dir(checkpoint):
        raise RuntimeError(f"sft worker (rank 0) finished without writing a model to {checkpoint}")
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    final = [r for r in rows if "sft/loss" in r][-1]
    print(f"sft done: {steps} steps on {len(data.rows)} dialogues ({data.truncated} truncated, "
          f"{data.skipped} skipped), loss {final['sft/loss']:.3f}; model in {checkpoint}")
    return SFTResult(checkpoint=checkpoint, steps=steps, final_loss=float(final["sft/loss"]),
                     metrics_path=metrics_path)
