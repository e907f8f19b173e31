"""Run-folder locks (orchestrator/run/lock.py): one writer, stale holders taken over, re-entrant
within a process. Holders are real processes: a child python that takes the lock and waits."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.run import lock as run_lock
from rlhf.orchestrator.run.lock import LOCK_FILE, holds, lock_out_file, lock_run_dir

HOLD = """
import os, sys, time
from rlhf.orchestrator.run.lock import lock_run_dir
lock_run_dir(sys.argv[1], command="holder")
if sys.argv[2] == "fork":  # a child forked without exec keeps the open lock file, and the lock
    if os.fork() == 0:
        time.sleep(120)
        os._exit(0)
print("held", flush=True)
if sys.argv[2] in ("kill", "fork"):
    os.kill(os.getpid(), 9)  # killed: no atexit, the lock file keeps its body
time.sleep(120)
"""


def _holder(folder: Path, mode: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), mode], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture(autouse=True)
def _release():
    yield
    run_lock.release_all()


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    proc = _holder(tmp_path / "run", "wait")
    try:
        with pytest.raises(BadInput, match=rf"output folder {tmp_path}/run is in use by another run "
                                           rf"\(pid {proc.pid} on .* since .*: holder\)"):
            lock_run_dir(tmp_path / "run")
    finally:
        proc.kill()
        proc.wait()
    # Its holder gone, the kernel freed the lock: taken over, saying so.
    lock_run_dir(tmp_path / "run")
    body = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
    assert body["pid"] == os.getpid() and body["host"] and body["since"]


def test_killed_holder_is_taken_over_saying_so(tmp_path, capsys):
    proc = _holder(tmp_path / "run", "kill")
    proc.wait()
    lock_run_dir(tmp_path / "run")
    out = capsys.readouterr().out
    assert f"taking over the stale lock of pid {proc.pid}" in out and "no longer running" in out


def test_lock_kept_by_a_forked_child_of_a_dead_holder_is_taken_over(tmp_path, capsys):
    proc = _holder(tmp_path / "run", "fork")
    proc.wait()  # the parent is dead; its forked child still holds the flock
    try:
        lock_run_dir(tmp_path / "run")
        assert f"taking over the stale lock of pid {proc.pid}" in capsys.readouterr().out
        assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == os.getpid()
        # ... and now this process holds it against anyone else.
        check = subprocess.run([sys.executable, "-c", "import sys\nfrom rlhf.orchestrator.run.lock import "
                                "lock_run_dir\nlock_run_dir(sys.argv[1])", str(tmp_path / "run")],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode != 0 and f"pid {os.getpid()}" in check.stderr
    finally:
        os.killpg(proc.pid, signal.SIGKILL)


def test_reentrant_for_the_folder_and_its_subfolders(tmp_path):
    top = lock_run_dir(tmp_path / "run")
    assert lock_run_dir(tmp_path / "run") is top
    assert lock_run_dir(tmp_path / "run" / "round1" / "ppo") is top  # the pipeline's stages
    assert not (tmp_path / "run" / "round1" / "ppo" / LOCK_FILE).exists()
    assert holds(tmp_path / "run" / "sft") and not holds(tmp_path / "other")


def test_a_deleted_folder_is_locked_afresh(tmp_path):
    """A failed start deletes the folder it made (and its lock file): the next start locks again."""
    import shutil

    lock_run_dir(tmp_path / "run")
    shutil.rmtree(tmp_path / "run")
    assert not holds(tmp_path / "run")
    lock_run_dir(tmp_path / "run")
    assert holds(tmp_path / "run") and (tmp_path / "run" / LOCK_FILE).is_file()


def test_release_removes_the_file_and_a_clean_exit_leaves_none(tmp_path):
    lock = lock_run_dir(tmp_path / "run")
    lock.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    subprocess.run([sys.executable, "-c", "import sys\nfrom rlhf.orchestrator.run.lock import lock_run_dir\n"
                    "lock_run_dir(sys.argv[1])", str(tmp_path / "b")], check=True, timeout=60)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == []


def test_output_files_lock_separately(tmp_path):
    lock_out_file(tmp_path / "a.json")
    lock_out_file(tmp_path / "b.json")  # another file in the same folder: no conflict
    assert (tmp_path / ".a.json.lock").is_file() and (tmp_path / ".b.json.lock").is_file()


def test_uncreatable_folder_is_bad_input_naming_it(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(BadInput, match=rf"output folder {tmp_path}/file/run: cannot be created"):
        lock_run_dir(tmp_path / "file" / "run")
