"""cuda_ipc weight sync: learner and engine share one GPU (the colocated "hybrid engine").

Policy rank 0 flattens each bucket into one CUDA buffer and hands the engines a CUDA IPC
handle to it (`torch.multiprocessing.reductions.reduce_tensor`); each engine's workers map
the same memory and load from it, so no bytes are copied through host memory or a socket.
The buffers stay alive on the learner until every engine has loaded the bucket.
GPU-only: importing this module needs no GPU; running it does.
"""
from __future__ import annotations

import time

from rlhf.orchestrator.groups import wait_all
from rlhf.orchestrator.weight_sync import SyncStats, WeightSync


class CudaIpcSync(WeightSync):
    def sync(self) -> SyncStats:
        start = time.perf_counter()
        nbytes = buckets = 0
        # One bucket at a time bounds the extra GPU memory to one bucket on the learner.
        for index in range(self._num_buckets()):
            per_rank = wait_all(self.policy.call_all("ipc_weight_bucket", self.bucket_bytes, index),
                                self.timeout_s, f"policy ipc_weight_bucket {index} (cuda_ipc sync)")
            meta, handle = per_rank[0]
            wait_all(self.rollout.load_ipc_refs(meta, handle), self.timeout_s, f"engines load_ipc {index}")
            nbytes, buckets = nbytes + meta["total_bytes"], buckets + 1
        wait_all(self.policy.call_all("release_ipc_buffers"), self.timeout_s, "policy release_ipc_buffers")
        return SyncStats(time.perf_counter() - start, nbytes, buckets)

    def _num_buckets(self) -> int:
        metas = wait_all(self.policy.ranks[0].weight_bucket_metas.remote(self.bucket_bytes), self.timeout_s,
                         "policy weight_bucket_metas (cuda_ipc sync)")
        return len(metas)
