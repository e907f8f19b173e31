"""Shared fixtures for tests that run the real thing on a local Ray."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_local():
    """One embedded Ray per test module (each start costs seconds), on loopback.

    address="local": always a fresh Ray owned by this module, never a cluster that another
    process started on this machine.
    """
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    yield ray
    ray.shutdown()
