"""`rlhf submit` and `rlhf jobs`: the same runs, sent to a Ray cluster as Ray jobs.

    rlhf submit CONFIG [overrides] [--stage pipeline|ppo|sft|rm] [--address http://HEAD:8265]
                [--out DIR] [--max-steps N] [--no-wait] [--retries N] [--env KEY[=VALUE] ...]
    rlhf jobs list | status ID | logs ID [--follow] | stop ID   [--address ...]

A job runs `PYTHON -m rlhf.orchestrator.cli STAGE CONFIG ... --address auto` on the
cluster's head, with the folder `rlhf submit` is run from as its working directory (configs,
data; `--working-dir` picks another, as in `ray job submit --working-dir .`) and this
install's code (orchestrator/, actors/, kernels/) shipped as the `rlhf` package to every
worker of the job, so the cluster runs exactly the code that was submitted; the nodes
only need the dependencies (deploy/azure/cluster.yaml installs them).

PYTHON is the interpreter that runs Ray on the head, not whatever `python` the head's PATH
finds: a head started as `/opt/venv/bin/ray start --head` without the venv activated would
otherwise run the entrypoint under a Python without Ray (`No module named 'ray'`). Ray runs
an entrypoint with `/bin/sh -c` as a child of the job's supervisor, a Ray worker, whose
parent is the node's raylet; the raylet's command line names the interpreter it starts
Python workers with (`--python_worker_command=/opt/venv/bin/python3 ...`). So the entrypoint
walks up its ancestors in /proc to the first one with that flag and runs under its first
word, falling back to `python` where there is none (no /proc, another launcher). The
supervisor's own command line does not help: Ray retitles its workers (`ray::JobSupervisor`).
Asking before submitting cannot work either: the job API does not report the head's
interpreter, and a probe job's entrypoint would run into the same PATH.

On one CPU machine: `ray start --head --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1`
(with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN set), then `rlhf submit configs/ppo-tiny.yaml
--stage ppo --address http://127.0.0.1:8265`. On a cluster: `ray up deploy/azure/cluster.yaml`,
`ray dashboard deploy/azure/cluster.yaml` (an SSH tunnel to the head's loopback-only job
API), then the same command (deploy/README.md).

The client authenticates like every Ray client: RAY_AUTH_MODE=token plus the token in
RAY_AUTH_TOKEN or ~/.ray/auth_token. An unreachable address or a refused token is bad
input (one line naming the address, exit 2). Secrets never appear in what is printed:
entrypoints, runtime environments and followed logs pass through `secrets.Redactor`.
"""
from __future__ import annotations

import argparse
import asyncio
import fnmatch
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path

from rlhf.orchestrator.errors import EXIT_OK, EXIT_RUNTIME, BadInput, RemoteCallFailed
from rlhf.orchestrator.run.secrets import Redactor, is_secret_name, redact_env

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
STAGES = ("pipeline", "ppo", "sft", "rm")
CODE_PACKAGES = ("orchestrator", "actors", "kernels")
# Never uploaded: environments, run outputs, caches, VCS data (deploy/runtime_env.yaml
# lists the same for `ray job submit --runtime-env`; a unit test keeps them equal).
WORKING_DIR_EXCLUDES = [
    ".venv", "venv", ".git", "runs", "wandb", "**/__pycache__", "*.egg-info", ".pytest_cache",
    "*.safetensors", "*.bin", "*.pt", "*.ckpt",
]
# Unbuffered output so `--follow` shows progress as it happens; tokenizers' own thread pool
# fights Ray workers for cores.
JOB_ENV = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def default_address() -> str:
    """$RAY_ADDRESS when set (the variable Ray's own job CLI reads), else the local head."""
    return os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def _auth_hint() -> str:
    return ("set RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN "
            "(or ~/.ray/auth_token)")


@contextmanager
def job_api(address: str):
    """Maps the job client's failures to one-line errors naming the address.

    Unreachable or refusing the token: BadInput (exit 2, the address is the bad resource).
    A job the cluster does not know: BadInput. Anything else the server answers: exit 1."""
    from ray.exceptions import AuthenticationError, RpcError

    try:
        yield
    except AuthenticationError as err:
        first = Redactor()(str(err)).splitlines()[0]
        raise BadInput(f"Ray job API at {address} refused the request ({first}); {_auth_hint()}") from None
    except (ConnectionError, RpcError, OSError) as err:
        raise BadInput(f"Ray job API at {address} is unreachable ({type(err).__name__}: "
                       f"{Redactor()(str(err)).splitlines()[0] if str(err) else 'no answer'})") from None
    except RuntimeError as err:
        text = Redactor()(str(err))
        if "404" in text or "does not exist" in text:
            raise BadInput(f"Ray job API at {address}: {text.splitlines()[0]}") from None
        raise RemoteCallFailed(f"Ray job API at {address}: {text.splitlines()[0]}") from None


def connect(address: str):
    """A JobSubmissionClient for `address`; checks reachability and the token up front."""
    from ray.job_submission import JobSubmissionClient

    with job_api(address):
        return JobSubmissionClient(address)


# ---------------------------------------------------------------- what a submission sends


def parse_env(items: list[str], environ=os.environ) -> dict[str, str]:
    """`KEY=VALUE`, or `KEY` alone to pass this shell's value on without typing it."""
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not key or not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise BadInput(f"--env {item.split('=')[0]!r}: not a variable name (KEY=VALUE or KEY)")
        if not sep:
            if key not in environ:
                raise BadInput(f"--env {key}: not set in this shell (give KEY=VALUE)")
            value = environ[key]
        env[key] = value
    return env


def config_in_working_dir(config: str, working_dir: Path) -> str:
    """CONFIG as a path relative to the working directory the job starts in."""
    path = Path(config).resolve()
    if not path.is_file():
        raise BadInput(f"config {config}: no such file")
    try:
        return path.relative_to(working_dir.resolve()).as_posix()
    except ValueError:
        raise BadInput(f"config {config}: outside the uploaded working directory {working_dir}; "
                       f"run rlhf submit from a folder that holds it or pass --working-dir") from None


# The `rlhf` subcommand parsers, handed over by `register` (so this module never imports the CLI).
_STAGE_PARSERS: dict[str, argparse.ArgumentParser] = {}


def stage_supports_resume(stage: str) -> bool:
    """Whether `rlhf STAGE` accepts --resume (asked of the real parser, not a list kept here)."""
    return any("--resume" in action.option_strings for action in _STAGE_PARSERS[stage]._actions)


# Sets $PY to the raylet's Python worker interpreter, found by walking up from the entrypoint's
# shell through /proc (module docstring); empty when no ancestor has the flag. POSIX sh only.
HEAD_PYTHON = ("p=$PPID; PY=; while [ -z \"$PY\" ] && [ \"${p:-0}\" -gt 1 ] 2>/dev/null; do "
               "PY=$(tr '\\0' '\\n' < /proc/$p/cmdline 2>/dev/null | "
               "sed -n 's/^--python_worker_command=\\([^ ]*\\).*/\\1/p'); "
               "p=$(sed 's/.*) //' /proc/$p/stat 2>/dev/null | cut -d' ' -f2); done; ")
RUN_PREFIX = HEAD_PYTHON + 'exec "${PY:-python}"'


def cli_args(stage: str, config: str, overrides: list[str], out: str | None,
             max_steps: int | None, resume: bool) -> list[str]:
    """The interpreter's arguments; `--address auto` joins the cluster the job runs on."""
    parts = ["-m", "rlhf.orchestrator.cli", stage, config, *overrides, "--address", "auto"]
    if out:
        parts += ["--out", out]
    if max_steps:
        parts += ["--max-steps", str(max_steps)]
    if resume:
        parts.append("--resume")
    return parts


def build_entrypoint(stage: str, config: str, overrides: list[str], out: str | None,
                     max_steps: int | None, resume: bool) -> str:
    """The shell command the job runs: `rlhf STAGE ...` under the head's Ray interpreter."""
    return f"{RUN_PREFIX} {shlex.join(cli_args(stage, config, overrides, out, max_steps, resume))}"


def shown(entrypoint: str) -> str:
    """An entrypoint for the console: the interpreter lookup as one word (`rlhf jobs status`
    shows it whole)."""
    return entrypoint.replace(RUN_PREFIX, "<head's ray python>")


def stage_code(into: Path) -> Path:
    """Copies this install's orchestrator/actors/kernels into `into`/rlhf (the job's py_modules)."""
    package = into / "rlhf"
    for name in CODE_PACKAGES:
        spec = find_spec(f"rlhf.{name}")  # the location only; nothing is imported
        source = Path(next(iter(spec.submodule_search_locations)))
        shutil.copytree(source, package / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return package


def snapshot_working_dir(source: Path, into: Path) -> Path:
    """A copy of `source` without WORKING_DIR_EXCLUDES, uploaded in place of the live folder.

    Ray hashes a working directory to name its package and then zips it; a file edited in
    between (an editor, a second run writing logs) makes the job ask for a package that was
    never uploaded. A private snapshot cannot change under the upload."""
    patterns = [p.removeprefix("**/") for p in WORKING_DIR_EXCLUDES]

    def ignore(_folder: str, names: list[str]) -> set[str]:
        return {n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)}

    shutil.copytree(source, into, ignore=ignore, symlinks=True)
    return into


def build_runtime_env(working_dir: Path, env: dict[str, str], code: Path | None) -> dict:
    runtime_env = {"working_dir": str(working_dir), "env_vars": {**JOB_ENV, **env}}
    if code is not None:
        runtime_env["py_modules"] = [str(code)]
    return runtime_env


def describe_runtime_env(runtime_env: dict, source: Path) -> str:
    """One line for the console: where the files came from, variables with secrets masked."""
    env = redact_env(runtime_env.get("env_vars", {}))
    code = "this install's orchestrator/ actors/ kernels/ as rlhf" if runtime_env.get("py_modules") else "none"
    return (f"working_dir={source} (without {' '.join(WORKING_DIR_EXCLUDES)}) env_vars={env} "
            f"py_modules={code}")


# ---------------------------------------------------------------- following a job


def follow_logs(client, job_id: str, redactor: Redactor, out=None) -> None:
    """Prints the job's logs as they arrive (whole lines, secrets masked) until it ends."""
    out = out or sys.stdout

    async def tail() -> None:
        pending = ""
        async for chunk in client.tail_job_logs(job_id):
            # A chunk may end mid-line; hold the tail back so a secret split across two
            # chunks is still masked whole.
            lines = (pending + chunk).split("\n")
            pending = lines.pop()
            if lines:
                out.write(redactor("\n".join(lines) + "\n"))
                out.flush()
        if pending:
            out.write(redactor(pending) + "\n")

    asyncio.run(tail())


def wait_terminal(client, job_id: str, timeout_s: float = 60.0) -> str:
    """The job's status once terminal (the log stream can close a moment before)."""
    deadline = time.monotonic() + timeout_s
    status = str(client.get_job_status(job_id))
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(1.0)
        status = str(client.get_job_status(job_id))
    return status


def _submission_id(name: str, stage: str, attempt: int) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    suffix = f"-retry{attempt - 1}" if attempt > 1 else ""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name)  # ids appear in URLs and file names
    return f"{name}-{stage}-{stamp}-{uuid.uuid4().hex[:4]}{suffix}"


def _check_submit_args(args) -> None:
    if args.retries:
        if args.no_wait:
            raise BadInput("--retries needs to watch the job; drop --no-wait")
        if not args.out:
            raise BadInput("--retries needs --out (a folder every node sees) so a retry resumes "
                           "from the checkpoints there")
        if not stage_supports_resume(args.stage):
            raise BadInput(f"--retries: `rlhf {args.stage}` has no --resume to continue a failed run")
    if args.out and not Path(args.out).is_absolute():
        print(f"note: --out {args.out} is resolved on the cluster, inside the job's temporary working "
              f"directory; give an absolute path on shared storage to keep the results", file=sys.stderr)


def cmd_submit(args) -> int:
    from rlhf.orchestrator.config import load_config

    _check_submit_args(args)
    working_dir = Path(args.working_dir or ".").resolve()
    config = config_in_working_dir(args.config, working_dir)
    cfg = load_config(args.config, args.overrides)  # bad configs fail here, not on the cluster
    env = parse_env(args.env)
    redactor = Redactor(extra=env.values())
    client = connect(args.address)
    with tempfile.TemporaryDirectory(prefix="rlhf-submit-") as tmp:
        tmp = Path(tmp)
        runtime_env = build_runtime_env(snapshot_working_dir(working_dir, tmp / "working_dir"), env,
                                        stage_code(tmp / "code"))
        for attempt in range(1, args.retries + 2):
            entrypoint = build_entrypoint(args.stage, config, args.overrides, args.out, args.max_steps,
                                          resume=attempt > 1)
            job_id = submit_job(client, args.address, entrypoint=entrypoint, runtime_env=runtime_env,
                                submission_id=_submission_id(cfg.name, args.stage, attempt),
                                metadata={"rlhf_stage": args.stage, "rlhf_config": config,
                                          "rlhf_attempt": str(attempt)})
            print(job_id)
            print(f"submitted to {args.address}: {redactor(shown(entrypoint))}", file=sys.stderr)
            print(f"runtime env: {redactor(describe_runtime_env(runtime_env, working_dir))}", file=sys.stderr)
            if args.no_wait:
                print(f"follow: rlhf jobs logs {job_id} --follow --address {args.address}", file=sys.stderr)
                return EXIT_OK
            status, message = _watch(client, args.address, job_id, redactor)
            # Exit 2 is bad input (a config, a path, a resource): the same job would fail again.
            if status != "FAILED" or attempt > args.retries or "exit code 2" in message:
                return EXIT_OK if status == "SUCCEEDED" else EXIT_RUNTIME
            print(f"job {job_id} FAILED; resubmitting with --resume (retry {attempt}/{args.retries})",
                  file=sys.stderr)
    return EXIT_RUNTIME


def submit_job(client, address: str, agent_wait_s: float = 90.0, **job) -> str:
    """client.submit_job, waiting while the head has no job agent yet.

    A head that has just started answers 500 "No available agent" until its dashboard agent
    registers (tens of seconds on a busy machine); that is not the user's error."""
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            with job_api(address):
                return client.submit_job(**job)
        except RemoteCallFailed as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def _watch(client, address: str, job_id: str, redactor: Redactor) -> tuple[str, str]:
    """Follows a job's logs to its end; returns its terminal status and the first line of
    Ray's message about it (both printed)."""
    try:
        with job_api(address):
            follow_logs(client, job_id, redactor)
            status = wait_terminal(client, job_id)
            info = client.get_job_info(job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on. stop it: rlhf jobs stop {job_id} --address {address}",
              file=sys.stderr)
        raise SystemExit(130) from None
    # The message's first line only: after it Ray repeats the tail of the logs just shown.
    message = (redactor(info.message or "").splitlines() or [""])[0]
    print(f"job {job_id} {status}: {message}", file=sys.stderr)
    return status, message


# ---------------------------------------------------------------- rlhf jobs


def cmd_list(args) -> int:
    client, redactor = connect(args.address), Redactor()
    with job_api(args.address):
        jobs = client.list_jobs()
    for job in sorted(jobs, key=lambda j: j.start_time or 0):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((job.start_time or 0) / 1000))
        print(f"{job.submission_id or job.job_id:<44} {job.status!s:<10} {started}  {redactor(shown(job.entrypoint))}")
    return EXIT_OK


def cmd_status(args) -> int:
    client, redactor = connect(args.address), Redactor()
    with job_api(args.address):
        info = client.get_job_info(args.job_id)
    env = (info.runtime_env or {}).get("env_vars") or {}
    print(f"job:         {info.submission_id or info.job_id}")
    print(f"status:      {info.status}")
    print(f"message:     {(redactor(info.message or '').splitlines() or [''])[0]}")
    print(f"entrypoint:  {redactor(info.entrypoint)}")
    print(f"env_vars:    {redactor(str(redact_env(env)))}")
    print(f"metadata:    {info.metadata or {}}")
    return EXIT_OK


def cmd_logs(args) -> int:
    client, redactor = connect(args.address), Redactor()
    with job_api(args.address):
        if args.follow:
            follow_logs(client, args.job_id, redactor)
        else:
            sys.stdout.write(redactor(client.get_job_logs(args.job_id)))
    return EXIT_OK


def cmd_stop(args) -> int:
    client = connect(args.address)
    with job_api(args.address):
        stopped = client.stop_job(args.job_id)
    print(f"job {args.job_id}: {'stop requested' if stopped else 'not running (nothing to stop)'}")
    return EXIT_OK


# ---------------------------------------------------------------- argument parsing


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return int(text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def _env_item(text: str) -> str:
    if is_secret_name(text.partition("=")[0]) and "=" in text:
        # Accepted, but a value typed on the command line lands in shell history: say so once.
        print(f"note: --env {text.partition('=')[0]}=... puts a secret in your shell history; "
              f"`--env {text.partition('=')[0]}` alone passes this shell's value", file=sys.stderr)
    return text


def _add_address(cmd) -> None:
    cmd.add_argument("--address", default=default_address(),
                     help=f"the cluster's job API (default: $RAY_ADDRESS or {DEFAULT_ADDRESS})")


def register(sub) -> None:
    """Adds `submit` and `jobs` to the `rlhf` subcommands (called from cli.build_parser, after the
    stage commands, whose parsers `stage_supports_resume` reads from `sub.choices`)."""
    _STAGE_PARSERS.update(sub.choices)
    submit = sub.add_parser("submit", help="run a config on a Ray cluster as a Ray job")
    submit.add_argument("config", help="experiment YAML inside the working directory, e.g. configs/ppo-tiny.yaml")
    submit.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    submit.add_argument("--stage", choices=STAGES, default="pipeline", help="which command the job runs")
    _add_address(submit)
    submit.add_argument("--out", default=None, help="output folder on the cluster (absolute, on shared storage)")
    submit.add_argument("--max-steps", type=_positive, default=None, help="passed to the stage (smoke runs)")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    submit.add_argument("--retries", type=_count, default=0,
                        help="resubmit a FAILED job up to N times with --resume (needs --out)")
    submit.add_argument("--env", action="append", default=[], type=_env_item, metavar="KEY[=VALUE]",
                        help="environment variable for the job; KEY alone passes this shell's value. "
                             "Printed masked if a secret, but visible to every holder of the cluster "
                             "token (deploy/README.md, trust model)")
    submit.add_argument("--working-dir", default=None,
                        help="folder uploaded as the job's working directory, holding CONFIG "
                             "(default: the current folder, as `ray job submit --working-dir .`)")
    submit.set_defaults(func=cmd_submit)

    jobs = sub.add_parser("jobs", help="list, inspect, follow and stop Ray jobs")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True, parser_class=sub._parser_class)
    listing = jobs_sub.add_parser("list", help="every job the cluster knows")
    status = jobs_sub.add_parser("status", help="status, message, entrypoint of one job")
    logs = jobs_sub.add_parser("logs", help="a job's output so far (--follow: until it ends)")
    stop = jobs_sub.add_parser("stop", help="ask a running job to stop")
    for cmd, func in ((listing, cmd_list), (status, cmd_status), (logs, cmd_logs), (stop, cmd_stop)):
        if cmd is not listing:
            cmd.add_argument("job_id", metavar="ID", help="submission id printed by rlhf submit")
        _add_address(cmd)
        cmd.set_defaults(func=func)
    logs.add_argument("--follow", action="store_true", help="keep printing until the job ends")
