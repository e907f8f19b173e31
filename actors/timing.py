"""Per-call compute time of actor methods, for the orchestration-overhead figure.

`with_compute_clock(cls)` returns a subclass whose public methods record how long each
call ran inside the actor; `pop_compute_seconds()` hands the records over and clears them.
The driver compares them with its own wall time per phase: what the actors did not spend
computing is orchestration (serialisation, object transfer, scheduling, waiting).
"""
from __future__ import annotations

import functools
import inspect
import time


def _timed(name: str, fn):
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(self, *args, **kwargs)
        finally:
            self._compute_log.append((name, time.perf_counter() - start))
    return wrapper


def with_compute_clock(cls: type) -> type:
    """A subclass of `cls` that times every public method (class methods and statics excepted)."""
    methods = {name: _timed(name, fn) for name, fn in inspect.getmembers(cls, inspect.isfunction)
               if not name.startswith("_")}

    def __init__(self, *args, **kwargs):
        self._compute_log = []
        cls.__init__(self, *args, **kwargs)

    def pop_compute_seconds(self) -> list[tuple[str, float]]:
        log, self._compute_log = self._compute_log, []
        return log

    return type(cls.__name__, (cls,), {**methods, "__init__": __init__, "__module__": cls.__module__,
                                       "pop_compute_seconds": pop_compute_seconds})
