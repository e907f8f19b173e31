"""A run's output folder: resolved config.yaml, metrics.jsonl (one flat JSON object per step).

Files are written atomically (temporary file, then rename) so a crash never leaves a
half-written config behind.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from rlhf.orchestrator.config import ExperimentConfig, to_yaml
from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.run.lock import lock_run_dir
from rlhf.orchestrator.run.secrets import Redactor, redact


def write_atomic(path: Path, text: str) -> None:
    """Writes `text` to `path` via a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def prepare_run_dir(out_dir: str | Path, cfg: ExperimentConfig) -> Path:
    """Creates (or reuses) the output folder and writes the resolved config.yaml.

    A folder that already holds a config of a different experiment (another `name`) is
    refused rather than mixed into; one that cannot be created or written is BadInput
    naming it, and so is one another live process holds the lock of (run/lock.py).
    """
    # Absolute: actors and Ray Train workers run in other working directories.
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise BadInput(f"output folder {out} exists and is not a folder")
    existing = out / "config.yaml"
    if existing.is_file():
        try:
            old_name = (yaml.safe_load(existing.read_text()) or {}).get("name")
        except yaml.YAMLError:
            old_name = None
        if old_name != cfg.name:
            raise BadInput(f"output folder {out} holds a different experiment ({old_name!r}, "
                           f"not {cfg.name!r}); choose another --out")
    # A path that cannot be made (under a file, on a read-only or pseudo file system) is the
    # user's input, named in one line; write_atomic leaves no temporary file behind.
    step = "created"
    try:
        out.mkdir(parents=True, exist_ok=True)
        # One writer per folder (run/lock.py): a second run into it stops here, exit 2.
        # Re-entrant: a stage folder inside one this process holds is not locked again.
        lock_run_dir(out)
        step = "written"
        # Secrets come from the environment only; should one have reached a config value, the
        # file on disk still shows "***", never the value.
        write_atomic(existing, redact(to_yaml(cfg)))
    except OSError as err:
        raise BadInput(f"output folder {out}: cannot be {step} ({err.strerror or type(err).__name__}); "
                       f"choose another --out") from None
    return out


class MetricsLog:
    """Appends one flat JSON object per step to metrics.jsonl (non-finite floats as null)."""

    def __init__(self, path: str | Path, append: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a" if append else "w")
        self._redact = Redactor()  # once: the environment's secrets do not change mid-run

    def log(self, metrics: dict) -> None:
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self._file.write(self._redact(json.dumps(row)) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def replace_folder(src: Path, dest: Path) -> None:
    """Moves the finished folder `src` to `dest`, replacing an old `dest` (a rename cannot
    replace a non-empty folder, so the old one steps aside first and is deleted after).
    `src` should be a sibling of `dest` (same filesystem) so each step is one rename."""
    src, dest = Path(src), Path(dest)
    old = dest.parent / f".{dest.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    src.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
