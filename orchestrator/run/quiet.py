"""Silence known, harmless library noise in every Ray worker of a local run.

Ray Train V2 starts a `PlacementGroupCleaner` actor per training run that asks the state
API every few seconds whether the controller is alive. The state API needs the dashboard,
which a local run keeps off (loopback only, no open ports), so the cleaner logs "Failed to
query Ray Train Controller actor state" each time: about 130 lines per SFT or RM stage,
and nothing is wrong. `start_ray` installs `quiet_worker` as Ray's worker_process_setup_hook.

transformers prints a progress bar for every model it loads (several per stage, in every
worker) and a "LOAD REPORT" table when a reward model's new score head starts untrained,
which is what the recipe means to happen. A local run sets `QUIET_ENV` (errors only, no
progress bars) in its workers and the driver, unless the user set those variables.
"""
from __future__ import annotations

import logging
import os
import sys

NOISY_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def quiet_env() -> dict[str, str]:
    """The QUIET_ENV variables the user has not set, for the workers' runtime env."""
    return {k: v for k, v in QUIET_ENV.items() if k not in os.environ}


def quiet_driver() -> None:
    """The same for this process: the variables, and transformers if it is already imported."""
    env = quiet_env()
    os.environ.update(env)
    if "transformers" in sys.modules and "TRANSFORMERS_VERBOSITY" in env:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def quiet_worker() -> None:
    """Runs once in each worker process before it does any work."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
