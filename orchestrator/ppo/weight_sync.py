"""Policy learner -> rollout engines weight sync, one interface, several backends.

- object_store: policy rank 0 `ray.put`s each bucket (safetensors bytes); engines fetch the
  buckets straight from the object store. The driver passes only ObjectRefs, never weights.
- gloo / nccl: a process group of policy rank 0 plus every vLLM worker; per bucket, the
  engines start receiving and rank 0 broadcasts a flat buffer (gloo is how this collective
  path is tested on CPU; nccl is the GPU route).
- cuda_ipc: learner and engine on the same GPU hand over CUDA IPC handles (colocated).
Every backend is bucketed (one call or collective per bucket, `sync.bucket_mb`), and all
policy ranks take part so ZeRO-3 shards are gathered before sending.
"""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from rlhf.orchestrator.ppo.groups import LearnerGroup, wait_all


@dataclass
class SyncStats:
    seconds: float
    bytes: int
    buckets: int


class WeightSync:
    """Base: `sync()` pushes the policy's current weights into every engine."""

    def __init__(self, policy: LearnerGroup, rollout, bucket_bytes: int, timeout_s: float) -> None:
        self.policy, self.rollout, self.bucket_bytes, self.timeout_s = policy, rollout, bucket_bytes, timeout_s
        self._nbytes: int | None = None

    def sync(self) -> SyncStats:
        raise NotImplementedError

    def start(self):
        """Queues the sync behind the calls the policy ranks already hold (an actor runs its
        calls in order), so it begins the moment they end, without a driver round trip in
        between; `finish(handle)` waits for it. The engines must have nothing to generate
        before it (rollout.overlap keeps the plain `sync()`). Backends that cannot queue
        start nothing here, and `finish` runs the whole sync."""
        return None

    def finish(self, handle) -> SyncStats:
        """Waits for a started sync; with `handle` None (or nothing started), syncs now."""
        return self.sync()

    def resync(self, engine: int) -> SyncStats:
        """After engine `engine` was restarted (it holds the initial weights): bring every
        engine to the policy's current weights again. Restarts are rare, so the plain full
        sync is used; the learners are idle while the engines generate."""
        return self.sync()

    def _bytes(self) -> int:
        """Bytes of weights one sync sends (asked once: the layout does not change)."""
        if self._nbytes is None:
            metas = wait_all(self.policy.ranks[0].weight_bucket_metas.remote(self.bucket_bytes), self.timeout_s,
                             "policy weight_bucket_metas")
            self._nbytes = sum(m["total_bytes"] for m in metas)
        return self._nbytes


class ObjectStoreSync(WeightSync):
    def sync(self) -> SyncStats:
        return self.finish(None)

    def start(self) -> tuple[float, list, list]:
        exports = self.policy.call_all("export_weight_buckets", self.bucket_bytes)
        # Rank 0 holds the gathered weights (other ranks return []). Its call's ref goes to the
        # engines at once: each fetches the buckets itself once the export is done.
        return time.perf_counter(), exports, self.rollout.load_weight_buckets_refs(exports[0])

    def finish(self, handle: tuple[float, list, list] | None) -> SyncStats:
        """`seconds` counts from `start` (behind a training call, the training's tail too);
        `handle` None: the whole sync, now."""
        start, exports, loads = handle or self.start()
        per_rank = wait_all(exports, self.timeout_s, "policy export_weight_buckets (weight sync)")
        self.rollout.wait(loads, "load_weight_buckets")
        return SyncStats(time.perf_counter() - start, self._bytes(), len(per_rank[0]))


class CollectiveSync(WeightSync):
    """gloo or nccl broadcast from policy rank 0 to every vLLM worker."""

    def __init__(self, policy, rollout, bucket_bytes, timeout_s, backend: str) -> None:
        super().__init__(policy, rollout, bucket_bytes, timeout_s)
        self.backend = backend
        self._group = None  # (host, port, world_size), created on the first sync

    def resync(self, engine: int) -> SyncStats:
        # The restarted engine's workers left the weight group with their old process: form
        # a new group (new port) with every engine, then broadcast.
        self._group = None
        return self.sync()

    def sync(self) -> SyncStats:
        start = time.perf_counter()
        setup = []
        if self._group is None:
            # The group is formed lazily: rank 0 becomes its TCPStore master inside its first
            # broadcast_weights call, so the engines' joins must be in flight at the same time.
            host, _ = wait_all(self.policy.ranks[0].master_address.remote(), self.timeout_s,
                               "policy rank 0 address (weight group)")
            self._group = (host, _free_port(), 1 + self.rollout.num_workers)
            setup = self.rollout.init_weight_group_refs(*self._group, self.backend)
        metas = wait_all(self.policy.call_all("weight_bucket_metas", self.bucket_bytes), self.timeout_s,
                         "policy weight_bucket_metas (weight sync)")[0]
        # Receivers are queued first (after their join, on the same actors); they block in
        # the broadcast until rank 0 sends.
        recv = self.rollout.receive_weights_refs(metas)
        send = self.policy.call_all("broadcast_weights", *self._group, self.bucket_bytes, self.backend)
        wait_all(setup + recv + send, self.timeout_s, f"weight broadcast ({self.backend})")
        return SyncStats(time.perf_counter() - start, sum(m["total_bytes"] for m in metas), len(metas))


# cuda_ipc weight sync: learner and engine share one GPU (the colocated "hybrid engine").
#
# Every policy rank gathers its full weights on its GPU and hands out CUDA IPC handles to
# them (`torch.multiprocessing.reductions.reduce_tensor`), keyed by the GPU's UUID; each
# engine worker maps the memory of the rank on its own GPU and loads from it, so no weight
# bytes cross host memory or a socket. The whole model goes in one update session: vLLM's
# layer-wise reload must see all parts of a fused layer (qkv, gate/up) before it repacks.
# The learners keep the buffers alive until every engine has loaded them.
# GPU-only: importing this module needs no GPU; running it does.
class CudaIpcSync(WeightSync):
    def sync(self) -> SyncStats:
        start = time.perf_counter()
        per_rank = wait_all(self.policy.call_all("ipc_weight_handles"), self.timeout_s,
                            "policy ipc_weight_handles (cuda_ipc sync)")
        handles = {uuid: data for rank_handles in per_rank for uuid, data in rank_handles.items()}
        self.rollout.load_ipc_handles(handles)
        wait_all(self.policy.call_all("release_ipc_buffers"), self.timeout_s, "policy release_ipc_buffers")
        return SyncStats(time.perf_counter() - start, self._bytes(), 1)


def _free_port() -> int:
    # Probed on the driver. On a cluster rank 0 runs on another machine, where the port may
    # be taken; its TCPStore then fails loudly and the sync error names the phase.
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def make_weight_sync(backend: str, policy: LearnerGroup, rollout, bucket_mb: float, timeout_s: float) -> WeightSync:
    bucket_bytes = int(bucket_mb * 2**20)
    if backend == "object_store":
        return ObjectStoreSync(policy, rollout, bucket_bytes, timeout_s)
    if backend in ("gloo", "nccl"):
        return CollectiveSync(policy, rollout, bucket_bytes, timeout_s, backend)
    if backend == "cuda_ipc":
        return CudaIpcSync(policy, rollout, bucket_bytes, timeout_s)
    raise ValueError(f"unknown weight sync backend {backend!r}")
