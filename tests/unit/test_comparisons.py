"""Comparison store, labelers and collection (no Ray: a fake rollout group stands in)."""
from __future__ import annotations

import json
import sqlite3

import pytest

from rlhf.orchestrator.recipe.comparisons import (
    ComparisonStore,
    FileLabeler,
    SimulatedLabeler,
    collect_comparisons,
    prompt_key,
    ranks_from_scores,
)
from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.experience import Samples
from rlhf.orchestrator.tasks import arithmetic

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


def test_ranks_from_scores_dense_with_ties():
    assert ranks_from_scores([1.5, -1.0, 1.5, 0.0]) == [0, 2, 0, 1]
    assert ranks_from_scores([0.0, 0.0]) == [0, 0]


def test_simulated_labeler_ranks_by_arithmetic_score():
    labeler = SimulatedLabeler(arithmetic.score_reply)
    replies = ["2 + 3 = 5.", "2 + 3 = 5. Happy to help!", "2 + 3 = 6.",
               "2 + 3 = 6. Let me tell you much more about numbers than you asked for today."]
    # scores 1.0, 1.5, -1.0, -1.5
    assert labeler.rank(Q1, replies) == [1, 0, 2, 3]
    assert labeler.rank(Q1, ["2 + 3 = 5.", "5"]) == [0, 0]  # equal scores: a tie


def _write(path, *lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_file_labeler_reads_ranks_matched_by_reply_text(tmp_path):
    path = _write(tmp_path / "r.jsonl",
                  json.dumps({"prompt": Q1, "replies": ["b", "a", "c"], "ranks": [1, 0, 2]}),
                  "",
                  json.dumps({"prompt": Q2, "ranks": [0, 0, 1]}))
    labeler = FileLabeler(path)
    assert labeler.rank(Q1, ["a", "b", "c"]) == [0, 1, 2]  # reordered to the sampled order
    assert labeler.rank(Q2, ["x", "y", "z"]) == [0, 0, 1]
    with pytest.raises(BadInput, match=r"r\.jsonl:1: the ranked replies differ"):
        labeler.rank(Q1, ["a", "b", "d"])
    with pytest.raises(BadInput, match=r"r\.jsonl:3: 3 ranks for 2 sampled replies"):
        labeler.rank(Q2, ["x", "y"])
    with pytest.raises(BadInput, match="no ranking for prompt 'What is 9 - 1\\?'"):
        labeler.rank([{"role": "user", "content": "What is 9 - 1?"}], ["a", "b"])


@pytest.mark.parametrize("bad, why", [
    ("{not json", "invalid JSON"),
    (json.dumps({"ranks": [0, 1]}), "missing key 'prompt'"),
    (json.dumps({"prompt": Q1, "ranks": [0]}), "'ranks' must be a list of >= 2"),
    (json.dumps({"prompt": Q1, "ranks": [0, "1"]}), "'ranks' must be a list of >= 2"),
    (json.dumps({"prompt": "What?", "ranks": [0, 1]}), "'prompt' must be a non-empty list"),
    (json.dumps({"prompt": Q1, "ranks": [0, 1], "replies": ["a"]}), "'replies' must be a list"),
    (json.dumps([1, 2]), "must be a JSON object"),
])
def test_file_labeler_malformed_line_names_file_and_line(tmp_path, bad, why):
    path = _write(tmp_path / "r.jsonl", json.dumps({"prompt": Q2, "ranks": [0, 1]}), bad)
    with pytest.raises(BadInput) as err:
        FileLabeler(path)
    msg = str(err.value)
    assert f"{path}:2: malformed ranking" in msg and why in msg and "\n" not in msg


def test_file_labeler_missing_file_empty_and_duplicate(tmp_path):
    with pytest.raises(BadInput, match="no such file"):
        FileLabeler(tmp_path / "none.jsonl")
    with pytest.raises(BadInput, match="no rankings"):
        FileLabeler(_write(tmp_path / "empty.jsonl", ""))
    line = json.dumps({"prompt": Q1, "ranks": [0, 1]})
    with pytest.raises(BadInput, match=r"dup\.jsonl:2: prompt already ranked on line 1"):
        FileLabeler(_write(tmp_path / "dup.jsonl", line, line))


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
