"""The `rlhf` command line.

    rlhf config show CONFIG [dotted.key=value ...]   print the resolved config as YAML
    rlhf config keys                                 every key with type, default, meaning
    rlhf quickstart CONFIG [overrides] [--out DIR] [--max-steps N]
    rlhf ppo CONFIG [overrides] [--out DIR] [--max-steps N] [--address ADDR]

Exit codes: 0 done; 2 bad input (one line on stderr, no traceback); 1 runtime failure.
"""
from __future__ import annotations

import argparse
import sys

from rlhf.orchestrator.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_RUNTIME, BadInput, RemoteCallFailed, RemoteCallTimeout


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2 like every other bad input."""

    def error(self, message: str):
        raise BadInput(f"{self.prog}: {message} (see {self.prog} --help)")


def _cmd_config_show(args) -> int:
    from rlhf.orchestrator.config import load_config, to_yaml

    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return EXIT_OK


def _cmd_config_keys(args) -> int:
    from rlhf.orchestrator.config import describe_keys

    for key, kind, default, description in describe_keys():
        print(f"{key:<34} {kind:<40} default={default!r:<14} {description}")
    return EXIT_OK


def _cmd_quickstart(args) -> int:
    from rlhf.orchestrator.config import load_config
    from rlhf.orchestrator.quickstart import run_quickstart

    cfg = load_config(args.config, args.overrides)
    run_quickstart(cfg, out_dir=args.out, max_steps=args.max_steps)
    return EXIT_OK


def _cmd_ppo(args) -> int:
    from rlhf.orchestrator.config import load_config
    from rlhf.orchestrator.launch import run_ppo

    cfg = load_config(args.config, args.overrides)
    run_ppo(cfg, out_dir=args.out or f"runs/{cfg.name}", max_steps=args.max_steps, address=args.address)
    return EXIT_OK


def _positive_int(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rlhf", description="RLHF (SFT -> reward model -> PPO) on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    config = sub.add_parser("config", help="inspect experiment configs")
    config_sub = config.add_subparsers(dest="config_command", required=True, parser_class=_Parser)
    show = config_sub.add_parser("show", help="print the resolved config as YAML")
    show.add_argument("config", help="experiment YAML, e.g. configs/quickstart.yaml")
    show.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    show.set_defaults(func=_cmd_config_show)
    keys = config_sub.add_parser("keys", help="list every config key with its type, default and meaning")
    keys.set_defaults(func=_cmd_config_keys)

    quick = sub.add_parser("quickstart", help="build the tiny model for the task, warm it up, sample and score")
    quick.add_argument("config", help="experiment YAML, e.g. configs/quickstart.yaml")
    quick.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    quick.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    quick.add_argument("--max-steps", type=_positive_int, default=None,
                       help="stop the warm-up after N optimizer steps")
    quick.set_defaults(func=_cmd_quickstart)

    ppo = sub.add_parser("ppo", help="PPO against the configured reward, on Ray")
    ppo.add_argument("config", help="experiment YAML, e.g. configs/ppo-tiny.yaml")
    ppo.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    ppo.add_argument("--out", default=None, help="output folder (default: runs/NAME)")
    ppo.add_argument("--max-steps", type=_positive_int, default=None, help="stop after N PPO steps")
    ppo.add_argument("--address", default=None,
                     help="Ray cluster to join (e.g. auto or HOST:6379); default: an embedded local Ray")
    ppo.set_defaults(func=_cmd_ppo)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except BadInput as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (RemoteCallFailed, RemoteCallTimeout) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
