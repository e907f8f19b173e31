"""Reference policy: a frozen copy of the initial (SFT) policy, for the KL penalty.

A plain class; the driver wraps it with ``ray.remote(num_cpus=..., num_gpus=...)``, one
actor per rank. Two ways to hold the model (config section `reference`):

- zero_stage 0 (default): every rank holds the whole model on its device; no DeepSpeed,
  no process group. With num_ranks > 1 the ranks are independent replicas, each
  scoring its slice of the batch.
- zero_stage 3: the parameters are partitioned over num_ranks DeepSpeed ZeRO-3 inference
  ranks (no optimizer), so a reference larger than one GPU fits, e.g. a 70B bf16 model
  (141 GB) over 4 x 80 GB. `offload` keeps the partitions in CPU memory. Same collective
  protocol as the learners (rlhf.actors.learner):

      ranks = [ray.remote(ReferenceModel).options(...).remote(path, zero_stage=3) for _ in range(W)]
      host, port = ray.get(ranks[0].master_address.remote())
      ray.get([r.init_process_group.remote(host, port, i, W) for i, r in enumerate(ranks)])
      ray.get([r.compute_logprobs.remote(part, T) for r, part in zip(ranks, batch.split(W))])

  compute_logprobs is then collective: every rank calls it at once with an equal slice
  (each forward gathers every layer's parameters from all ranks).

Runs the same on one CPU machine (gloo; tests/integration/test_reference_sharded.py) and
on GPU nodes (nccl).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from rlhf.actors import deepspeed_rank
from rlhf.actors.deepspeed_rank import equal_micro_slices
from rlhf.actors.modeling import load_causal_lm, sequence_logprobs
from rlhf.orchestrator.experience import SequenceBatch


class _Logprobs(nn.Module):
    """What the ZeRO-3 engine runs: token log-probs from the last hidden state and the
    output embedding (never the [B, T, V] logits)."""

    def __init__(self, model: nn.Module, chunk_size: int) -> None:
        super().__init__()
        self.model, self.chunk_size = model, chunk_size

    def forward(self, input_ids: Tensor, attention_mask: Tensor, temperature: float) -> Tensor:
        batch = SequenceBatch(input_ids, attention_mask, attention_mask[:, 1:])
        return sequence_logprobs(self.model, batch, temperature, self.chunk_size)


class ReferenceModel:
    """Log-probs of sequences under the frozen initial policy."""

    def __init__(self, model_path: str, dtype: str = "float32", micro_batch_size: int = 8,
                 num_threads: int = 1, chunk_size: int = 1024, zero_stage: int = 0,
                 offload: bool = False, backend: str = "gloo", packing: bool = False) -> None:
        if zero_stage not in (0, 3):
            raise ValueError(f"reference zero_stage must be 0 or 3, got {zero_stage}")
        if offload and zero_stage != 3:
            raise ValueError("offload needs zero_stage 3 (only partitioned parameters are offloaded)")
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        torch.set_num_threads(num_threads)
        self.model_path, self.dtype, self.zero_stage = model_path, dtype, zero_stage
        self.offload, self.backend = offload, backend
        self.packing = packing  # pack micro-batches in forward (rlhf.actors.modeling)
        self.micro_batch_size, self.chunk_size = micro_batch_size, chunk_size
        self.rank, self.world_size, self.engine = 0, 1, None
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        if zero_stage == 0:
            self.model = load_causal_lm(model_path, dtype, packing=packing).to(self.device).eval()
            self.model.requires_grad_(False)
        # ZeRO-3 loads in init_process_group: partitioning needs the process group.

    # ---- set-up (ZeRO-3) -------------------------------------------------------------
    def master_address(self) -> tuple[str, int]:
        """(node IP, free port) for the ranks' rendezvous; ask rank 0 only."""
        return deepspeed_rank.master_address()

    def init_process_group(self, host: str, port: int, rank: int, world_size: int) -> None:
        """Joins the ranks' process group and partitions the model (all ranks; ZeRO-3 only).

        Each rank reads the whole checkpoint into CPU memory, then `zero.Init(module=...)`
        moves it to the device one parameter at a time and keeps only this rank's
        partition, so the device never holds the whole model (deepspeed.initialize alone
        would first move the whole module to the GPU). CPU memory peaks at one full copy
        per rank during the load."""
        if self.zero_stage != 3:
            self.rank, self.world_size = rank, world_size  # replicas need no group
            return
        import deepspeed

        deepspeed_rank.join_process_group(host, port, rank, world_size, self.backend)
        self.rank, self.world_size = rank, world_size
        # Inference only: no optimizer section, so DeepSpeed builds its ZeRO-3
        # parameter-offload engine (partition + gather hooks) and nothing else.
        config = deepspeed_rank.ds_config(zero_stage=3, micro_batch_size=self.micro_batch_size, dtype=self.dtype,
                                          offload=self.offload)
        model = load_causal_lm(self.model_path, self.dtype, packing=self.packing).eval()
        model.requires_grad_(False)
        deepspeed_rank.partition_while_loading(model, config)
        module = _Logprobs(model, self.chunk_size)
        self.engine, *_ = deepspeed.initialize(model=module, config=config)
        self.device = self.engine.device
        deepspeed_rank.register_output_head(module, model)

    def held_parameters(self) -> int:
        """Parameter elements this rank holds: its ZeRO-3 partition, or the whole model."""
        module = self.engine.module if self.engine is not None else self.model
        return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())

    # ---- log-probs ----------------------------------------------------------------------
    @torch.no_grad()
    def compute_logprobs(self, batch: SequenceBatch, temperature: float = 1.0) -> Tensor:
        """[B, T] -> log-probs [B, T-1] float32 on CPU of softmax(logits / temperature),
        0 outside action_mask (the learners' convention). Collective under ZeRO-3."""
        if self.zero_stage == 3 and self.engine is None:
            raise RuntimeError("ZeRO-3 reference: call init_process_group on every rank first")
        forward = self._forward_sharded if self.engine is not None else self._forward_plain
        out = torch.zeros(batch.action_mask.shape, dtype=torch.float32)
        for sl in self._micro_slices(len(batch)):
            mb = batch.select(sl).trimmed()
            ids, attn = mb.input_ids.to(self.device), mb.attention_mask.to(self.device)
            positions = mb.action_mask.to(self.device)
            out[sl, : mb.action_mask.shape[1]] = forward(ids, attn, temperature, positions).float().cpu()
        return torch.where(batch.action_mask.bool(), out, torch.zeros_like(out))

    def _forward_plain(self, ids: Tensor, attn: Tensor, temperature: float, positions: Tensor) -> Tensor:
        return sequence_logprobs(self.model, SequenceBatch(ids, attn, attn[:, 1:]), temperature, self.chunk_size,
                                 positions=positions)  # the output head on the replies' positions only

    def _forward_sharded(self, ids: Tensor, attn: Tensor, temperature: float, positions: Tensor) -> Tensor:
        return self.engine(ids, attn, temperature)  # every rank gathers the same layers: all positions

    def _micro_slices(self, n: int) -> list[slice]:
        """Micro-batch slices; under ZeRO-3 checks every rank makes the same number of
        forwards (a mismatch would otherwise hang in a parameter gather)."""
        # Replicas (no engine) run alone; only ZeRO-3 ranks meet in a collective.
        world_size = self.world_size if self.engine is not None else 1
        return equal_micro_slices(n, self.micro_batch_size, world_size, self.device, f"reference rank {self.rank}")
