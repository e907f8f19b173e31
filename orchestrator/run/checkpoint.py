"""Resumable checkpoints of a PPO run, written atomically.

Layout under `RUN/checkpoints/`:

    step_000010/                 one complete checkpoint
        policy/  critic/         DeepSpeed states of every rank (module, optimizer, scheduler, RNG)
        trainer_state.json       driver state: step, KL controller, RNG, counters (written last)
    latest                       name of the newest complete checkpoint (replaced last)
    .tmp-step_000012/            a checkpoint being written; a crash leaves it behind, and the
                                 next start deletes it

A checkpoint is built in a temporary folder, renamed into place (atomic on one filesystem),
and only then does `latest` move to it; older checkpoints beyond `keep` are deleted after
that. So at every instant `latest` names a complete checkpoint or does not exist.

On a cluster the checkpoint folder must be on storage every learner node can write (a
shared filesystem such as Azure Files/NFS); learner ranks write their own ZeRO partitions.
"""
from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from rlhf.orchestrator.run.rundir import write_atomic

_NAME = re.compile(r"^step_(\d{6,})$")
STATE_FILE = "trainer_state.json"


class CheckpointManager:
    def __init__(self, root: str | Path, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root, self.keep = Path(root), keep

    def clean_partial(self) -> list[Path]:
        """Deletes folders of checkpoints a crash left half-written; returns them."""
        partial = sorted(self.root.glob(".tmp-step_*")) if self.root.is_dir() else []
        for path in partial:
            shutil.rmtree(path, ignore_errors=True)
        return partial

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))

    def latest(self) -> Path | None:
        """The checkpoint `latest` names (falling back to the newest complete one, in case a
        crash came between the rename and the pointer update)."""
        pointer = self.root / "latest"
        if pointer.is_file():
            path = self.root / pointer.read_text().strip()
            if _NAME.match(path.name) and (path / STATE_FILE).is_file():
                return path
        done = self.complete()
        return done[-1] if done else None

    def save(self, step: int, state: dict, write: Callable[[Path], None]) -> Path:
        """`write(tmp_dir)` fills a temporary folder (the learners' states); then the driver
        state goes in, the folder is renamed into place, `latest` updated, old ones pruned."""
        name = f"step_{step:06d}"
        final, tmp = self.root / name, self.root / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            write(tmp)
            write_atomic(tmp / STATE_FILE, json.dumps(state, indent=1, sort_keys=True))
            if final.exists():  # the same step saved again (a resumed run): replace it
                shutil.rmtree(final)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        write_atomic(self.root / "latest", name + "\n")
        for old in self.complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def load_state(path: Path) -> dict:
        return json.loads((Path(path) / STATE_FILE).read_text())
