"""Weight export of a DeepSpeed learner rank: full tensors out of (possibly ZeRO-3
partitioned) parameters, in buckets, for the weight-sync routes and HF checkpoints.

A mixin of `rlhf.actors.learner.LearnerRank`; it needs `self.args.zero_stage`, `self.rank`,
`self.world_size`, `self.device`, `self._weight_groups`, `self.model`, `_named_weights()` and
`_save()`. Every method that gathers parameters is collective: all ranks call it concurrently.

With LoRA (rlhf.actors.lora) every export is of merged weights in the base names; a weight
sync (`sync=True` below) sends only the adapted layers and their fused siblings, since the
frozen rest is what the engines loaded at start; checkpoints and HF folders get everything.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from rlhf.actors.lora import Adapter, export_plan, merge, sync_names
from rlhf.actors.weights import NamedTensors, WeightGroup, bucket_to_bytes, flatten_bucket, iter_buckets


def _full_shape(p: Tensor) -> tuple[int, ...]:
    """Shape of the whole parameter, also when ZeRO-3 holds only a partition of it."""
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


class WeightExport:
    @contextlib.contextmanager
    def _gathered(self, params: list[nn.Parameter]) -> Iterator[None]:
        """Full parameters on every rank inside the block (ZeRO-3); a no-op otherwise."""
        if self.args.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                yield
        else:
            yield

    def _export_plan(self, sync: bool) -> list[tuple[str, nn.Parameter, Adapter | None]]:
        """(base name, parameter, LoRA adapter or None) of every exported tensor; `sync`: only
        what a weight sync must send (everything without LoRA)."""
        plan = export_plan(self.model, self._named_weights())
        if sync:
            keep = set(sync_names(plan))
            plan = [item for item in plan if item[0] in keep]
        return plan

    def _plan_buckets(self, bucket_bytes: int, sync: bool) -> list[list[tuple[str, nn.Parameter, Adapter | None]]]:
        # Meta tensors of the full shapes let iter_buckets size buckets under ZeRO-3 too.
        plan = self._export_plan(sync)
        shells = [(n, torch.empty(_full_shape(p), dtype=p.dtype, device="meta")) for n, p, _ in plan]
        items = {n: (n, p, a) for n, p, a in plan}
        return [[items[n] for n, _ in bucket] for bucket in iter_buckets(shells, bucket_bytes)]

    def _gathered_buckets(self, bucket_bytes: int, sync: bool = False) -> Iterator[NamedTensors]:
        """Yields each bucket's full (LoRA-merged) tensors, gathered on every rank (all ranks
        iterate). `sync`: only the tensors a weight sync sends."""
        for bucket in self._plan_buckets(bucket_bytes, sync):
            adapters = [q for _, _, a in bucket if a is not None for q in (a.a, a.b)]
            with self._gathered([p for _, p, _ in bucket] + adapters):
                yield [(n, merge(p.data, a)) for n, p, a in bucket]

    def weight_bucket_metas(self, bucket_bytes: int) -> list[dict]:
        """BucketMeta.to_dict() of each bucket `broadcast_weights` sends (local; no gather)."""
        return [flatten_bucket([(n, torch.empty(_full_shape(p), dtype=p.dtype, device="meta"))
                                for n, p, _ in bucket])[1].to_dict()
                for bucket in self._plan_buckets(bucket_bytes, sync=True)]

    def export_weight_buckets(self, bucket_bytes: int) -> list:
        """Object-store route (all ranks call): rank 0 returns one ObjectRef per bucket of
        safetensors bytes (rlhf.actors.weights.bucket_from_bytes reads one); others []."""
        import ray

        refs = []
        for bucket in self._gathered_buckets(bucket_bytes, sync=True):
            if self.rank == 0:
                refs.append(ray.put(bucket_to_bytes(bucket)))
        return refs

    def broadcast_weights(self, host: str, port: int, world_size: int, bucket_bytes: int,
                          backend: str = "gloo") -> None:
        """Collective route (all ranks call): rank 0 joins the weight group as its rank 0
        (made on the first call, then reused) and broadcasts every flat bucket in
        `weight_bucket_metas` order; the receivers (ranks 1..world_size-1) must join too."""
        group = None
        if self.rank == 0:
            key = (host, port, world_size, backend)
            if key not in self._weight_groups:
                device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
                self._weight_groups[key] = WeightGroup(host, port, 0, world_size, backend, device=device)
            group = self._weight_groups[key]
        for bucket in self._gathered_buckets(bucket_bytes, sync=True):
            if group is not None:
                flat, _ = flatten_bucket(bucket)
                group.broadcast(flat, src=0)

    def ipc_weight_handles(self) -> dict[str, bytes]:
        """cuda_ipc route (all ranks call; GPU only): this rank's full weights, copied into
        buffers it keeps alive until `release_ipc_buffers`, as CUDA IPC handles keyed by this
        rank's GPU UUID. An engine worker on the same GPU maps them (colocated placement)."""
        from rlhf.actors.vllm_ext import ipc_handles_for

        if self.device.type != "cuda":
            raise RuntimeError("cuda_ipc weight sync needs the learner on a GPU")
        # One bucket holding every tensor: the engine loads the whole model in one session.
        self._ipc_buffers = [(n, t.detach().clone()) for bucket in self._gathered_buckets(1 << 62, sync=True)
                             for n, t in bucket]
        uuid = str(torch.cuda.get_device_properties(self.device).uuid)
        return {uuid: ipc_handles_for(self._ipc_buffers)}

    def release_ipc_buffers(self) -> None:
        """Frees the buffers of the last `ipc_weight_handles` (after every engine loaded them)."""
        self._ipc_buffers = []

    def full_state_dict(self, sync: bool = False) -> dict[str, Tensor]:
        """All weights on CPU at rank 0 (all ranks call; others get {}); `sync`: only those a
        weight sync sends."""
        state = {}
        for bucket in self._gathered_buckets(bucket_bytes=1 << 28, sync=sync):
            if self.rank == 0:
                state.update({n: t.detach().to("cpu", copy=True) for n, t in bucket})
        return state

    def weight_checksums(self) -> dict[str, float]:
        """Per-tensor float64 sums at rank 0 of what a sync sends (all ranks call): compare
        with a receiver's."""
        return {n: float(t.double().sum()) for n, t in self.full_state_dict(sync=True).items()}

    def save_pretrained(self, path: str) -> None:
        """Rank 0 writes an HF folder (all ranks call; ZeRO-3 parameters are gathered)."""
        state = self.full_state_dict()
        if self.rank == 0:
            self._save(path, state)
        if self.world_size > 1:
            torch.distributed.barrier()

    def _save(self, path: str, state: dict[str, Tensor]) -> None:
        raise NotImplementedError
