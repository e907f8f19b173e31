"""torch intra-op threads per call: an actor computes with the cores its phase leaves idle.

The driver's phases run one after another (generate, experience, train, sync), so the actor
that computes alone in a phase can use every core, and actors that compute together share
them (orchestrator/ppo/placement.plan_threads). Each heavy method sets its own count on
entry; changing it costs microseconds.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int | None):
    """Runs the block with `n` torch threads (None: as it is), then restores the count."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
