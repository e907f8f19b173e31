"""Peak host memory of a run: this process plus every descendant (Ray's raylet, workers, vLLM).

    with MemoryWatcher() as mem:
        run_pipeline(...)            # ray.init() here makes Ray's processes our descendants
    print(mem.peak_bytes / 2**30, "GiB")

A background thread sums the resident set size (RSS) of the process tree every
`interval_s` and keeps the largest sum. Caveats, on purpose simple: pages shared between
processes (shared libraries, Ray's /dev/shm object store, fork copy-on-write) count once per
process, so the sum over-states true use; a spike shorter than the interval can be missed.
Processes Ray runs outside this tree (a cluster joined with --address) are not counted.
"""
from __future__ import annotations

import os
import threading

import psutil


def tree_rss_bytes(pid: int | None = None) -> int:
    """Sum of RSS over process `pid` (default: this one) and all its descendants, in bytes."""
    root = psutil.Process(pid or os.getpid())
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue  # exited (or became unreadable) between listing and reading
    return total


class MemoryWatcher:
    """Context manager: samples `tree_rss_bytes` in a daemon thread; `peak_bytes` is the maximum."""

    def __init__(self, interval_s: float = 0.5, pid: int | None = None) -> None:
        self.interval_s, self.pid = interval_s, pid or os.getpid()
        self.peak_bytes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        """Takes one sample now, updates the peak, returns the sample."""
        now = tree_rss_bytes(self.pid)
        self.peak_bytes = max(self.peak_bytes, now)
        self.samples += 1
        return now

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> "MemoryWatcher":
        self.sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="memory-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int:
        """Stops sampling (after one last sample) and returns the peak in bytes."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.sample()
        return self.peak_bytes

    def metrics(self) -> dict[str, float]:
        """Flat metrics for metrics.jsonl / the summary line."""
        return {"memory/peak_rss_gib": self.peak_bytes / 2**30}

    def __enter__(self) -> "MemoryWatcher":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
