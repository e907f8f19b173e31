"""The labeling tables: agreement math by hand, queue order, overlap, tokens, export."""
from __future__ import annotations

import sqlite3

import pytest

from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.label.agreement import kendall_tau_b, pairwise_agreement
from rlhf.orchestrator.label.cli import export_rows
from rlhf.orchestrator.label.db import LabelDB, Refused, hash_token
from rlhf.orchestrator.recipe.comparisons import ComparisonStore


def _store(path, n: int, k: int = 3) -> None:
    with ComparisonStore(path) as store:
        for i in range(n):
            store.add(1, f"p{i}", "pol", [{"role": "user", "content": f"q{i}"}], [f"r{i}.{j}" for j in range(k)],
                      [[j] for j in range(k)])


@pytest.mark.parametrize("a, b, agreement, tau", [
    ([0, 1, 2], [0, 1, 2], 1.0, 1.0),
    ([0, 1, 2], [2, 1, 0], 0.0, -1.0),
    # pairs (0,1) (0,2) (1,2): a says <,<,<; b says <,<,> -> 2 of 3 agree; C=2, D=1 -> tau 1/3
    ([0, 1, 2], [0, 2, 1], 2 / 3, 1 / 3),
    # b ties 1 and 2: agreement on (0,1),(0,2) only; C=2, D=0, n0=3, n1=0, n2=1 -> 2/sqrt(3*2)
    ([0, 1, 2], [0, 1, 1], 2 / 3, 2 / 6 ** 0.5),
    ([0, 0], [0, 1], 0.0, None),  # a ties everything: tau undefined
])
def test_agreement_and_kendall_tau_by_hand(a, b, agreement, tau):
    assert pairwise_agreement(a, b) == pytest.approx(agreement)
    assert kendall_tau_b(a, b) == (None if tau is None else pytest.approx(tau))


def test_agreement_needs_two_rankings_of_the_same_replies():
    with pytest.raises(ValueError):
        kendall_tau_b([0, 1], [0, 1, 2])


def test_tokens_are_stored_hashed_and_names_checked(tmp_path):
    db = LabelDB(tmp_path / "c.sqlite")
    token = db.add_labeler("ann")
    raw = sqlite3.connect(tmp_path / "c.sqlite").execute("SELECT token_hash FROM labelers").fetchone()[0]
    assert raw == hash_token(token) and token not in raw
    assert db.authenticate(token) == "ann"
    with pytest.raises(BadInput, match="exists already"):
        db.add_labeler("ann")
    with pytest.raises(BadInput, match="labeler name"):
        db.add_labeler("a b")
    db.revoke("ann")
    with pytest.raises(Refused) as err:
        db.authenticate(token)
    assert err.value.status == 403 and not db.has_labelers()
    with pytest.raises(BadInput, match="no active labeler"):
        db.revoke("ann")


@pytest.mark.parametrize("order", ["fifo", "random", "uncertainty"])
def test_queue_order(tmp_path, order):
    _store(tmp_path / "c.sqlite", 6)
    db = LabelDB(tmp_path / "c.sqlite", order=order, overlap=0.0)
    db.margins = {4: 0.01, 2: 0.5, 6: 0.02}
    ids = [it["id"] for it in db.take("ann", 10)]
    expected = {"fifo": [1, 2, 3, 4, 5, 6], "uncertainty": [4, 6, 2, 1, 3, 5]}
    if order == "random":  # a fixed shuffle per labeler: the same ids, the same order again
        fresh = LabelDB(tmp_path / "c.sqlite", order=order, overlap=0.0)
        assert sorted(ids) == [1, 2, 3, 4, 5, 6] and [it["id"] for it in fresh.take("ann", 10)] == ids
    else:
        assert ids == expected[order]
    # the leases stay with ann: bob sees nothing, ann gets the same items with the same display order
    assert db.take("bob", 10) == [] and db.take("ann", 10) == db.take("ann", 10)


def test_overlap_share_and_machine_ranked_items(tmp_path):
    path = tmp_path / "c.sqlite"
    _store(path, 200)
    with ComparisonStore(path) as store:
        store.set_ranks(1, [0, 1, 2])  # a machine labeler's ranks: not pending for people
    db = LabelDB(path, overlap=0.25)
    drawn = sum(db.drawn_for_overlap(i) for i in range(1, 201))
    assert 30 <= drawn <= 70  # 25 % of 200, by a fixed hash
    items = db.take("ann", 200)
    assert 1 not in [it["id"] for it in items] and len(items) == 199
    for it in items:
        db.submit("ann", it["id"], [0, 1, 2])
    second = [it["id"] for it in db.take("bob", 200)]
    assert second == [i for i in range(2, 201) if db.drawn_for_overlap(i)]


def test_export_pairs_per_labeler_and_demonstrations(tmp_path):
    _store(tmp_path / "comparisons.sqlite", 1)
    db = LabelDB(tmp_path / "comparisons.sqlite", overlap=1.0)
    db.take("ann", 1)
    db.submit("ann", 1, [1, 0, 1], better_reply="best")
    db.submit("bob", 1, [0, 0, 1])
    pairs = [(r["chosen"], r["rejected"]) for r in export_rows(tmp_path, "preference")]
    assert pairs == [("r0.1", "r0.0"), ("r0.1", "r0.2"), ("r0.0", "r0.2"), ("r0.1", "r0.2")]
    [demo] = export_rows(tmp_path, "messages")
    assert demo == {"messages": [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "best"}]}
