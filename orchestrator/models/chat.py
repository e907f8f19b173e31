"""`rlhf chat CHECKPOINT`: talk to a trained model in a terminal.

    rlhf chat runs/pipeline/checkpoints/final/policy             interactive, multi-turn
    rlhf chat runs/pipeline/checkpoints/final/policy --once "What is 2 + 3?"

CHECKPOINT is a Hugging Face folder (config, weights, tokenizer with a chat template), as
every stage saves. The whole conversation is rendered with the tokenizer's chat template on
each turn, and generation stops at any of the generation config's eos ids (for the tiny
models: <|im_end|> and <|endoftext|>, see orchestrator/models/tiny.py). Runs with transformers on
CPU (or the first GPU if there is one); on a cluster, run it on any node that sees the folder.

Interactive commands: an empty line, /exit or end of input (Ctrl-D) quit; /reset starts a
new conversation (the --system message is kept).

`--rerank N` (Sparrow@N: N candidates with and without search, the preference and rule reward
models' favourite shown with its evidence card) is orchestrator/recipe/sparrow.py, on this loop.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from rlhf.orchestrator.errors import BadInput

EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"


class ChatSession:
    """A multi-turn conversation with one model; `messages` is the history so far."""

    def __init__(self, model, tokenizer, system: str | None = None, max_new_tokens: int = 128,
                 temperature: float = 0.7, seed: int = 0) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.system, self.max_new_tokens, self.temperature = system, max_new_tokens, temperature
        self.generator_seed = seed
        self.stop_ids = generation_stop_ids(model, tokenizer)
        self.messages: list[dict] = []
        self.reset()

    @classmethod
    def load(cls, path: str | Path, **kwargs) -> "ChatSession":
        """Loads model and tokenizer from a folder; problems are one-line `BadInput`s naming it."""
        model, tokenizer = load_chat_model(path)
        return cls(model, tokenizer, **kwargs)

    def reset(self) -> None:
        """Forgets the conversation (keeps the system message)."""
        import torch

        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        torch.manual_seed(self.generator_seed)  # same seed, same replies after a reset

    def render(self) -> str:
        """The prompt the model sees now: the history plus the assistant header."""
        return self.tokenizer.apply_chat_template(self.messages, tokenize=False, add_generation_prompt=True)

    def send(self, text: str) -> str:
        """Adds the user's message, generates the reply, adds it to the history and returns it."""
        self.messages.append({"role": "user", "content": text})
        ids = self._fit_context()
        [(reply, _)] = generate_replies(self.model, self.tokenizer, ids, 1, self.max_new_tokens, self.temperature,
                                        self.stop_ids)
        self.messages.append({"role": "assistant", "content": reply})
        return reply


    def _fit_context(self) -> dict:
        ids, self.messages = fit_context(self.model, self.tokenizer, self.messages, self.max_new_tokens)
        return ids


def fit_context(model, tokenizer, messages: list[dict], max_new_tokens: int) -> tuple[dict, list[dict]]:
    """Token ids of `messages` plus the assistant header, on the model's device; the oldest
    exchanges are dropped (a system message kept) until prompt + max_new_tokens fits the
    model's context, so a long conversation never crashes. Returns (ids, the messages kept)."""
    messages = list(messages)
    limit = getattr(model.config, "max_position_embeddings", None)
    while True:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        first = 1 if messages[0]["role"] == "system" else 0
        if limit is None or ids["input_ids"].shape[1] + max_new_tokens <= limit or len(messages) - first <= 1:
            return ids.to(model.device), messages
        del messages[first: first + 2]  # oldest user message and its reply


def generate_replies(model, tokenizer, ids: dict, n: int, max_new_tokens: int, temperature: float,
                     stop_ids: list[int]) -> list[tuple[str, list[int]]]:
    """`n` replies to one tokenized prompt (`ids`: input_ids [1, T] and attention_mask), each as
    (text, generated token ids up to and including the stop id, padding dropped)."""
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    out = model.generate(**ids, max_new_tokens=max_new_tokens, eos_token_id=stop_ids, num_return_sequences=n,
                         pad_token_id=tokenizer.pad_token_id, **sampling)
    replies = []
    for row in out[:, ids["input_ids"].shape[1]:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        replies.append((tokenizer.decode(row[:cut], skip_special_tokens=True).strip(), row[:cut]))
    return replies


def generation_stop_ids(model, tokenizer) -> list[int]:
    """The generation config's eos ids (int or list), else the tokenizer's eos id."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not ids and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id]
    return ids


def load_chat_model(path: str | Path):
    """(model, tokenizer) from a Hugging Face folder or a known name (imported on first use,
    orchestrator/models/registry.py); `BadInput` naming `path` if it is neither."""
    from rlhf.orchestrator.models.registry import resolve_model

    folder = Path(resolve_model(str(path), key="chat"))
    # Checked before importing torch/transformers, so a typo fails in well under a second.
    if not folder.is_dir():
        raise BadInput(f"chat: no such model folder: {folder}")
    if not (folder / "config.json").is_file():
        raise BadInput(f"chat: {folder} is not a model folder (no config.json)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the terminal is for the conversation
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as err:
        raise BadInput(f"chat: cannot load a tokenizer from {folder}: {err}") from None
    if not getattr(tokenizer, "chat_template", None):
        raise BadInput(f"chat: the tokenizer in {folder} has no chat template")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise BadInput(f"chat: cannot load a causal LM from {folder}: {err}") from None
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model, tokenizer


def run_chat(path: str | Path, once: str | None = None, system: str | None = None, max_new_tokens: int = 128,
             temperature: float = 0.7, seed: int = 0, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    """`--once TEXT`: print one reply. Otherwise a loop over input lines until EOF/empty/exit."""
    if temperature < 0:
        raise BadInput(f"chat: --temperature must be >= 0, got {temperature}")
    session = ChatSession.load(path, system=system, max_new_tokens=max_new_tokens,
                               temperature=temperature, seed=seed)
    chat_loop(session, str(path), once, stdin, stdout)


def chat_loop(session, path: str, once: str | None, stdin: TextIO, stdout: TextIO) -> None:
    """The terminal side of a session with `send(text) -> str` and `reset()` (ChatSession, or
    Sparrow@N's SparrowChat in orchestrator/recipe/sparrow.py)."""
    if once is not None:
        print(session.send(once), file=stdout, flush=True)
        return
    interactive = stdin.isatty()
    if interactive:
        print(f"chatting with {path} (empty line or /exit quits, /reset starts over)", file=stdout)
    while True:
        if interactive:
            print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        text = line.strip()
        if not line or not text or text in EXIT_COMMANDS:
            return
        if text == RESET_COMMAND:
            session.reset()
            print("(conversation reset)", file=stdout, flush=True)
            continue
        reply = session.send(text)
        print(f"assistant> {reply}" if interactive else reply, file=stdout, flush=True)
