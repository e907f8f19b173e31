"""`rlhf model import SOURCE --out DIR`: a GGUF file becomes a normal Hugging Face folder.

    rlhf model import path/to/model.gguf --out models/smollm2      one file
    rlhf model import path/to/folder --out models/smollm2          a folder holding one .gguf
    rlhf model import model.gguf --out models/smollm2 --force      replace an existing folder

transformers dequantises the GGUF (gguf_file=...) into float32 torch weights, but refuses
to `save_pretrained` a model it loaded that way; so the weights move into a plain model
built from the same config (minus its quantization_config) and that one is saved:
safetensors (fp32), the tokenizer with its chat template, and a generation config whose
eos ids include the template's end-of-turn token (SmolLM2: <|im_end|>), so that
`generate` and vLLM stop at the end of an assistant turn.

The import is checked before it is kept: greedy decoding of a fixed chat prompt must give
the same tokens from transformers on the written folder as on the GGUF. The folder is
written next to DIR under a temporary name and renamed into place, so an interrupted or
failed import leaves nothing that looks like a model. Bad input (not a GGUF, truncated,
a folder with no or several .gguf files, DIR existing without --force) is a one-line
`BadInput` naming the path, checked before transformers starts.

Runs on one CPU (SmolLM2-135M: about 30 s, 538 MB written); on a cluster, import once
on shared storage and point `model.policy` at the folder.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.run.rundir import replace_folder

GGUF_MAGIC = b"GGUF"
# Written into the folder last, before the rename: where it came from and what was checked.
MARKER = "rlhf_import.json"
CHECK_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
CHECK_TOKENS = 16


def find_gguf(source: str | os.PathLike) -> Path:
    """The GGUF file named by `source` (a file, or a folder holding exactly one .gguf)."""
    path = Path(source)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
        if not found:
            raise BadInput(f"model import: no .gguf file in {path}")
        if len(found) > 1:
            raise BadInput(f"model import: {len(found)} .gguf files in {path} "
                           f"({', '.join(p.name for p in found)}); give one file")
        path = found[0]
    elif not path.is_file():
        raise BadInput(f"model import: no such file or folder: {path}")
    return path.resolve()


def check_gguf(path: Path) -> None:
    """`BadInput` unless `path` is a complete GGUF file (magic, header, every tensor's bytes).

    gguf's reader parses the header and maps the tensors; a file cut short fails there or
    leaves a tensor ending past the end of the file. Done before transformers, whose errors
    on such files are neither short nor about the file."""
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise BadInput(f"model import: {path} is not a GGUF file (it does not start with 'GGUF')")
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        size = path.stat().st_size
        end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as err:  # the reader raises whatever numpy does on a short buffer
        raise BadInput(f"model import: {path} is truncated or corrupt "
                       f"(gguf: {type(err).__name__}: {err})") from None
    if not reader.tensors or end > size:
        raise BadInput(f"model import: {path} is truncated ({size} bytes, its tensors need {end})")


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextlib.contextmanager
def quiet_transformers():
    """No progress bars and no library warnings while loading and saving: the import prints
    its own lines. transformers' GGUF loader draws its own tqdm bar on stderr, and saving
    imports DeepSpeed, which warns on stdout that it fell back to the CPU accelerator."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    deepspeed_log, below_error = logging.getLogger("DeepSpeed"), _BelowError()
    deepspeed_log.addFilter(below_error)  # a filter survives DeepSpeed's own logger set-up
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        deepspeed_log.removeFilter(below_error)
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_gguf(path: Path):
    """(model, tokenizer) dequantised to float32 by transformers; `BadInput` naming `path`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError) as err:
        raise BadInput(f"model import: transformers cannot load {path}: {type(err).__name__}: {err}") from None
    return model.eval(), tokenizer


def end_of_turn_ids(tokenizer) -> list[int]:
    """Ids the chat template puts right after an assistant reply (ChatML: <|im_end|>), then the
    tokenizer's eos: what a generation config must stop at."""
    ids = []
    if getattr(tokenizer, "chat_template", None):
        sentinel = "Xq7Z"
        text = tokenizer.apply_chat_template(CHECK_MESSAGES + [{"role": "assistant", "content": sentinel}],
                                             tokenize=False)
        after = tokenizer(text.split(sentinel)[-1], add_special_tokens=False)["input_ids"]
        special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
        ids += [i for i in after if i in special][:1]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(ids))


def greedy_tokens(model, tokenizer, n: int = CHECK_TOKENS) -> list[int]:
    """`n` greedy tokens after the fixed check prompt: a plain argmax loop, so neither side's
    generation config (eos ids, penalties) can make the two differ."""
    import torch

    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(CHECK_MESSAGES, add_generation_prompt=True, tokenize=True,
                                            return_dict=True, return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer(CHECK_MESSAGES[0]["content"], return_tensors="pt")["input_ids"]
    tokens, cache = [], None
    with torch.no_grad():
        for _ in range(n):
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            cache, ids = out.past_key_values, out.logits[:, -1:].argmax(-1)
            tokens.append(int(ids))
    return tokens


def check_folder(folder: Path, expected: list[int], source: Path) -> None:
    """Loads `folder` afresh with transformers; `BadInput` unless its greedy tokens are `expected`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
    got = greedy_tokens(model, tokenizer, len(expected))
    if got != expected:
        first = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
        raise BadInput(f"model import: {source}: the written folder does not reproduce the GGUF "
                       f"(greedy token {first} differs: {got[first]} vs {expected[first]}); nothing kept")


def _plain_model(gguf_model, tokenizer):
    """The same weights in a model transformers will save: built from the config without its
    quantization_config, with a generation config that stops at the end of a turn."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with quiet_transformers():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise BadInput(f"model import: the GGUF's tensors do not fit {type(model).__name__} "
                       f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    eos = end_of_turn_ids(tokenizer)
    gen = gguf_model.generation_config.to_dict()
    gen.update(eos_token_id=eos if len(eos) > 1 else eos[0] if eos else None,
               pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [None])[0])
    model.generation_config = GenerationConfig.from_dict(gen)
    return model.eval()


def _created_dirs(parent: Path) -> Path | None:
    """The topmost folder `mkdir(parents=True)` on `parent` would create (None if it exists)."""
    top = None
    for p in (parent, *parent.parents):
        if p.exists():
            break
        top = p
    return top


def import_gguf(source: str | os.PathLike, out: str | os.PathLike, force: bool = False,
                log: Callable[[str], None] = print) -> Path:
    """Imports the GGUF at `source` into the Hugging Face folder `out` and returns `out`."""
    started = time.perf_counter()
    path = find_gguf(source)
    out = Path(out).absolute()
    if out.exists() and not force:
        raise BadInput(f"model import: --out {out} exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise BadInput(f"model import: --out {out} is a file, not a folder")
    if out == path.parent or out in path.parents:
        raise BadInput(f"model import: --out {out} holds the source {path}; choose another folder")
    check_gguf(path)
    log(f"model import: {path} ({path.stat().st_size / 1e6:.0f} MB) -> {out}")
    gguf_model, tokenizer = load_gguf(path)
    params = sum(p.numel() for p in gguf_model.parameters())
    log(f"model import: dequantised {type(gguf_model).__name__}, {params / 1e6:.1f} M parameters, "
        f"to float32 ({time.perf_counter() - started:.0f} s)")
    expected = greedy_tokens(gguf_model, tokenizer)
    model = _plain_model(gguf_model, tokenizer)
    del gguf_model
    made = _created_dirs(out.parent)
    tmp = out.parent / f".{out.name}.importing-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        with quiet_transformers():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        del model
        check_folder(tmp, expected, path)
        size = sum(f.stat().st_size for f in tmp.iterdir())
        (tmp / MARKER).write_text(json.dumps({
            "source": str(path), "source_bytes": path.stat().st_size, "check_prompt": CHECK_MESSAGES,
            "greedy_tokens": expected, "seconds": round(time.perf_counter() - started, 1)}, indent=1) + "\n")
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise
    stop = set(end_of_turn_ids(tokenizer))
    reply = expected[:next((i for i, t in enumerate(expected) if t in stop), len(expected))]
    text = tokenizer.decode(reply, skip_special_tokens=True).strip().replace("\n", " ")
    log(f"model import: checked: {len(expected)} greedy tokens match the GGUF ({text!r})")
    log(f"model import: wrote {out} ({size / 1e6:.0f} MB) in {time.perf_counter() - started:.0f} s")
    return out


def is_imported(folder: str | os.PathLike, source: str | os.PathLike | None = None) -> bool:
    """True if `folder` is a finished import (marker present), of `source` as it is now if given."""
    marker = Path(folder) / MARKER
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if source is None:
        return True
    source = Path(source)
    return meta.get("source") == str(source.resolve()) and meta.get("source_bytes") == source.stat().st_size
