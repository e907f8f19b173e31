"""Which environment variables hold secrets, and `redact(text)` that masks their values.

Tokens and API keys (Ray's cluster token, wandb, the Hugging Face hub, Azure service
principals) reach a run only through the environment, never through a config file. Every
place where text leaves the process passes it through `redact` first: `rlhf config show`,
the run folder's config.yaml, metrics and console logging, and what `rlhf submit` /
`rlhf jobs` print (entrypoints, runtime environments, the job logs they follow).

Works the same on one CPU machine and on a cluster: the values masked are those of the
process that prints (plus any given explicitly, e.g. `rlhf submit --env KEY=VALUE`).
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

MASK = "***"

# Named explicitly so they are secrets whatever the suffix rules below say.
SECRET_NAMES = frozenset({
    "RAY_AUTH_TOKEN", "WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
    "AZURE_CLIENT_SECRET", "AZURE_STORAGE_KEY", "AZURE_STORAGE_CONNECTION_STRING",
})
SECRET_SUFFIXES = ("_TOKEN", "_KEY", "_SECRET", "_PASSWORD")

# Shorter values are not masked: replacing e.g. "1" or "true" everywhere would garble the
# text while protecting nothing (real tokens and keys are tens of characters long).
MIN_SECRET_LEN = 8


def is_secret_name(name: str) -> bool:
    """True for RAY_AUTH_TOKEN, WANDB_API_KEY, HF_TOKEN, AZURE_*SECRET*, *_TOKEN/_KEY/_SECRET/_PASSWORD."""
    upper = name.upper()
    return (upper in SECRET_NAMES or upper.endswith(SECRET_SUFFIXES)
            or (upper.startswith("AZURE_") and "SECRET" in upper))


def ray_token_file_value() -> str | None:
    """The Ray auth token held in a file (RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token), if any.

    Ray reads its token from there when RAY_AUTH_TOKEN is unset, so it is a secret too."""
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def secret_values(env: Mapping[str, str] | None = None, extra: Iterable[str] = ()) -> list[str]:
    """Values to mask: secret-named variables of `env` (default os.environ), the Ray token
    file, and `extra`; longest first so a secret that contains another is masked whole."""
    env = os.environ if env is None else env
    values = {v for k, v in env.items() if is_secret_name(k)}
    values.update(extra)
    token = ray_token_file_value()
    if token:
        values.add(token)
    return sorted((v for v in values if v and len(v) >= MIN_SECRET_LEN), key=len, reverse=True)


class Redactor:
    """Masks a fixed set of secret values (computed once: use one per stream of lines).

    Besides the values themselves, `NAME=value` / `NAME: value` for a secret environment
    variable NAME is masked even when the value is not one of ours (e.g. a job's
    environment printed back). Only upper-case names count, so YAML keys such as a
    tokenizer's `pad_token:` stay intact."""

    _ASSIGNMENT = re.compile(r"(?P<name>\b[A-Z_][A-Z0-9_]*)(?P<sep>['\"]?\s*[=:]\s*['\"]?)(?P<value>[^\s'\",}]+)")

    def __init__(self, env: Mapping[str, str] | None = None, extra: Iterable[str] = ()) -> None:
        self.values = secret_values(env, extra)

    def __call__(self, text: str) -> str:
        for value in self.values:
            text = text.replace(value, MASK)
        return self._ASSIGNMENT.sub(self._mask_assignment, text)

    @staticmethod
    def _mask_assignment(match: re.Match) -> str:
        if not is_secret_name(match["name"]) or match["value"] == MASK:
            return match[0]
        return f"{match['name']}{match['sep']}{MASK}"


def redact(text: str, extra: Iterable[str] = ()) -> str:
    """`text` with every secret value of this process's environment (and `extra`) masked."""
    return Redactor(extra=extra)(text)


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of an environment mapping with the values of secret-named keys masked."""
    return {k: (MASK if is_secret_name(k) else v) for k, v in env.items()}
