"""Driver-side group of rollout engines: load-aware dispatch and group-wide weight sync.

`RolloutGroup` holds Ray actor handles of `rlhf.actors.rollout.RolloutEngine` (or anything
with the same methods). It never moves weights itself: buckets go engine <- object store
(refs) or engine <- learner rank 0 (broadcast); the driver only passes refs and metas.

Run on one CPU machine or a cluster alike:

    group = RolloutGroup([engine_a, engine_b])
    samples = group.generate(prompt_ids, n=4, temperature=1.0, max_new_tokens=64, seed=step * 10**6)
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

import ray
from ray.actor import ActorHandle

from rlhf.orchestrator.errors import RemoteCallFailed, RemoteCallTimeout
from rlhf.orchestrator.experience import Samples


class RolloutGroup:
    def __init__(self, engines: list[ActorHandle], tensor_parallel_size: int = 1, timeout_s: float = 600.0,
                 max_in_flight_per_engine: int = 2) -> None:
        """`timeout_s` bounds every wait on an engine; `max_in_flight_per_engine` chunks are
        queued per engine at most (2: the next chunk is already there when one finishes)."""
        if not engines:
            raise ValueError("a rollout group needs at least one engine")
        self.engines = list(engines)
        self.tensor_parallel_size = tensor_parallel_size
        self.timeout_s = timeout_s
        self.max_in_flight = max(1, max_in_flight_per_engine)
        self.last_chunks_per_engine: list[int] = []  # chunks each engine served in the last generate
        self.restarts = 0  # engine restarts survived so far (metric ray/actor_restarts)
        self.last_reissued = 0
        self.chunks_done = 0
        self._incarnation = [0] * len(self.engines)
        # Called with the engine index after a restart, before its chunks are re-issued; the
        # launcher sets it to the weight sync, since a restarted engine holds initial weights.
        self.on_engine_restart: Callable[[int], None] | None = None

    def __len__(self) -> int:
        return len(self.engines)

    @property
    def num_workers(self) -> int:
        """vLLM workers in all engines: the receivers of a weight broadcast."""
        return len(self.engines) * self.tensor_parallel_size

    def shutdown(self) -> None:
        """Stops every engine's processes (best effort, bounded) and the actors."""
        ray.wait([e.shutdown.remote() for e in self.engines], num_returns=len(self.engines), timeout=60)
        for engine in self.engines:
            ray.kill(engine)

    def generate(self, prompt_ids: list[list[int]], n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 max_new_tokens: int = 128, seed: int | None = None, chunk_size: int = 16) -> Samples:
        """`n` samples per prompt from all engines; returned in prompt order (n consecutive).

        Prompts are cut into chunks of `chunk_size`; each engine holds at most
        `max_in_flight_per_engine` chunks, and whichever engine finishes first gets the
        next one (`ray.wait`), so a slow or busy engine simply serves fewer chunks.
        Seeds follow the global prompt index (see RolloutEngine.generate), so the samples
        do not depend on which engine served a chunk. An engine that dies is restarted by
        Ray (its actor's max_restarts), re-synced, and its unfinished chunks re-issued: the
        batch comes back whole, nothing lost or duplicated (`restarts` counts them).
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        chunks = [list(range(s, min(s + chunk_size, len(prompt_ids)))) for s in range(0, len(prompt_ids), chunk_size)]
        todo = deque(range(len(chunks)))
        results: dict[int, Samples] = {}
        in_flight: dict[ray.ObjectRef, tuple[int, int, int]] = {}  # ref -> (engine, chunk, incarnation)
        served = [0] * len(self.engines)  # chunks per engine, kept for metrics and tests
        self.last_reissued = 0  # chunks re-issued after an engine died (metric rollout/reissued_chunks)
        self.chunks_done = 0  # progress of this call, readable from another thread

        def submit(engine: int) -> None:
            chunk = todo.popleft()
            index = chunks[chunk]
            ref = self.engines[engine].generate.remote([prompt_ids[i] for i in index], index, n, temperature,
                                                       top_p, max_new_tokens, seed)
            in_flight[ref] = (engine, chunk, self._incarnation[engine])
            served[engine] += 1

        # Fill round-robin up to the in-flight bound, then refill whichever engine frees up.
        for _ in range(self.max_in_flight):
            for engine in range(len(self.engines)):
                if todo:
                    submit(engine)
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=self.timeout_s)
            if not ready:
                late = sorted({e for e, _, _ in in_flight.values()})
                raise RemoteCallTimeout(f"rollout engines {late}: generate did not return a chunk in {self.timeout_s}s")
            engine, chunk, incarnation = in_flight.pop(ready[0])
            try:
                results[chunk] = self._get(ready[0], engine, "generate", raise_actor_death=True)
                self.chunks_done += 1
            except ray.exceptions.RayActorError as err:
                if incarnation == self._incarnation[engine]:  # first news of this death
                    self._recover(engine, err)
                todo.appendleft(chunk)  # re-issued whole: its samples were never returned
                self.last_reissued += 1
                served[engine] -= 1
            if todo and sum(1 for e, _, _ in in_flight.values() if e == engine) < self.max_in_flight:
                submit(engine)
        self.last_chunks_per_engine = served
        return Samples.concat([results[c] for c in range(len(chunks))])

    def _recover(self, engine: int, err: Exception) -> None:
        """Waits for Ray to restart a dead engine (a fresh vLLM with the initial weights),
        then lets `on_engine_restart` (the weight sync) bring it to the current policy."""
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                ray.get(self.engines[engine].__ray_ready__.remote(), timeout=max(1.0, deadline - time.monotonic()))
                break
            except ray.exceptions.GetTimeoutError:
                raise RemoteCallTimeout(f"rollout engine {engine}: died ({first}) and was not restarted "
                                        f"within {self.timeout_s}s") from None
            except ray.exceptions.ActorUnavailableError:
                # Restarting (or its node is unreachable for now): ask again until the deadline.
                if time.monotonic() > deadline:
                    raise RemoteCallTimeout(f"rollout engine {engine}: died ({first}) and was not restarted "
                                            f"within {self.timeout_s}s") from None
                time.sleep(1.0)
            except ray.exceptions.RayActorError:
                raise RemoteCallFailed(f"rollout engine {engine}: died ({first}) and could not be restarted "
                                       "(restarts used up, or no capacity left to place it)") from None
        self._incarnation[engine] += 1
        self.restarts += 1
        if self.on_engine_restart is not None:
            self.on_engine_restart(engine)

    # ---- weight sync -------------------------------------------------------------------
    def load_weight_buckets(self, bucket_refs: list[ray.ObjectRef]) -> list[int]:
        """Object-store route: every engine fetches and loads the same `ray.put` buckets."""
        return self.wait(self.load_weight_buckets_refs(bucket_refs), "load_weight_buckets")

    def load_weight_buckets_refs(self, bucket_refs: list[ray.ObjectRef] | ray.ObjectRef) -> list[ray.ObjectRef]:
        """The engines' load calls as refs. `bucket_refs` may be a ref to the list (the policy's
        export call): Ray hands it to the engines once the export returns, no driver round trip."""
        arg = bucket_refs if isinstance(bucket_refs, ray.ObjectRef) else list(bucket_refs)
        return [e.load_weight_buckets.remote(arg) for e in self.engines]

    def load_ipc_handles(self, handles: dict[str, bytes]) -> list[int]:
        """cuda_ipc route: each engine worker loads the weights shared on its own GPU."""
        return self.wait([e.load_ipc_handles.remote(handles) for e in self.engines], "load_ipc_handles")

    def init_weight_group_refs(self, host: str, port: int, world_size: int, backend: str = "gloo") -> list[ray.ObjectRef]:
        """Engine e's TP workers join as ranks 1 + e * tp ... ; the sender must join as rank 0.

        Returns refs: the calls block until rank 0 joins, so start the sender, then `wait`.
        """
        expected = 1 + len(self.engines) * self.tensor_parallel_size
        if world_size != expected:
            raise ValueError(f"world_size {world_size} != 1 sender + {len(self.engines)} engines x "
                             f"{self.tensor_parallel_size} TP workers = {expected}")
        return [e.init_weight_group.remote(host, port, 1 + i * self.tensor_parallel_size, world_size, backend)
                for i, e in enumerate(self.engines)]

    def init_weight_group(self, host: str, port: int, world_size: int, backend: str = "gloo") -> list[list[int]]:
        """Blocking form of `init_weight_group_refs`: rank 0 must already be joining elsewhere."""
        return self.wait(self.init_weight_group_refs(host, port, world_size, backend), "init_weight_group")

    def receive_weights_refs(self, metas: list[dict]) -> list[ray.ObjectRef]:
        """Starts every engine's receive of `metas` buckets; the sender then broadcasts them
        in the same order, and the driver waits on both (`wait` for these refs)."""
        return [e.receive_weights.remote(metas) for e in self.engines]

    def weights_checksums(self) -> list[dict[str, float]]:
        return self.wait([e.weights_checksum.remote() for e in self.engines], "weights_checksum")

    def wait(self, refs: list[ray.ObjectRef], phase: str) -> list[Any]:
        """Results of one ref per engine (in engine order); a timeout or failure names the engine."""
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=self.timeout_s)
        if pending:
            late = [i for i, r in enumerate(refs) if r in set(pending)]
            raise RemoteCallTimeout(f"rollout engines {late}: {phase} did not finish in {self.timeout_s}s")
        return [self._get(r, i, phase) for i, r in enumerate(refs)]

    def _get(self, ref: ray.ObjectRef, engine: int, phase: str, raise_actor_death: bool = False) -> Any:
        try:
            return ray.get(ref, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError as err:
            raise RemoteCallTimeout(f"rollout engine {engine}: {phase} did not finish in {self.timeout_s}s") from err
        except ray.exceptions.RayActorError:
            if raise_actor_death:
                raise
            raise RemoteCallFailed(f"rollout engine {engine}: {phase} failed: the engine's actor died") from None
        except ray.exceptions.RayError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RemoteCallFailed(f"rollout engine {engine}: {phase} failed: {first}") from err
