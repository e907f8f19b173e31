"""Every input the recipe reads: JSONL files and local Hugging Face datasets, in three formats.

A source (`DataSourceConfig`: path, format, weight, column, split) is one of
  - a JSONL file (one JSON object per line; any file not ending in .parquet, .json or .csv);
  - a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (`datasets.load_from_disk`);
  - a parquet, json or csv file, a folder of them, or a glob such as `data/*.parquet`
    (`datasets.load_dataset("parquet"|"json"|"csv", data_files=...)`; a folder of .jsonl files is
    read line by line like one JSONL file).
Nothing touches the network (HF_DATASETS_OFFLINE=1): to use a dataset from the Hub, download it
once with `datasets` and `save_to_disk` it, or point at its parquet files.

Formats (field names after the `column` mapping {our field: their column}):
  messages         {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  prompt_response  {"prompt": str, "response": str} -> [user, assistant] (InstructGPT's SFT data)
  preference       {"prompt": str or messages | "messages": [...], "chosen": ..., "rejected": ...}
                   (HH-RLHF, UltraFeedback, TRL): chosen and rejected are each a reply string, or a
                   message list whose last message is the assistant reply; with no prompt/messages
                   field the prompt is that list without its last message (both lists must share it).
                   Raw HH-RLHF transcripts ("\\n\\nHuman: ... \\n\\nAssistant: ...") need converting first.
  rule_labels      {"messages": [...], "reply": str, "rule": name, "violated": bool}: one reply judged
                   against one rule (orchestrator/data/rule_labels.py reads them; not a dialogue source).
As dialogues (SFT, prompts, eval) a preference row counts as its prompt plus the chosen reply.
`load_preferences` reads every source as preference rows (a messages-format source too: its
`messages` field is then the prompt); a prompt_response source has no rejected reply and is an error.

Mixing by weight (`load_dialogues`): a source of weight w and N rows contributes round(w * N) rows:
as many whole copies of it (in file order) as fit, then a seeded sample without replacement for
the rest, kept in file order (w = 1: the file as it is; 0.5: a random half; 2.5: two copies and a
random half). A weight that rounds to no row is an error.
Built-in task dialogues (`base`) come first and are not weighted.

Bad input is one-line `BadInput` naming where: `<key>.path` for a missing file or folder,
`<file>:<line>` for a malformed JSONL line, `<path> row <i>` (0-based, as `dataset[i]`) for a bad
dataset row, `<key>` and the dataset's columns for a missing column, `<key>.split` for an unknown
split, and `<key>` for an empty source. Runs anywhere (CPU only, no Ray):

    pairs = load_preferences(cfg.data.comparisons, "data.comparisons")
"""
from __future__ import annotations

import glob
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from rlhf.orchestrator.config import DataSourceConfig
from rlhf.orchestrator.errors import BadInput

Dialogue = list[dict]  # [{"role": "system"|"user"|"assistant", "content": str}, ...]
ROLES = ("system", "user", "assistant")
# format -> (required fields, optional fields)
FIELDS = {"messages": (("messages",), ()), "prompt_response": (("prompt", "response"), ()),
          "preference": (("chosen", "rejected"), ("prompt", "messages")),
          "rule_labels": (("messages", "reply", "rule", "violated"), ())}  # read by data/rule_labels.py
_NOUN = {"messages": "dialogue", "prompt_response": "prompt/response pair", "preference": "preference pair",
         "rule_labels": "rule label"}
_HF_BUILDERS = {".parquet": "parquet", ".json": "json", ".csv": "csv"}
_JSONL = ".jsonl"


@dataclass(frozen=True)
class PreferencePair:
    prompt: list[dict]    # conversation ending with a user turn
    chosen: str
    rejected: str


class _RowError(ValueError):
    """A problem with one row; the caller prefixes where it is."""


# --------------------------------------------------------------------------- public API


def read_rows(src: DataSourceConfig, key: str) -> list[dict]:
    """The rows of one source with `column` applied (our field names), e.g. key "data.sft.0"."""
    return [row for _, row in _located_rows(src, key)]


def load_dialogues(sources: list[DataSourceConfig], key: str, seed: int,
                   base: list[Dialogue] = ()) -> list[Dialogue]:
    """`base`, then every source's dialogues mixed in by weight (reproducible from `seed`)."""
    rng = random.Random(seed)
    out = list(base)
    for index, src in enumerate(sources):
        where = f"{key}.{index}"
        dialogues = [_parsed(src.format, row, at, _dialogue) for at, row in _located_rows(src, where)]
        out += _mix(dialogues, src.weight, rng, where)
    return out


def load_preferences(sources: list[DataSourceConfig], key: str) -> list[PreferencePair]:
    """Every source's preference pairs, mixed by weight (each source sampled with its own fixed
    seed, its index, so the pairs do not depend on the experiment's seed)."""
    out: list[PreferencePair] = []
    for index, src in enumerate(sources):
        where = f"{key}.{index}"
        if src.format == "prompt_response":
            raise BadInput(f"{where}.format: {key} holds preference pairs (prompt, chosen, rejected); "
                           "prompt_response has no rejected reply; use format: preference")
        src = src.model_copy(update={"format": "preference"})
        pairs = [_parsed("preference", row, at, _pair) for at, row in _located_rows(src, where)]
        out += _mix(pairs, src.weight, random.Random(index), where)
    return out


# --------------------------------------------------------------------------- rows


def _located_rows(src: DataSourceConfig, key: str) -> list[tuple[str, dict]]:
    """(where, row) for every row of a source: where is "file:line" or "path row i"."""
    _check_column_map(src, key)
    path = Path(src.path)
    has_glob = any(ch in src.path for ch in "*?[")
    if not has_glob and not path.exists():
        raise BadInput(f"{key}.path: no such file or folder: {src.path}")
    if not has_glob and path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json")):
        rows = _hf_rows(src, key, files=None)
    else:
        files = _data_files(src.path, key)
        kinds = {_HF_BUILDERS.get(f.suffix.lower(), _JSONL) for f in files}
        if len(kinds) > 1:
            raise BadInput(f"{key}.path: {src.path} mixes file types ({', '.join(sorted(kinds))}); "
                           "give one source per type")
        if src.split is not None:
            raise BadInput(f"{key}.split: only a folder written by DatasetDict.save_to_disk has splits; "
                           f"{src.path} is not one (remove split)")
        kind = kinds.pop()
        rows = _hf_rows(src, key, files) if kind != _JSONL else \
            [(at, _mapped(row, src.column)) for f in files for at, row in _jsonl_rows(f)]
    if not rows:
        raise BadInput(f"{key}: {src.path}: empty dataset (no rows)")
    return rows


def _check_column_map(src: DataSourceConfig, key: str) -> None:
    required, optional = FIELDS[src.format]
    for ours in src.column:
        if ours not in required + optional:
            raise BadInput(f"{key}.column: {ours!r} is not a field of format {src.format} "
                           f"(fields: {', '.join(required + optional)})")


def _data_files(spec: str, key: str) -> list[Path]:
    """The data files of a file, a folder (its .jsonl/.parquet/.json/.csv files) or a glob."""
    path = Path(spec)
    if any(ch in spec for ch in "*?["):
        files = [Path(p) for p in sorted(glob.glob(spec, recursive=True)) if Path(p).is_file()]
        if not files:
            raise BadInput(f"{key}.path: no such file or folder: no file matches {spec}")
        return files
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in (_JSONL, *_HF_BUILDERS))
    if not files:
        raise BadInput(f"{key}.path: {spec} holds no dataset (a save_to_disk folder, or "
                       ".jsonl/.parquet/.json/.csv files)")
    return files


def _jsonl_rows(path: Path) -> list[tuple[str, dict]]:
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise BadInput(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise BadInput(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append((f"{path}:{lineno}", row))
    return rows


def _datasets():
    """`datasets`, imported offline and quiet (it reads HF_DATASETS_OFFLINE at import)."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets

    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True  # if imported before us
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    return datasets


def _hf_rows(src: DataSourceConfig, key: str, files: list[Path] | None) -> list[tuple[str, dict]]:
    """Rows of a save_to_disk folder (files None) or of parquet/json/csv files."""
    datasets = _datasets()
    if files is None and _saved_empty(Path(src.path)):
        return []  # load_from_disk fails on a dataset saved with no rows; it is just empty
    try:
        if files is None:
            loaded = datasets.load_from_disk(src.path)
        else:
            loaded = datasets.load_dataset(_HF_BUILDERS[files[0].suffix.lower()], data_files=[str(f) for f in files])
    except Exception as err:  # corrupt folder, unreadable parquet, bad csv ...: the user's data
        first = next((ln for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
        raise BadInput(f"{key}.path: cannot read {src.path} as a Hugging Face dataset: {first}") from None
    dataset = _pick_split(loaded, src, key, datasets.DatasetDict)
    required, optional = FIELDS[src.format]
    columns = list(dataset.column_names)
    for field in required + tuple(f for f in optional if f in src.column):
        column = src.column.get(field, field)
        if column not in columns:
            mapped = f"for field {field}, " if column != field else ""
            raise BadInput(f"{key}: column {column!r} ({mapped}format {src.format}) not in dataset columns "
                           f"{columns}; map it with column: {{{field}: ...}}")
    return [(f"{src.path} row {i}", _mapped(row, src.column)) for i, row in enumerate(dataset.to_list())]


def _saved_empty(folder: Path) -> bool:
    """True for a save_to_disk folder of a Dataset with no rows (no arrow files)."""
    try:
        return json.loads((folder / "state.json").read_text()).get("_data_files") == []
    except (OSError, ValueError, AttributeError):
        return False


def _pick_split(loaded, src: DataSourceConfig, key: str, dataset_dict: type):
    """The split to read: src.split, else train, else the only one."""
    if not isinstance(loaded, dataset_dict):
        if src.split is not None:
            raise BadInput(f"{key}.split: {src.path} is one dataset without splits (remove split)")
        return loaded
    splits = list(loaded)
    split = src.split or ("train" if "train" in splits else splits[0] if len(splits) == 1 else None)
    if split is None:
        raise BadInput(f"{key}.split: {src.path} has splits {splits} and none is train; choose one")
    if split not in splits:
        raise BadInput(f"{key}.split: no split {split!r} in {src.path}; splits: {splits}")
    return loaded[split]


def _mapped(row: dict, column: dict[str, str]) -> dict:
    out = dict(row)
    for ours, theirs in column.items():
        if theirs in row:
            out[ours] = row[theirs]
        else:
            out.pop(ours, None)  # a mapped field is read from its column only
    return out


def _mix(items: list, weight: float, rng: random.Random, key: str) -> list:
    """round(weight * N) items: whole copies in order, then a sample (in order) of the rest."""
    n = round(weight * len(items))
    if n == 0:
        raise BadInput(f"{key}.weight: {weight} x {len(items)} rows rounds to no row; raise the weight")
    copies, rest = divmod(n, len(items))
    return items * copies + [items[i] for i in sorted(rng.sample(range(len(items)), rest))]


# --------------------------------------------------------------------------- formats


def _parsed(fmt: str, row: dict, at: str, parse):
    """parse(fmt, row), with a row problem turned into BadInput naming where it is."""
    try:
        for field in FIELDS[fmt][0]:
            if field not in row:
                raise _RowError(f"missing field {field!r} (format {fmt}; fields here: {sorted(row)}; "
                                f"map one with column: {{{field}: ...}})")
        return parse(fmt, row)
    except _RowError as err:
        raise BadInput(f"{at}: malformed {_NOUN[fmt]}: {err}") from None


def _messages(value, field: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _RowError(f"{field!r} must be a non-empty list of messages")
    out = []
    for m in value:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise _RowError(f"each message in {field!r} needs role in {ROLES} and string content, got {m!r}"[:200])
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _text(row: dict, field: str) -> str:
    if not isinstance(row[field], str):
        raise _RowError(f"{field!r} must be a string, got {type(row[field]).__name__}")
    return row[field]


def _dialogue(fmt: str, row: dict) -> Dialogue:
    if fmt == "messages":
        return _messages(row["messages"], "messages")
    if fmt == "prompt_response":
        return [{"role": "user", "content": _text(row, "prompt")},
                {"role": "assistant", "content": _text(row, "response")}]
    pair = _pair(fmt, row)
    return pair.prompt + [{"role": "assistant", "content": pair.chosen}]


def _reply(value, field: str) -> tuple[str, list[dict] | None]:
    """(reply text, the conversation before it or None): a string, or messages ending with the reply."""
    if isinstance(value, str):
        return value, None
    if isinstance(value, list):
        messages = _messages(value, field)
        if messages[-1]["role"] != "assistant":
            raise _RowError(f"the last message of {field!r} must be the assistant reply, got {messages[-1]['role']}")
        return messages[-1]["content"], messages[:-1]
    raise _RowError(f"{field!r} must be a string or a list of messages, got {type(value).__name__}")


def _pair(fmt: str, row: dict) -> PreferencePair:
    chosen, chosen_ctx = _reply(row["chosen"], "chosen")
    rejected, rejected_ctx = _reply(row["rejected"], "rejected")
    if row.get("prompt") is not None:
        prompt = ([{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str)
                  else _messages(row["prompt"], "prompt"))
    elif row.get("messages") is not None:
        prompt = _messages(row["messages"], "messages")
    elif chosen_ctx is None or rejected_ctx is None:
        raise _RowError("no prompt: give a 'prompt' or 'messages' field, or chosen and rejected as message "
                        "lists ending with the reply")
    elif chosen_ctx != rejected_ctx:
        raise _RowError("chosen and rejected continue different conversations")
    else:
        prompt = chosen_ctx
    if not prompt or prompt[-1]["role"] != "user":
        raise _RowError("the prompt must end with a user turn")
    if chosen == rejected:
        raise _RowError("chosen equals rejected: the pair states no preference")
    return PreferencePair(prompt, chosen, rejected)
