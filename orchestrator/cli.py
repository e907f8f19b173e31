"""The `rlhf` command line.

    rlhf config show CONFIG [dotted.key=value ...]   print the resolved config as YAML
    rlhf config keys                                 every key with type, default, meaning
    rlhf ppo CONFIG [overrides] [--out DIR] [--max-steps N] [--address ADDR] [--resume]
    rlhf sft CONFIG [overrides] [--out DIR] [--max-steps N] [--address ADDR]
    rlhf rm CONFIG [overrides] [--out DIR] [--max-steps N] [--address ADDR]
    rlhf dpo CONFIG [overrides] [--out DIR] [--max-steps N] [--address ADDR]
    rlhf pipeline CONFIG [overrides] [--out DIR] [--max-steps N] [--address ADDR] [--resume]
    rlhf submit CONFIG [overrides] --address http://HEAD:8265 [--stage S] [--no-wait] [--retries N]
    rlhf jobs list|status ID|logs ID [--follow]|stop ID [--address ...]
    rlhf plan CONFIG [overrides] [--cluster FILE] [--node-type NAME]   placement + GPU memory, exit 2 if it does not fit
    rlhf compare CONFIG [overrides] [--methods ppo,dpo,best_of_n] [--out DIR] [--resume]   methods side by side
    rlhf eval CONFIG A B [overrides] [--prompts FILE] [--samples N] [--out FILE.json]   win rate of A over B
              [--rerank N [--reward-model DIR] [--rule-model DIR] [--corpus JSONL]]   Sparrow@N of A beside A, B
    rlhf chat CHECKPOINT [--once TEXT] [--system TEXT] [--max-new-tokens N] [--temperature T]
              [--rerank N [--reward-model DIR] [--rule-model DIR] [--corpus JSONL]]   Sparrow@N
    rlhf model import SOURCE --out DIR [--force]      GGUF file (or folder holding one) -> checked HF folder
    rlhf model list                                  known model names (e.g. smollm2-135m-instruct), what is cached
    rlhf label serve RUN_DIR [--host H] [--port P] [--policy CHECKPOINT]   labeling web app (people rank, chat, write)
    rlhf label add-labeler|revoke RUN_DIR NAME; rlhf label list|stats RUN_DIR
    rlhf label export RUN_DIR --format preference|messages [--out FILE]   JSONL for data.comparisons / data.sft

Dotted overrides follow CONFIG and may come before, between or after the options.
Exit codes: 0 done; 2 bad input (one line on stderr, no traceback); 1 runtime failure.
"""
from __future__ import annotations

import argparse
import os
import sys

from rlhf.orchestrator.errors import (EXIT_BAD_INPUT, EXIT_OK, EXIT_RUNTIME, BadInput, RemoteCallFailed,
                                      RemoteCallTimeout, StageFailed, TrainingAborted)


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2 like every other bad input, and a
    leaf command takes its positionals (CONFIG, dotted overrides) before, between or after its
    options.

    Plain argparse stops collecting `nargs="*"` positionals at the first option, so
    `rlhf ppo CONFIG --out DIR a.b=1` fails with "unrecognized arguments". Intermixed parsing
    fixes that, but refuses a parser that has subcommands, so it applies per leaf parser: the
    top parser (and `config`, `jobs`) pick the command as usual, and the subparsers action
    then calls the leaf's parse_known_args, which parses intermixed."""

    _intermixing = False  # set while parse_known_intermixed_args calls back into parse_known_args

    def error(self, message: str):
        raise BadInput(f"{self.prog}: {message} (see {self.prog} --help)")

    def add_argument(self, *names, **kwargs):
        if kwargs.get("nargs") == "*" and names and not names[0].startswith("-"):
            # With a default it is optional; without, intermixed parsing names it among the
            # missing "required" arguments when CONFIG is missing.
            kwargs.setdefault("default", [])
        return super().add_argument(*names, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing or any(isinstance(a, argparse._SubParsersAction) for a in self._actions):
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def _cmd_config_show(args) -> int:
    from rlhf.orchestrator.config import load_config, to_yaml

    from rlhf.orchestrator.run.secrets import redact

    print(redact(to_yaml(load_config(args.config, args.overrides))), end="")
    return EXIT_OK


def _cmd_config_keys(args) -> int:
    from rlhf.orchestrator.config import describe_keys

    for key, kind, default, description in describe_keys():
        print(f"{key:<34} {kind:<40} default={default!r:<14} {description}")
    return EXIT_OK


def _load(args):
    """The command's config, loaded before the stage's modules (torch, Ray) are imported: a
    bad config or override fails in a fraction of a second."""
    from rlhf.orchestrator.config import load_config

    return load_config(args.config, args.overrides)


def _cmd_ppo(args) -> int:
    cfg = _load(args)
    from rlhf.orchestrator.ppo.launch import run_ppo

    run_ppo(cfg, out_dir=args.out or f"runs/{cfg.name}", max_steps=args.max_steps, address=args.address,
            resume=args.resume, started_at=_process_start())
    return EXIT_OK


def _process_start() -> float:
    """When this command's process started (time.time()): start-up counts from the command."""
    import psutil

    return psutil.Process().create_time()


def _cmd_pipeline(args) -> int:
    cfg = _load(args)
    from rlhf.orchestrator.recipe.pipeline import run_pipeline

    run_pipeline(cfg, out_dir=args.out or f"runs/{cfg.name}", address=args.address, resume=args.resume,
                 max_steps=args.max_steps)
    return EXIT_OK


def _cmd_sft(args) -> int:
    cfg = _load(args)
    from rlhf.orchestrator.recipe.pipeline import run_sft_stage

    run_sft_stage(cfg, out_dir=args.out or f"runs/{cfg.name}", address=args.address, max_steps=args.max_steps)
    return EXIT_OK


def _cmd_rm(args) -> int:
    cfg = _load(args)
    from rlhf.orchestrator.recipe.stages import run_rm_stage

    run_rm_stage(cfg, out_dir=args.out or f"runs/{cfg.name}", address=args.address, max_steps=args.max_steps)
    return EXIT_OK


def _cmd_rule_rm(args) -> int:
    cfg = _load(args)
    from rlhf.orchestrator.recipe.rule_rm import run_rule_rm_stage

    run_rule_rm_stage(cfg, out_dir=args.out or f"runs/{cfg.name}", address=args.address, max_steps=args.max_steps)
    return EXIT_OK


def _cmd_dpo(args) -> int:
    cfg = _load(args)
    from rlhf.orchestrator.recipe.dpo import run_dpo_stage

    run_dpo_stage(cfg, out_dir=args.out or f"runs/{cfg.name}", address=args.address, max_steps=args.max_steps)
    return EXIT_OK


def _cmd_compare(args) -> int:
    from rlhf.orchestrator.recipe.compare import parse_methods

    methods = parse_methods(args.methods)  # before the config: a typo fails at once
    cfg = _load(args)
    from rlhf.orchestrator.recipe.compare import run_compare

    run_compare(cfg, methods, out_dir=args.out or f"runs/{cfg.name}-compare", address=args.address,
                resume=args.resume, max_steps=args.max_steps)
    return EXIT_OK


def _cmd_eval(args) -> int:
    cfg = _load(args)
    if args.rerank is not None:
        from rlhf.orchestrator.recipe.sparrow_eval import format_rerank_result, run_rerank_eval

        result = run_rerank_eval(cfg, args.a, args.b, args.rerank, prompts_file=args.prompts, samples=args.samples,
                                 out=args.out, reward_model=args.reward_model, rule_model=args.rule_model,
                                 corpus=args.corpus)
        print(format_rerank_result(result))
        return EXIT_OK
    from rlhf.orchestrator.recipe.evaluate import format_result, run_eval

    result = run_eval(cfg, args.a, args.b, prompts_file=args.prompts, samples=args.samples, out=args.out)
    print(format_result(result))
    return EXIT_OK


def _add_eval(sub) -> None:
    cmd = sub.add_parser("eval", help="win rate of checkpoint A over B on the eval prompts, as the judge "
                                      "scores them, with a 95 %% CI")
    cmd.add_argument("config", help="experiment YAML: task, judge, eval prompts, sampling (rollout.*)")
    cmd.add_argument("a", metavar="A", help="model folder A, e.g. runs/NAME/checkpoints/final/policy")
    cmd.add_argument("b", metavar="B", help="model folder B, e.g. runs/NAME/sft/checkpoint")
    cmd.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    cmd.add_argument("--prompts", default=None, metavar="FILE",
                     help='JSONL of {"messages": [...]} ending with a user turn (default: the config\'s eval prompts)')
    cmd.add_argument("--samples", type=_positive_int, default=None,
                     help="replies per prompt and model (default: pipeline.eval_samples)")
    cmd.add_argument("--out", default=None, metavar="FILE.json", help="also write the result as JSON")
    _add_rerank_flags(cmd)  # A@N beside A's plain samples, and A@N over B
    cmd.set_defaults(func=_cmd_eval)


def _add_run_command(sub, name: str, help: str, func, resume: bool = False) -> None:
    """The shared shape of run commands: CONFIG [overrides] [--out] [--max-steps] [--address]."""
    cmd = sub.add_parser(name, help=help)
    cmd.add_argument("config", help="experiment YAML, e.g. configs/quickstart.yaml")
    cmd.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    cmd.add_argument("--out", default=None, help="output folder (default: runs/NAME)")
    cmd.add_argument("--max-steps", type=_positive_int, default=None,
                     help="stop each training stage after N optimizer/PPO steps (smoke runs)")
    cmd.add_argument("--address", default=None,
                     help="Ray cluster to join (e.g. auto or HOST:6379); default: an embedded local Ray")
    if resume:
        cmd.add_argument("--resume", action="store_true",
                         help="continue the run in --out from its latest checkpoint (finished stages are skipped)")
    cmd.set_defaults(func=func)


def _cmd_chat(args) -> int:
    if args.rerank is not None:
        from rlhf.orchestrator.recipe.sparrow import run_sparrow_chat

        run_sparrow_chat(args.checkpoint, args.rerank, reward_model=args.reward_model, rule_model=args.rule_model,
                         corpus=args.corpus, once=args.once, system=args.system,
                         max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
        return EXIT_OK
    from rlhf.orchestrator.models.chat import run_chat

    run_chat(args.checkpoint, once=args.once, system=args.system, max_new_tokens=args.max_new_tokens,
             temperature=args.temperature, seed=args.seed)
    return EXIT_OK


def _add_chat(sub) -> None:
    chat = sub.add_parser("chat", help="talk to a model folder (multi-turn; --once for one reply)")
    chat.add_argument("checkpoint", help="Hugging Face model folder, e.g. runs/NAME/checkpoints/final/policy, "
                                         "or a known name (rlhf model list)")
    chat.add_argument("--once", default=None, metavar="TEXT", help="answer this one message and exit")
    chat.add_argument("--system", default=None, metavar="TEXT", help="system message opening the conversation")
    chat.add_argument("--max-new-tokens", type=_positive_int, default=128, help="longest reply in tokens")
    chat.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy")
    chat.add_argument("--seed", type=int, default=0, help="sampling seed")
    _add_rerank_flags(chat)
    chat.set_defaults(func=_cmd_chat)


def _add_rerank_flags(cmd) -> None:
    """Sparrow@N (orchestrator/recipe/sparrow.py); defaults from the run folder above the checkpoint."""
    cmd.add_argument("--rerank", type=_positive_int, default=None, metavar="N",
                     help="Sparrow@N: sample N replies (half with search, half without), keep the one the "
                          "preference RM x rule no-violation ranks best")
    cmd.add_argument("--reward-model", default=None, metavar="DIR",
                     help="preference RM for --rerank (default: model.reward, else the run's newest roundN/rm)")
    cmd.add_argument("--rule-model", default=None, metavar="DIR",
                     help="rule RM for --rerank (default: model.rule_reward, else the run's newest roundN/rule_rm)")
    cmd.add_argument("--corpus", default=None, metavar="JSONL",
                     help="corpus the search half searches (default: evidence.corpus, else the run's "
                          "evidence/corpus.jsonl; none: no candidate searches)")


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


    _add_run_command(sub, "ppo", "PPO against the configured reward, on Ray", _cmd_ppo, resume=True)
    _add_run_command(sub, "sft", "supervised fine-tuning on demonstrations (Ray Train + DeepSpeed)", _cmd_sft)
    _add_run_command(sub, "rm", "reward model on preference pairs (data.comparisons) and OUT/comparisons.sqlite",
                     _cmd_rm)
    _add_run_command(sub, "rule-rm", "rule-conditional reward model (P(violation | dialogue, rule)) on "
                     "data.rule_labels and OUT/comparisons.sqlite's replies and rule checkboxes", _cmd_rule_rm)
    _add_run_command(sub, "dpo", "DPO/IPO/cDPO/SimPO/KTO on OUT/comparisons.sqlite and data.comparisons "
                                 "(Ray Train + DeepSpeed)", _cmd_dpo)
    _add_run_command(sub, "pipeline", "SFT, then rounds of comparisons -> reward model -> PPO",
                     _cmd_pipeline, resume=True)
    _add_run_command(sub, "compare", "ppo, dpo and best-of-N from the same SFT model and comparisons, "
                     "with a matched budget: one table and plot", _cmd_compare, resume=True)
    sub.choices["compare"].add_argument("--methods", default="ppo,dpo,best_of_n",
                                        help="comma-separated: ppo, dpo, best_of_n (default: all three)")
    _add_eval(sub)
    _add_chat(sub)
    from rlhf.orchestrator.cluster.jobs import register as register_jobs

    register_jobs(sub)  # submit, jobs list|status|logs|stop
    from rlhf.orchestrator.cluster.plan import register as register_plan

    register_plan(sub)  # plan
    from rlhf.orchestrator.models.registry import register as register_model

    register_model(sub)  # model import|list
    from rlhf.orchestrator.label.cli import register as register_label

    register_label(sub)  # label serve|add-labeler|list|revoke|stats|export
    from rlhf.orchestrator.evidence.cli import register as register_evidence

    register_evidence(sub)  # evidence index|search
    return parser


def _unexpected(argv: list[str] | None, err: Exception) -> str:
    """One line for an error no stage named (a bug): what failed, and where the traceback went."""
    import tempfile
    import traceback

    fd, path = tempfile.mkstemp(prefix="rlhf-traceback-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write(" ".join(["rlhf", *(sys.argv[1:] if argv is None else argv)]) + "\n\n")
        traceback.print_exception(err, file=f)
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return f"unexpected {type(err).__name__}: {first[:300]} (traceback in {path})"


def _one_line(err: Exception) -> str:
    """A failure from Ray workers as one plain line: their terminal colour codes and line
    breaks (Ray colours actor names) removed."""
    import re

    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(err)).split())


def main(argv: list[str] | None = None) -> int:
    from rlhf.orchestrator.run.lock import release_all
    from rlhf.orchestrator.run.quiet import drop_driver_notices

    drop_driver_notices()  # notices that say nothing is wrong (Ray's token auth, DeepSpeed's CPU)
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except BadInput as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (RemoteCallFailed, RemoteCallTimeout, TrainingAborted, StageFailed) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_RUNTIME
    except Exception as err:  # noqa: BLE001 - the contract is one line, even for a bug
        print(f"error: {_unexpected(argv, err)}", file=sys.stderr)
        return EXIT_RUNTIME
    finally:
        release_all()  # the run folders this command locked (run/lock.py)


if __name__ == "__main__":
    sys.exit(main())
