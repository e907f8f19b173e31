"""The labeling app's JSON API, on a real SQLite store: auth (401/403/CSRF), the ranking
contract (400/409/413), leases and overlap, stats, chat-and-compare and demonstrations
with a tiny real policy, and 20 concurrent submissions from 2 labelers through a real
uvicorn server (threads), all stored exactly once."""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient

from rlhf.orchestrator.config import ExperimentConfig
from rlhf.orchestrator.label.app import CSP, SESSION_COOKIE, create_app
from rlhf.orchestrator.label.db import LabelDB
from rlhf.orchestrator.models.tiny import TinyModelSpec, build_tiny_from_corpus, sample_corpus
from rlhf.orchestrator.recipe.comparisons import ComparisonStore

pytestmark = pytest.mark.slow


def _store(run, n: int, k: int = 3, ranked: int = 0) -> list[int]:
    with ComparisonStore(run / "comparisons.sqlite") as store:
        return [store.add(1, f"p{i}", "policy", [{"role": "user", "content": f"question {i}?"}],
                          [f"reply {i}.{j}" for j in range(k)], [[j + 1] for j in range(k)],
                          [0] + [1] * (k - 1) if i < ranked else None) for i in range(n)]


def _cfg(**label) -> ExperimentConfig:
    return ExperimentConfig.model_validate({"label": {"overlap": 0.0, **label}})


def _bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture()
def run(tmp_path):
    _store(tmp_path, 4, ranked=1)
    return tmp_path


def test_tokens_401_403_and_what_a_labeler_sees(run):
    db = LabelDB(run / "comparisons.sqlite")
    ann, bob = db.add_labeler("ann"), db.add_labeler("bob")
    client = TestClient(create_app(run, config=_cfg()).app)
    assert client.get("/api/queue").status_code == 401
    assert client.get("/api/queue", headers=_bearer("nope")).json() == {"error": "unknown token"}
    db.revoke("bob")
    refused = client.get("/api/queue", headers=_bearer(bob))
    assert refused.status_code == 403 and "revoked" in refused.json()["error"]
    items = client.get("/api/queue?limit=10", headers=_bearer(ann)).json()
    assert [it["id"] for it in items] == [2, 3, 4]  # 1 was ranked by a machine labeler: not pending
    assert sorted(r["idx"] for r in items[0]["replies"]) == [0, 1, 2]
    assert items[0]["prompt_messages"] == [{"role": "user", "content": "question 1?"}]
    response = client.get("/api/stats", headers=_bearer(ann))
    assert response.headers["content-security-policy"] == CSP
    assert response.json()["totals"] == {"comparisons": 4, "ranked": 1, "pending": 3, "rankings": 0,
                                         "demonstrations": 0, "labelers": 1}


def test_ranking_contract_400_409_413_and_what_is_stored(run):
    db = LabelDB(run / "comparisons.sqlite")
    ann = db.add_labeler("ann")
    client = TestClient(create_app(run, config=_cfg(rules={"no_medical_advice": "No medical advice."},
                                                    max_body_kb=4)).app)
    [item] = client.get("/api/queue?limit=1", headers=_bearer(ann)).json()
    cid, shown = item["id"], [r["idx"] for r in item["replies"]]
    url = f"/api/comparisons/{cid}/ranking"
    assert client.post(url, json={"ranks": [0, 1]}, headers=_bearer(ann)).status_code == 400  # K = 3
    assert client.post(url, json={"ranks": [0, 1, 3]}, headers=_bearer(ann)).status_code == 400
    assert client.post(url, json={"ranks": [0, 1, 1], "violations": ["nope"]}, headers=_bearer(ann)).status_code == 400
    assert client.post(url, json={"ranks": [0, 1, 1], "extra": 1}, headers=_bearer(ann)).status_code == 400
    big = client.post(url, json={"ranks": [0, 1, 1], "note": "x" * 5000}, headers=_bearer(ann))
    assert big.status_code == 413 and "label.max_body_kb" in big.json()["error"]
    assert client.post("/api/comparisons/99/ranking", json={"ranks": [0]}, headers=_bearer(ann)).status_code == 404
    ok = client.post(url, json={"ranks": [2, 0, 1], "better_reply": "A better one.", "note": "meh",
                                "violations": ["no_medical_advice"], "unacceptable": True}, headers=_bearer(ann))
    assert ok.status_code == 200 and ok.json()["ok"] is True
    again = client.post(url, json={"ranks": [2, 0, 1]}, headers=_bearer(ann))
    assert again.status_code == 409 and "already ranked" in again.json()["error"]
    sql = sqlite3.connect(run / "comparisons.sqlite")
    row = sql.execute("SELECT labeler, ranks, display_order, seconds, unacceptable, violations, note FROM rankings").fetchone()
    assert row[:3] == ("ann", "[2, 0, 1]", json.dumps(shown)) and row[3] >= 0
    assert row[4:] == (1, '["no_medical_advice"]', "meh")
    assert sql.execute("SELECT rank FROM replies WHERE comparison_id = ? ORDER BY idx", (cid,)).fetchall() == [
        (2,), (0,), (1,)]
    demo = db.demonstrations()[0]
    assert demo["messages"][-1] == {"role": "assistant", "content": "A better one."}
    assert demo["provenance"] == {"source": "better_reply", "comparison_id": cid}


def test_cookie_login_is_one_time_and_posts_need_csrf(run):
    lab = create_app(run, config=_cfg())
    client = TestClient(lab.app)
    login = client.get(f"/login?token={lab.login_token}", follow_redirects=False)
    assert login.status_code == 303 and SESSION_COOKIE in login.cookies
    session = next(iter(lab.sessions.values()))
    [item] = client.get("/api/queue?limit=1").json()
    url = f"/api/comparisons/{item['id']}/ranking"
    assert client.post(url, json={"ranks": [0, 1, 2]}).status_code == 403  # cookie but no CSRF token
    assert client.post(url, json={"ranks": [0, 1, 2]}, headers={"X-CSRF-Token": "wrong"}).status_code == 403
    assert client.post(url, json={"ranks": [0, 1, 2]}, headers={"X-CSRF-Token": session.csrf}).status_code == 200
    fresh = TestClient(lab.app)
    assert fresh.get(f"/login?token={lab.login_token or 'used'}", follow_redirects=False).status_code == 401
    assert fresh.get("/", follow_redirects=False).headers["location"] == "/login"


def test_leases_expire_and_overlap_items_reach_a_second_labeler(tmp_path):
    _store(tmp_path, 2)
    db = LabelDB(tmp_path / "comparisons.sqlite")
    ann, bob = db.add_labeler("ann"), db.add_labeler("bob")
    client = TestClient(create_app(tmp_path, config=_cfg(overlap=1.0, lease_s=0.5)).app)
    first = client.get("/api/queue?limit=1", headers=_bearer(ann)).json()[0]["id"]
    assert [i["id"] for i in client.get("/api/queue", headers=_bearer(bob)).json()] == [2]  # 1 is ann's now
    held = client.post(f"/api/comparisons/{first}/ranking", json={"ranks": [0, 1, 2]}, headers=_bearer(bob))
    assert held.status_code == 409 and "leased to another labeler" in held.json()["error"]
    time.sleep(0.6)  # ann's lease runs out: bob may take it
    assert client.get(f"/api/comparisons/{first}", headers=_bearer(bob)).status_code == 200
    stale = client.post(f"/api/comparisons/{first}/ranking", json={"ranks": [0, 1, 2]}, headers=_bearer(ann))
    assert stale.status_code == 409
    assert client.post(f"/api/comparisons/{first}/ranking", json={"ranks": [0, 1, 2]},
                       headers=_bearer(bob)).status_code == 200
    # overlap 1.0: every item goes to a second labeler; ann ranks the same item differently
    assert first in [i["id"] for i in client.get("/api/queue", headers=_bearer(ann)).json()]
    assert client.post(f"/api/comparisons/{first}/ranking", json={"ranks": [0, 2, 1]},
                       headers=_bearer(ann)).status_code == 200
    people = {p["name"]: p for p in client.get("/api/stats", headers=_bearer(ann)).json()["labelers"]}
    assert people["ann"]["agreement"] == pytest.approx(2 / 3) and people["ann"]["kendall_tau"] == pytest.approx(1 / 3)
    assert people["bob"]["overlap_items"] == 1 and people["bob"]["count"] == 1
    with ComparisonStore(tmp_path / "comparisons.sqlite") as store:  # each ranking is one comparison for the RM
        assert sorted((c.labeler, tuple(c.ranks)) for c in store.load() if c.id == first) == [
            ("ann", (0, 2, 1)), ("bob", (0, 1, 2))]


def test_twenty_concurrent_submissions_from_two_labelers_are_stored_once(tmp_path):
    import uvicorn

    _store(tmp_path, 20)
    db = LabelDB(tmp_path / "comparisons.sqlite")
    tokens = {"ann": db.add_labeler("ann"), "bob": db.add_labeler("bob")}
    lab = create_app(tmp_path, config=_cfg())
    server = uvicorn.Server(uvicorn.Config(lab.app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    try:
        held = {who: [i["id"] for i in httpx.get(f"{base}/api/queue?limit=10", headers=_bearer(t)).json()]
                for who, t in tokens.items()}
        assert sorted(held["ann"] + held["bob"]) == list(range(1, 21))
        jobs = [(who, cid) for who in tokens for cid in held[who]] * 2  # each item sent twice at once
        with ThreadPoolExecutor(max_workers=20) as pool:
            codes = list(pool.map(lambda job: httpx.post(
                f"{base}/api/comparisons/{job[1]}/ranking", json={"ranks": [0, 1, 2]},
                headers=_bearer(tokens[job[0]]), timeout=60).status_code, jobs))
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert sorted(codes) == [200] * 20 + [409] * 20
    sql = sqlite3.connect(tmp_path / "comparisons.sqlite")
    assert sql.execute("SELECT COUNT(*), COUNT(DISTINCT comparison_id) FROM rankings").fetchone() == (20, 20)
    assert sql.execute("SELECT COUNT(*) FROM replies WHERE rank IS NULL").fetchone()[0] == 0
    assert sql.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    return build_tiny_from_corpus(sample_corpus(), tmp_path_factory.mktemp("label") / "policy",
                                  spec=TinyModelSpec(hidden_size=64, num_layers=1))


def test_chat_alternatives_and_demonstrations_with_a_tiny_policy(tmp_path, tiny_policy):
    db = LabelDB(tmp_path / "comparisons.sqlite")
    ann = db.add_labeler("ann")
    client = TestClient(create_app(tmp_path, policy=str(tiny_policy), config=_cfg()).app)
    talk = [{"role": "user", "content": "What is 2 + 3?"}]
    reply = client.post("/api/chat", json={"messages": talk}, headers=_bearer(ann))
    assert reply.status_code == 200 and isinstance(reply.json()["reply"], str)
    assert client.post("/api/chat", json={"messages": talk + [{"role": "assistant", "content": "5"}]},
                       headers=_bearer(ann)).status_code == 400  # must end with a user turn
    made = client.post("/api/alternatives", json={"messages": talk, "k": 3}, headers=_bearer(ann))
    cid = made.json()["comparison_id"]
    item = client.get(f"/api/comparisons/{cid}", headers=_bearer(ann)).json()
    assert item["prompt_messages"] == talk and len(item["replies"]) == 3
    with ComparisonStore(tmp_path / "comparisons.sqlite") as store:
        [stored] = store.load(ranked_only=False)
    assert stored.policy == str(tiny_policy) and all(ids for ids in stored.reply_ids)
    demo = talk + [{"role": "assistant", "content": "5"}, {"role": "user", "content": "And 2 + 4?"},
                   {"role": "assistant", "content": "6"}]
    bad = client.post("/api/demonstrations", json={"messages": demo, "suggestions": [{"turn": 0, "text": "x",
                                                                                      "action": "accepted"}]},
                      headers=_bearer(ann))
    assert bad.status_code == 400 and "suggestions[0].turn" in bad.json()["error"]
    saved = client.post("/api/demonstrations", json={"messages": demo, "suggestions": [
        {"turn": 1, "text": "five", "action": "edited"}]}, headers=_bearer(ann))
    [row] = db.demonstrations()
    assert saved.json()["id"] == row["id"] and row["messages"] == demo
    assert row["provenance"]["suggestions"] == [{"turn": 1, "text": "five", "action": "edited"}]


def test_no_policy_is_404(run):
    token = LabelDB(run / "comparisons.sqlite").add_labeler("ann")
    client = TestClient(create_app(run, config=_cfg()).app)
    response = client.post("/api/chat", json={"messages": [{"role": "user", "content": "hi"}]},
                           headers=_bearer(token))
    assert response.status_code == 404 and "--policy" in response.json()["error"]


def test_serve_command_prints_a_one_time_login_url(run):
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rlhf = str(Path(sys.executable).with_name("rlhf"))
    proc = subprocess.Popen([rlhf, "label", "serve", str(run), "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"label: open http://localhost:{port}/login?token=") and "3 comparisons wait" in line
        url = line.split()[2].replace("localhost", "127.0.0.1")
        for _ in range(100):  # the line comes just before uvicorn binds
            try:
                login = httpx.get(url, follow_redirects=False)
                break
            except httpx.ConnectError:
                time.sleep(0.1)
        assert login.status_code == 303
        page = httpx.get(f"http://127.0.0.1:{port}/", cookies=login.cookies)
        assert page.status_code == 200 and "csrf-token" in page.text and page.headers["content-security-policy"] == CSP
        assert httpx.get(url, follow_redirects=False).status_code == 401  # the token worked once
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_uncertainty_order_puts_the_reward_models_closest_call_first(tmp_path, tiny_policy):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.orchestrator.label.uncertainty import newest_reward_model, reward_margins

    for r in (1, 3):  # the newest round's reward model is the one used
        rm = tmp_path / f"round{r}" / "rm" / "checkpoint"
        AutoModelForSequenceClassification.from_pretrained(tiny_policy, num_labels=1).save_pretrained(rm)
        AutoTokenizer.from_pretrained(tiny_policy).save_pretrained(rm)
    assert newest_reward_model(tmp_path) == tmp_path / "round3" / "rm" / "checkpoint"
    with ComparisonStore(tmp_path / "comparisons.sqlite") as store:
        for i, replies in enumerate([["yes", "no thanks, never"], ["same", "same"], ["a", "bbb ccc ddd"]]):
            store.add(1, f"p{i}", "pol", [{"role": "user", "content": "ok?"}], replies, [[1], [2]])
        comparisons = store.load(ranked_only=False)
    margins = reward_margins(newest_reward_model(tmp_path), comparisons)
    assert margins[2] == pytest.approx(0.0, abs=1e-6) and min(margins[1], margins[3]) > 1e-6
    db = LabelDB(tmp_path / "comparisons.sqlite", order="uncertainty", overlap=0.0)
    db.margins = margins
    assert [it["id"] for it in db.take("ann", 3)][0] == 2  # identical replies: the RM cannot tell them apart


SEARCHED = ('Search Query: capital of Veltra\nSearch Result: Veltra | Veltra is a river nation. Its capital is Osk.\n'
            'Osk is the capital. Source: Veltra "Its capital is Osk."')


def test_evidence_card_fields_and_per_reply_judgements(tmp_path):
    """A reply that searched is handed out with its parsed evidence (one that did not: None);
    violations per reply idx and supported?/plausible? per reply are stored; bad keys are 400."""
    rules = {"no_medical_advice": "No medical advice.", "no_human_claims": "Do not claim to be human."}
    with ComparisonStore(tmp_path / "comparisons.sqlite") as store:
        cid = store.add(1, "p", "pol", [{"role": "user", "content": "Capital of Veltra?"}],
                        [SEARCHED, "It is Osk, I think.", "I am a human doctor: take two pills."], [[1], [2], [3]])
    db = LabelDB(tmp_path / "comparisons.sqlite", rules=rules)
    ann = db.add_labeler("ann")
    client = TestClient(create_app(tmp_path, config=_cfg(rules=rules)).app)
    [item] = client.get("/api/queue?limit=1", headers=_bearer(ann)).json()
    by_idx = {r["idx"]: r for r in item["replies"]}
    assert by_idx[0]["text"] == SEARCHED  # the contract's text stays the whole reply
    assert by_idx[0]["evidence"] == {
        "queries": ["capital of Veltra"], "passages": [{"title": "Veltra", "text": "Veltra is a river nation. Its capital is Osk."}],
        "answer": "Osk is the capital.", "cited_title": "Veltra", "quote": "Its capital is Osk.", "quote_found": True}
    assert by_idx[1]["evidence"] is None and by_idx[2]["evidence"] is None
    url = f"/api/comparisons/{cid}/ranking"
    for bad, where in [({"3": ["no_medical_advice"]}, "violations"), ({"x": []}, "violations"),
                       ({"2": ["nope"]}, "violations[2]"), ({"2": "no_medical_advice"}, "violations[2]")]:
        refused = client.post(url, json={"ranks": [0, 1, 2], "violations": bad}, headers=_bearer(ann))
        assert refused.status_code == 400 and refused.json()["error"].startswith(where), refused.json()
    for bad, where in [({"0": {"supported": True}}, "evidence[0]"), ({"0": {"plausible": "yes"}}, "evidence[0]"),
                       ({"5": {"plausible": True}}, "evidence"), ({"0": {"plausible": True, "x": 1}}, "evidence[0]")]:
        refused = client.post(url, json={"ranks": [0, 1, 2], "evidence": bad}, headers=_bearer(ann))
        assert refused.status_code == 400 and refused.json()["error"].startswith(where), refused.json()
    assert client.post(url, json={"ranks": [0, 1, 2], "evidence": []}, headers=_bearer(ann)).status_code == 400
    ok = client.post(url, headers=_bearer(ann), json={
        "ranks": [0, 1, 2], "violations": {"2": ["no_medical_advice", "no_human_claims"], "1": []},
        "evidence": {"0": {"supported": True, "plausible": True}, "1": {"supported": None, "plausible": True},
                     "2": {"supported": None, "plausible": False}}})
    assert ok.status_code == 200, ok.json()
    sql = sqlite3.connect(tmp_path / "comparisons.sqlite")
    (violations,) = sql.execute("SELECT violations FROM rankings").fetchone()
    assert json.loads(violations) == {"2": ["no_human_claims", "no_medical_advice"]}  # empty lists dropped
    assert db.evidence_judgements() == [
        {"comparison_id": cid, "labeler": "ann", "idx": 0, "supported": True, "plausible": True},
        {"comparison_id": cid, "labeler": "ann", "idx": 1, "supported": None, "plausible": True},
        {"comparison_id": cid, "labeler": "ann", "idx": 2, "supported": None, "plausible": False}]


def test_a_version_3_store_is_upgraded_on_open(tmp_path):
    """A store written before the evidence judgements (schema 3) gains the table on open and keeps its rankings."""
    path = tmp_path / "comparisons.sqlite"
    _store(tmp_path, 1)
    LabelDB(path).submit("ann", 1, [0, 1, 2], violations=[])
    sql = sqlite3.connect(path)
    sql.executescript("DROP TABLE evidence_judgements; PRAGMA user_version = 3;")
    sql.close()
    db = LabelDB(path)
    sql = sqlite3.connect(path)
    assert sql.execute("PRAGMA user_version").fetchone()[0] == 4
    assert sql.execute("SELECT labeler, violations FROM rankings").fetchall() == [("ann", "[]")]
    assert db.evidence_judgements() == []
