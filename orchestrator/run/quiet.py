"""Silence known, harmless library noise in every Ray worker of a local run.

Ray Train V2 starts a `PlacementGroupCleaner` actor per training run that asks the state
API every few seconds whether the controller is alive. The state API needs the dashboard,
which a local run keeps off (loopback only, no open ports), so the cleaner logs "Failed to
query Ray Train Controller actor state" each time: about 130 lines per SFT or RM stage,
and nothing is wrong. `start_ray` installs `quiet_worker` as Ray's worker_process_setup_hook.
"""
from __future__ import annotations

import logging

NOISY_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_worker() -> None:
    """Runs once in each worker process before it does any work."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
