"""`rlhf submit` / `rlhf jobs`: argument parsing and bad input, without a Ray cluster.

Every bad input ends as one line on stderr and exit 2, before anything is sent; an address
nobody listens on is named in that line. (The real submission is tests/integration/test_submit.py.)
"""
from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.orchestrator.cluster import jobs
from rlhf.orchestrator.cli import main
from rlhf.orchestrator.run.secrets import MASK

CONFIG = "configs/ppo-tiny.yaml"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the with-block ends


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("error:")]) == 1, err
    assert "Traceback" not in "\n".join(err)
    return next(line for line in err if line.startswith("error:"))


@pytest.mark.parametrize("argv, words", [
    (["submit"], "required: config"),
    (["submit", CONFIG, "--stage", "chat"], "invalid choice"),
    (["submit", CONFIG, "--retries", "-1"], "--retries"),
    (["submit", CONFIG, "--max-steps", "0"], "--max-steps"),
    (["submit", CONFIG, "--retries", "1", "--no-wait", "--out", "/x"], "drop --no-wait"),
    (["submit", CONFIG, "--retries", "2"], "needs --out"),
    (["submit", "configs/missing.yaml"], "no such file"),
    (["submit", CONFIG, "ppo.no_such_key=1"], "ppo.no_such_key"),
    (["submit", CONFIG, "--env", "1BAD=x"], "not a variable name"),
    (["submit", CONFIG, "--env", "RLHF_TEST_SURELY_UNSET"], "not set in this shell"),
    (["jobs"], "jobs_command"),
    (["jobs", "status"], "required: ID"),
    (["jobs", "stop"], "required: ID"),
])
def test_bad_input_is_one_line_exit_2(capsys, argv, words):
    assert words in _one_line_error(capsys, argv)


def test_config_outside_the_working_dir_is_refused(capsys, tmp_path):
    outside = tmp_path / "x.yaml"
    outside.write_text(Path(CONFIG).read_text())
    line = _one_line_error(capsys, ["submit", str(outside), "--address", "http://127.0.0.1:1"])
    assert "outside the uploaded working directory" in line and "--working-dir" in line


def test_the_working_dir_is_the_current_folder(capsys, tmp_path, monkeypatch, fake_cluster):
    """Run from a project folder outside this checkout: that folder is uploaded and CONFIG is
    read relative to it; the package code still comes from this install."""
    _, install = fake_cluster
    client = install([("RUNNING", "")])
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mine.yaml").write_text(Path(CONFIG).read_text())
    (tmp_path / "data.jsonl").write_text("{}\n")
    seen = {}
    real_snapshot = jobs.snapshot_working_dir

    def snapshot(source, into):
        seen["source"] = source
        snap = real_snapshot(source, into)
        seen["files"] = sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file())
        return snap

    monkeypatch.setattr(jobs, "snapshot_working_dir", snapshot)
    monkeypatch.chdir(tmp_path)
    assert main(["submit", "configs/mine.yaml", "--stage", "ppo", "--no-wait"]) == 0
    assert seen == {"source": tmp_path.resolve(), "files": ["configs/mine.yaml", "data.jsonl"]}
    (job,) = client.submitted
    assert _cli_part(job["entrypoint"])[3] == "configs/mine.yaml"
    assert job["metadata"]["rlhf_config"] == "configs/mine.yaml"
    assert job["runtime_env"]["py_modules"]  # rlhf itself ships as code, not from the folder
    # From another folder the same config is outside the upload: named, with the way out.
    monkeypatch.chdir(tmp_path / "configs")
    line = _one_line_error(capsys, ["submit", str(tmp_path / "configs" / "mine.yaml"), "--working-dir", "/proc/self"])
    assert "--working-dir" in line


def test_retries_need_a_stage_that_resumes(capsys, monkeypatch):
    from rlhf.orchestrator.cli import build_parser

    build_parser()  # registers the stage parsers that stage_supports_resume reads
    assert jobs.stage_supports_resume("pipeline")
    monkeypatch.setattr(jobs, "stage_supports_resume", lambda stage: False)
    line = _one_line_error(capsys, ["submit", CONFIG, "--stage", "sft", "--retries", "1", "--out", "/x"])
    assert "rlhf sft` has no --resume" in line


@pytest.mark.parametrize("argv", [["submit", CONFIG, "--stage", "ppo"], ["jobs", "list"], ["jobs", "logs", "x"],
                                  ["jobs", "status", "x"], ["jobs", "stop", "x"]])
def test_unreachable_address_is_named(capsys, argv):
    address = f"http://127.0.0.1:{_closed_port()}"
    line = _one_line_error(capsys, [*argv, "--address", address])
    assert f"Ray job API at {address} is unreachable" in line


def test_default_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert jobs.default_address() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert jobs.default_address() == "http://head:8265"


def _cli_part(entrypoint: str) -> list[str]:
    prelude, command = entrypoint.split(jobs.RUN_PREFIX + " ")
    assert prelude == ""
    return shlex.split(command)


def test_entrypoint_quotes_overrides_and_adds_resume_only_when_asked():
    first = jobs.build_entrypoint("ppo", CONFIG, ["data.task=arithmetic", "name=a b"], "/runs/x", 2, resume=False)
    assert _cli_part(first) == ["-m", "rlhf.orchestrator.cli", "ppo", CONFIG, "data.task=arithmetic",
                                "name=a b", "--address", "auto", "--out", "/runs/x", "--max-steps", "2"]
    retry = jobs.build_entrypoint("pipeline", CONFIG, [], None, None, resume=True)
    assert _cli_part(retry)[-1] == "--resume" and "--out" not in retry
    assert jobs.shown(retry) == (f"<head's ray python> -m rlhf.orchestrator.cli pipeline {CONFIG} "
                                 "--address auto --resume")


# Runs argv[1] through /bin/sh and exits with its status: a stand-in for a process tree.
_RUN = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1], shell=True).returncode)"


def _run_under_a_fake_raylet(entrypoint: str, worker_python: str) -> subprocess.CompletedProcess:
    """`entrypoint` as Ray runs it: /bin/sh, child of the job supervisor (here a shell, whose
    command line says nothing: Ray retitles its workers), child of the raylet, whose command
    line carries --python_worker_command. PATH holds no `python` with Ray or rlhf (a head whose
    venv is not active)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
    supervisor = f"/bin/sh -c {shlex.quote(entrypoint)}; exit $?"  # two commands: sh must not exec it away
    raylet = [sys.executable, "-c", _RUN, supervisor,
              f"--python_worker_command={worker_python} /ray/_private/workers/default_worker.py --x=1"]
    return subprocess.run(raylet, env=env, capture_output=True, text=True, timeout=120)


def test_entrypoint_runs_under_the_raylets_worker_python_not_the_path(tmp_path):
    wrapper = tmp_path / "head-venv" / "bin" / "python3"  # marks its use, then is this venv's python
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f'#!/bin/sh\necho "worker python ran" >&2\nexec {shlex.quote(sys.executable)} "$@"\n')
    wrapper.chmod(0o755)
    found = _run_under_a_fake_raylet(jobs.HEAD_PYTHON + 'echo "$PY"', str(wrapper))
    assert found.stdout.strip() == str(wrapper), found.stderr
    # The real entrypoint reaches rlhf's CLI (a missing config: its one-line exit 2), so the
    # interpreter imports rlhf with its dependencies although no PATH entry leads to it.
    entrypoint = jobs.build_entrypoint("sft", "configs/missing.yaml", [], None, None, False)
    ran = _run_under_a_fake_raylet(entrypoint, str(wrapper))
    assert ran.returncode == 2 and "worker python ran" in ran.stderr, ran.stderr
    assert "error: " in ran.stderr and "configs/missing.yaml" in ran.stderr and "Traceback" not in ran.stderr


def test_entrypoint_falls_back_to_python_without_a_raylet():
    found = subprocess.run(["/bin/sh", "-c", jobs.HEAD_PYTHON + 'echo "${PY:-python}"'], capture_output=True,
                           text=True)
    assert found.stdout.strip() == "python" and found.stderr == ""


def test_parse_env_takes_values_from_the_shell(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "from-the-shell-123")
    assert jobs.parse_env(["WANDB_API_KEY", "A=1", "B=x=y"]) == {
        "WANDB_API_KEY": "from-the-shell-123", "A": "1", "B": "x=y"}


def test_runtime_env_ships_a_snapshot_and_code_and_masks_secrets_when_shown(tmp_path):
    code = jobs.stage_code(tmp_path / "code")
    assert (code / "orchestrator" / "cli.py").is_file() and (code / "actors").is_dir()
    assert not list(code.rglob("__pycache__"))
    source = tmp_path / "src"
    for name in ("configs/a.yaml", ".venv/bin/python", "runs/x/metrics.jsonl", "pkg/__pycache__/m.pyc",
                 "pkg/m.py", "x.egg-info/PKG-INFO", "model.safetensors"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text("x")
    snap = jobs.snapshot_working_dir(source, tmp_path / "snap")
    assert sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file()) == ["configs/a.yaml",
                                                                                              "pkg/m.py"]
    env = jobs.build_runtime_env(snap, {"HF_TOKEN": "hf-secret-value-1"}, code)
    assert env["working_dir"] == str(snap) and env["py_modules"] == [str(code)]
    assert env["env_vars"]["HF_TOKEN"] == "hf-secret-value-1"  # passed to the job as given...
    shown = jobs.describe_runtime_env(env, source)
    assert "hf-secret-value-1" not in shown and MASK in shown  # ...but never printed


def test_secret_typed_on_the_command_line_gets_a_note(capsys):
    assert main(["submit", CONFIG, "--env", "HF_TOKEN=typed-value-123", "--max-steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "--env HF_TOKEN=... puts a secret in your shell history" in err
    assert "typed-value-123" not in err


class FakeJobClient:
    """Stands in for JobSubmissionClient: each submitted job ends with the next status in
    `outcomes`; its log arrives in chunks that split a planted secret across two of them."""

    def __init__(self, outcomes: list[tuple[str, str]], secret: str) -> None:
        self.outcomes, self.secret, self.submitted = list(outcomes), secret, []

    def submit_job(self, **job) -> str:
        self.submitted.append(job)
        return job["submission_id"]

    async def tail_job_logs(self, job_id: str):
        half = len(self.secret) // 2
        for chunk in ("step 1\nkey=", self.secret[:half], self.secret[half:] + "\nstep 2\n", "done"):
            yield chunk

    def get_job_status(self, job_id: str) -> str:
        return self.outcomes[len(self.submitted) - 1][0]

    def get_job_info(self, job_id: str):
        status, message = self.outcomes[len(self.submitted) - 1]
        return type("Info", (), {"message": message, "status": status})()


@pytest.fixture
def fake_cluster(monkeypatch):
    secret = "planted-secret-5b1e0c77d2"
    monkeypatch.setenv("WANDB_API_KEY", secret)

    def install(outcomes):
        client = FakeJobClient(outcomes, secret)
        monkeypatch.setattr(jobs, "connect", lambda address: client)
        return client

    return secret, install


def test_a_failed_job_is_resubmitted_with_resume(capsys, fake_cluster):
    secret, install = fake_cluster
    client = install([("FAILED", "Job entrypoint command failed with exit code 1"),
                      ("SUCCEEDED", "Job finished successfully.")])
    assert main(["submit", CONFIG, "--stage", "pipeline", "--retries", "2", "--out", "/shared/run",
                 "--env", "WANDB_API_KEY"]) == 0
    first, second = (shlex.split(job["entrypoint"]) for job in client.submitted)
    assert "--resume" not in first and second[-1] == "--resume" and "/shared/run" in second
    assert client.submitted[1]["submission_id"].endswith("-retry1")
    assert client.submitted[0]["runtime_env"]["env_vars"]["WANDB_API_KEY"] == secret  # the job gets it
    out = capsys.readouterr()
    assert "step 1\nkey=***\nstep 2\ndone\n" in out.out  # followed logs, masked across chunks
    assert secret not in out.out + out.err
    assert "resubmitting with --resume (retry 1/2)" in out.err


@pytest.mark.parametrize("outcomes, code, submissions", [
    ([("FAILED", "exit code 1")] * 3, 1, 3),                       # retries used up
    ([("FAILED", "Job entrypoint command failed with exit code 2")], 1, 1),  # bad input: no retry
    ([("STOPPED", "Job was intentionally stopped.")], 1, 1),       # stopped by a user: no retry
])
def test_retries_end(capsys, fake_cluster, outcomes, code, submissions):
    _, install = fake_cluster
    client = install(outcomes)
    assert main(["submit", CONFIG, "--retries", "2", "--out", "/shared/run"]) == code
    assert len(client.submitted) == submissions


def test_no_wait_prints_the_id_and_returns(capsys, fake_cluster):
    _, install = fake_cluster
    client = install([("RUNNING", "")])
    assert main(["submit", CONFIG, "--stage", "ppo", "--no-wait"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == client.submitted[0]["submission_id"] and "rlhf jobs logs" in out.err
