"""`rlhf submit` / `rlhf jobs` against a real Ray head with token authentication.

The test owns its head: `.venv/bin/ray start --head --block` on loopback, as a subprocess,
with RAY_AUTH_MODE=token and a random token; ending that process ends the cluster
(ENVIRONMENT.md). The head runs like one started from a venv that is not activated: the
venv is not on its PATH, and the `python` its PATH finds first is a stand-in that cannot
run anything, so the job succeeds only because its entrypoint runs under the interpreter
that runs Ray. A submission without the token (or with a wrong one) is refused with one
line naming the address; with it, a 2-step PPO smoke run (vLLM-CPU engine, DeepSpeed
learners) succeeds, `rlhf jobs status|logs|list|stop` report on it, the run folder holds
config.yaml and 2 metric rows, and a planted secret appears nowhere: not in the run folder,
not in what `rlhf submit` printed, not in the job's raw driver log.

    .venv/bin/pytest tests/integration/test_submit.py      # about 2 minutes on 2 idle cores
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
RLHF = str(BIN / "rlhf")
PLANTED = "planted-wandb-" + secrets.token_hex(8)
PLANTED_HEAD = "planted-hf-" + secrets.token_hex(8)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _client_env(token: str | None, home: Path) -> dict[str, str]:
    """The environment of an `rlhf` client: the token only when given; never this machine's
    own ~/.ray/auth_token (HOME is an empty folder)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env["HOME"] = str(home)
    env["WANDB_API_KEY"] = PLANTED
    if token is not None:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return env


def _wait_for_dashboard(proc: subprocess.Popen, url: str, log: Path, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            return
        except urllib.error.HTTPError as err:  # 401: up, and asking for the token
            if err.code == 401:
                return
        except OSError:
            pass
        time.sleep(1.0)
    pytest.fail(f"Ray dashboard at {url} did not come up in {timeout_s:.0f}s:\n{log.read_text()[-3000:]}")


def _path_without_the_venv(root: Path) -> str:
    """This PATH without the venv's bin folder, behind a folder whose `python` and `python3`
    fail loudly: what a head started by `/abs/.venv/bin/ray start` from a plain shell sees."""
    wrong = root / "wrong-bin"
    wrong.mkdir()
    for name in ("python", "python3"):
        (wrong / name).write_text("#!/bin/sh\necho \"not the head's Ray python: $0\" >&2\nexit 97\n")
        (wrong / name).chmod(0o755)
    kept = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and Path(d).resolve() != BIN.resolve()]
    return os.pathsep.join([str(wrong), *kept])


@pytest.fixture(scope="module")
def head():
    """A Ray head with token auth on loopback, owned by this module; yields (address, token, temp dir)."""
    token = secrets.token_hex(16)
    # Short path: Ray's socket paths under the temp dir must stay under 107 characters.
    root = Path(tempfile.mkdtemp(prefix="rlhf-head-", dir="/tmp"))
    gcs, dash, client, agent_http, agent_grpc, metrics, runtime_env = _free_ports(7)
    env = {**{k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}, "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": token, "HF_TOKEN": PLANTED_HEAD, "PATH": _path_without_the_venv(root)}
    log = root / "head.log"
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--include-dashboard", "true", "--ray-client-server-port", str(client),
           "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(runtime_env),
           "--num-cpus", "4", "--disable-usage-stats", "--temp-dir", str(root / "ray")]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_dashboard(proc, address, log)
        yield address, token, root
    finally:
        proc.terminate()  # --block: ending it stops every process it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


def _rlhf(args: list[str], env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run([RLHF, *args], env=env, capture_output=True, text=True, timeout=timeout_s)


def test_submission_without_the_token_is_refused(head, tmp_path):
    address, token, _ = head
    for env in (_client_env(None, tmp_path), _client_env("0" * 32, tmp_path)):  # no token; a wrong one
        result = _rlhf(["submit", "configs/ppo-tiny.yaml", "--stage", "ppo", "--max-steps", "1",
                        "--address", address], env, timeout_s=120)
        assert result.returncode == 2, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"Ray job API at {address} refused the request" in errors[0]
        assert "Traceback" not in result.stderr and result.stdout == ""
    env = _client_env(None, tmp_path)
    listing = _rlhf(["jobs", "list", "--address", address], env, timeout_s=120)
    assert listing.returncode == 2 and "refused" in listing.stderr


def test_submit_runs_ppo_and_jobs_report_on_it(head, tmp_path):
    address, token, root = head
    (tmp_path / "home").mkdir()
    env = _client_env(token, tmp_path / "home")
    out = tmp_path / "run"
    # The shortest real PPO job: grpo (no critic learner to start) and the HF rollout backend
    # (no vLLM engine start, ~30 s here); vLLM runs are covered by test_ppo_tiny/test_faults.
    result = _rlhf(["submit", "configs/ppo-tiny.yaml", "logger.backend=none", "ppo.advantage=grpo",
                    "rollout.backend=hf", "--stage", "ppo",
                    "--max-steps", "2", "--out", str(out), "--address", address,
                    "--env", "WANDB_API_KEY"], env, timeout_s=600)
    printed = result.stdout + result.stderr
    assert result.returncode == 0, printed[-4000:]
    job_id = result.stdout.splitlines()[0].strip()
    assert job_id.startswith("ppo-tiny-ppo-")
    assert "ppo done: 2 steps" in result.stdout  # the followed logs
    assert "not the head's Ray python" not in printed
    assert f"job {job_id} SUCCEEDED" in result.stderr

    status = _rlhf(["jobs", "status", job_id, "--address", address], env, timeout_s=120)
    assert status.returncode == 0 and "status:      SUCCEEDED" in status.stdout
    assert "WANDB_API_KEY': '***'" in status.stdout  # the job has the key; nobody sees it
    logs = _rlhf(["jobs", "logs", job_id, "--address", address], env, timeout_s=120)
    assert logs.returncode == 0 and "ppo done: 2 steps" in logs.stdout
    listing = _rlhf(["jobs", "list", "--address", address], env, timeout_s=120)
    assert job_id in listing.stdout and "SUCCEEDED" in listing.stdout
    stop = _rlhf(["jobs", "stop", job_id, "--address", address], env, timeout_s=120)
    assert stop.returncode == 0 and "not running" in stop.stdout
    missing = _rlhf(["jobs", "status", "no-such-job", "--address", address], env, timeout_s=120)
    assert missing.returncode == 2 and "no-such-job" in missing.stderr

    assert (out / "config.yaml").is_file()
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2

    # The planted secrets, nowhere: run folder, everything printed, the job's raw driver log.
    driver_logs = list((root / "ray").glob(f"session_*/logs/job-driver-{job_id}.log"))
    assert driver_logs, "no job driver log found"
    for text, where in [(printed, "rlhf submit output"), (status.stdout + logs.stdout, "rlhf jobs output"),
                        (driver_logs[0].read_text(errors="replace"), "job driver log")]:
        assert PLANTED not in text and PLANTED_HEAD not in text, where
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert PLANTED.encode() not in data and PLANTED_HEAD.encode() not in data, path
