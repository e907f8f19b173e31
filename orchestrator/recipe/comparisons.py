"""Comparison data for the reward model: K sampled replies per prompt, ranked by a labeler.

InstructGPT (Ouyang et al. 2022, sec. 3.5) shows labelers K = 4..9 replies to one prompt
and has them rank all K; every one of the C(K, 2) pairs then trains the reward model, and
one prompt is one batch element (rlhf.orchestrator.rl.pairwise_rm_loss).

- `ComparisonStore`: an embedded SQLite file (stdlib `sqlite3`, no server). Each comparison
  keeps its provenance (round, policy checkpoint, prompt id, prompt messages, time) and its
  K replies (text, token ids, rank: 0 = best, equal ranks = tie). Re-opening a file keeps
  earlier rounds: the pipeline retrains the reward model on all comparisons so far.
- Labelers, one interface `rank(prompt_messages, replies) -> ranks`: `SimulatedLabeler`
  (a task's score function) and `FileLabeler` (rankings made by people, from JSONL).
- `collect_comparisons`: sample K replies per prompt with the rollout engines, rank, store.

Run on one CPU machine or a cluster alike (the store lives on the driver):

    with ComparisonStore(out / "comparisons.sqlite") as store:
        collect_comparisons(rollout, prompts.messages, prompts.token_ids, keys, k=4,
                            labeler=SimulatedLabeler(arithmetic.score_reply), store=store,
                            round=0, policy=str(sft_dir), temperature=1.0,
                            max_new_tokens=64, seed=0, tokenizer=tokenizer)
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Protocol

from rlhf.orchestrator.errors import BadInput

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS comparisons (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    round           INTEGER NOT NULL,
    prompt_id       TEXT    NOT NULL,
    policy          TEXT    NOT NULL,   -- checkpoint path or name of the policy that sampled
    prompt_messages TEXT    NOT NULL,   -- JSON list of {"role", "content"}
    created         TEXT    NOT NULL    -- ISO-8601 UTC
);
CREATE INDEX IF NOT EXISTS comparisons_round ON comparisons(round);
CREATE TABLE IF NOT EXISTS replies (
    comparison_id INTEGER NOT NULL REFERENCES comparisons(id) ON DELETE CASCADE,
    idx           INTEGER NOT NULL,     -- position among the K replies, as sampled
    text          TEXT    NOT NULL,
    token_ids     TEXT    NOT NULL,     -- JSON list of ints (stop token included if generated)
    rank          INTEGER NOT NULL,     -- 0 = best; equal ranks are ties
    PRIMARY KEY (comparison_id, idx)
);
"""


@dataclass(frozen=True)
class Comparison:
    """One prompt with its K ranked replies, and where they came from."""

    id: int
    round: int
    prompt_id: str                 # the caller's key for the prompt (see `prompt_key`)
    policy: str                    # checkpoint path/name of the policy that sampled the replies
    prompt_messages: list[dict]    # the conversation, ending with a user turn
    replies: list[str]             # K decoded replies
    reply_ids: list[list[int]]     # K token-id lists (what the policy generated)
    ranks: list[int]               # K ranks, 0 = best, equal = tie
    created: str                   # ISO-8601 UTC time of `add`


def prompt_key(messages: list[dict]) -> str:
    """A stable id for a conversation: sha1 of its canonical JSON (first 16 hex digits)."""
    canon = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha1(canon.encode()).hexdigest()[:16]


class ComparisonStore:
    """SQLite file of comparisons; `add` is one transaction, reopening keeps the contents."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(str(self.path))
            self._db.execute("PRAGMA foreign_keys = ON")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise BadInput(f"{self.path}: comparison store schema version {version}, "
                               f"this code reads version {SCHEMA_VERSION}")
            with self._db:
                self._db.executescript(_SCHEMA)
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as err:
            raise BadInput(f"{self.path}: not a comparison store ({err})") from None

    def add(self, round: int, prompt_id: str, policy: str, prompt_messages: list[dict],
            replies: list[str], reply_ids: list[list[int]], ranks: list[int]) -> int:
        """Stores one comparison and its replies in one transaction; returns its id."""
        if not (len(replies) == len(reply_ids) == len(ranks)) or len(replies) < 2:
            raise ValueError(f"a comparison needs >= 2 replies with one token list and one rank each, got "
                             f"{len(replies)} replies, {len(reply_ids)} token lists, {len(ranks)} ranks")
        if any(not isinstance(r, int) or isinstance(r, bool) or r < 0 for r in ranks):
            raise ValueError(f"ranks must be ints >= 0 (0 = best), got {ranks}")
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self._db:  # one transaction: a comparison is stored whole or not at all
            cur = self._db.execute(
                "INSERT INTO comparisons (round, prompt_id, policy, prompt_messages, created) VALUES (?, ?, ?, ?, ?)",
                (int(round), str(prompt_id), str(policy), json.dumps(prompt_messages), created))
            cid = int(cur.lastrowid)
            self._db.executemany(
                "INSERT INTO replies (comparison_id, idx, text, token_ids, rank) VALUES (?, ?, ?, ?, ?)",
                [(cid, i, text, json.dumps([int(t) for t in ids]), int(rank))
                 for i, (text, ids, rank) in enumerate(zip(replies, reply_ids, ranks))])
        return cid

    def load(self, rounds: list[int] | None = None) -> list[Comparison]:
        """Comparisons of `rounds` (all when None), in insertion order."""
        query = "SELECT id, round, prompt_id, policy, prompt_messages, created FROM comparisons"
        args: tuple = ()
        if rounds is not None:
            query += f" WHERE round IN ({','.join('?' * len(rounds))})"
            args = tuple(int(r) for r in rounds)
        heads = self._db.execute(query + " ORDER BY id", args).fetchall()
        by_id: dict[int, list[tuple]] = {cid: [] for cid, *_ in heads}
        for row in self._db.execute("SELECT comparison_id, idx, text, token_ids, rank FROM replies "
                                    "ORDER BY comparison_id, idx"):
            if row[0] in by_id:
                by_id[row[0]].append(row)
        return [Comparison(id=cid, round=rnd, prompt_id=pid, policy=policy, prompt_messages=json.loads(msgs),
                           replies=[r[2] for r in by_id[cid]], reply_ids=[json.loads(r[3]) for r in by_id[cid]],
                           ranks=[r[4] for r in by_id[cid]], created=created)
                for cid, rnd, pid, policy, msgs, created in heads]

    def count(self, rounds: list[int] | None = None) -> int:
        if rounds is None:
            return int(self._db.execute("SELECT COUNT(*) FROM comparisons").fetchone()[0])
        marks = ",".join("?" * len(rounds))
        return int(self._db.execute(f"SELECT COUNT(*) FROM comparisons WHERE round IN ({marks})",
                                    tuple(int(r) for r in rounds)).fetchone()[0])

    def delete_round(self, round: int) -> int:
        """Removes every comparison of `round` (and its replies); returns how many.

        A collection that crashed midway leaves part of a round; the pipeline clears it
        before collecting that round again, so no prompt is counted twice."""
        with self._db:
            cur = self._db.execute("DELETE FROM comparisons WHERE round = ?", (int(round),))
        return int(cur.rowcount)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "ComparisonStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- labelers


class Labeler(Protocol):
    def rank(self, prompt_messages: list[dict], replies: list[str]) -> list[int]:
        """One rank per reply: 0 = best, equal ranks = tie."""


def ranks_from_scores(scores: list[float]) -> list[int]:
    """Dense ranks, higher score = better: [1.5, -1, 1.5, 0] -> [0, 2, 0, 1]."""
    order = sorted(set(scores), reverse=True)
    return [order.index(s) for s in scores]


class SimulatedLabeler:
    """Ranks replies by a score function `score_fn(prompt_messages, reply) -> float`
    (e.g. rlhf.orchestrator.tasks.arithmetic.score_reply); equal scores share a rank."""

    def __init__(self, score_fn: Callable[[list[dict], str], float]) -> None:
        self.score_fn = score_fn

    def rank(self, prompt_messages: list[dict], replies: list[str]) -> list[int]:
        return ranks_from_scores([float(self.score_fn(prompt_messages, r)) for r in replies])


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

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise BadInput(f"rm.rankings_file: no such file: {self.path}")
        self._by_prompt: dict[str, tuple[int, list[str] | None, list[int]]] = {}
        for lineno, line in enumerate(self.path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            key, replies, ranks = self._parse(line, lineno)
            if key in self._by_prompt:
                raise BadInput(f"{self.path}:{lineno}: prompt already ranked on line {self._by_prompt[key][0]}")
            self._by_prompt[key] = (lineno, replies, ranks)
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

    def rank(self, prompt_messages: list[dict], replies: list[str]) -> list[int]:
        found = self._by_prompt.get(prompt_key(prompt_messages))
        if found is None:
            last = prompt_messages[-1]["content"] if prompt_messages else ""
            raise BadInput(f"{self.path}: no ranking for prompt {last[:80]!r} "
                           f"(prompt id {prompt_key(prompt_messages)}); add a line for it")
        lineno, ranked_replies, ranks = found
        if ranked_replies is None:
            if len(ranks) != len(replies):
                raise BadInput(f"{self.path}:{lineno}: {len(ranks)} ranks for {len(replies)} sampled replies")
            return list(ranks)
        if Counter(ranked_replies) != Counter(replies):
            raise BadInput(f"{self.path}:{lineno}: the ranked replies differ from the sampled ones")
        rank_of = dict(zip(ranked_replies, ranks))
        return [rank_of[r] for r in replies]


# --------------------------------------------------------------------------- collection


def collect_comparisons(rollout, prompt_messages: list[list[dict]], prompt_ids: list[list[int]],
                        prompt_keys: list[str], k: int, labeler: Labeler, store: ComparisonStore, round: int,
                        policy: str, temperature: float, max_new_tokens: int, seed: int | None,
                        tokenizer, top_p: float = 1.0) -> int:
    """Samples `k` replies per prompt, ranks them, stores one comparison per prompt.

    rollout: a RolloutGroup (or anything with its `generate`). prompt_messages[i],
    prompt_ids[i] (chat-templated token ids) and prompt_keys[i] describe prompt i.
    Returns the number of comparisons stored.
    """
    if not len(prompt_messages) == len(prompt_ids) == len(prompt_keys):
        raise ValueError(f"{len(prompt_messages)} prompts, {len(prompt_ids)} token lists, {len(prompt_keys)} keys")
    if k < 2:
        raise ValueError(f"a comparison needs k >= 2 replies, got {k}")
    # One generate call for all prompts: the group spreads chunks over every engine.
    samples = rollout.generate(prompt_ids, n=k, temperature=temperature, top_p=top_p,
                               max_new_tokens=max_new_tokens, seed=seed)
    if len(samples) != k * len(prompt_ids):
        raise RuntimeError(f"rollout returned {len(samples)} samples, expected {k} x {len(prompt_ids)}")
    texts = tokenizer.batch_decode(samples.response_ids, skip_special_tokens=True)
    stored = 0
    for i, (messages, key) in enumerate(zip(prompt_messages, prompt_keys)):
        rows = range(i * k, (i + 1) * k)  # the k samples of prompt i are consecutive
        if any(samples.prompt_index[j] != i for j in rows):
            raise RuntimeError(f"rollout samples out of order: rows {rows.start}..{rows.stop - 1} are not prompt {i}")
        replies = [texts[j] for j in rows]
        ranks = labeler.rank(messages, replies)
        store.add(round, key, policy, messages, replies, [list(samples.response_ids[j]) for j in rows], ranks)
        stored += 1
    return stored
