"""One writer per run folder: an exclusive lock on `DIR/.lock`, held for the process's life.

Every command that writes a run folder (`rlhf ppo|sft|rm|pipeline` and their `--resume`)
calls `lock_run_dir(DIR)` before it writes anything there; `rlhf eval --out FILE` locks
just its file (`lock_out_file`: DIR/.FILE.lock), as two evaluations may share a folder. The lock is `fcntl.flock(LOCK_EX | LOCK_NB)` on `DIR/.lock`; the
file's body says who holds it:

    {"host": "node-3", "pid": 4242, "since": "2026-12-01T12:00:00Z", "command": "rlhf ppo ..."}

- A second writer gets `BadInput` (exit 2): one line naming the folder and the holder.
- The kernel frees a flock when its holder dies, however it dies (SIGKILL included), so a
  lock whose holder is gone is simply taken. When the body still names a holder (it died
  before it could clear it), the taker says so: "taking over the stale lock of pid N".
- A flock can outlive its holder in one case: a child forked without exec (a data loader,
  a compile worker) inherits the open file and keeps the lock while it lives. If the
  lock is busy but the body's pid is dead *on this host*, the lock file is replaced (under
  a second lock, `DIR/.lock.takeover`, so two takers cannot both win) and the taker says so.
- Re-entrant within a process: a folder inside one this process holds (the pipeline's SFT,
  reward-model and PPO stages write sub-folders of the pipeline's folder) is not locked again.
- At a normal exit (and when a CLI command returns, its work done or refused) the lock file
  is deleted. A taker checks after its flock that the path still names the file it locked
  (else it opens the path again), so a late opener never holds an orphaned inode. A
  killed holder leaves the file and its body behind: that is the stale lock above.

Shared storage across nodes (a run folder on a cluster's shared filesystem):
- NFSv4: flock is mapped to NFS byte-range locks and works through the server's lock
  manager (Linux >= 2.6.12), so two nodes cannot both hold it. NFSv3 needs the NLM lock
  daemon (lockd/statd) running on client and server; mounted with `nolock`, a flock is
  only local to the node and does NOT exclude other nodes.
- Azure Files: SMB 3 shares support byte-range locks (mandatory on the server side), and
  the Linux CIFS client maps flock to them; Azure Files NFS 4.1 shares support NFSv4
  locks. Either excludes writers on other nodes. Blob storage mounted with blobfuse does not
  lock across nodes at all.
- When a node dies while it holds the lock, the server frees it after its lease/lock
  timeout (NFSv4 lease, typically 90 s; SMB durable handle timeout), not at once.
- A pid on another host cannot be checked, so the busy-lock-with-dead-pid takeover above is
  only automatic for holders on this host; for one on another host the one-line error names
  the host and pid and the user decides (delete DIR/.lock once sure it is dead).
"""
from __future__ import annotations

import atexit
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rlhf.orchestrator.errors import BadInput

LOCK_FILE = ".lock"


@dataclass
class RunLock:
    """A held lock: its file, open (the flock lives as long as the file is open)."""

    path: Path  # FOLDER/.lock, or FOLDER/.NAME.lock for one output file
    fd: int
    pid: int = 0  # the process that took it (a forked child inherits the object, not the lock's ownership)

    def release(self) -> None:
        """Deletes the lock file and closes it (the kernel frees the flock). Safe against a
        process that opened the file just before: it locks the deleted inode, sees that the
        path no longer names it and opens the path again."""
        if self.fd < 0:
            return
        if self.pid == os.getpid():  # a forked child exiting must not remove its parent's lock
            try:
                if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                    self.path.unlink()
            except OSError:
                pass
        os.close(self.fd)
        self.fd = -1
        _HELD.pop(self.path, None)


_HELD: dict[Path, RunLock] = {}


def _holder_record(command: str | None) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": command or " ".join([Path(sys.argv[0]).name] + sys.argv[1:])[:300]}


def _read_body(fd: int) -> dict:
    try:
        raw = os.pread(fd, 65536, 0)
        body = json.loads(raw) if raw.strip() else {}
        return body if isinstance(body, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_body(fd: int, record: dict) -> None:
    data = (json.dumps(record) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _describe(body: dict) -> str:
    if not body.get("pid"):
        return "another process (no holder recorded)"
    return f"pid {body['pid']} on {body.get('host', '?')} since {body.get('since', '?')}"


def _held_here(path: Path) -> RunLock | None:
    """The lock this process holds on lock file `path` or on a folder above it, if its file
    is still the one at the path (a folder deleted after a failed start takes its lock along)."""
    for held, lock in list(_HELD.items()):
        if held == path or (held.name == LOCK_FILE and held.parent in path.parents):
            try:
                if os.fstat(lock.fd).st_ino == os.stat(held).st_ino:
                    return lock
            except OSError:
                pass
            lock.release()  # its file is gone: a fresh lock is taken below
    return None


def holds(folder: str | Path) -> bool:
    """Whether this process holds the lock of `folder` (or of a folder above it): cleanup
    after a failed start deletes a folder only when it is this process's to delete."""
    return _held_here(Path(folder).resolve() / LOCK_FILE) is not None


def _open(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def lock_run_dir(folder: str | Path, command: str | None = None) -> RunLock:
    """Creates `folder` if needed and takes its lock for this process's life (re-entrant).

    Raises BadInput naming the folder and the holder when another live process holds it, or
    naming the folder when it cannot be created or locked."""
    folder = Path(folder).resolve()
    if folder.exists() and not folder.is_dir():
        raise BadInput(f"output folder {folder} exists and is not a folder")
    return _acquire(folder, folder / LOCK_FILE, f"output folder {folder}", command)


def lock_out_file(file: str | Path, command: str | None = None) -> RunLock:
    """The lock of one output file (`rlhf eval --out FILE`): FOLDER/.FILE.lock, so two
    commands writing different files into one folder do not exclude each other."""
    file = Path(file).resolve()
    return _acquire(file.parent, file.parent / f".{file.name}.lock", f"--out {file}", command)


def _acquire(folder: Path, path: Path, what: str, command: str | None) -> RunLock:
    held = _held_here(path)
    if held is not None:
        return held
    try:
        folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = _open(path)
            if _try_flock(fd):
                try:  # locked the file at the path, not one a takeover just replaced
                    same = os.fstat(fd).st_ino == os.stat(path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
                continue
            body = _read_body(fd)
            os.close(fd)
            fd = _take_over_busy(path, what, body)
            break
        stale = _read_body(fd)
        if stale.get("pid") and stale.get("pid") != os.getpid():
            gone = ("it is no longer running" if stale.get("host") == socket.gethostname()
                    and not _pid_alive(stale["pid"]) else "it no longer holds the lock")
            print(f"{what}: taking over the stale lock of pid {stale['pid']} "
                  f"(on {stale.get('host', '?')} since {stale.get('since', '?')}; {gone})")
        _write_body(fd, _holder_record(command))
    except OSError as err:
        raise BadInput(f"{what}: cannot be created or locked "
                       f"({err.strerror or type(err).__name__}); choose another --out") from None
    lock = _HELD[path] = RunLock(path, fd, os.getpid())
    return lock


def _take_over_busy(path: Path, what: str, body: dict) -> int:
    """The lock is held. Returns a locked fd of a new lock file when the recorded holder is a
    dead process on this host (a forked child still holds the old file); else BadInput."""
    pid, host = body.get("pid"), body.get("host")
    if not (isinstance(pid, int) and host == socket.gethostname() and not _pid_alive(pid)):
        raise BadInput(f"{what} is in use by another run ({_describe(body)}"
                       f"{': ' + body['command'] if body.get('command') else ''}); wait for it to end "
                       f"or choose another --out")
    guard = _open(path.with_name(path.name + ".takeover"))
    try:
        fcntl.flock(guard, fcntl.LOCK_EX)  # short: only takers wait here
        fd = _open(path)
        if _try_flock(fd):  # freed meanwhile: an ordinary take (the caller reports the stale body)
            return fd
        current = _read_body(fd)
        os.close(fd)
        if current != body:  # someone else took it over first
            raise BadInput(f"{what} is in use by another run ({_describe(current)}); "
                           f"wait for it to end or choose another --out")
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        fd = _open(tmp)
        fcntl.flock(fd, fcntl.LOCK_EX)
        _write_body(fd, body)  # so the caller reports whose lock it took
        os.replace(tmp, path)
        return fd
    finally:
        os.close(guard)


@atexit.register
def release_all() -> None:
    """Releases every lock this process holds (at exit, and when a CLI command returns)."""
    for lock in list(_HELD.values()):
        lock.release()
