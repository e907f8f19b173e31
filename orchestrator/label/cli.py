"""`rlhf label ...`: people rank, chat and write demonstrations for a run, in a browser.

    rlhf label serve RUN_DIR [--host 127.0.0.1] [--port 8377] [--policy CHECKPOINT]
    rlhf label add-labeler RUN_DIR NAME        prints NAME's token once (only its hash is kept)
    rlhf label list RUN_DIR                    labelers, active or revoked
    rlhf label revoke RUN_DIR NAME
    rlhf label stats RUN_DIR                   per labeler: count, median seconds, agreement, Kendall tau
    rlhf label export RUN_DIR --format preference|messages [--out FILE.jsonl]

`serve` binds to loopback unless labelers exist: a non-loopback --host is refused while the
run has no labeler tokens, since then only the one-time login URL guards the page.
"""
from __future__ import annotations

import ipaddress
import json
import socket
import sys
from pathlib import Path

from rlhf.orchestrator.errors import EXIT_OK, BadInput

DEFAULT_PORT = 8377


def _run_dir(text: str) -> Path:
    run = Path(text)
    if not run.is_dir():
        raise BadInput(f"RUN_DIR: no such folder: {run}")
    return run


def _db(run: Path):
    from rlhf.orchestrator.label.db import LabelDB

    return LabelDB(run / "comparisons.sqlite")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            raise BadInput(f"--host {host} --port {port}: cannot listen there ({err.strerror})") from None


def _cmd_serve(args) -> int:
    from rlhf.orchestrator.run.quiet import quiet_driver

    run = _run_dir(args.run_dir)
    if not _loopback(args.host) and not _db(run).has_labelers():
        raise BadInput(f"--host {args.host}: not a loopback address, and {run} has no labelers; add one with "
                       f"`rlhf label add-labeler {run} NAME` first (each labeler signs in with their own token)")
    _check_port(args.host, args.port)
    quiet_driver()
    import uvicorn

    from rlhf.orchestrator.label.app import create_app
    from rlhf.orchestrator.label.uncertainty import newest_reward_model, reward_margins
    from rlhf.orchestrator.recipe.comparisons import ComparisonStore

    lab = create_app(run, policy=args.policy)
    order = lab.db.order
    if order == "uncertainty":
        rm = newest_reward_model(run)
        if rm is None:
            order = "uncertainty (no reward model in the run yet: oldest first)"
        else:
            with ComparisonStore(lab.db.path) as store:
                pending = [c for c in store.load(ranked_only=False) if not c.ranked]
            lab.db.margins = reward_margins(rm, pending)
            order = f"uncertainty (margins of {rm})"
    totals = lab.db.stats()["totals"]
    shown = "localhost" if args.host in ("127.0.0.1", "::1") else args.host
    print(f"label: open http://{shown}:{args.port}/login?token={lab.login_token} ({totals['pending']} comparisons "
          f"wait in {run}; order {order}; policy {args.policy or 'none'}; Ctrl-C stops)", flush=True)
    server = uvicorn.Server(uvicorn.Config(lab.app, host=args.host, port=args.port, log_level="warning",
                                           access_log=False))
    server.run()
    return EXIT_OK


def _cmd_add(args) -> int:
    token = _db(_run_dir(args.run_dir)).add_labeler(args.name)
    print(f"labeler {args.name} added; token (shown once, keep it secret): {token}")
    print(f"sign in at http://HOST:PORT/login?token={token} or send `Authorization: Bearer {token}`")
    return EXIT_OK


def _cmd_list(args) -> int:
    rows = _db(_run_dir(args.run_dir)).labelers()
    for lab in rows:
        print(f"{lab['name']:<24} added {lab['created']}  " + (f"revoked {lab['revoked']}" if lab["revoked"] else "active"))
    if not rows:
        print("no labelers yet (rlhf label add-labeler RUN_DIR NAME)")
    return EXIT_OK


def _cmd_revoke(args) -> int:
    _db(_run_dir(args.run_dir)).revoke(args.name)
    print(f"labeler {args.name} revoked: their token and sessions no longer work")
    return EXIT_OK


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _cmd_stats(args) -> int:
    stats = _db(_run_dir(args.run_dir)).stats()
    print(f"{'labeler':<20} {'count':>6} {'median s':>9} {'overlap':>8} {'agreement':>10} {'kendall tau':>12}")
    for p in stats["labelers"]:
        print(f"{p['name']:<20} {p['count']:>6} {_fmt(p['median_seconds'], '.1f'):>9} {p['overlap_items']:>8} "
              f"{_fmt(p['agreement'], '.2f'):>10} {_fmt(p['kendall_tau'], '.2f'):>12}")
    t = stats["totals"]
    print(f"store: {t['comparisons']} comparisons, {t['ranked']} ranked, {t['pending']} pending, {t['rankings']} "
          f"rankings by people, {t['demonstrations']} demonstrations, {t['labelers']} active labelers")
    return EXIT_OK


def export_rows(run: Path, fmt: str) -> list[dict]:
    """preference: every (better, worse) reply pair of every ranked comparison (each labeler's
    ranking on its own; pairs read from data.comparisons files are left out), as
    {"prompt": messages, "chosen", "rejected"}. messages: the demonstrations as {"messages"}."""
    from rlhf.orchestrator.recipe.comparisons import ComparisonStore
    from rlhf.orchestrator.recipe.stages import PREFERENCE_POLICY

    if fmt == "messages":
        return [{"messages": d["messages"]} for d in _db(run).demonstrations()]
    with ComparisonStore(run / "comparisons.sqlite") as store:
        ranked = [c for c in store.load() if c.policy != PREFERENCE_POLICY]
    return [{"prompt": c.prompt_messages, "chosen": c.replies[i], "rejected": c.replies[j]}
            for c in ranked for i in range(len(c.ranks)) for j in range(len(c.ranks)) if c.ranks[i] < c.ranks[j]]


def _cmd_export(args) -> int:
    from rlhf.orchestrator.run.rundir import write_atomic

    run = _run_dir(args.run_dir)
    if not (run / "comparisons.sqlite").is_file():
        raise BadInput(f"RUN_DIR: {run} has no comparisons.sqlite")
    rows = export_rows(run, args.format)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if args.out is None:
        sys.stdout.write(text)
    else:
        write_atomic(Path(args.out), text)
        print(f"label export: {len(rows)} {'preference pairs' if args.format == 'preference' else 'demonstrations'} "
              f"-> {args.out}", file=sys.stderr)
    return EXIT_OK


def _port(text: str) -> int:
    import argparse

    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"must be a port number 1..65535, got {text!r}")
    return int(text)


def register(sub) -> None:
    """Adds `label` and its subcommands to the rlhf parser's subcommands `sub`."""
    label = sub.add_parser("label", help="people rank, chat-and-compare and write demonstrations in a browser")
    cmds = label.add_subparsers(dest="label_command", required=True, parser_class=type(label))
    serve = cmds.add_parser("serve", help="the labeling web app over RUN_DIR/comparisons.sqlite")
    serve.add_argument("run_dir", metavar="RUN_DIR")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (non-loopback needs labelers)")
    serve.add_argument("--port", type=_port, default=DEFAULT_PORT)
    serve.add_argument("--policy", default=None, metavar="CHECKPOINT",
                       help="model folder to chat with, sample alternatives and suggestions from")
    serve.set_defaults(func=_cmd_serve)
    for name, helptext, func, with_name in (("add-labeler", "add a labeler; prints its token once", _cmd_add, True),
                                            ("list", "labelers of the run", _cmd_list, False),
                                            ("revoke", "revoke a labeler's token", _cmd_revoke, True),
                                            ("stats", "per-labeler counts, times and agreement", _cmd_stats, False)):
        cmd = cmds.add_parser(name, help=helptext)
        cmd.add_argument("run_dir", metavar="RUN_DIR")
        if with_name:
            cmd.add_argument("name", metavar="NAME")
        cmd.set_defaults(func=func)
    export = cmds.add_parser("export", help="preference pairs (data.comparisons) or demonstrations (data.sft) as JSONL")
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("--format", choices=("preference", "messages"), required=True)
    export.add_argument("--out", default=None, metavar="FILE.jsonl", help="default: stdout")
    export.set_defaults(func=_cmd_export)
