"""The DPO stage's Ray Train worker: one DeepSpeed ZeRO rank training the policy on preferences.

`rlhf.orchestrator.recipe.dpo.run_dpo` (the driver) tokenizes the pairs, has the reference
actor score every sequence once, puts the `DPOData` in the object store once and starts
`train_loop` on every worker of a `TorchTrainer`. Each worker then, for step 1..S:

    B   = next global batch of batch_size pairs (seeded shuffled epochs, `global_batches`)
    worker r: for each micro-batch m of its shard B_r (chosen and rejected in one forward):
        pc, pr = sum of the reply tokens' log-probs (prompt masked out)
        L_m = pair_loss(pc, pr, ref_c, ref_r) * |m| / |B|;   backward(W * L_m)
    optimizer step: DeepSpeed averages gradients over the W workers, so the update is that of
    the loss mean over the global batch's pairs, exactly.

KTO (`loss: kto`) trains on unpaired rows instead (best replies desirable, worst undesirable);
its reference point z0 is the clamped mean of logp - ref_logp over mismatched rows (a prompt
with another prompt's reply), computed without gradient over the global batch before each
step (all-reduced), as in the KTO paper (sec. 4.1).

Before the first and after the last step rank 0 scores the held-out pairs: implicit-reward
accuracy (a tie, |reward difference| <= TIE_TOLERANCE, counts half, so the untrained policy,
whose rewards beta * (logp - ref) are all 0, scores 50 %). The policy is saved as a Hugging Face
folder (LoRA merged, ZeRO-3 gathered, atomically: `rlhf.actors.sft_worker.save_atomically`) and
the summary to `summary_path`.

Runs under Ray Train on one CPU machine (gloo) or a GPU cluster (nccl); see run_dpo.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from rlhf.actors.learner import LearnerArgs
from rlhf.actors.lora import LoraArgs
from rlhf.actors.sft_worker import SFTLearner, save_atomically, global_batches
from rlhf.orchestrator.experience import dialogue_batch
from rlhf.orchestrator.rl.preference import kto_kl_reference, kto_loss, pair_loss

Row = tuple[list[int], list[int]]  # (prompt + reply ids [T], reply mask [T]: 1 on reply tokens)
DATA_TIMEOUT_S = 600.0
# Implicit rewards closer than this are a tie: before training the policy IS the reference, and
# its log-probs differ from the reference actor's only by float rounding (other padding).
TIE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class DPOData:
    """Everything the workers train and evaluate on (ray.put once by the driver)."""

    sequences: list[Row]               # every distinct (prompt, reply) once
    ref_logps: list[float] | None      # summed reply log-prob of each sequence under the reference; None = free
    train: list[tuple[int, int]]       # pairs: (chosen, rejected) sequence indices; kto: (row, kl row)
    desirable: list[bool] | None       # kto: one flag per train row (None for pair losses)
    heldout: list[tuple[int, int]]     # (chosen, rejected) pairs of held-out prompts (every loss)


@dataclass(frozen=True)
class LossArgs:
    name: str                 # dpo | ipo | cdpo | simpo | kto
    beta: float
    label_smoothing: float
    gamma: float
    desirable_weight: float
    undesirable_weight: float


@dataclass(frozen=True)
class DPOLoopArgs:
    """What every Ray Train worker gets (built from the config by `run_dpo`)."""

    model_path: str
    data_ref: object          # ObjectRef of DPOData
    loss: LossArgs
    total_steps: int
    batch_size: int           # pairs (kto: rows) per optimizer step, over all workers
    micro_batch_size: int     # pairs per forward/backward
    zero_stage: int
    lr: float
    dtype: str
    seed: int
    pad_id: int
    metrics_path: str
    checkpoint_path: str
    summary_path: str
    lora: LoraArgs | None = None


def reply_logps(logp: Tensor, action_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Token log-probs [B, T-1] and the reply targets' mask [B, T-1] -> (sum of the reply's
    log-probs [B], reply length [B])."""
    return (logp * action_mask).sum(dim=1), action_mask.sum(dim=1)


class DPOLearner(SFTLearner):
    """A policy learner rank inside a Ray Train worker (SFT's engine, linear decay) plus the
    preference updates."""

    def __init__(self, args: LearnerArgs, total_steps: int, pad_id: int, data: DPOData, loss: LossArgs) -> None:
        super().__init__(args, total_steps, pad_id)
        self.data, self.loss = data, loss
        self.ref = None if data.ref_logps is None else torch.tensor(data.ref_logps, dtype=torch.float32)

    def _logps(self, index: list[int], grad: bool) -> tuple[Tensor, Tensor]:
        """Summed reply log-probs and lengths [N] of sequences `index` (one forward)."""
        batch = dialogue_batch([self.data.sequences[i] for i in index], self.pad_id)
        mask = batch.action_mask.to(self.device)
        with torch.set_grad_enabled(grad):
            logp = self.engine(batch.input_ids.to(self.device), batch.attention_mask.to(self.device))
        return reply_logps(logp, mask[:, : logp.shape[1]])

    def _pair_loss(self, chosen: list[int], rejected: list[int], grad: bool):
        logps, lengths = self._logps(chosen + rejected, grad)
        n, a = len(chosen), self.loss
        ref = None if self.ref is None else self.ref[chosen + rejected].to(self.device)
        name = "dpo" if a.name == "kto" else a.name  # held-out pairs of a KTO run: DPO's implicit reward
        out = pair_loss(name, logps[:n], logps[n:], None if ref is None else ref[:n], None if ref is None else ref[n:],
                        beta=a.beta, label_smoothing=a.label_smoothing, gamma=a.gamma,
                        chosen_lengths=lengths[:n], rejected_lengths=lengths[n:])
        return out, logps[:n].detach(), logps[n:].detach()

    def pair_step(self, shard: list[tuple[int, int]], n_global: int) -> dict[str, float]:
        """One optimizer step on this worker's pairs; returns global (all-reduced) step means."""
        self.engine.train()
        sums = torch.zeros(7, dtype=torch.float64)
        for sl in self._micro_slices(len(shard)):
            chosen, rejected = [c for c, _ in shard[sl]], [r for _, r in shard[sl]]
            out, pc, pr = self._pair_loss(chosen, rejected, grad=True)
            part = out.loss * (len(chosen) / n_global)  # this micro-batch's share of the global mean
            self.engine.backward(part * self.world_size)  # DeepSpeed averages over ranks; we want the sum
            sums += torch.tensor([float(part.detach()), len(chosen), float(out.chosen_rewards.sum()),
                                  float(out.rejected_rewards.sum()), float(pc.sum()), float(pr.sum()),
                                  float((out.chosen_rewards > out.rejected_rewards).sum())], dtype=torch.float64)
        lr, grad_norm = self._step()
        loss, n, cr, rr, pc, pr, correct = self._all_reduce(sums).tolist()
        return {"dpo/loss": loss, "dpo/margin": (cr - rr) / n, "dpo/chosen_reward": cr / n,
                "dpo/rejected_reward": rr / n, "dpo/chosen_logp": pc / n, "dpo/rejected_logp": pr / n,
                "dpo/accuracy": correct / n, "dpo/lr": lr, "dpo/grad_norm": grad_norm}

    def kto_step(self, shard: list[int], n_global: int) -> dict[str, float]:
        """One KTO step on this worker's train rows (indices into data.train)."""
        self.engine.train()
        a, rows = self.loss, [self.data.train[i] for i in shard]
        # z0 over the global batch's mismatched rows, before any update of this step.
        kl_idx = [k for _, k in rows]
        kl_sums = torch.zeros(2, dtype=torch.float64)
        for sl in self._micro_slices(len(kl_idx)):
            logps, _ = self._logps(kl_idx[sl], grad=False)
            kl_sums += torch.tensor([float((logps.cpu() - self.ref[kl_idx[sl]]).sum()), len(kl_idx[sl])],
                                    dtype=torch.float64)
        kl_sum, kl_n = self._all_reduce(kl_sums).tolist()
        z0 = kto_kl_reference(torch.tensor([kl_sum / kl_n]), torch.zeros(1))
        sums = torch.zeros(8, dtype=torch.float64)
        for sl in self._micro_slices(len(rows)):
            idx = [s for s, _ in rows[sl]]
            desirable = torch.tensor([self.data.desirable[i] for i in shard[sl]], device=self.device)
            logps, _ = self._logps(idx, grad=True)
            out = kto_loss(logps, self.ref[idx].to(self.device), desirable, beta=a.beta, kl_ref=z0.to(self.device),
                           desirable_weight=a.desirable_weight, undesirable_weight=a.undesirable_weight)
            part = out.loss * (len(idx) / n_global)
            self.engine.backward(part * self.world_size)
            lp, d = logps.detach(), desirable
            right = torch.cat([out.chosen_rewards > a.beta * z0, out.rejected_rewards < a.beta * z0])
            sums += torch.tensor([float(part.detach()), float(d.sum()), float((~d).sum()),
                                  float(out.chosen_rewards.sum()), float(out.rejected_rewards.sum()),
                                  float(lp[d].sum()), float(lp[~d].sum()), float(right.sum())], dtype=torch.float64)
        lr, grad_norm = self._step()
        loss, nd, nu, cr, rr, pc, pr, right = self._all_reduce(sums).tolist()
        accuracy = right / (nd + nu)  # rewards on the right side of the reference point beta * z0
        nd, nu = max(nd, 1.0), max(nu, 1.0)
        return {"dpo/loss": loss, "dpo/margin": cr / nd - rr / nu, "dpo/chosen_reward": cr / nd,
                "dpo/rejected_reward": rr / nu, "dpo/chosen_logp": pc / nd, "dpo/rejected_logp": pr / nu,
                "dpo/accuracy": accuracy, "dpo/kl_ref": float(z0), "dpo/lr": lr, "dpo/grad_norm": grad_norm}

    @torch.no_grad()
    def heldout_accuracy(self) -> float | None:
        """Implicit-reward accuracy on the held-out pairs (a tie counts half); every rank
        computes all of them (same forwards on every rank, as ZeRO-3 needs)."""
        pairs = self.data.heldout
        if not pairs:
            return None
        self.engine.eval()
        score = 0.0
        for sl in self._micro_slices(len(pairs)):
            out, _, _ = self._pair_loss([c for c, _ in pairs[sl]], [r for _, r in pairs[sl]], grad=False)
            diff = out.chosen_rewards - out.rejected_rewards
            score += float((diff > TIE_TOLERANCE).sum() + 0.5 * (diff.abs() <= TIE_TOLERANCE).sum())
        return score / len(pairs)

    def _all_reduce(self, sums: Tensor) -> Tensor:
        if self.world_size > 1:
            sums = sums.to(self.device)
            torch.distributed.all_reduce(sums)
        return sums.cpu()


def train_loop(config: dict) -> None:
    """The Ray Train worker function (every worker runs it)."""
    import ray

    from rlhf.orchestrator.run.rundir import MetricsLog, write_atomic

    a: DPOLoopArgs = config["args"]
    data: DPOData = ray.get(a.data_ref, timeout=DATA_TIMEOUT_S)
    learner = DPOLearner(LearnerArgs(model_path=a.model_path, dtype=a.dtype, zero_stage=a.zero_stage, lr=a.lr,
                                     micro_batch_size=a.micro_batch_size, seed=a.seed,
                                     backend=torch.distributed.get_backend(), lora=a.lora),
                         total_steps=a.total_steps, pad_id=a.pad_id, data=data, loss=a.loss)
    learner.join_train_group()
    rank, world = learner.rank, learner.world_size
    per_rank = a.batch_size // world
    before = learner.heldout_accuracy()
    log = MetricsLog(a.metrics_path, append=True) if rank == 0 else None
    step_fn = learner.kto_step if a.loss.name == "kto" else learner.pair_step
    try:
        for step, batch in enumerate(global_batches(len(data.train), a.batch_size, a.seed, a.total_steps), start=1):
            tick = time.perf_counter()
            shard = batch[rank * per_rank:(rank + 1) * per_rank]
            stats = step_fn(shard if a.loss.name == "kto" else [data.train[i] for i in shard], per_rank * world)
            if log:
                log.log({"step": step, **stats, "timing/step_s": time.perf_counter() - tick})
        after = learner.heldout_accuracy()
        if log:
            log.log({"step": a.total_steps, "dpo/heldout_accuracy_before": before,
                     "dpo/heldout_accuracy_after": after})
    finally:
        if log:
            log.close()
    save_atomically(learner, Path(a.checkpoint_path))
    if rank == 0:
        write_atomic(Path(a.summary_path), json.dumps(
            {"heldout_accuracy_before": before, "heldout_accuracy_after": after, "steps": a.total_steps}) + "\n")
