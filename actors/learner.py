"""DeepSpeed ZeRO learners: one data-parallel rank per object (policy or critic).

These are plain classes; the driver wraps them with ``ray.remote(num_cpus=..., num_gpus=...)``
at launch, one actor per rank, and tests do the same. Lifecycle, as the driver calls it:

    ranks = [ray.remote(PolicyLearner).options(...).remote(args) for _ in range(W)]
    host, port = ray.get(ranks[0].master_address.remote())
    ray.get([r.init_process_group.remote(host, port, i, W) for i, r in enumerate(ranks)])

Collective calls (EVERY rank must call them, concurrently, with equal-sized slices):
init_process_group, compute_logprobs / compute_values (ZeRO-3 gathers parameters inside
forward), train_step, export_weight_buckets, broadcast_weights, full_state_dict,
weight_checksums, save_pretrained, save_checkpoint, load_checkpoint (weight export lives in
rlhf.actors.learner_weights). Local calls (rank 0 alone is enough): master_address,
weight_bucket_metas.

Exact losses across ranks and micro-batches: the driver passes the GLOBAL token and
sequence counts of the mini-batch; each micro-batch loss is then one part of a single sum
(rlhf.orchestrator.rl.aggregate_loss). Gradients of the parts accumulate locally, one
optimizer step follows per epoch, and since DeepSpeed averages gradients over ranks we
multiply each loss by the world size: the update equals a single-process full-batch step.

Runs unchanged on one CPU machine (backend "gloo", local Ray) and on GPU clusters ("nccl").
"""
from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rlhf.actors import deepspeed_rank
from rlhf.actors.deepspeed_rank import AdamW, ds_config, equal_micro_slices
from rlhf.actors.lora import LoraArgs, apply_lora, frozen_left_out
from rlhf.actors.modeling import ValueModel, load_causal_lm, prompt_lengths, sequence_logprobs
from rlhf.actors.learner_weights import WeightExport, _full_shape
from rlhf.actors.threads import torch_threads
from rlhf.actors.weights import WeightGroup
from rlhf.orchestrator.experience import Experience, SequenceBatch, dialogue_batch
from rlhf.orchestrator.rl import aggregate_loss, masked_mean, policy_loss, value_loss


@dataclass(frozen=True)
class LearnerArgs:
    """What one learner rank needs (built from the config by the driver)."""

    model_path: str  # HF folder: the initial policy (the critic is initialised from it too)
    dtype: str = "float32"  # parameter dtype: "float32" | "bfloat16" (bf16 enables DeepSpeed bf16)
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0/1/2/3
    lr: float = 1e-6  # AdamW peak learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay (not on biases and norm weights)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global grad norm; None turns clipping off
    warmup_steps: int = 0  # linear warmup over this many optimizer steps, then constant
    micro_batch_size: int = 4  # sequences per forward/backward on this rank
    seed: int = 0
    temperature: float = 1.0  # sampling temperature: log-probs are of softmax(logits / T)
    backend: str = "gloo"  # torch.distributed backend among learner ranks: "gloo" | "nccl"
    offload: bool = False  # ZeRO-Offload: optimizer state (and ZeRO-3 params) on CPU
    gradient_checkpointing: bool = False
    num_threads: int = 1  # torch intra-op threads per rank in forwards (many ranks share few CPU cores)
    train_threads: int | None = None  # torch threads while training (None: num_threads)
    logprob_chunk_size: int = 1024  # rows per block in the token log-prob kernel
    packing: bool = False  # pack each micro-batch's sequences into one row (rlhf.actors.modeling)
    lora: LoraArgs | None = None  # train LoRA adapters only (rlhf.actors.lora); None = every weight
    reference_path: str | None = None  # policy only: also hold this frozen model (reference_logprobs)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on biases and norm weights (1-D tensors). Under
    ZeRO-3 every partitioned parameter is 1-D locally, so its full shape decides."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [{"params": [p for p in params if len(_full_shape(p)) >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if len(_full_shape(p)) < 2], "weight_decay": 0.0}]


def _seq_to(batch: SequenceBatch, device: torch.device) -> SequenceBatch:
    return SequenceBatch(batch.input_ids.to(device), batch.attention_mask.to(device), batch.action_mask.to(device))


def _exp_to(exp: Experience, device: torch.device) -> Experience:
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return Experience(_seq_to(exp.sequences, device), move(exp.old_logp), move(exp.ref_logp),
                      move(exp.advantages), move(exp.returns), move(exp.old_values))


class LearnerRank(WeightExport):
    """One data-parallel DeepSpeed rank. Subclasses build the module and the loss."""

    def __init__(self, args: LearnerArgs) -> None:
        if args.backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {args.backend!r}")
        if args.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {args.zero_stage}")
        self.args = args
        self.rank, self.world_size = 0, 1
        self.engine = None
        self._weight_groups: dict[tuple, WeightGroup] = {}
        torch.set_num_threads(args.num_threads)
        torch.manual_seed(args.seed)

    # ---- set-up -----------------------------------------------------------------------
    def master_address(self) -> tuple[str, int]:
        """(node IP, free port) for the learners' rendezvous; ask rank 0 only."""
        return deepspeed_rank.master_address()

    def init_process_group(self, host: str, port: int, rank: int, world_size: int) -> None:
        """Joins the learners' process group and builds the DeepSpeed engine (all ranks)."""
        deepspeed_rank.join_process_group(host, port, rank, world_size, self.args.backend)
        self.rank, self.world_size = rank, world_size
        self._build_engine()

    def _build_engine(self) -> None:
        """Loads the module, partitions it while loading under ZeRO-3 (a 70B model fits no
        single GPU) and builds the engine; needs the process group (every rank calls)."""
        import deepspeed

        module = self._build_module()
        if self.args.gradient_checkpointing:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        config = self._ds_config()
        deepspeed_rank.partition_while_loading(module, config)
        self.engine, *_ = deepspeed.initialize(
            model=module, model_parameters=param_groups(module, self.args.weight_decay),
            config=config, lr_scheduler=self._scheduler)
        self.device = self.engine.device
        self._after_initialize()

    def _ds_config(self) -> dict:
        a = self.args
        # We own the accumulation boundary: backward() per micro-batch only accumulates,
        # step() reduces (stage 0/1) or finalises (stage 2/3) and updates.
        return ds_config(zero_stage=a.zero_stage, micro_batch_size=a.micro_batch_size, dtype=a.dtype,
                         adamw=AdamW(lr=a.lr, betas=a.adam_betas, eps=a.adam_eps, weight_decay=a.weight_decay),
                         grad_clip=a.grad_clip, offload=a.offload, own_accumulation=True)

    def _scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        """Linear warmup over warmup_steps optimizer steps, then constant."""
        warmup = self.args.warmup_steps
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0)

    def _build_module(self) -> nn.Module:
        raise NotImplementedError

    def _after_initialize(self) -> None:
        pass

    def _named_weights(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) in the names a checkpoint/inference engine expects."""
        raise NotImplementedError

    # ---- shared training helpers --------------------------------------------------------
    def _micro_slices(self, n: int, epochs: int = 1) -> list[slice]:
        """Micro-batch slices of a rank's rows; checks every rank makes the same number of
        passes (a mismatch would otherwise hang in a collective)."""
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        return equal_micro_slices(n, self.args.micro_batch_size, self.world_size, self.device, f"rank {self.rank}")

    def _step(self) -> tuple[float, float]:
        """Optimizer step; returns (lr used, global grad norm before clipping)."""
        lr = float(self.engine.get_lr()[0])
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return lr, float("nan") if norm is None else float(norm)

    def train_steps(self, kwargs: list[dict], *shards: Experience) -> list[dict[str, float]]:
        """`train_step(shard, **kw)` for each pair, in order: every mini-batch of a PPO step in
        one actor call (one round trip instead of one per mini-batch)."""
        if len(kwargs) != len(shards):
            raise ValueError(f"train_steps: {len(kwargs)} keyword sets for {len(shards)} shards")
        return [self.train_step(shard, **kw) for shard, kw in zip(shards, kwargs)]

    def _train(self, shard: Experience, epochs: int, micro_loss) -> dict[str, float]:
        """`epochs` optimizer steps on this rank's shard. `micro_loss(mb, n_micro)` returns the
        micro-batch's loss part and token-weighted stat sums; the loop backpropagates, guards
        and steps. Returns summed stats plus loss, tokens, grad_norm, lr, skips, micro_batches."""
        with torch_threads(self.args.train_threads):
            return self._train_epochs(shard, epochs, micro_loss)

    def _train_epochs(self, shard: Experience, epochs: int, micro_loss) -> dict[str, float]:
        self.engine.train()
        slices = self._micro_slices(len(shard), epochs)
        acc: dict[str, float] = defaultdict(float)
        for _ in range(epochs):
            finite = True
            for sl in slices:
                mb = _exp_to(shard.select(sl).trimmed(), self.device)
                loss, parts = micro_loss(mb, len(slices))
                if self._inject_nonfinite > 0:  # fault injection (tests): poison this update's loss
                    loss = loss * float("nan")
                finite &= bool(torch.isfinite(loss))
                # x world size: DeepSpeed averages gradients over ranks; we want their sum.
                self.engine.backward(loss * self.world_size)
                acc["loss"] += float(loss.detach()) * self.world_size
                acc["tokens"] += float(mb.sequences.action_mask.sum())
                for key, value in parts.items():
                    acc[key] += value
            self._inject_nonfinite = max(0, self._inject_nonfinite - 1)
            applied, acc["lr"], grad_norm = self._guarded_step(finite)
            acc["grad_norm"] += grad_norm if applied else 0.0
            acc["skips"] += 0.0 if applied else 1.0
        acc["micro_batches"] = len(slices)
        return acc

    def _guarded_step(self, local_finite: bool) -> tuple[bool, float, float]:
        """Optimizer step unless any rank saw a non-finite loss or gradient: then EVERY rank
        drops this update together (a rank stepping alone would desynchronise the replicas).

        Returns (applied, lr, grad norm). ZeRO 1-3 already skip (and clear) a step whose global
        gradient norm is not finite; stage 0 does not, so its local gradients are checked here
        and cleared by hand. The all-reduce makes the decision identical on every rank."""
        if self.args.zero_stage == 0 and local_finite:
            local_finite = all(bool(torch.isfinite(p.grad).all()) for p in self.engine.module.parameters()
                               if p.grad is not None)
        bad = torch.tensor([0.0 if local_finite else 1.0], device=self.device)
        if self.world_size > 1:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        lr = float(self.engine.get_lr()[0])
        if bad.item() and self.args.zero_stage == 0:
            self.engine.zero_grad()  # nothing was reduced yet: stage 0 reduces inside step()
            return False, lr, float("nan")
        _, grad_norm = self._step()  # ZeRO >= 1: non-finite gradients make DeepSpeed skip
        applied = bool(getattr(self.engine, "_step_applied", True)) and not bad.item()
        return applied, lr, grad_norm

    def optimizer_state_numel(self) -> int:
        """Elements in this rank's optimizer state (Adam's two moments; under ZeRO its
        partition). With LoRA only the adapters (and a value head) have any."""
        inner = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        return sum(t.numel() for state in inner.state.values() for t in state.values()
                   if torch.is_tensor(t) and t.dim() > 0)

    def inject_nonfinite(self, updates: int = 1) -> None:
        """Fault injection for tests: this rank's next `updates` optimizer steps see a NaN loss."""
        self._inject_nonfinite = updates

    _inject_nonfinite: int = 0

    # ---- checkpoints (all ranks call; `path` must be reachable from every rank) ----------
    def save_checkpoint(self, path: str) -> None:
        """DeepSpeed states (module, optimizer partitions, LR scheduler) and this rank's RNG.
        With LoRA the frozen base is left out: it is the model folder, reloaded at start."""
        lora = self.args.lora is not None
        with frozen_left_out(self.engine.module) if lora else contextlib.nullcontext():
            self.engine.save_checkpoint(path, tag="deepspeed", save_latest=False, exclude_frozen_parameters=lora)
        torch.save(self._rng_state(), os.path.join(path, f"rng_rank{self.rank}.pt"))
        if self.world_size > 1:
            torch.distributed.barrier()

    def load_checkpoint(self, path: str) -> None:
        load_path, _ = self.engine.load_checkpoint(path, tag="deepspeed", load_optimizer_states=True,
                                                   load_lr_scheduler_states=True,
                                                   load_module_strict=self.args.lora is None)
        if load_path is None:
            raise FileNotFoundError(f"{self.__class__.__name__} rank {self.rank}: no DeepSpeed checkpoint in {path}")
        self._set_rng_state(torch.load(os.path.join(path, f"rng_rank{self.rank}.pt"), weights_only=False))

    def _rng_state(self) -> dict:
        return {"torch": torch.get_rng_state()}

    def _set_rng_state(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])

    @torch.no_grad()
    def _forward_tokens(self, batch: SequenceBatch) -> Tensor:
        """The engine's per-token output (log-probs or values) on this rank's slice, in
        micro-batches: [B, T] -> [B, T-1] float32 on CPU, 0 outside action_mask."""
        self.engine.eval()
        out = torch.zeros(batch.action_mask.shape, dtype=torch.float32)
        with torch_threads(self.args.num_threads):
            for sl in self._micro_slices(len(batch)):
                mb = _seq_to(batch.select(sl).trimmed(), self.device)
                per_token = self._token_forward(mb)
                out[sl, : per_token.shape[1]] = per_token.float().cpu()
        return torch.where(batch.action_mask.bool(), out, torch.zeros_like(out))

    def _token_forward(self, mb: SequenceBatch) -> Tensor:
        return self.engine(mb.input_ids, mb.attention_mask, prompt_lengths(mb))


class _PolicyLogprobs(nn.Module):
    """The policy engine's module: forward returns token log-probs, not logits.

    Log-probs come from the last hidden state and the output embedding (no [B, T, V]
    logits), so the output embedding is used outside its own module; under ZeRO-3 it is
    registered as an external parameter of this module so DeepSpeed gathers it here.
    """

    def __init__(self, model: nn.Module, temperature: float, chunk_size: int) -> None:
        super().__init__()
        self.model, self.temperature, self.chunk_size = model, temperature, chunk_size

    def forward(self, input_ids: Tensor, attention_mask: Tensor, with_entropy: bool = False,
                positions: Tensor | None = None):
        batch = SequenceBatch(input_ids, attention_mask, attention_mask[:, 1:])
        return sequence_logprobs(self.model, batch, self.temperature, self.chunk_size, with_entropy,
                                 positions=positions)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.model.gradient_checkpointing_enable(**kwargs)


class PolicyLearner(LearnerRank):
    """PPO actor: old log-probs, the clipped-surrogate update, weight export; with
    `args.reference_path`, the frozen reference's log-probs too (reference.colocate)."""

    def __init__(self, args: LearnerArgs) -> None:
        super().__init__(args)
        self.reference = None
        if args.reference_path:  # loads now, while the other actors start
            from rlhf.actors.reference import ReferenceModel

            self.reference = ReferenceModel(args.reference_path, args.dtype, args.micro_batch_size,
                                            num_threads=args.num_threads, chunk_size=args.logprob_chunk_size,
                                            packing=args.packing)

    def reference_logprobs(self, batch: SequenceBatch, temperature: float = 1.0) -> Tensor:
        """The reference's log-probs of this rank's slice, as ReferenceModel.compute_logprobs."""
        if self.reference is None:
            raise RuntimeError("this policy rank holds no reference (LearnerArgs.reference_path is None)")
        return self.reference.compute_logprobs(batch, temperature)  # at the process's num_threads

    def _build_module(self) -> nn.Module:
        self.model = load_causal_lm(self.args.model_path, self.args.dtype, packing=self.args.packing)
        if self.args.lora is not None:
            apply_lora(self.model, self.args.lora)
        return _PolicyLogprobs(self.model, self.args.temperature, self.args.logprob_chunk_size)

    def _after_initialize(self) -> None:
        if self.args.zero_stage == 3:
            deepspeed_rank.register_output_head(self.engine.module, self.model)

    def _named_weights(self) -> list[tuple[str, nn.Parameter]]:
        # named_parameters() already lists a tied LM head once (as the input embedding);
        # the explicit skip keeps vLLM's loader from seeing a duplicate if that changes.
        tied = bool(getattr(self.model.config, "tie_word_embeddings", False))
        return [(n, p) for n, p in self.model.named_parameters() if not (tied and n == "lm_head.weight")]

    def compute_logprobs(self, batch: SequenceBatch) -> Tensor:
        """This rank's slice [B, T] -> log-probs [B, T-1] float32 on CPU, 0 outside action_mask."""
        return self._forward_tokens(batch)

    def _token_forward(self, mb: SequenceBatch) -> Tensor:
        return self.engine(mb.input_ids, mb.attention_mask, positions=mb.action_mask)  # the head on replies only

    def train_step(self, shard: Experience, clip_eps: float, dual_clip: float | None, entropy_coef: float,
                   loss_agg: str, num_tokens: int, num_seqs: int, epochs: int = 1,
                   measure_gap: bool = False) -> dict[str, float]:
        """PPO update on this rank's shard of one mini-batch: `epochs` optimizer steps.

        num_tokens / num_seqs: GLOBAL counts of the mini-batch over all ranks. Returns means
        over epochs; policy/loss is this rank's share x world size, so the mean over ranks is
        the mini-batch loss; clipfrac/approx_kl/entropy are this rank's token means.
        `measure_gap`: also return policy/old_logprob_gap, the mean |log-prob - shard.old_logp|
        per token of the first micro-batch, computed before this call's first optimizer step
        (the guard of ppo.old_logprobs=sampler: ~0 when old_logp came from these weights).
        """
        gap: list[float] = []

        def micro_loss(mb: Experience, n_micro: int) -> tuple[Tensor, dict[str, float]]:
            mask = mb.sequences.action_mask
            logp, entropy = self.engine(mb.sequences.input_ids, mb.sequences.attention_mask, with_entropy=True,
                                        positions=mask)
            if measure_gap and not gap:
                gap.append(float(masked_mean((logp.detach() - mb.old_logp).abs(), mask)))
            loss, stats = policy_loss(logp, mb.old_logp, mb.advantages, mask, clip_eps, dual_clip,
                                      loss_agg, num_tokens, num_seqs)
            if entropy_coef:
                loss = loss - entropy_coef * aggregate_loss(entropy, mask, loss_agg, num_tokens, num_seqs)
            parts = {}
            if self._ptx_coef:
                ptx = self._ptx_nll() / n_micro
                loss = loss + self._ptx_coef * ptx
                parts["ptx_loss"] = float(ptx.detach()) * n_micro
            n_tok = float(mask.sum())
            parts.update(clipfrac=float(stats.clipfrac) * n_tok, approx_kl=float(stats.approx_kl) * n_tok,
                         entropy=float(masked_mean(entropy.detach(), mask)) * n_tok)
            return loss, parts

        acc = self._train(shard, epochs, micro_loss)
        tokens = max(acc["tokens"], 1.0)
        stats = {"policy/loss": acc["loss"] / epochs, "policy/clipfrac": acc["clipfrac"] / tokens,
                 "policy/approx_kl": acc["approx_kl"] / tokens, "policy/entropy": acc["entropy"] / tokens,
                 "policy/grad_norm": acc["grad_norm"] / epochs, "policy/lr": acc["lr"],
                 "policy/nonfinite_skips": acc["skips"]}
        if self._ptx_coef:
            stats["policy/ptx_loss"] = acc["ptx_loss"] / (epochs * acc["micro_batches"])
        if gap:
            stats["policy/old_logprob_gap"] = gap[0]
        return stats

    # ---- PPO-ptx (InstructGPT): the SFT log-likelihood mixed into the policy loss ---------
    _ptx_coef: float = 0.0

    def set_ptx_data(self, rows: list[tuple[list[int], list[int]]], coef: float, pad_id: int) -> None:
        """Demonstrations (token ids, assistant mask) whose NLL is added to every micro-batch's
        loss with weight `coef`. Each rank draws its own micro-batches (seeded by rank)."""
        import random

        self._ptx_rows, self._ptx_coef, self._ptx_pad = list(rows), float(coef), pad_id
        self._ptx_rng = random.Random(self.args.seed * 1000 + self.rank)

    def _rng_state(self) -> dict:
        state = super()._rng_state()
        if self._ptx_coef:
            state["ptx"] = self._ptx_rng.getstate()
        return state

    def _set_rng_state(self, state: dict) -> None:
        super()._set_rng_state(state)
        if "ptx" in state and self._ptx_coef:
            self._ptx_rng.setstate(state["ptx"])

    def _ptx_nll(self) -> Tensor:
        """Mean NLL of the assistant tokens of one random micro-batch of demonstrations.

        Departs from exact token-mean aggregation on purpose: the ptx term is a regulariser,
        averaged per micro-batch (and over ranks by DeepSpeed), not a sum over a global batch.
        """
        rows = self._ptx_rng.sample(self._ptx_rows, min(self.args.micro_batch_size, len(self._ptx_rows)))
        batch = _seq_to(dialogue_batch(rows, self._ptx_pad).trimmed(), self.device)
        logp = self.engine(batch.input_ids, batch.attention_mask)
        return -masked_mean(logp, batch.action_mask) / self.world_size  # undone by the x world size below

    def _save(self, path: str, state: dict[str, Tensor]) -> None:
        from transformers import AutoTokenizer

        self.model.save_pretrained(path, state_dict=state)
        AutoTokenizer.from_pretrained(self.args.model_path).save_pretrained(path)


class CriticLearner(LearnerRank):
    """PPO critic: values of every state, the (clipped) value-loss update."""

    def _build_module(self) -> nn.Module:
        self.model = ValueModel.from_pretrained(self.args.model_path, self.args.dtype, packing=self.args.packing)
        if self.args.lora is not None:
            apply_lora(self.model, self.args.lora, trainable=("value_head",))
        return self.model

    def _named_weights(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.model.named_parameters())

    def compute_values(self, batch: SequenceBatch) -> Tensor:
        """This rank's slice [B, T] -> values [B, T-1] float32 on CPU, 0 outside action_mask."""
        return self._forward_tokens(batch)

    def train_step(self, shard: Experience, value_clip: float | None, loss_agg: str,
                   num_tokens: int, num_seqs: int, epochs: int = 1) -> dict[str, float]:
        """Value-loss update on this rank's shard; same conventions as PolicyLearner.train_step."""
        if value_clip is not None and shard.old_values is None:
            raise ValueError("value_clip needs shard.old_values (the critic's rollout-time values)")

        def micro_loss(mb: Experience, n_micro: int) -> tuple[Tensor, dict[str, float]]:
            mask = mb.sequences.action_mask
            values = self.engine(mb.sequences.input_ids, mb.sequences.attention_mask,
                                 prompt_lengths(mb.sequences))
            loss, stats = value_loss(values, mb.old_values, mb.returns, mask, value_clip,
                                     loss_agg, num_tokens, num_seqs)
            n_tok = float(mask.sum())
            return loss, {"clipfrac": float(stats.clipfrac) * n_tok,
                          "values": float(masked_mean(values.detach(), mask)) * n_tok}

        acc = self._train(shard, epochs, micro_loss)
        tokens = max(acc["tokens"], 1.0)
        return {"critic/loss": acc["loss"] / epochs, "critic/clipfrac": acc["clipfrac"] / tokens,
                "critic/values_mean": acc["values"] / tokens, "critic/grad_norm": acc["grad_norm"] / epochs,
                "critic/lr": acc["lr"], "critic/nonfinite_skips": acc["skips"]}

    def _save(self, path: str, state: dict[str, Tensor]) -> None:
        self.model.save_pretrained(path, state_dict=state)
