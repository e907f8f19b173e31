"""cuda_ipc weight sync: learner and engine share one GPU (the colocated "hybrid engine").

Every policy rank gathers its full weights on its GPU and hands out CUDA IPC handles to
them (`torch.multiprocessing.reductions.reduce_tensor`), keyed by the GPU's UUID; each
engine worker maps the memory of the rank on its own GPU and loads from it, so no weight
bytes cross host memory or a socket. The whole model goes in one update session: vLLM's
layer-wise reload must see all parts of a fused layer (qkv, gate/up) before it repacks.
The learners keep the buffers alive until every engine has loaded them.
GPU-only: importing this module needs no GPU; running it does.
"""
from __future__ import annotations

import time

from rlhf.orchestrator.groups import wait_all
from rlhf.orchestrator.weight_sync import SyncStats, WeightSync


class CudaIpcSync(WeightSync):
    def sync(self) -> SyncStats:
        start = time.perf_counter()
        per_rank = wait_all(self.policy.call_all("ipc_weight_handles"), self.timeout_s,
                            "policy ipc_weight_handles (cuda_ipc sync)")
        handles = {uuid: data for rank_handles in per_rank for uuid, data in rank_handles.items()}
        self.rollout.load_ipc_handles(handles)
        wait_all(self.policy.call_all("release_ipc_buffers"), self.timeout_s, "policy release_ipc_buffers")
        return SyncStats(time.perf_counter() - start, self._bytes(), 1)
