"""The `rlhf` command line through `cli.main`: dotted overrides anywhere among the options,
and an --out that cannot be made is one line, exit 2, with nothing left on disk."""
from __future__ import annotations

import pytest

from rlhf.orchestrator import cli
from rlhf.orchestrator.cli import main
from rlhf.orchestrator.config import load_config
from rlhf.orchestrator.run.rundir import prepare_run_dir
from rlhf.orchestrator.errors import BadInput

CONFIG = "configs/ppo-tiny.yaml"
BAD = "no_such.key=1"  # load_config refuses it: proof the override reached the command


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# Each command that takes overrides, with its options; BAD goes before, between and after them.
COMMANDS = {
    "config show": (["config", "show", CONFIG], []),
    "ppo": (["ppo", CONFIG], ["--out", "/tmp/never-made", "--max-steps", "1", "--resume"]),
    "sft": (["sft", CONFIG], ["--out", "/tmp/never-made", "--max-steps", "1"]),
    "rm": (["rm", CONFIG], ["--out", "/tmp/never-made", "--address", "auto"]),
    "pipeline": (["pipeline", CONFIG], ["--out", "/tmp/never-made", "--resume"]),
    "eval": (["eval", CONFIG, "/tmp/a", "/tmp/b"], ["--samples", "2", "--out", "/tmp/never-made.json"]),
    "submit": (["submit", CONFIG], ["--stage", "ppo", "--address", "http://127.0.0.1:1", "--no-wait"]),
    "plan": (["plan", CONFIG], ["--node-type", "x"]),
}


def _placements(head: list[str], options: list[str]) -> list[list[str]]:
    between = [*head, *options[:2], BAD, *options[2:]] if len(options) > 2 else [*head, BAD]
    return [[*head, BAD, *options], between, [*head, *options, BAD]]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_overrides_before_between_and_after_the_options(capsys, command):
    for argv in _placements(*COMMANDS[command]):
        line = _one_line_error(capsys, argv)
        assert "no_such" in line and "unrecognized arguments" not in line, (argv, line)


def test_the_options_and_overrides_reach_the_command(monkeypatch):
    from rlhf.orchestrator.ppo import launch

    seen = {}
    monkeypatch.setattr(launch, "run_ppo", lambda cfg, **kw: seen.update(cfg=cfg, **kw))
    # CONFIG is the first positional; options may also come before it.
    argv = ["ppo", "--out", "runs/x", CONFIG, "ppo.kl.coef=0.1", "--max-steps", "2", "seed=3", "ppo.steps=7"]
    assert main(argv) == 0
    assert (seen["cfg"].ppo.kl.coef, seen["cfg"].seed, seen["cfg"].ppo.steps) == (0.1, 3, 7)
    assert (seen["out_dir"], seen["max_steps"], seen["resume"]) == ("runs/x", 2, False)


def test_config_show_prints_overrides_given_after_nothing_else(capsys):
    assert main(["config", "show", CONFIG, "ppo.kl.coef=0.25"]) == 0
    assert "coef: 0.25" in capsys.readouterr().out


def test_eval_positionals_keep_their_order_among_options(monkeypatch):
    from rlhf.orchestrator.recipe import evaluate

    seen = {}

    def fake_run_eval(cfg, a, b, **kw):
        seen.update(cfg=cfg, a=a, b=b, **kw)
        return {"win_rate": 0.5, "ci_low": 0.25, "ci_high": 0.75, "n": 4, "ties": 4, "samples": 2,
                "level": 0.95, "judge": "task (arithmetic)"}

    monkeypatch.setattr(evaluate, "run_eval", fake_run_eval)
    assert main(["eval", "--samples", "2", CONFIG, "A", "--prompts", "p.jsonl", "B", "seed=5"]) == 0
    assert (seen["a"], seen["b"], seen["cfg"].seed) == ("A", "B", 5)
    assert (seen["samples"], seen["prompts_file"]) == (2, "p.jsonl")


def test_missing_config_is_named_not_overrides():
    with pytest.raises(BadInput, match=r"required: config \(see"):
        cli.build_parser().parse_args(["ppo"])


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_out_that_cannot_be_created_is_one_line_exit_2(capsys, tmp_path, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "run" if where == "under_a_file" else "/proc/rlhf-cannot-exist/run"
    line = _one_line_error(capsys, ["sft", CONFIG, "--out", str(out), "--max-steps", "1"])
    assert f"output folder {out}: cannot be created" in line and "choose another --out" in line
    assert blocker.read_text() == "x" and sorted(tmp_path.iterdir()) == [blocker]


def test_out_that_cannot_be_written_is_named(tmp_path, monkeypatch):
    """A folder that exists but refuses the file (read-only mount, full disk); root writes
    through chmod, so the refusal is simulated."""
    from rlhf.orchestrator.run import rundir

    def refuse(path, text):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(rundir, "write_atomic", refuse)
    with pytest.raises(BadInput, match=r"output folder .*/run: cannot be written \(Permission denied\)"):
        prepare_run_dir(tmp_path / "run", load_config(CONFIG, []))


def test_runtime_failures_print_one_plain_line(capsys, monkeypatch):
    from rlhf.orchestrator import cli
    from rlhf.orchestrator.errors import RemoteCallFailed

    def fail(args):
        raise RemoteCallFailed("\x1b[36mray::PolicyLearner.train\x1b[0m: RuntimeError: boom\n  more")

    monkeypatch.setattr(cli, "_cmd_config_keys", fail)
    assert cli.main(["config", "keys"]) == 1
    assert capsys.readouterr().err == "error: ray::PolicyLearner.train: RuntimeError: boom more\n"
