"""What a local run prints: stage summaries and warnings that matter; library noise goes to a file.

Workers. Ray streams every line a worker prints to the driver's terminal: vLLM's start-up
warnings (Triton, chunked prefill, LD_PRELOAD), DeepSpeed's "Setting accelerator to CPU"
and op-build notices, Ray Train's controller chatter, safetensors load bars: about 180
lines for the quickstart, none of them actionable. `route_worker_output` replaces Ray's
printer in the driver: every worker line goes to RUN_DIR/logs/ray-workers.log, prefixed
`(Name pid=...)` as Ray prints it, and the terminal gets Ray's own notices (the raylet's: a
worker killed for memory; the autoscaler's events, which Ray's printer picks out of its
monitor log: a request that cannot be scheduled) and our warnings (`WARNING rlhf.x: ...`,
the format `quiet_worker` gives the `rlhf` loggers).
A failing actor still fails the run: its exception comes back through `ray.get`.

Ray Train V2 starts a `PlacementGroupCleaner` actor per training run that asks the state
API every few seconds whether the controller is alive. The state API needs the dashboard,
which a local run keeps off (loopback only, no open ports), so the cleaner logs "Failed to
query Ray Train Controller actor state" each time: about 130 lines per SFT or RM stage,
and nothing is wrong. `WorkerOutput` drops those lines (DROPPED_LINES).

Our own workers set their `rlhf` loggers up when they import `rlhf.actors` (every actor
and Ray Train loop lives there): `quiet_if_worker`. A runtime env's
worker_process_setup_hook would do the same, but any runtime env makes every worker start
through Ray's setup_worker.py and leaves the workers Ray pre-starts unused: about 6 of
some 65 busy core-seconds, and 3 s of a 35-40 s ppo-tiny start on two cores.

transformers prints a progress bar for every model it loads (several per stage, in every
worker) and a "LOAD REPORT" table when a reward model's new score head starts untrained,
which is what the recipe means to happen. A local run sets `QUIET_ENV` (errors only, no
progress bars) in its workers and the driver, unless the user set those variables.

The driver itself: Ray's token-auth notice (the local cluster keeps token auth on; the
notice only says so), its note that a Ray started off the main thread sets no SIGTERM
handler (RayStart sets it), and DeepSpeed's CPU-accelerator notice are dropped at their
loggers.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import threading
from pathlib import Path
from typing import Callable

# Worker lines dropped on the driver, not even written to the file: actor name -> text in the line.
DROPPED_LINES = {"PlacementGroupCleaner": "Failed to query Ray Train Controller actor state"}
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
# Driver-side notices that say nothing is wrong: logger -> the start of the dropped message.
DRIVER_NOTICES = {
    "ray._private.authentication.authentication_token_setup": "Token authentication is enabled",
    "DeepSpeed": "Setting accelerator to CPU",
    # A local Ray starts in a background thread (ppo/launch.RayStart), which sets the handler itself.
    "ray._private.worker": "SIGTERM handler is not set because current thread is not the main thread",
}
WORKER_LOG = Path("logs") / "ray-workers.log"  # in the run folder
# Worker lines the terminal still shows: our own loggers at WARNING or above (quiet_worker's format).
WORKER_FORMAT = "%(levelname)s %(name)s: %(message)s"
SHOWN = re.compile(r"^(WARNING|ERROR|CRITICAL) rlhf[\w.]*: ")
RAY_SYSTEM = ("raylet", "autoscaler")  # Ray's own notices arrive under these "pids"
HANDLER = "rlhf_worker_output"


def quiet_env() -> dict[str, str]:
    """The QUIET_ENV variables the user has not set, for the workers' runtime env."""
    return {k: v for k, v in QUIET_ENV.items() if k not in os.environ}


class _DropNotice(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def drop_driver_notices() -> None:
    """The DRIVER_NOTICES filters on this process's loggers; the CLI installs them first thing,
    since a stage may import DeepSpeed before Ray starts (a filter survives the library's own
    logger set-up, and every other record of those loggers passes)."""
    for name, start in DRIVER_NOTICES.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) for f in log.filters):
            log.addFilter(_DropNotice(start))


def quiet_driver() -> None:
    """The same for this process: the variables, transformers if it is already imported, and
    the DRIVER_NOTICES filters."""
    env = quiet_env()
    os.environ.update(env)
    if "transformers" in sys.modules and "TRANSFORMERS_VERBOSITY" in env:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    drop_driver_notices()


def quiet_if_worker() -> None:
    """`quiet_worker` when this process is a Ray worker (not a driver). `rlhf.actors` calls it
    on import, so it runs before any actor or Ray Train loop of ours does work."""
    worker = sys.modules.get("ray._private.worker")  # Ray imports it before it runs any of our code
    if worker is not None and getattr(worker.global_worker, "mode", None) == worker.WORKER_MODE:
        quiet_worker()


def quiet_worker() -> None:
    """The `rlhf` loggers to stderr in WORKER_FORMAT (INFO and up: the log file keeps the choices
    they log; `route_worker_output` shows WARNING and up on the terminal). Idempotent."""
    log = logging.getLogger("rlhf")
    if not any(getattr(h, "rlhf_worker", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(WORKER_FORMAT))
        handler.rlhf_worker = True
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False  # one line per record, not a second bare one from logging's last resort


def worker_prefix(batch: dict) -> str:
    """`(Name pid=N)` as Ray prints it; `(raylet)` for Ray's own notices."""
    pid = batch.get("pid")
    if pid in RAY_SYSTEM:
        return f"({pid})"
    name = batch.get("actor_name") or batch.get("task_name")
    return f"({name} pid={pid})" if name else f"(pid={pid})"


class WorkerOutput:
    """Ray's driver-side handler for one batch of worker lines: all of them to `log_file`, the
    ones that matter to `show` (Ray's own printer, so they look and dedupe as before)."""

    def __init__(self, log_file: Path, show: Callable[[dict], None]):
        log_file.parent.mkdir(parents=True, exist_ok=True)
        self.path = log_file
        self._file = open(log_file, "a", buffering=1, encoding="utf-8", errors="replace")
        self._show = show
        self._lock = threading.Lock()

    def __call__(self, batch: dict) -> None:
        lines = batch.get("lines") or []
        if batch.get("pid") == "autoscaler":  # its whole monitor log (a status table every few
            self._show(batch)                 # seconds): Ray's printer keeps only the events
            return
        dropped = DROPPED_LINES.get(batch.get("actor_name") or "")
        if dropped:
            lines = [line for line in lines if dropped not in line]
        prefix = worker_prefix(batch)
        with self._lock:
            self._file.write("".join(f"{prefix} {line}\n" for line in lines))
        shown = lines if batch.get("pid") in RAY_SYSTEM else [line for line in lines if SHOWN.match(line)]
        if shown:
            self._show({**batch, "lines": shown})


def route_worker_output(log_file: Path) -> WorkerOutput | None:
    """After ray.init(log_to_driver=True): workers' lines to `log_file`, the ones that matter to
    the terminal. None (Ray prints everything, as before) where this Ray has no printer to wrap."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return None
    handlers = dict(dispatcher.handlers)
    ray_printer = handlers.get("ray_print_logs")
    if ray_printer is None:  # log_to_driver=False, or a Ray that names it otherwise
        return None
    output = WorkerOutput(log_file, ray_printer)
    dispatcher.remove_handler(HANDLER)  # a second local Ray in this process: one file, not two
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler(HANDLER, output)
    return output
