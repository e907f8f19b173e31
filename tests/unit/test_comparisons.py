"""Comparison store (ranked, unranked, v1 files) and collection (no Ray: a fake rollout group stands in).
The labelers are tested in test_labelers.py."""
from __future__ import annotations

import json
import sqlite3

import pytest

from rlhf.orchestrator.data.labelers import SimulatedLabeler
from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.experience import Samples
from rlhf.orchestrator.recipe.comparisons import SCHEMA_VERSION, ComparisonStore, collect_comparisons, prompt_key

Q1 = [{"role": "user", "content": "What is 2 + 3?"}]
Q2 = [{"role": "user", "content": "What is 4 * 5?"}, {"role": "assistant", "content": "4 * 5 = 20."},
      {"role": "user", "content": "Now add 1 to that."}]


def _add(store, round=0, prompt=Q1, ranks=(0, 1, 1, 2), policy="ckpt/sft"):
    replies = [f"reply {i}" for i in range(len(ranks))]
    ids = [[10 + i, 11 + i, 2] for i in range(len(ranks))]
    return store.add(round, prompt_key(prompt), policy, prompt, replies, ids, list(ranks))


def test_store_round_trip_with_provenance_and_ties(tmp_path):
    with ComparisonStore(tmp_path / "c.sqlite") as store:
        cid = _add(store, round=0, ranks=(0, 1, 1, 2))
        assert store.count() == 1
        [c] = store.load()
    assert c.id == cid and c.round == 0 and c.policy == "ckpt/sft"
    assert c.prompt_id == prompt_key(Q1) and c.prompt_messages == Q1
    assert c.replies == ["reply 0", "reply 1", "reply 2", "reply 3"]
    assert c.reply_ids == [[10, 11, 2], [11, 12, 2], [12, 13, 2], [13, 14, 2]]
    assert c.ranks == [0, 1, 1, 2]  # the tie survives
    assert c.created.endswith("+00:00")


def test_reopen_keeps_earlier_rounds_and_filters(tmp_path):
    path = tmp_path / "c.sqlite"
    with ComparisonStore(path) as store:
        _add(store, round=0)
        _add(store, round=0, prompt=Q2)
    with ComparisonStore(path) as store:  # next round: same file
        _add(store, round=1, policy="ckpt/ppo-1")
        assert store.count() == 3 and store.count([1]) == 1
        assert [c.round for c in store.load()] == [0, 0, 1]
        [late] = store.load([1])
        assert late.policy == "ckpt/ppo-1"
        assert [c.prompt_messages for c in store.load([0])] == [Q1, Q2]
        assert store.load([7]) == []


def test_add_is_one_transaction(tmp_path):
    with ComparisonStore(tmp_path / "c.sqlite") as store:
        with pytest.raises(ValueError):
            store.add(0, "p", "pol", Q1, ["a", "b"], [[1], [2]], [0])  # one rank missing
        with pytest.raises(ValueError):
            store.add(0, "p", "pol", Q1, ["a", "b"], [[1], [2]], [0, -1])
        # A failure inside the transaction (bad token id) leaves no half comparison behind.
        with pytest.raises((TypeError, ValueError)):
            store.add(0, "p", "pol", Q1, ["a", "b"], [[1], ["x"]], [0, 1])
        assert store.count() == 0
        rows = store._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]
        assert rows == 0


def test_not_a_store_is_bad_input(tmp_path):
    path = tmp_path / "junk.sqlite"
    path.write_text("this is not sqlite " * 100)
    with pytest.raises(BadInput, match="not a comparison store"):
        ComparisonStore(path)


class _FakeTokenizer:
    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(str(t) for t in seq if not (skip_special_tokens and t == 99)) for seq in ids]


class _FakeRollout:
    """Stands in for RolloutGroup.generate: reply j of prompt i is [i, j, stop id 99]."""

    def __init__(self):
        self.calls = []

    def generate(self, prompt_ids, n, temperature, top_p, max_new_tokens, seed):
        self.calls.append(dict(n=n, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed))
        rows = [(i, j) for i in range(len(prompt_ids)) for j in range(n)]
        return Samples(prompt_ids=[list(prompt_ids[i]) for i, _ in rows], response_ids=[[i, j, 99] for i, j in rows],
                       response_logprobs=[[0.0] * 3 for _ in rows], finished=[True] * len(rows),
                       prompt_index=[i for i, _ in rows])


def test_collect_comparisons_samples_ranks_and_stores(tmp_path):
    rollout = _FakeRollout()
    # Prefer replies with a larger second token (j): reply 3 best; 0 and 1 tie (score 0).
    labeler = SimulatedLabeler(lambda messages, reply: max(0, int(reply.split()[1]) - 1))
    with ComparisonStore(tmp_path / "c.sqlite") as store:
        n = collect_comparisons(rollout, [Q1, Q2], [[5, 6], [7]], ["q1", "q2"], k=4, labeler=labeler,
                                store=store, round=3, policy="ckpt/ppo-2", temperature=0.9,
                                max_new_tokens=16, seed=123, tokenizer=_FakeTokenizer())
        assert n == 2 and store.count() == 2
        first, second = store.load()
    assert rollout.calls == [dict(n=4, temperature=0.9, max_new_tokens=16, seed=123)]
    assert (first.prompt_id, first.round, first.policy, first.prompt_messages) == ("q1", 3, "ckpt/ppo-2", Q1)
    assert first.replies == ["0 0", "0 1", "0 2", "0 3"]
    assert second.reply_ids == [[1, 0, 99], [1, 1, 99], [1, 2, 99], [1, 3, 99]]
    assert first.ranks == [2, 2, 1, 0] and second.prompt_messages == Q2


def test_store_file_is_plain_sqlite(tmp_path):
    """Other tools (and people) can read the store: the tables are plain SQL."""
    path = tmp_path / "c.sqlite"
    with ComparisonStore(path) as store:
        _add(store, ranks=(1, 0))
    db = sqlite3.connect(path)
    assert db.execute("SELECT text, rank FROM replies ORDER BY idx").fetchall() == [("reply 0", 1), ("reply 1", 0)]
    db.close()


def test_delete_round_removes_only_that_round_and_its_replies(tmp_path):
    with ComparisonStore(tmp_path / "c.sqlite") as store:
        for rnd in (1, 2, 2):
            store.add(rnd, f"p{rnd}", "policy", [{"role": "user", "content": "q"}], ["a", "b"], [[1], [2]], [0, 1])
        assert store.delete_round(2) == 2
        assert [c.round for c in store.load()] == [1]
        assert store._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0] == 2  # cascaded


def test_unranked_comparisons_wait_for_their_ranks(tmp_path):
    with ComparisonStore(tmp_path / "c.sqlite") as store:
        ranked = _add(store, round=1, ranks=(1, 0))
        unranked = store.add(1, prompt_key(Q2), "ckpt/sft", Q2, ["a", "b", "c"], [[1], [2], [3]])  # ranks=None
        assert store.count() == 2 and store.count([1]) == 2
        assert store.count_ranked() == 1 and store.count_ranked([1]) == 1 and store.count_ranked([2]) == 0
        assert [c.id for c in store.load()] == [ranked]  # ranked_only by default: the RM never sees NULLs
        everything = store.load(ranked_only=False)
        assert [c.ranks for c in everything] == [[1, 0], [None, None, None]]
        assert [c.ranked for c in everything] == [True, False]
        store.set_ranks(unranked, [2, 0, 0])
        assert store.count_ranked() == 2
        assert store.load([1])[1].ranks == [2, 0, 0]
        with pytest.raises(ValueError, match="has 3 replies, got 2 ranks"):
            store.set_ranks(unranked, [0, 1])
        with pytest.raises(ValueError, match="ranks must be ints >= 0"):
            store.set_ranks(unranked, [0, 1, -1])
        with pytest.raises(ValueError, match="no comparison with id 99"):
            store.set_ranks(99, [0, 1])
        assert store.load([1])[1].ranks == [2, 0, 0]  # failed updates changed nothing


def test_partly_ranked_comparison_counts_as_unranked(tmp_path):
    """What a person half-way through ranking in SQL leaves: not yet training data."""
    path = tmp_path / "c.sqlite"
    with ComparisonStore(path) as store:
        cid = store.add(0, "p", "pol", Q1, ["a", "b"], [[1], [2]])
    db = sqlite3.connect(path)
    with db:
        db.execute("UPDATE replies SET rank = 0 WHERE comparison_id = ? AND idx = 0", (cid,))
    db.close()
    with ComparisonStore(path) as store:
        assert store.count_ranked() == 0 and store.load() == []
        assert store.load(ranked_only=False)[0].ranks == [0, None]


def _v1_file(path):
    """A store as version 1 wrote it (rank NOT NULL), with one ranked comparison."""
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE comparisons (id INTEGER PRIMARY KEY AUTOINCREMENT, round INTEGER NOT NULL,
            prompt_id TEXT NOT NULL, policy TEXT NOT NULL, prompt_messages TEXT NOT NULL, created TEXT NOT NULL);
        CREATE INDEX comparisons_round ON comparisons(round);
        CREATE TABLE replies (comparison_id INTEGER NOT NULL REFERENCES comparisons(id) ON DELETE CASCADE,
            idx INTEGER NOT NULL, text TEXT NOT NULL, token_ids TEXT NOT NULL, rank INTEGER NOT NULL,
            PRIMARY KEY (comparison_id, idx));
        PRAGMA user_version = 1;
    """)
    with db:
        db.execute("INSERT INTO comparisons VALUES (7, 2, 'pid', 'ckpt/old', ?, '2024-01-01T00:00:00+00:00')",
                   (json.dumps(Q1),))
        db.executemany("INSERT INTO replies VALUES (7, ?, ?, ?, ?)", [(0, "x", "[1, 2]", 1), (1, "y", "[3]", 0)])
    db.close()
    return path


def test_v1_file_is_migrated_and_keeps_its_comparisons(tmp_path):
    path = _v1_file(tmp_path / "old.sqlite")
    with ComparisonStore(path) as store:
        [old] = store.load()
        assert (old.id, old.round, old.policy, old.replies, old.reply_ids, old.ranks) == (
            7, 2, "ckpt/old", ["x", "y"], [[1, 2], [3]], [1, 0])
        store.add(3, "new", "ckpt/new", Q2, ["a", "b"], [[1], [2]])  # unranked: needs the nullable column
        assert store.count() == 2 and store.count_ranked() == 1
        assert store.delete_round(2) == 1  # the cascade still holds on the rebuilt table
        assert store._db.execute("SELECT COUNT(*) FROM replies WHERE comparison_id = 7").fetchone()[0] == 0
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    db.close()


def test_unknown_schema_version_is_bad_input(tmp_path):
    path = tmp_path / "future.sqlite"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 9")
    db.close()
    with pytest.raises(BadInput, match="schema version 9"):
        ComparisonStore(path)


def test_collect_without_labeler_stores_unranked(tmp_path):
    with ComparisonStore(tmp_path / "c.sqlite") as store:
        n = collect_comparisons(_FakeRollout(), [Q1], [[5, 6]], ["q1"], k=3, labeler=None, store=store, round=1,
                                policy="ckpt/sft", temperature=1.0, max_new_tokens=8, seed=0,
                                tokenizer=_FakeTokenizer())
        assert n == 1 and store.count() == 1 and store.count_ranked() == 0
        [c] = store.load(ranked_only=False)
    assert c.replies == ["0 0", "0 1", "0 2"] and c.ranks == [None, None, None]
