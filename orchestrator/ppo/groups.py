"""Driver-side handles on groups of actors: typed methods, pre-sliced payloads, timed waits.

Methods whose names end in `_refs` return ObjectRefs so the driver can run several groups
at once and wait on them together with `wait_all`.
"""
from __future__ import annotations

import ray
import torch

from rlhf.orchestrator.errors import RemoteCallFailed, RemoteCallTimeout
from rlhf.orchestrator.experience import Experience, SequenceBatch


def wait_all(refs, timeout_s: float, what: str):
    """`ray.get` with a timeout that ends in an error naming `what` (role and phase)."""
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise RemoteCallTimeout(f"{what}: no answer within {timeout_s:.0f}s") from None
    except ray.exceptions.RayActorError as err:
        raise RemoteCallFailed(f"{what}: actor died: {str(err).splitlines()[0]}") from None
    except ray.exceptions.RayTaskError as err:
        raise RemoteCallFailed(f"{what}: {type(err.cause).__name__}: {err.cause}") from None


# Parts below this size travel inside the call itself (Ray inlines small arguments into the
# task), with no object-store round trip: a tiny model's mini-batch of experience is ~45 KB.
INLINE_BYTES = 96 * 1024  # Ray inlines arguments up to 100 KiB (max_direct_call_object_size)


def _counts(mb: "Scattered") -> dict[str, int]:
    """A mini-batch's global token and sequence counts (token-mean losses need them on every rank)."""
    return dict(num_tokens=int(mb.batch.sequences.action_mask.sum()), num_seqs=len(mb.batch))


def _nbytes(part) -> int:
    return sum(t.numel() * t.element_size() for t in vars(part).values() if isinstance(t, torch.Tensor)) + sum(
        _nbytes(v) for v in vars(part).values() if isinstance(v, SequenceBatch))


class Scattered:
    """A batch sliced once per rank count: groups with the same number of ranks share the
    same slices (reference, policy and critic often all need the whole batch, or the same
    halves). A large slice is `ray.put` once, so each byte enters the object store once per
    step; a small one (< INLINE_BYTES) goes inline with each call, and there `reads` (the
    Experience fields the receiving role reads) leaves the others out of that call's bytes."""

    def __init__(self, batch: SequenceBatch | Experience) -> None:
        self.batch = batch
        self._parts: dict[int, list] = {}

    def parts(self, n: int, reads: tuple[str, ...] | None = None) -> list:
        if n not in self._parts:
            self._parts[n] = [part if _nbytes(part) < INLINE_BYTES else ray.put(part) for part in self.batch.split(n)]
        if reads is None:
            return self._parts[n]
        return [part.keeping(*reads) if isinstance(part, Experience) else part for part in self._parts[n]]


class LearnerGroup:
    """N data-parallel DeepSpeed ranks of one role ("policy" or "critic"), or the reference.

    `aliases` renames methods: a reference held by the policy ranks (reference.colocate) is
    the policy's actors, whose `reference_logprobs` is the reference's `compute_logprobs`."""

    def __init__(self, role: str, ranks: list, timeout_s: float, aliases: dict[str, str] | None = None) -> None:
        self.role, self.ranks, self.timeout_s = role, ranks, timeout_s
        self.aliases = dict(aliases or {})

    def __len__(self) -> int:
        return len(self.ranks)

    def init_process_group(self) -> None:
        """Rank 0 publishes the rendezvous address; every rank joins the DeepSpeed group."""
        wait_all(self.init_process_group_refs(), self.timeout_s, f"{self.role} init_process_group")

    def init_process_group_refs(self) -> list:
        """The joins as ObjectRefs, so that several groups build their engines at once."""
        host, port = wait_all(self.ranks[0].master_address.remote(), self.timeout_s, f"{self.role} rank 0 address")
        return [r.init_process_group.remote(host, port, i, len(self.ranks)) for i, r in enumerate(self.ranks)]

    def forward_refs(self, method: str, batch: Scattered, **kwargs) -> list:
        """Every rank runs `method` on its equal slice (ZeRO-3 needs all ranks in forward)."""
        method = self.aliases.get(method, method)
        return [getattr(r, method).remote(part, **kwargs) for r, part in zip(self.ranks, batch.parts(len(self)))]

    def train_refs(self, minibatches: list[Scattered], **kwargs) -> list[list]:
        """Queues one optimizer step per mini-batch on every rank (actor calls run in order).

        Token-mean losses need the mini-batch's global token and sequence counts, which no
        single rank can see; they travel with the call.
        """
        return [[r.train_step.remote(part, **_counts(mb), **kwargs) for r, part in zip(self.ranks, mb.parts(len(self)))]
                for mb in minibatches]

    def train_all(self, minibatches: list[tuple[Scattered, dict]], reads: tuple[str, ...] | None = None,
                  **kwargs) -> list:
        """The step's mini-batches (each with its own extra keywords) in ONE call per rank;
        one ref per rank, each resolving to that rank's stats per mini-batch, in order.
        The slices go as top-level arguments, so Ray resolves those put in the store.
        `reads`: the Experience fields this role's update reads (Scattered.parts)."""
        calls = [dict(**_counts(mb), **kwargs, **extra) for mb, extra in minibatches]
        parts = [mb.parts(len(self), reads) for mb, _ in minibatches]
        return [r.train_steps.remote(calls, *[p[i] for p in parts]) for i, r in enumerate(self.ranks)]

    def call_all(self, method: str, *args, **kwargs) -> list:
        return [getattr(r, method).remote(*args, **kwargs) for r in self.ranks]
