"""What a local run prints (rlhf.orchestrator.run.quiet): worker lines to the run folder's log,
the ones that matter to the terminal; the loggers quiet_worker and quiet_driver set. No Ray
cluster starts: Ray's own dispatcher is driven with batches shaped as Ray sends them."""
from __future__ import annotations

import io
import logging

import pytest

from rlhf.orchestrator.run import quiet


def _batch(lines, pid=4242, actor="RolloutEngine", is_err=False):
    return {"ip": "127.0.0.1", "pid": pid, "job": "01000000", "is_err": is_err, "lines": lines,
            "actor_name": actor, "task_name": "", "localhost": "127.0.0.1"}


@pytest.fixture
def dispatcher():
    """Ray's real driver-side dispatcher, with a stand-in for Ray's printer; restored after."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as d

    saved = list(d.handlers)
    printed = []
    d.handlers = [("ray_print_logs", printed.append)]
    yield d, printed
    d.handlers = saved


def test_every_worker_line_goes_to_the_file_and_only_warnings_that_matter_to_the_terminal(dispatcher, tmp_path):
    d, printed = dispatcher
    log = tmp_path / "run" / quiet.WORKER_LOG
    output = quiet.route_worker_output(log)
    assert output is not None and [name for name, _ in d.handlers] == [quiet.HANDLER]  # Ray's printer is wrapped
    ours = "WARNING rlhf.actors.modeling: packed forwards: keeping sdpa"
    d.emit(_batch(["Triton is installed, but doesn't include CPU backend. Disabling Triton.", ours], is_err=True))
    d.emit(_batch(["INFO rlhf.kernels: token log-probs: backend 'auto' on cpu -> the chunked PyTorch reference",
                   "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully"], pid=7, actor=""))
    d.emit(_batch(["A worker died or was killed while executing a task by an unexpected system error."],
                  pid="raylet", actor=""))
    cleaner = ["[2026-12-07 04:00:00] WARNING placement_group_cleaner.py:85 -- Failed to query Ray Train "
               "Controller actor state. The dashboard may be off.", "PlacementGroupCleaner: run done"]
    d.emit(_batch(cleaner, pid=9, actor="PlacementGroupCleaner"))  # its every-few-seconds warning goes nowhere
    monitor = ["======== Autoscaler status: 2026-12-01 22:00:00 ========", "Node status", ":event_summary:Adding 1 node"]
    d.emit(_batch(monitor, pid="autoscaler", actor=""))  # Ray's printer picks the events out of it
    written = log.read_text().splitlines()
    assert written == [
        "(RolloutEngine pid=4242) Triton is installed, but doesn't include CPU backend. Disabling Triton.",
        f"(RolloutEngine pid=4242) {ours}",
        "(pid=7) INFO rlhf.kernels: token log-probs: backend 'auto' on cpu -> the chunked PyTorch reference",
        "(pid=7) DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
        "(raylet) A worker died or was killed while executing a task by an unexpected system error.",
        "(PlacementGroupCleaner pid=9) PlacementGroupCleaner: run done",
    ]
    assert [b["lines"] for b in printed] == [[ours], ["A worker died or was killed while executing a task by an "
                                                      "unexpected system error."], monitor]
    assert printed[0]["actor_name"] == "RolloutEngine" and printed[0]["is_err"]  # Ray prints it as before
    # A second local Ray in this process (Ray adds its printer again): one handler, the new file.
    d.handlers.append(("ray_print_logs", printed.append))
    again = quiet.route_worker_output(tmp_path / "other" / quiet.WORKER_LOG)
    assert again is not None and [name for name, _ in d.handlers] == [quiet.HANDLER]


def test_without_rays_printer_nothing_is_rerouted(dispatcher, tmp_path):
    d, _ = dispatcher
    d.handlers = []  # ray.init(log_to_driver=False): no worker lines reach the driver at all
    assert quiet.route_worker_output(tmp_path / quiet.WORKER_LOG) is None
    assert d.handlers == [] and not (tmp_path / "logs").exists()


@pytest.fixture
def loggers():
    """Restores the loggers the quiet functions touch."""
    names = ["rlhf", *quiet.DRIVER_NOTICES]
    saved = {n: (logging.getLogger(n).level, list(logging.getLogger(n).handlers), list(logging.getLogger(n).filters),
                 logging.getLogger(n).propagate) for n in names}
    yield
    for n, (level, handlers, filters, propagate) in saved.items():
        log = logging.getLogger(n)
        log.setLevel(level)
        log.handlers[:], log.filters[:], log.propagate = handlers, filters, propagate


def test_quiet_worker_formats_our_loggers(loggers, monkeypatch):
    stderr = io.StringIO()
    monkeypatch.setattr("sys.stderr", stderr)
    quiet.quiet_worker()
    quiet.quiet_worker()  # a second call adds no second handler
    logging.getLogger("rlhf.kernels").info("token log-probs: backend 'auto' on cpu")
    logging.getLogger("rlhf.actors.modeling").warning("packed forwards: keeping sdpa")
    logging.getLogger("rlhf.actors.modeling").debug("not shown")
    lines = stderr.getvalue().splitlines()
    assert lines == ["INFO rlhf.kernels: token log-probs: backend 'auto' on cpu",
                     "WARNING rlhf.actors.modeling: packed forwards: keeping sdpa"]
    assert [bool(quiet.SHOWN.match(line)) for line in lines] == [False, True]  # the terminal gets the warning only


def test_quiet_driver_drops_the_two_notices_and_keeps_other_warnings(loggers, monkeypatch):
    environ = {"TRANSFORMERS_VERBOSITY": "info"}  # set by the user: kept (and transformers left alone)
    monkeypatch.setattr(quiet.os, "environ", environ)
    quiet.quiet_driver()
    quiet.quiet_driver()  # one filter per logger, however often it runs
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    for name, notice in quiet.DRIVER_NOTICES.items():
        log = logging.getLogger(name)
        assert len(log.filters) == len({type(f) for f in log.filters})
        log.addHandler(Keep())
        log.warning(notice + " and the rest of the notice")
        log.warning("something that matters")
    assert seen == ["something that matters"] * len(quiet.DRIVER_NOTICES)
    assert environ == {"TRANSFORMERS_VERBOSITY": "info", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def test_quiet_if_worker_sets_up_ray_workers_only(loggers, monkeypatch):
    """`rlhf.actors` calls it on import: a driver (which imports the actor classes to launch
    them) keeps its loggers; a Ray worker gets quiet_worker's handler."""
    import ray._private.worker as ray_worker

    def ours() -> list:
        return [h for h in logging.getLogger("rlhf").handlers if getattr(h, "rlhf_worker", False)]

    assert ours() == []
    monkeypatch.setattr(ray_worker.global_worker, "mode", ray_worker.SCRIPT_MODE)
    quiet.quiet_if_worker()
    assert ours() == []
    monkeypatch.setattr(ray_worker.global_worker, "mode", ray_worker.WORKER_MODE)
    quiet.quiet_if_worker()
    assert len(ours()) == 1
    assert logging.getLogger("rlhf").propagate is False
