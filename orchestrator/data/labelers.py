"""Who ranks sampled replies (the labeler) and who scores held-out ones (the judge).

One interface, `Labeler.rank(messages, replies) -> ranks` (0 = best, equal ranks = tie),
and `Judge.score(messages, reply) -> float` for whatever can also score. Kinds
(`labeler.kind`, and `pipeline.judge.kind` with the same keys):

    task          the task's simulated labeler (Task.score); ranks follow the scores
    python        target `pkg.module:name` or `/abs/file.py:name`: a function
                  score(messages, reply) -> float (ranks follow the scores, equal scores tie),
                  or an object with rank(messages, replies) -> list[int] and/or
                  score(messages, reply) -> float (a class is instantiated with no arguments)
    file          rankings made by people, JSONL (path); ranks, cannot score
    reward_model  a reward-model folder written by the RM stage (path): the head at the last
                  token of the chat-templated prompt + reply + end of turn, minus
                  config.reward_offset (orchestrator/models/scoring.py)
    human         nobody ranks now: the K replies are stored unranked and people rank them
                  in the comparison store; build_labeler returns None

    labeler:
      kind: python
      target: /home/me/prefs.py:score

Everything a user's code does wrong (missing file/module/attribute, wrong signature, an
exception, a non-number or NaN, a rank list of the wrong shape) is a one-line BadInput
naming the config key, the target and, for calls, the prompt. Labelers are built once, on
the driver; on one CPU machine and on a cluster alike.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import numbers
from collections import Counter
from pathlib import Path
from typing import Callable, Protocol

from rlhf.orchestrator.config import ExperimentConfig, LabelerConfig
from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.tasks import Dialogue, Task, import_target

ScoreFn = Callable[[Dialogue, str], float]
CANNOT_SCORE = "cannot score replies; set pipeline.judge to a task, python score function or reward_model"
_PROBE_MESSAGES: Dialogue = [{"role": "user", "content": "?"}]  # only for signature checks


class Labeler(Protocol):
    def rank(self, messages: Dialogue, replies: list[str]) -> list[int]:
        """One rank per reply: 0 = best, equal ranks = tie."""


class Judge(Protocol):
    def score(self, messages: Dialogue, reply: str) -> float:
        """How good `reply` is as the next assistant turn; higher = better."""


def ranks_from_scores(scores: list[float]) -> list[int]:
    """Dense ranks, higher score = better: [1.5, -1, 1.5, 0] -> [0, 2, 0, 1]."""
    order = sorted(set(scores), reverse=True)
    return [order.index(s) for s in scores]


def prompt_key(messages: Dialogue) -> str:
    """A stable id for a conversation: sha1 of its canonical JSON (first 16 hex digits)."""
    canon = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha1(canon.encode()).hexdigest()[:16]


def _prompt(messages: Dialogue) -> str:
    """The first 60 characters of the last user turn, for error messages."""
    return next((str(m.get("content", "")) for m in reversed(messages) if m.get("role") == "user"), "")[:60]


def _number(value, key: str, source: str, messages: Dialogue) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BadInput(f"{key}: {source} returned {value!r:.40} ({type(value).__name__}), not a number, "
                       f"on prompt {_prompt(messages)!r}")
    if not math.isfinite(float(value)):
        raise BadInput(f"{key}: {source} returned {float(value)}, not a finite number, on prompt {_prompt(messages)!r}")
    return float(value)


def _call(fn, args: tuple, key: str, source: str, messages: Dialogue):
    try:
        return fn(*args)
    except BadInput:
        raise
    except Exception as err:  # the user's code: any failure becomes one line naming it
        raise BadInput(f"{key}: {source} raised {type(err).__name__}: {err} on prompt {_prompt(messages)!r}") from None


def _check_signature(fn, args: tuple, what: str, key: str, source: str) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin without a signature: the first call will tell
    try:
        signature.bind(*args)
    except TypeError:
        raise BadInput(f"{key}: {source}: must be callable as {what}; its signature is {signature}") from None


class SimulatedLabeler:
    """Ranks replies by a score function `score_fn(messages, reply) -> float` (e.g. a task's
    `score`); equal scores share a rank. It is also a Judge. Calls are checked: an exception,
    a non-number or a non-finite value is a BadInput naming `key` and `source`."""

    def __init__(self, score_fn: ScoreFn, key: str = "labeler", source: str | None = None) -> None:
        self.score_fn, self.key = score_fn, key
        self.source = source or getattr(score_fn, "__qualname__", type(score_fn).__name__)

    def score(self, messages: Dialogue, reply: str) -> float:
        return _number(_call(self.score_fn, (messages, reply), self.key, self.source, messages),
                       self.key, self.source, messages)

    def rank(self, messages: Dialogue, replies: list[str]) -> list[int]:
        return ranks_from_scores([self.score(messages, r) for r in replies])


class RankingLabeler:
    """A user's object that ranks (`obj.rank(messages, replies)`); `scorer` is its checked
    `score` when it has one, else None (then it cannot judge)."""

    def __init__(self, obj, key: str, source: str, scorer: SimulatedLabeler | None = None) -> None:
        self.obj, self.key, self.source, self.scorer = obj, key, source, scorer

    def rank(self, messages: Dialogue, replies: list[str]) -> list[int]:
        ranks = _call(self.obj.rank, (messages, list(replies)), self.key, f"{self.source} rank", messages)
        if (not isinstance(ranks, (list, tuple)) or len(ranks) != len(replies) or any(
                isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 0 for r in ranks)):
            raise BadInput(f"{self.key}: {self.source} rank returned {ranks!r:.60}; expected a list of "
                           f"{len(replies)} ints >= 0 (0 = best), on prompt {_prompt(messages)!r}")
        return [int(r) for r in ranks]


def python_labeler(target: str | None, key: str = "labeler") -> SimulatedLabeler | RankingLabeler:
    """Loads `target` (see the module docstring) once and checks its signature."""
    if not target:
        raise BadInput(f"{key}.target: kind python needs target: pkg.module:name or /abs/file.py:name")
    where = f"{key}.target"
    obj = import_target(target, where)
    if inspect.isclass(obj):
        try:
            obj = obj()
        except Exception as err:
            raise BadInput(f"{where}: {target}: {obj.__name__}() raised {type(err).__name__}: {err}") from None
    rank, score = getattr(obj, "rank", None), getattr(obj, "score", None)
    scorer = None
    if callable(score) and not inspect.isfunction(obj):
        _check_signature(score, (_PROBE_MESSAGES, ""), "score(messages, reply)", where, target)
        scorer = SimulatedLabeler(score, where, f"{target} score")
    if callable(rank) and not inspect.isfunction(obj):
        _check_signature(rank, (_PROBE_MESSAGES, [""]), "rank(messages, replies)", where, target)
        return RankingLabeler(obj, where, target, scorer)
    if scorer is not None:
        return scorer
    if not callable(obj):
        raise BadInput(f"{where}: {target}: a {type(obj).__name__} is neither a function score(messages, reply) "
                       "nor an object with rank(messages, replies) or score(messages, reply)")
    _check_signature(obj, (_PROBE_MESSAGES, ""), "score(messages, reply)", where, target)
    return SimulatedLabeler(obj, where, target)


class FileLabeler:
    """Rankings made by people, read from a JSONL file, one prompt per line.

    Keyed by the prompt text (the conversation), not by an id, so a ranking file is
    self-describing and survives re-sampling and re-numbering:

        {"prompt": [{"role": "user", "content": "What is 2 + 3?"}],
         "replies": ["2 + 3 = 5.", "2 + 3 = 6."], "ranks": [0, 1]}

    `replies` is optional but recommended: with it, the ranks are matched to the sampled
    replies by text (so any order works) and a mismatch is an error; without it, `ranks`
    must be in the order the replies were sampled. Malformed lines raise BadInput naming
    file:line; a prompt with no line raises BadInput naming the prompt.
    """

    def __init__(self, path: str | Path, key: str = "labeler") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise BadInput(f"{key}.path: no such file: {self.path}")
        self._by_prompt: dict[str, tuple[int, list[str] | None, list[int]]] = {}
        for lineno, line in enumerate(self.path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            key_, replies, ranks = self._parse(line, lineno)
            if key_ in self._by_prompt:
                raise BadInput(f"{self.path}:{lineno}: prompt already ranked on line {self._by_prompt[key_][0]}")
            self._by_prompt[key_] = (lineno, replies, ranks)
        if not self._by_prompt:
            raise BadInput(f"{self.path}: no rankings in the file")

    def _parse(self, line: str, lineno: int) -> tuple[str, list[str] | None, list[int]]:
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("each line must be a JSON object")
            prompt, ranks, replies = row["prompt"], row["ranks"], row.get("replies")
            if not isinstance(prompt, list) or not prompt or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in prompt):
                raise ValueError("'prompt' must be a non-empty list of {role, content} messages")
            if (not isinstance(ranks, list) or len(ranks) < 2
                    or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in ranks)):
                raise ValueError(f"'ranks' must be a list of >= 2 ints >= 0 (0 = best), got {ranks!r}"[:160])
            if replies is not None and (not isinstance(replies, list) or len(replies) != len(ranks)
                                        or not all(isinstance(r, str) for r in replies)):
                raise ValueError("'replies' must be a list of strings, one per rank")
        except json.JSONDecodeError as err:
            raise BadInput(f"{self.path}:{lineno}: malformed ranking: invalid JSON ({err.msg})") from None
        except KeyError as err:
            raise BadInput(f"{self.path}:{lineno}: malformed ranking: missing key {err}") from None
        except ValueError as err:
            raise BadInput(f"{self.path}:{lineno}: malformed ranking: {err}") from None
        return prompt_key(prompt), replies, ranks

    def rank(self, messages: Dialogue, replies: list[str]) -> list[int]:
        found = self._by_prompt.get(prompt_key(messages))
        if found is None:
            last = messages[-1]["content"] if messages else ""
            raise BadInput(f"{self.path}: no ranking for prompt {last[:80]!r} "
                           f"(prompt id {prompt_key(messages)}); add a line for it")
        lineno, ranked_replies, ranks = found
        if ranked_replies is None:
            if len(ranks) != len(replies):
                raise BadInput(f"{self.path}:{lineno}: {len(ranks)} ranks for {len(replies)} sampled replies")
            return list(ranks)
        if Counter(ranked_replies) != Counter(replies):
            raise BadInput(f"{self.path}:{lineno}: the ranked replies differ from the sampled ones")
        rank_of = dict(zip(ranked_replies, ranks))
        return [rank_of[r] for r in replies]


class RewardModelLabeler:
    """Scores with a reward-model folder (RM stage output) and ranks by those scores.

    A reply is scored as the policy would have emitted it: chat-templated prompt, reply
    tokens, end-of-turn id; the sequence keeps its end when longer than the model's context.
    """

    def __init__(self, path: str | Path | None, key: str = "labeler") -> None:
        folder = Path(path or "")
        if not path or not (folder / "config.json").is_file():
            raise BadInput(f"{key}.path: {folder} is not a reward-model folder (no config.json)")
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from rlhf.orchestrator.models.scoring import reward_offset, turn_end_ids

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
            self.model = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=1).eval()
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise BadInput(f"{key}.path: cannot load a reward model from {folder}: {type(err).__name__}: {err}") from None
        if not getattr(self.tokenizer, "chat_template", None):
            raise BadInput(f"{key}.path: the tokenizer in {folder} has no chat template")
        self.turn_end, self.offset = turn_end_ids(str(folder), self.tokenizer), reward_offset(self.model)
        self.max_len = getattr(self.model.config, "max_position_embeddings", None)

    def _sequence(self, messages: Dialogue, reply: str) -> list[int]:
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"]
        seq = list(prompt) + self.tokenizer.encode(reply, add_special_tokens=False) + self.turn_end
        return seq[-self.max_len:] if self.max_len else seq

    def scores(self, messages: Dialogue, replies: list[str]) -> list[float]:
        from rlhf.orchestrator.models.scoring import score_sequences

        raw = score_sequences(self.model, [self._sequence(messages, r) for r in replies], self.tokenizer.pad_token_id)
        return [float(s) - self.offset for s in raw]

    def score(self, messages: Dialogue, reply: str) -> float:
        return self.scores(messages, [reply])[0]

    def rank(self, messages: Dialogue, replies: list[str]) -> list[int]:
        return ranks_from_scores(self.scores(messages, replies))


def build_labeler(lab: LabelerConfig, task: Task | None, key: str = "labeler") -> Labeler | None:
    """The labeler `lab` describes (None for kind human: people rank in the store)."""
    if lab.kind == "human":
        return None
    if lab.kind == "task":
        if task is None:
            raise BadInput(f"{key}.kind: task needs data.task")
        return SimulatedLabeler(task.score, key, f"task {getattr(task, 'name', '?')}")
    if lab.kind == "python":
        return python_labeler(lab.target, key)
    if lab.kind == "file":
        if not lab.path:
            raise BadInput(f"{key}.path: kind file needs the rankings JSONL")
        return FileLabeler(lab.path, key)
    if lab.kind == "reward_model":
        return RewardModelLabeler(lab.path, key)
    if lab.kind == "llm_judge":  # ranks once rlhf.orchestrator.recipe.judge_engine attaches an engine
        from rlhf.orchestrator.data.llm_judge import LLMJudge

        return LLMJudge(lab.path, lab.template, key)
    raise BadInput(f"{key}.kind: unknown labeler kind {lab.kind!r}")


def build_judge(cfg: ExperimentConfig, task: Task | None) -> Judge:
    """Who scores held-out replies: pipeline.judge, else the labeler; it must be able to score."""
    own = cfg.pipeline.judge is not None
    lab, key = (cfg.pipeline.judge, "pipeline.judge") if own else (cfg.labeler, "labeler")
    what = f"{key}.kind {lab.kind}" + (f" ({lab.target})" if lab.kind == "python" else "")
    if lab.kind in ("file", "human", "llm_judge"):  # llm_judge compares replies; it gives no score
        raise BadInput(f"pipeline.judge: {what} {CANNOT_SCORE}")
    judge = build_labeler(lab, task, key)
    if isinstance(judge, RankingLabeler):
        if judge.scorer is None:
            raise BadInput(f"pipeline.judge: {what} only ranks; it {CANNOT_SCORE}")
        return judge.scorer
    return judge
