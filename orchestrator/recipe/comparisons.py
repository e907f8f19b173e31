"""Comparison data for the reward model: K sampled replies per prompt, ranked by a labeler.

InstructGPT (Ouyang et al. 2022, sec. 3.5) shows labelers K = 4..9 replies to one prompt
and has them rank all K; every one of the C(K, 2) pairs then trains the reward model, and
one prompt is one batch element (rlhf.orchestrator.rl.pairwise_rm_loss).

- `ComparisonStore`: an embedded SQLite file (stdlib `sqlite3`, no server). Each comparison
  keeps its provenance (round, policy checkpoint, prompt id, prompt messages, time) and its
  K replies (text, token ids, rank: 0 = best, equal ranks = tie, NULL = not ranked yet).
  Re-opening a file keeps earlier rounds: the pipeline retrains the reward model on all
  comparisons so far. Unranked comparisons are how people label (`labeler.kind: human`):
  a labeling tool, or plain SQL, fills in the ranks (`set_ranks`), and `load` returns only
  fully ranked comparisons unless asked otherwise.
- `collect_comparisons`: sample K replies per prompt with the rollout engines, rank them
  with a labeler (rlhf.orchestrator.data.labelers) or leave them unranked, store.

Schema version 4: replies.rank is nullable (v2), the labeling tables (v3) that
`rlhf label serve` fills (orchestrator/label/db.py): labelers, per-labeler rankings, leases,
demonstrations, and (v4) evidence_judgements: a labeler's "supported?" / "plausible?" per
reply. When people rank, each labeler's ranking of a comparison is one comparison for the
reward model (`load` returns one per ranking), and the first ranking also fills
replies.rank, so tools that read only that column see the comparison as ranked. A version-1,
-2 or -3 file is upgraded on open, in one transaction. The file runs in WAL mode, so a labeling
server and the pipeline can read and write it at once.

Run on one CPU machine or a cluster alike (the store lives on the driver):

    with ComparisonStore(out / "comparisons.sqlite") as store:
        collect_comparisons(rollout, prompts.messages, prompts.token_ids, keys, k=4,
                            labeler=build_labeler(cfg.labeler, task), store=store,
                            round=0, policy=str(sft_dir), temperature=1.0,
                            max_new_tokens=64, seed=0, tokenizer=tokenizer)
"""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from rlhf.orchestrator.data.labelers import Labeler, prompt_key
from rlhf.orchestrator.errors import BadInput

__all__ = ["Comparison", "ComparisonStore", "collect_comparisons", "prompt_key"]

SCHEMA_VERSION = 4
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
    rank          INTEGER,              -- 0 = best; equal ranks are ties; NULL = not ranked yet
    PRIMARY KEY (comparison_id, idx)
);
CREATE TABLE IF NOT EXISTS labelers (
    name       TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,    -- sha256 hex of the token; the token itself is shown once
    created    TEXT NOT NULL,
    revoked    TEXT                     -- ISO-8601 UTC, NULL while active
);
CREATE TABLE IF NOT EXISTS rankings (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    comparison_id INTEGER NOT NULL REFERENCES comparisons(id) ON DELETE CASCADE,
    labeler       TEXT    NOT NULL,
    ranks         TEXT    NOT NULL,     -- JSON list, one rank per reply idx, 0 = best
    display_order TEXT    NOT NULL,     -- JSON list of reply idx in the order they were shown
    seconds       REAL,                 -- from handing out the item to the submission
    unacceptable  INTEGER NOT NULL DEFAULT 0,
    violations    TEXT    NOT NULL DEFAULT '[]',  -- JSON {"<reply idx>": [rule names]} (older: a list)
    note          TEXT,
    created       TEXT    NOT NULL,
    UNIQUE (comparison_id, labeler)
);
CREATE TABLE IF NOT EXISTS leases (
    comparison_id INTEGER PRIMARY KEY REFERENCES comparisons(id) ON DELETE CASCADE,
    labeler       TEXT    NOT NULL,
    display_order TEXT    NOT NULL,
    issued        REAL    NOT NULL,     -- unix seconds
    expires       REAL    NOT NULL
);
CREATE TABLE IF NOT EXISTS demonstrations (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    labeler       TEXT    NOT NULL,
    messages      TEXT    NOT NULL,     -- JSON conversation ending with an assistant turn
    provenance    TEXT    NOT NULL,     -- JSON: {"source": "written"|"better_reply", "suggestions": [...], ...}
    comparison_id INTEGER,              -- the ranked comparison a better reply was written for
    created       TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS evidence_judgements (
    ranking_id INTEGER NOT NULL REFERENCES rankings(id) ON DELETE CASCADE,
    idx        INTEGER NOT NULL,        -- the reply's idx
    supported  INTEGER,                 -- 1/0: its quote backs the answer; NULL: it shows no evidence
    plausible  INTEGER NOT NULL,        -- 1/0: on topic and correct
    PRIMARY KEY (ranking_id, idx)
);
"""
# Version 1 had `rank INTEGER NOT NULL`; SQLite cannot drop a constraint, so the table is rebuilt.
_MIGRATE_V1 = """
BEGIN;
CREATE TABLE replies_v2 (
    comparison_id INTEGER NOT NULL REFERENCES comparisons(id) ON DELETE CASCADE,
    idx           INTEGER NOT NULL,
    text          TEXT    NOT NULL,
    token_ids     TEXT    NOT NULL,
    rank          INTEGER,
    PRIMARY KEY (comparison_id, idx)
);
INSERT INTO replies_v2 (comparison_id, idx, text, token_ids, rank)
    SELECT comparison_id, idx, text, token_ids, rank FROM replies;
DROP TABLE replies;
ALTER TABLE replies_v2 RENAME TO replies;
PRAGMA user_version = 2;
COMMIT;
"""
# A comparison is ranked when none of its replies has a NULL rank.
_RANKED = "NOT EXISTS (SELECT 1 FROM replies r WHERE r.comparison_id = comparisons.id AND r.rank IS NULL)"


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
    ranks: list[int | None]        # K ranks, 0 = best, equal = tie; None = not ranked yet
    created: str                   # ISO-8601 UTC time of `add`
    labeler: str | None = None     # who ranked it, when a person did (rankings table)

    @property
    def ranked(self) -> bool:
        return all(r is not None for r in self.ranks)


class ComparisonStore:
    """SQLite file of comparisons; `add` is one transaction, reopening keeps the contents."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(str(self.path), timeout=30.0)
            self._db.execute("PRAGMA foreign_keys = ON")
            self._db.execute("PRAGMA journal_mode = WAL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, 1, 2, 3, SCHEMA_VERSION):
                raise BadInput(f"{self.path}: comparison store schema version {version}, "
                               f"this code reads versions 1 to {SCHEMA_VERSION}")
            if version == 1:
                self._migrate_v1()
            with self._db:
                self._db.executescript(_SCHEMA)
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as err:
            raise BadInput(f"{self.path}: not a comparison store ({err})") from None

    def _migrate_v1(self) -> None:
        """Rebuilds the replies table with a nullable rank, all in one transaction."""
        try:
            self._db.executescript(_MIGRATE_V1)
        except sqlite3.Error:
            if self._db.in_transaction:
                self._db.rollback()  # the file stays a readable version 1
            raise

    def add(self, round: int, prompt_id: str, policy: str, prompt_messages: list[dict],
            replies: list[str], reply_ids: list[list[int]], ranks: list[int] | None = None) -> int:
        """Stores one comparison and its replies in one transaction; returns its id.
        `ranks=None` stores it unranked (people rank it later: `set_ranks`)."""
        n = len(replies)
        if n < 2 or len(reply_ids) != n or (ranks is not None and len(ranks) != n):
            raise ValueError(f"a comparison needs >= 2 replies with one token list and one rank each, got {n} "
                             f"replies, {len(reply_ids)} token lists, {'no' if ranks is None else len(ranks)} ranks")
        if ranks is not None:
            _check_ranks(ranks)
        stored = ranks if ranks is not None else [None] * n
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self._db:  # one transaction: a comparison is stored whole or not at all
            cur = self._db.execute(
                "INSERT INTO comparisons (round, prompt_id, policy, prompt_messages, created) VALUES (?, ?, ?, ?, ?)",
                (int(round), str(prompt_id), str(policy), json.dumps(prompt_messages), created))
            cid = int(cur.lastrowid)
            self._db.executemany(
                "INSERT INTO replies (comparison_id, idx, text, token_ids, rank) VALUES (?, ?, ?, ?, ?)",
                [(cid, i, text, json.dumps([int(t) for t in ids]), None if rank is None else int(rank))
                 for i, (text, ids, rank) in enumerate(zip(replies, reply_ids, stored))])
        return cid

    def set_ranks(self, comparison_id: int, ranks: list[int]) -> None:
        """Ranks (or re-ranks) the K replies of one comparison, in one transaction; in SQL:
        UPDATE replies SET rank = ? WHERE comparison_id = ? AND idx = ?  (one row per reply)."""
        k = self._db.execute("SELECT COUNT(*) FROM replies WHERE comparison_id = ?", (int(comparison_id),)).fetchone()[0]
        if k == 0:
            raise ValueError(f"no comparison with id {comparison_id} in {self.path}")
        if len(ranks) != k:
            raise ValueError(f"comparison {comparison_id} has {k} replies, got {len(ranks)} ranks")
        _check_ranks(ranks)
        with self._db:
            self._db.executemany("UPDATE replies SET rank = ? WHERE comparison_id = ? AND idx = ?",
                                 [(int(r), int(comparison_id), i) for i, r in enumerate(ranks)])

    def _where(self, rounds: list[int] | None, ranked_only: bool) -> tuple[str, tuple]:
        clauses, args = [], ()
        if rounds is not None:
            clauses.append(f"round IN ({','.join('?' * len(rounds))})")
            args = tuple(int(r) for r in rounds)
        if ranked_only:
            clauses.append(_RANKED)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), args

    def load(self, rounds: list[int] | None = None, ranked_only: bool = True) -> list[Comparison]:
        """Comparisons of `rounds` (all when None), in insertion order; only fully ranked
        ones unless `ranked_only=False` (then unranked replies have rank None). A comparison
        people ranked comes once per labeler's ranking, with `labeler` set."""
        where, args = self._where(rounds, ranked_only)
        heads = self._db.execute("SELECT id, round, prompt_id, policy, prompt_messages, created FROM comparisons"
                                 + where + " ORDER BY id", args).fetchall()
        by_id: dict[int, list[tuple]] = {cid: [] for cid, *_ in heads}
        for row in self._db.execute("SELECT comparison_id, idx, text, token_ids, rank FROM replies "
                                    "ORDER BY comparison_id, idx"):
            if row[0] in by_id:
                by_id[row[0]].append(row)
        people: dict[int, list[tuple]] = {}
        for cid, labeler, ranks in self._db.execute("SELECT comparison_id, labeler, ranks FROM rankings ORDER BY id"):
            if cid in by_id:
                people.setdefault(cid, []).append((labeler, json.loads(ranks)))
        out = []
        for cid, rnd, pid, policy, msgs, created in heads:
            rows = by_id[cid]
            base = Comparison(id=cid, round=rnd, prompt_id=pid, policy=policy, prompt_messages=json.loads(msgs),
                              replies=[r[2] for r in rows], reply_ids=[json.loads(r[3]) for r in rows],
                              ranks=[r[4] for r in rows], created=created)
            # Each labeler's ranking is one comparison (two people on one item count twice).
            out.extend([replace(base, ranks=ranks, labeler=who) for who, ranks in people[cid]]
                       if cid in people else [base])
        return out

    def count(self, rounds: list[int] | None = None) -> int:
        """Comparisons of `rounds` (all when None), ranked or not."""
        where, args = self._where(rounds, ranked_only=False)
        return int(self._db.execute("SELECT COUNT(*) FROM comparisons" + where, args).fetchone()[0])

    def count_ranked(self, rounds: list[int] | None = None) -> int:
        """Fully ranked comparisons of `rounds` (all when None)."""
        where, args = self._where(rounds, ranked_only=True)
        return int(self._db.execute("SELECT COUNT(*) FROM comparisons" + where, args).fetchone()[0])

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


def _check_ranks(ranks: list[int]) -> None:
    if any(not isinstance(r, int) or isinstance(r, bool) or r < 0 for r in ranks):
        raise ValueError(f"ranks must be ints >= 0 (0 = best), got {ranks}")


# --------------------------------------------------------------------------- collection


def collect_comparisons(rollout, prompt_messages: list[list[dict]], prompt_ids: list[list[int]],
                        prompt_keys: list[str], k: int, labeler: Labeler | None, store: ComparisonStore, round: int,
                        policy: str, temperature: float, max_new_tokens: int, seed: int | None,
                        tokenizer, top_p: float = 1.0) -> int:
    """Samples `k` replies per prompt, ranks them (`labeler` None: leaves them unranked for
    people to rank in the store), stores one comparison per prompt.

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
    if any(samples.prompt_index[j] != j // k for j in range(len(samples))):  # prompt i's k samples are consecutive
        raise RuntimeError("rollout samples out of order: each prompt's samples must come together, in prompt order")
    # A labeler with rank_many (the LLM judge) ranks every prompt in one call.
    batched = (labeler.rank_many([(m, texts[i * k:(i + 1) * k]) for i, m in enumerate(prompt_messages)])
               if hasattr(labeler, "rank_many") else None)
    stored = 0
    for i, (messages, key) in enumerate(zip(prompt_messages, prompt_keys)):
        rows = range(i * k, (i + 1) * k)
        replies = [texts[j] for j in rows]
        ranks = batched[i] if batched is not None else labeler.rank(messages, replies) if labeler is not None else None
        store.add(round, key, policy, messages, replies, [list(samples.response_ids[j]) for j in rows], ranks)
        stored += 1
    return stored
