"""Supervised fine-tuning (InstructGPT step 1): the driver of the Ray Train SFT workers.

The driver loads and tokenizes the demonstrations once (rlhf.orchestrator.data.dialogues),
plans the steps and hands every worker the same rows; a `TorchTrainer` starts
`sft.num_workers` workers running `rlhf.actors.sft_worker.train_loop` (the DeepSpeed ZeRO
rank, the exact token-mean loss over workers and micro-batches, metrics and the checkpoint).

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
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhf.actors.lora import LoraArgs, check_targets_for
from rlhf.actors.sft_worker import SFTLoopArgs, train_loop
from rlhf.orchestrator.config import ExperimentConfig
from rlhf.orchestrator.data.dialogues import encode_dialogues, load_sft_dialogues
from rlhf.orchestrator.errors import BadInput, RemoteCallFailed
from rlhf.orchestrator.tasks import load_task


@dataclass(frozen=True)
class SFTResult:
    checkpoint: Path    # Hugging Face folder of the fine-tuned model (and tokenizer)
    steps: int          # optimizer steps taken
    final_loss: float   # token-mean NLL of the assistant tokens in the last global batch
    metrics_path: Path  # metrics.jsonl the steps were appended to


def plan_steps(n_rows: int, batch_size: int, epochs: int, cfg_max_steps: int | None,
               max_steps: int | None) -> int:
    """Optimizer steps: `epochs` passes (last batch wrapping into the next shuffle), or
    sft.max_steps when set (like HF's max_steps, it replaces epochs); --max-steps caps it."""
    total = cfg_max_steps or math.ceil(epochs * n_rows / batch_size)
    return min(total, max_steps) if max_steps else total


def is_model_dir(path: Path) -> bool:
    """config.json plus weights, in one file or sharded (large models)."""
    return (path / "config.json").is_file() and any(
        (path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json"))


def load_tokenizer(model_path: str):
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


def worker_failure(err: Exception, role: str = "sft") -> RemoteCallFailed:
    """One line naming the failing Ray Train worker of `role` (the lowest failed rank) and its
    root error; the reward-model stage uses it too (role "reward-model")."""
    failures = getattr(err, "worker_failures", None) or {}
    if failures:
        rank, cause = min(failures.items(), key=lambda item: item[0])
        return RemoteCallFailed(f"{role} worker (rank {rank}) failed: {_last_line(cause)}"[:500])
    return RemoteCallFailed(f"{role} worker group failed: {_last_line(err)}"[:500])


def run_sft(cfg: ExperimentConfig, model_path: str, out_dir: Path, max_steps: int | None = None,
            dialogues: list[list[dict]] | None = None) -> SFTResult:
    """Fine-tunes `model_path` on the experiment's demonstrations, or on `dialogues` when given
    (best-of-N passes its kept replies); Ray must be running."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if max_steps is not None and max_steps < 1:
        raise BadInput(f"--max-steps must be >= 1, got {max_steps}")
    if not ray.is_initialized():
        raise RuntimeError("run_sft needs Ray started by the caller (ray.init)")
    sft, out = cfg.sft, Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(model_path)
    if dialogues is None:
        dialogues = load_sft_dialogues(cfg, load_task(cfg.data.task), cfg.seed)
    data = encode_dialogues(tokenizer, dialogues, sft.max_tokens)
    steps = plan_steps(len(data.rows), sft.batch_size, sft.epochs, sft.max_steps, max_steps)
    metrics_path, checkpoint = out / "metrics.jsonl", out / "checkpoint"
    lora = LoraArgs.from_config(sft.lora, "sft.lora")
    check_targets_for(model_path, lora)  # before any worker starts
    args = SFTLoopArgs(model_path=str(model_path), rows=data.rows, total_steps=steps, batch_size=sft.batch_size,
                       micro_batch_size=sft.micro_batch_size, zero_stage=sft.zero_stage, lr=sft.lr,
                       dtype=cfg.model.dtype, seed=cfg.seed,
                       pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                       metrics_path=str(metrics_path), checkpoint_path=str(checkpoint),
                       lora=asdict(lora) if lora else None)
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
    if not is_model_dir(checkpoint):
        raise RemoteCallFailed(f"sft worker (rank 0) finished without writing a model to {checkpoint}")
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    final = [r for r in rows if "sft/loss" in r][-1]
    print(f"sft done: {steps} steps on {len(data.rows)} dialogues ({data.truncated} truncated, "
          f"{data.skipped} skipped), loss {final['sft/loss']:.3f}; model in {checkpoint}")
    return SFTResult(checkpoint=checkpoint, steps=steps, final_loss=float(final["sft/loss"]),
                     metrics_path=metrics_path)
