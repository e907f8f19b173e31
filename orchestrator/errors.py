"""Errors the CLI turns into exit codes (see DESIGN.md, "User-facing contract").

`BadInput` is anything the user can fix by editing a config, a data file, a path or a
resource request (or a run folder another live run holds): the CLI prints its one-line
message and exits 2, with no traceback. A runtime failure (`StageFailed` and the remote-call
errors below) is one line naming the role and the phase, exit 1. Anything else that reaches
the CLI is a bug: still one line and exit 1, with the traceback written to a file it names.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_BAD_INPUT = 2


class BadInput(Exception):
    """A problem with the user's input; `str(err)` is the whole one-line message."""

    def __init__(self, message: str) -> None:
        # Collapse to one line: the contract is one line on stderr, whatever the cause.
        super().__init__(" ".join(str(message).split()))


class ConfigError(BadInput):
    """A config value is missing, unknown, mistyped or out of range.

    `key` is the dotted key (e.g. "ppo.kl.coef"), or "" for whole-file problems.
    """

    def __init__(self, key: str, message: str, source: str | None = None) -> None:
        self.key, self.detail, self.source = key, message, source
        where = ": ".join(part for part in (source, key) if part)
        super().__init__(f"config error: {where}: {message}" if where else f"config error: {message}")

    def at(self, source: str | None) -> "ConfigError":
        """The same error, attributed to a config file."""
        return ConfigError(self.key, self.detail, source=source)


class RemoteCallTimeout(RuntimeError):
    """A remote call did not finish in time; the message names the role and the phase (exit 1)."""


class RemoteCallFailed(RuntimeError):
    """A remote call raised or its actor died; the message names the role and the phase (exit 1)."""


class TrainingAborted(RuntimeError):
    """Training cannot go on (e.g. too many consecutive non-finite updates); exit 1. The
    last checkpoint is intact and `--resume` continues from it."""


class StageFailed(RuntimeError):
    """A stage's own work failed at runtime (a worker group, an in-process model load, a
    resume that finds no intact checkpoint); the message names the role and the phase (exit 1)."""
