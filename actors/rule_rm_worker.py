"""The rule reward model's Ray Train worker: DeepSpeed ZeRO training of P(violation | dialogue, rule).

`rlhf.orchestrator.recipe.rule_rm.run_rule_rm` (the driver) tokenizes the examples
(`RuleRMData`: the chat template of [system "Rule: <text>", *messages, assistant reply]),
puts them in the object store once and starts `_train_worker` on every worker of a
`TorchTrainer`. As in Sparrow (Glaese et al. 2022, sec. 2.5), one model serves every rule:
- the SFT model with a scalar head (`AutoModelForSequenceClassification(num_labels=1)`), read
  at the last real token like the preference RM (rlhf.actors.rm_worker.LastTokenReward);
- P(violation) = sigmoid(score), binary cross-entropy (`rule_violation_loss`);
- batch_size examples per optimizer step over all workers, micro_batch_size per forward on
  one worker (DeepSpeed accumulates in between), cosine decay to 10 % of the learning rate.
Rank 0 saves the model, the tokenizer and rules.json, scores the held-out examples and
reports the folder as the Ray Train checkpoint.

Runs under Ray Train on one CPU machine (gloo) or a GPU cluster (nccl); see run_rule_rm.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf.actors import deepspeed_rank
from rlhf.actors.deepspeed_rank import AdamW
from rlhf.actors.rm_worker import (LastTokenReward, _epoch_batches, _full_state, cosine_lr_lambda,
                                   scalar_head_worker_start)
from rlhf.orchestrator.models.scoring import RULES_FILE, pad_right, score_sequences
from rlhf.orchestrator.rl.losses import rule_violation_loss

EVAL_FILE = "rule_rm_eval.json"  # held-out accuracy, base rates and sizes, saved next to the weights


@dataclass(frozen=True)
class RuleRMData:
    train_sequences: list[list[int]]    # N token lists: the rule model's input (rule + dialogue + reply)
    train_labels: list[bool]            # N: True = violated
    heldout_sequences: list[list[int]]  # M token lists, dialogues never trained on
    heldout_labels: list[bool]          # M
    heldout_rules: list[str]            # M rule names, for the per-rule accuracy
    rules: dict[str, str]               # name -> text, saved as rules.json


@dataclass(frozen=True)
class RuleRMWorkerArgs:
    """What each Ray Train worker needs (built from the config by `run_rule_rm`)."""

    model_path: str          # SFT folder the rule model starts from
    tokenizer_path: str
    metrics_path: str        # rank 0 appends one JSON line per optimizer step
    data_ref: object         # ObjectRef of RuleRMData (ray.put once, fetched by every worker)
    zero_stage: int
    lr: float
    batch_size: int          # examples per optimizer step, over all workers
    micro_batch_size: int    # examples per forward/backward on one worker
    epochs: int
    max_steps: int | None
    seed: int
    dtype: str
    backend: str             # "gloo" (CPU) or "nccl"
    max_tokens: int = 512    # what the sequences were cut to; saved as config.rule_max_tokens for scorers
    grad_clip: float = 1.0
    num_threads: int = 1     # torch intra-op threads per worker


def step_shape(n_train: int, batch_size: int, micro_batch_size: int, world: int) -> tuple[int, int]:
    """(micro-batch per worker, micro-batches per step): the largest whole split of
    min(batch_size, n_train) examples into world x micro x accumulation."""
    per_worker = max(1, min(batch_size, n_train) // world)
    micro = min(micro_batch_size, per_worker)
    return micro, per_worker // micro


def _train_worker(config: dict) -> None:
    """Ray Train loop on every worker: DeepSpeed ZeRO training, then rank 0 saves and evaluates."""
    import deepspeed
    import ray.train

    a: RuleRMWorkerArgs = config["args"]
    rank, world, data, tokenizer, model = scalar_head_worker_start(a)
    pad_id = model.config.pad_token_id
    module = LastTokenReward(model)
    micro, accum = step_shape(len(data.train_sequences), a.batch_size, a.micro_batch_size, world)
    batches = _epoch_batches(len(data.train_sequences), micro * accum * world, a.epochs, a.seed)
    total = len(batches) if a.max_steps is None else min(len(batches), a.max_steps)
    ds_config = deepspeed_rank.ds_config(zero_stage=a.zero_stage, micro_batch_size=micro, dtype=a.dtype,
                                         adamw=AdamW(lr=a.lr), grad_clip=a.grad_clip)
    ds_config["gradient_accumulation_steps"] = accum  # DeepSpeed steps (and scales the loss) at the boundary
    deepspeed_rank.partition_while_loading(module, ds_config)
    engine, *_ = deepspeed.initialize(
        model=module, model_parameters=list(module.parameters()), config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, cosine_lr_lambda(total)))

    metrics_file = open(a.metrics_path, "a") if rank == 0 else None
    engine.train()
    for step in range(total):
        mine = batches[step][1][rank::world]  # this worker's share of the step's examples
        stats = _train_step(engine, data, [mine[m * micro: (m + 1) * micro] for m in range(accum)], pad_id)
        if metrics_file is not None:
            metrics_file.write(json.dumps({"step": step + 1, **{f"rule_rm/{k}": v for k, v in stats.items()}}) + "\n")
            metrics_file.flush()
    if metrics_file is not None:
        metrics_file.close()

    state = _full_state(engine, a.zero_stage, rank)
    summary = {"steps": total, "train_examples": len(data.train_sequences),
               "heldout_examples": len(data.heldout_sequences)}
    if rank == 0:
        folder = Path(tempfile.mkdtemp(prefix="rule-rm-checkpoint-"))
        model.config.rule_max_tokens = a.max_tokens  # rule_violation_probs cuts sequences the same way
        model.save_pretrained(str(folder), state_dict=state)
        tokenizer.save_pretrained(str(folder))
        (folder / RULES_FILE).write_text(json.dumps(data.rules, indent=2) + "\n")
        summary.update(_evaluate(folder, data, pad_id))
        (folder / EVAL_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        ray.train.report(summary, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
        shutil.rmtree(folder, ignore_errors=True)  # report has persisted it to the run's storage
    else:
        ray.train.report(summary)


def _train_step(engine, data: RuleRMData, micro_batches: list[list[int]], pad_id: int) -> dict[str, float]:
    """One optimizer step (accumulated over `micro_batches`); returns global (all-reduced) stats."""
    device = engine.device
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, examples
    lr = float(engine.get_lr()[0])
    for index in micro_batches:
        ids, attn = pad_right([data.train_sequences[i] for i in index], pad_id)
        labels = torch.tensor([data.train_labels[i] for i in index], device=device)
        loss, accuracy = rule_violation_loss(engine(ids.to(device), attn.to(device)), labels)
        # Equal micro-batches everywhere: DeepSpeed's mean over workers and steps is the global mean.
        engine.backward(loss)
        engine.step()
        totals += torch.tensor([float(loss.detach()) * len(index), float(accuracy) * len(index), len(index)],
                               dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    loss_sum, correct, n = totals.tolist()
    return {"loss": loss_sum / n, "accuracy": correct / n, "lr": lr}


def _evaluate(folder: Path, data: RuleRMData, pad_id: int) -> dict:
    """Rank 0, on the saved folder: held-out accuracy (P > 0.5 = violated), overall and per rule,
    beside the majority-class accuracy a constant guess gets."""
    from transformers import AutoModelForSequenceClassification

    labels = data.train_labels + data.heldout_labels
    out = {"violation_rate": sum(labels) / len(labels), "heldout_accuracy": None, "heldout_majority": None,
           "heldout_per_rule": {}}
    if not data.heldout_sequences:
        return out
    model = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=1).eval()
    said = (score_sequences(model, data.heldout_sequences, pad_id) > 0).tolist()
    right = [s == v for s, v in zip(said, data.heldout_labels)]
    rate = sum(data.heldout_labels) / len(right)
    per_rule: dict[str, list[bool]] = {}
    for rule, ok in zip(data.heldout_rules, right):
        per_rule.setdefault(rule, []).append(ok)
    out.update(heldout_accuracy=sum(right) / len(right), heldout_majority=max(rate, 1 - rate),
               heldout_per_rule={r: sum(v) / len(v) for r, v in sorted(per_rule.items())})
    return out
