"""Tiny, randomly initialised chat models built locally (no model hub needed).

Tests and the quickstart need a real Hugging Face model folder that both transformers
and vLLM load: a byte-level BPE tokenizer trained on a handful of texts, a ChatML chat
template, a Qwen2- or Llama-shaped config and seeded random weights.

Run on one CPU machine (a cluster needs nothing different; build once, share the folder):

    from rlhf.orchestrator.models.tiny import build_tiny_from_corpus
    path = build_tiny_from_corpus(["some text", ...], "/tmp/tiny-model")

End-of-sequence choice (documented once, here): the tokenizer's ``eos_token`` and
``pad_token`` are both ``<|endoftext|>`` (the document separator), while chat turns end
with ``<|im_end|>``. So that generation stops at the end of an assistant turn,
``generation_config.json`` lists BOTH ids in ``eos_token_id`` (``<|im_end|>`` first).
transformers' ``generate`` and vLLM (which adds generation-config eos ids to each
request's stop ids) both read that file. Code that decides whether a rollout finished
must use :func:`stop_token_ids`, not ``tokenizer.eos_token_id`` alone.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Order fixes their ids: 0, 1, 2.
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# Qwen2's split rule (GPT-4 style; digits one by one), copied from transformers'
# models/qwen2/tokenization_qwen2.py. test_tiny_model checks that the saved folder, loaded
# back through AutoTokenizer, encodes exactly as the trained tokenizer does.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# vLLM's CPU attention rejects head_dim 16 (measured); 64 works.
MIN_HEAD_DIM = 64
# Embedding rows are padded to a multiple of this (the extra rows are never produced
# by the tokenizer); it keeps matmul shapes friendly and matches common practice.
VOCAB_MULTIPLE = 64

# ChatML. The assistant's content and its closing <|im_end|> sit inside
# {% generation %} so that apply_chat_template(..., return_assistant_tokens_mask=True)
# marks exactly the tokens an SFT loss should train on: the model must learn to emit
# <|im_end|>, but not the "<|im_start|>assistant\n" header, which the prompt supplies.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The files that make a folder a complete model folder (what loaders need).
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of a tiny causal LM. Defaults give a ~0.4 M-parameter model."""

    arch: Literal["qwen2", "llama"] = "qwen2"  # Config family: Qwen2 (qkv bias) or Llama.
    hidden_size: int = 128  # Residual stream width.
    num_layers: int = 2  # Number of decoder blocks.
    num_heads: int = 2  # Query heads per layer.
    num_kv_heads: int = 1  # Key/value heads (GQA); must divide num_heads.
    head_dim: int = 64  # Per-head width; >= 64 because vLLM's CPU attention needs it.
    intermediate_size: int = 256  # MLP hidden width.
    vocab_size: int = 512  # Target tokenizer vocabulary (BPE may stop short on tiny corpora).
    max_position_embeddings: int = 512  # Longest sequence the model (and tokenizer) accepts.
    tie_word_embeddings: bool = False  # Share input embedding and LM head weights.

    def __post_init__(self) -> None:
        if self.arch not in ("qwen2", "llama"):
            raise ValueError(f"arch must be 'qwen2' or 'llama', got {self.arch!r}")
        if self.head_dim < MIN_HEAD_DIM:
            raise ValueError(
                f"head_dim={self.head_dim} is too small: vLLM's CPU attention rejects head_dim "
                f"< {MIN_HEAD_DIM} ('Unsupported CPU attention configuration'); "
                f"use >= {MIN_HEAD_DIM}"
            )
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}"
            )
        min_vocab = 256 + len(SPECIAL_TOKENS)  # every byte + the special tokens
        if self.vocab_size < min_vocab:
            raise ValueError(f"vocab_size must be >= {min_vocab} (256 bytes + specials), "
                             f"got {self.vocab_size}")


def train_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style) on `corpus` with the ChatML specials.

    Any NFC-normalised string round-trips (every byte is in the base alphabet).
    `vocab_size` is a target: on a tiny corpus BPE may run out of merges first.
    Ids 0, 1, 2 are <|endoftext|>, <|im_start|>, <|im_end|>.
    """
    tok = Tokenizer(models.BPE())
    # Exactly the normaliser and pre-tokeniser that transformers' Qwen2Tokenizer builds:
    # for model_type "qwen2", AutoTokenizer (and so vLLM) constructs a Qwen2Tokenizer from
    # our vocab/merges and ignores the pre-tokeniser saved in tokenizer.json. Any other
    # choice would make the loaded tokenizer split text differently from this one.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def sample_corpus(n_texts: int = 200, seed: int = 0) -> list[str]:
    """A small deterministic English-like corpus for tokenizer training in tests/quickstart."""
    import random

    rng = random.Random(seed)
    subjects = ["The model", "A user", "The assistant", "My friend", "This answer", "Every cat"]
    verbs = ["writes", "reads", "explains", "counts", "likes", "asks about", "answers"]
    objects = ["a short poem", "the weather", "numbers 1 2 3", "simple math", "the sky",
               "a helpful reply", "the question", "rewards and policies"]
    endings = [".", "!", "?", ", then stops.", " today.", " again and again."]
    return [
        f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}{rng.choice(endings)}"
        for _ in range(n_texts)
    ]


def stop_token_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Ids that end a generation: <|im_end|> (end of turn) and <|endoftext|>."""
    return [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)]


def padded_vocab_size(n_tokens: int) -> int:
    """`n_tokens` rounded up to a multiple of VOCAB_MULTIPLE."""
    return -(-n_tokens // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def make_config(spec: TinyModelSpec, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    """The Hugging Face config for `spec`, with ids taken from `tokenizer`."""
    eos_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    config_cls = Qwen2Config if spec.arch == "qwen2" else LlamaConfig
    config = config_cls(
        vocab_size=padded_vocab_size(len(tokenizer)),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # float32 so that vLLM and transformers agree to ~1e-5 in log-probs (tests rely on it).
    config.dtype = torch.float32
    return config


def is_complete_model_dir(path: str | os.PathLike) -> bool:
    """True if `path` holds every file `build_tiny_model` writes that loaders need."""
    path = Path(path)
    return all((path / name).is_file() for name in _REQUIRED_FILES)


def build_tiny_model(
    spec: TinyModelSpec,
    tokenizer: PreTrainedTokenizerFast,
    out_dir: str | os.PathLike,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a randomly initialised model plus `tokenizer` as a Hugging Face folder.

    The same (spec, tokenizer, seed) gives bit-identical weights. The folder appears
    atomically: it is built in a hidden sibling and renamed into place, so a failure
    leaves nothing half-written. An existing non-empty `out_dir` (a complete model or
    anything else) raises FileExistsError unless `overwrite=True`; an empty one is replaced.
    Returns the resolved path.
    """
    out_dir = Path(out_dir).resolve()
    _check_replaceable(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        _write_model_folder(spec, tokenizer, tmp_dir, seed)
        _move_into_place(tmp_dir, out_dir, overwrite)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # a no-op after a successful rename
    return out_dir


def build_tiny_from_corpus(
    corpus: Iterable[str],
    out_dir: str | os.PathLike,
    spec: TinyModelSpec = TinyModelSpec(),
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Train a tokenizer on `corpus` and build a tiny model with it in `out_dir`."""
    _check_replaceable(Path(out_dir).resolve(), overwrite)  # fail before training
    tokenizer = train_tokenizer(corpus, spec.vocab_size)
    return build_tiny_model(spec, tokenizer, out_dir, seed=seed, overwrite=overwrite)


def _check_replaceable(out_dir: Path, overwrite: bool) -> None:
    if overwrite or not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if is_complete_model_dir(out_dir):
        raise FileExistsError(f"{out_dir} already holds a model; pass overwrite=True to replace it")
    if any(out_dir.iterdir()):
        raise FileExistsError(
            f"{out_dir} is not empty and is not a model folder; refusing to replace it "
            "(pass overwrite=True to replace it anyway)"
        )


def _write_model_folder(
    spec: TinyModelSpec, tokenizer: PreTrainedTokenizerFast, folder: Path, seed: int
) -> None:
    config = make_config(spec, tokenizer)
    # fork_rng: seed the initialisation without disturbing the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=None,
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    from transformers.utils import logging as hf_logging

    # A progress bar for one tiny shard is noise (and would sit above a CLI's one-line error).
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    saved_max_length = tokenizer.model_max_length  # set for saving only; restore after
    tokenizer.model_max_length = spec.max_position_embeddings
    try:
        tokenizer.save_pretrained(folder)
    finally:
        tokenizer.model_max_length = saved_max_length
    # Provenance, for humans: how this folder was made.
    (folder / "tiny_spec.json").write_text(
        json.dumps({"spec": asdict(spec), "seed": seed}, indent=2) + "\n"
    )
    missing = [name for name in _REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(f"model folder is missing {missing} after saving")


def _move_into_place(tmp_dir: Path, out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        try:
            tmp_dir.rename(out_dir)
            return
        except OSError as err:  # another process created it meanwhile
            if not out_dir.exists():
                raise
            if not overwrite:
                raise FileExistsError(f"{out_dir} appeared while building") from err
    # Replace: move the old folder aside first (rename cannot replace a non-empty
    # directory), put the new one in place, then delete the old one.
    _check_replaceable(out_dir, overwrite)
    old_dir = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    out_dir.rename(old_dir)
    try:
        tmp_dir.rename(out_dir)
    except OSError:
        old_dir.rename(out_dir)  # put the old folder back
        raise
    shutil.rmtree(old_dir, ignore_errors=True)
