"""The weight-bucket protocol shared by policy learners (senders) and rollout engines (receivers).

Weights move in buckets of about `bucket_bytes`: one remote call or one collective per
bucket, never one per tensor. Two encodings:

- bytes: a bucket serialised with safetensors. This is what crosses Ray's object store and
  vLLM's `collective_rpc` intact (vLLM turns tensors in RPC arguments into lists; raw
  bytes arrive as they were sent, see ENVIRONMENT.md).
- flat: one contiguous uint8 tensor per bucket plus a `BucketMeta` (names, shapes, dtypes,
  byte offsets) sent ahead over RPC; the flat tensor travels by a gloo/NCCL broadcast.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

NamedTensors = list[tuple[str, torch.Tensor]]


def iter_buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[NamedTensors]:
    """Groups tensors into consecutive buckets of at most `bucket_bytes` (a larger tensor alone)."""
    bucket: NamedTensors = []
    size = 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def bucket_to_bytes(bucket: NamedTensors) -> bytes:
    """Serialises a bucket (tensors moved to CPU, made contiguous) with safetensors."""
    return st_save({name: t.detach().to("cpu").contiguous() for name, t in bucket})


def bucket_from_bytes(data: bytes) -> NamedTensors:
    return list(st_load(data).items())


@dataclass(frozen=True)
class BucketMeta:
    """Layout of one flat bucket: tensor i is bytes [offsets[i], offsets[i] + nbytes_i)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]  # e.g. "float32"; strings so the meta crosses msgpack RPC
    offsets: tuple[int, ...]
    total_bytes: int

    def to_dict(self) -> dict:
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes],
                "dtypes": list(self.dtypes), "offsets": list(self.offsets), "total_bytes": self.total_bytes}

    @classmethod
    def from_dict(cls, d: dict) -> "BucketMeta":
        return cls(tuple(d["names"]), tuple(tuple(s) for s in d["shapes"]), tuple(d["dtypes"]),
                   tuple(d["offsets"]), int(d["total_bytes"]))


def flatten_bucket(bucket: NamedTensors) -> tuple[torch.Tensor, BucketMeta]:
    """Packs a bucket into one uint8 tensor (on the tensors' device) and its layout."""
    offsets, parts, offset = [], [], 0
    for _, t in bucket:
        offsets.append(offset)
        part = t.detach().contiguous().view(-1).view(torch.uint8)
        parts.append(part)
        offset += part.numel()
    flat = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
    meta = BucketMeta(tuple(n for n, _ in bucket), tuple(tuple(t.shape) for _, t in bucket),
                      tuple(str(t.dtype).removeprefix("torch.") for _, t in bucket), tuple(offsets), offset)
    return flat, meta


def unflatten_bucket(flat: torch.Tensor, meta: BucketMeta) -> NamedTensors:
    """Views into `flat` (no copy) laid out by `meta`."""
    out = []
    ends = list(meta.offsets[1:]) + [meta.total_bytes]
    for name, shape, dtype, start, end in zip(meta.names, meta.shapes, meta.dtypes, meta.offsets, ends):
        out.append((name, flat[start:end].view(getattr(torch, dtype)).view(shape)))
    return out


class WeightGroup:
    """A process group outside torch's default group: policy rank 0 (rank 0 here) plus
    every vLLM worker (ranks 1..world_size-1), used only to broadcast weight buckets.

    It is built from its own TCPStore, so it never disturbs the learners' DeepSpeed group
    or vLLM's own groups. `backend="gloo"` runs on CPU (how the collective route is tested);
    `backend="nccl"` uses vLLM's PyNccl communicator on GPUs (imported only then).
    """

    def __init__(self, host: str, port: int, rank: int, world_size: int, backend: str = "gloo",
                 timeout_s: float = 300.0, device: str | torch.device = "cpu") -> None:
        self.rank, self.world_size, self.backend = rank, world_size, backend
        if backend == "gloo":
            store = torch.distributed.TCPStore(host, port, world_size, is_master=rank == 0,
                                               timeout=timedelta(seconds=timeout_s))
            self._pg = torch.distributed.ProcessGroupGloo(store, rank, world_size, timedelta(seconds=timeout_s))
        elif backend == "nccl":
            from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
            from vllm.distributed.utils import StatelessProcessGroup

            group = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
            self._pg = PyNcclCommunicator(group, device=torch.device(device))
        else:
            raise ValueError(f"weight group backend must be gloo or nccl, got {backend!r}")

    def broadcast(self, flat: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Broadcasts `flat` from `src` in place; returns it."""
        if self.backend == "gloo":
            opts = torch.distributed.BroadcastOptions()
            opts.rootRank = src
            self._pg.broadcast([flat], opts).wait()
        else:
            self._pg.broadcast(flat, src=src, stream=torch.cuda.current_stream())
        return flat
