"""Tasks as plug-ins: where demonstrations, prompts and the simulated labeler come from.

A task generates everything from a seed (no files, no download) and scores replies the
way its simulated labeler prefers. Built-ins are registered by name in `TASKS`; a user's
task is `pkg.module:Factory` or `/abs/path/file.py:Factory`, where `Factory()` returns an
object with the `Task` methods:

    data:
      task: instruct                       # or arithmetic, rules, evidence, or my_tasks.py:MyTask

    task = load_task("instruct")
    demos = task.demonstrations(256, seed=0)   # each ends with the demonstrated assistant turn
    prompts = task.prompts(256, seed=0)        # each ends with a user turn
    held_out = task.eval_prompts(32, seed=0)   # disjoint from prompts()
    task.score(held_out[0], "Apple, pear.")    # higher = better
    task.rules                                 # optional {name: text}: what labelers tick as broken

Only this package names the built-in task modules; everything else goes through
`load_task` / `TASKS`. Runs the same on one CPU machine and on a cluster (the driver
generates the data).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable, Protocol

from rlhf.orchestrator.errors import BadInput

Dialogue = list[dict]  # [{"role": "system"|"user"|"assistant", "content": str}, ...]
TASK_METHODS = ("demonstrations", "prompts", "eval_prompts", "score")


class Task(Protocol):
    name: str

    def demonstrations(self, n: int, seed: int) -> list[Dialogue]:
        """`n` conversations, each ending with the demonstrated assistant turn."""

    def prompts(self, n: int, seed: int) -> list[Dialogue]:
        """`n` conversations ending with a user turn (comparisons, PPO)."""

    def eval_prompts(self, n: int, seed: int) -> list[Dialogue]:
        """`n` held-out conversations ending with a user turn, disjoint from `prompts`."""

    def score(self, messages: Dialogue, reply: str) -> float:
        """The simulated labeler: how good `reply` is as the next assistant turn; higher = better."""


def import_target(target: str, key: str):
    """The object named by `pkg.module:name` or `path/to/file.py:name`.

    Every failure is a one-line BadInput naming `key` and `target`: no `:`, a missing file
    or module, an import that raises, a missing attribute.
    """
    module_part, sep, attr = target.rpartition(":")
    if not sep or not module_part or not attr:
        raise BadInput(f"{key}: {target!r}: expected pkg.module:name or path/to/file.py:name")
    if module_part.endswith(".py") or "/" in module_part:
        module = _import_file(Path(module_part), target, key)
    else:
        try:
            module = importlib.import_module(module_part)
        except ModuleNotFoundError as err:
            raise BadInput(f"{key}: {target}: no module named {err.name!r}") from None
        except Exception as err:  # the user's module failed while importing
            raise BadInput(f"{key}: {target}: importing {module_part} raised {type(err).__name__}: {err}") from None
    if not hasattr(module, attr):
        raise BadInput(f"{key}: {target}: {module_part} has no attribute {attr!r}")
    return getattr(module, attr)


def _import_file(path: Path, target: str, key: str):
    if not path.is_file():
        raise BadInput(f"{key}: {target}: no such file: {path}")
    # A name of its own per file, so two user files called tasks.py do not shadow each other.
    name = f"_rlhf_user_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise BadInput(f"{key}: {target}: cannot import {path} as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look classes up by module name
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise BadInput(f"{key}: {target}: importing {path} raised {type(err).__name__}: {err}") from None
    return module


def load_task(spec: str | None, key: str = "data.task") -> Task | None:
    """The task `spec` names: None -> None; a name in `TASKS`; or `pkg.module:Factory` /
    `/abs/path/file.py:Factory` whose `Factory()` returns an object with `TASK_METHODS`
    (a missing `name` attribute is set to the spec). Problems are one-line BadInputs naming `key`."""
    if spec is None:
        return None
    if spec in TASKS:
        return TASKS[spec]()
    if ":" not in spec:
        raise BadInput(f"{key}: unknown task {spec!r}; known: {', '.join(sorted(TASKS))} "
                       "(or pkg.module:Factory / path/to/file.py:Factory)")
    factory = import_target(spec, key)
    if not callable(factory):
        raise BadInput(f"{key}: {spec}: {type(factory).__name__} is not callable; expected a task factory")
    try:
        task = factory()
    except Exception as err:
        raise BadInput(f"{key}: {spec}: calling it raised {type(err).__name__}: {err}") from None
    missing = [m for m in TASK_METHODS if not callable(getattr(task, m, None))]
    if missing:
        raise BadInput(f"{key}: {spec}: the task lacks {', '.join(missing)} (a task needs {', '.join(TASK_METHODS)})")
    if not isinstance(getattr(task, "name", None), str):
        try:
            task.name = spec
        except AttributeError:
            pass  # a read-only object keeps whatever it has
    return task


# Imported last: the built-ins import nothing from here, and the registry needs them.
from rlhf.orchestrator.tasks.arithmetic import ArithmeticTask  # noqa: E402
from rlhf.orchestrator.tasks.evidence import EvidenceTask  # noqa: E402
from rlhf.orchestrator.tasks.instruct import InstructTask  # noqa: E402
from rlhf.orchestrator.tasks.rules import RulesTask  # noqa: E402

TASKS: dict[str, Callable[[], Task]] = {
    "arithmetic": ArithmeticTask,
    "evidence": EvidenceTask,
    "instruct": InstructTask,
    "rules": RulesTask,
}
