"""The labeling pages of `rlhf label serve` in a real browser: Playwright for Python driving
Debian's Chromium, against the real FastAPI app on uvicorn and the real SQLite store.

Each test checks what a labeler's keys and clicks leave in the store, not only what the page
shows. Chromium comes from the `chromium` Debian package (`playwright install` downloads from
a host these machines cannot reach); without it the tests fail with the command to run.
RLHF_SCREENSHOT_DIR=docs writes the README's screenshot (docs/label-rank.png).

    .venv/bin/pytest tests/integration/test_label_browser.py
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import threading
import time
from contextlib import closing, contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from rlhf.orchestrator.recipe.comparisons import ComparisonStore

pytestmark = pytest.mark.slow

PROMPTS = [
    "Give me three tips for sleeping better.\nKeep each tip short.",
    "What is 17 * 23?",
    "Write a friendly reminder that the meeting moved to Thursday.",
]
REPLIES = [
    ["1. Keep a fixed wake-up time.\n2. No screens in bed.\n3. Cut coffee after noon.",
     "Sleep is important. Try to sleep more.",
     "1. Dark, cool room.\n2. Same bedtime every night.\n3. A short walk in daylight."],
    ["17 * 23 = 391.", "17 * 23 = 401.", "About 400."],
    ["Hi all, a reminder: the meeting is now on Thursday, same time and room.",
     "MEETING THURSDAY.",
     "Hello! Quick note that we moved our meeting to Thursday. See you there!"],
]
# The ranks a labeler gives each item's replies, by idx (1 = best; the last one has a tie).
RANKS = [[1, 3, 2], [1, 3, 2], [1, 3, 1]]
SCRIPT = "<script>window.__pwned=1;alert(1)</script>"
IMG = '<img src=x onerror="window.__pwned=2;alert(2)">'


# ---------------------------------------------------------------- fixtures


def _store(run_dir: Path, prompts: list[str], replies: list[list[str]]) -> list[int]:
    """Unranked comparisons (pending for people) in RUN_DIR/comparisons.sqlite; their ids."""
    with ComparisonStore(run_dir / "comparisons.sqlite") as store:
        return [store.add(round=1, prompt_id=f"p{i}", policy="p", prompt_messages=[{"role": "user", "content": p}],
                          replies=r, reply_ids=[[j + 1] for j in range(len(r))], ranks=None)
                for i, (p, r) in enumerate(zip(prompts, replies))]


@contextmanager
def _serve(run_dir: Path, policy: Path | None = None):
    """The app on uvicorn in a thread, on a loopback socket bound here (so no port race)."""
    import uvicorn

    from rlhf.orchestrator.label.app import create_app

    lab = create_app(run_dir, policy=str(policy) if policy else None)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(lab.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail(f"the label app did not start on port {port}", pytrace=False)
        time.sleep(0.02)
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", lab=lab, db=run_dir / "comparisons.sqlite")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is not installed: run `apt-get install -y chromium` "
                    "(make test's set-up installs it)", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A fresh context (no cookies) per test; the test fails on any script error and on any
    Content-Security-Policy violation (an inline script, handler or style in the pages)."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.set_default_timeout(20_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None)
    yield page
    context.close()
    assert not errors, f"errors on the page: {errors}"


@pytest.fixture(scope="module")
def queue_server(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("label-queue")
    ids = _store(run_dir, PROMPTS, REPLIES)
    (run_dir / "config.yaml").write_text("data:\n  task: rules\n")  # the rules task's rules as checkboxes
    with _serve(run_dir) as srv:
        srv.ids = ids
        yield srv


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory) -> Path:
    from rlhf.orchestrator.models.tiny import TinyModelSpec, build_tiny_from_corpus, sample_corpus

    spec = TinyModelSpec(hidden_size=64, num_layers=1, intermediate_size=128, vocab_size=384)
    return build_tiny_from_corpus(sample_corpus(), tmp_path_factory.mktemp("label-policy") / "tiny", spec=spec)


@pytest.fixture(scope="module")
def policy_server(tmp_path_factory, tiny_policy):
    run_dir = tmp_path_factory.mktemp("label-policy-run")
    with _serve(run_dir, policy=tiny_policy) as srv:
        yield srv


def _labeler_token(srv, name: str) -> str:
    from rlhf.orchestrator.label.db import LabelDB

    return LabelDB(srv.db).add_labeler(name)


def _login(page, srv, token: str) -> str:
    """Signs in through the login URL; returns the name the page says is signed in."""
    page.goto(f"{srv.url}/login?token={token}")
    assert page.url == f"{srv.url}/", f"login did not land on the rank page: {page.url}"
    return page.locator("#labeler-name").inner_text()


def _rows(db: Path, sql: str, args=()) -> list[tuple]:
    with closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql, args).fetchall()


def _shown(page, root: str = "#rank-root") -> tuple[int, list[int]]:
    """The comparison on screen and its replies' idx in display order."""
    ranker = page.locator(f"{root} .ranker")
    ranker.wait_for()
    cid = int(ranker.get_attribute("data-comparison-id"))
    return cid, [int(i) for i in page.locator(f"{root} .card").evaluate_all("cs => cs.map(c => c.dataset.idx)")]


# ---------------------------------------------------------------- tests


def test_rank_a_queue_with_the_keyboard(queue_server, page, tmp_path):
    """Three comparisons ranked with keys only (letters choose a card, digits rank it, ties,
    `u`, `/` for a better reply, Esc, Enter); the store holds what was pressed, by idx."""
    srv = queue_server
    name = _login(page, srv, srv.lab.login_token)
    assert page.locator(".card .text").first.evaluate("e => getComputedStyle(e).whiteSpace") == "pre-wrap"
    better = "Hi all, the meeting moved to Thursday.\nSame time, same room."
    expected, orders = {}, {}
    for n in range(3):
        cid, order = _shown(page)
        assert cid not in expected and len(order) == 3
        page.get_by_text("0 of 3 ranked").wait_for()  # a new item starts unranked
        want = RANKS[srv.ids.index(cid)]               # UI ranks (1 = best) by reply idx
        ui_ranks = [want[idx] for idx in order]        # ... by display position
        if n == 0:    # a letter chooses each card, a digit ranks it
            keys = [k for pos, r in enumerate(ui_ranks) for k in ("abc"[pos], str(r))]
        elif n == 1:  # cards chosen backwards, then "all unacceptable"
            keys = [k for pos in (2, 1, 0) for k in ("abc"[pos], str(ui_ranks[pos]))] + ["u"]
        else:         # digits alone walk the cards in order
            keys = [str(r) for r in ui_ranks]
        for key in keys:
            page.keyboard.press(key)
        if n == 0:
            page.screenshot(path=str(tmp_path / "label-rank.png"), full_page=True)
            if os.environ.get("RLHF_SCREENSHOT_DIR"):
                out = Path(os.environ["RLHF_SCREENSHOT_DIR"]) / "label-rank.png"
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(tmp_path / "label-rank.png", out)
        if n == 2:
            page.keyboard.press("/")
            page.keyboard.type(better)        # typing digits here must not re-rank the cards
            page.keyboard.press("Escape")
        badges = page.locator("#rank-root .card-rank").all_inner_texts()
        assert [b.split()[1] for b in badges] == [str(r) for r in ui_ranks], badges
        page.keyboard.press("Enter")
        expected[cid], orders[cid] = [r - 1 for r in want], order
        if n < 2:
            page.locator(f'#rank-root .ranker:not([data-comparison-id="{cid}"])').wait_for()
    page.locator("#queue-empty").wait_for()
    page.locator("#queue-left").get_by_text("0 left in queue").wait_for()

    rows = _rows(srv.db, "SELECT comparison_id, labeler, ranks, display_order, unacceptable, seconds FROM rankings")
    assert sorted(r[0] for r in rows) == sorted(srv.ids)
    for cid, labeler, ranks, order, unacceptable, seconds in rows:
        assert labeler == name
        assert json.loads(ranks) == expected[cid], cid
        assert json.loads(order) == orders[cid], cid
        assert bool(unacceptable) == (cid == list(expected)[1])
        assert seconds is not None and seconds >= 0
    demos = _rows(srv.db, "SELECT labeler, messages, provenance, comparison_id FROM demonstrations")
    third = list(expected)[2]
    assert len(demos) == 1 and demos[0][0] == name and demos[0][3] == third
    prompt = PROMPTS[srv.ids.index(third)]
    assert json.loads(demos[0][1]) == [{"role": "user", "content": prompt}, {"role": "assistant", "content": better}]
    assert json.loads(demos[0][2])["source"] == "better_reply"


def test_chat_and_compare(policy_server, page):
    """Chat two turns with a tiny policy, press Compare on the second model message, rank the
    K alternatives with the mouse: a new comparison whose prompt is the chat up to there."""
    srv = policy_server
    _login(page, srv, _labeler_token(srv, "carol"))
    page.get_by_role("link", name="Chat & compare").click()
    page.wait_for_url(f"{srv.url}/chat")
    k = int(page.locator("body").get_attribute("data-k"))
    said = ["Hello there!\nHow are you?", "Tell me about cats."]
    for n, text in enumerate(said):
        page.fill("#chat-input", text)
        page.click("#chat-send")
        page.locator("#chat-log li.msg-assistant:not(.pending)").nth(n).wait_for()
    turns = page.locator("#chat-log li.msg").evaluate_all(
        "ls => ls.map(l => ({role: l.classList.contains('msg-user') ? 'user' : 'assistant',"
        " content: l.querySelector('.text').textContent}))")
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"]
    assert [turns[0]["content"], turns[2]["content"]] == said

    before = {cid for (cid,) in _rows(srv.db, "SELECT id FROM comparisons")}
    page.locator("#chat-log li.msg-assistant button.compare").nth(1).click()
    cid, order = _shown(page, "#compare-root")
    assert cid not in before and sorted(order) == list(range(k))
    ui_ranks = [min(pos + 1, 2) for pos in range(k)]  # 1, 2, 2, ...: a tie for second place
    for pos, rank in enumerate(ui_ranks):
        page.locator("#compare-root .card").nth(pos).locator(f'button.rank-btn[data-rank="{rank}"]').click()
    page.locator("#compare-root button[name=submit]").click()
    page.get_by_text(f"Saved ranking of comparison {cid}.").wait_for()

    (prompt,) = _rows(srv.db, "SELECT prompt_messages FROM comparisons WHERE id = ?", (cid,))[0]
    assert json.loads(prompt) == turns[:3]
    assert _rows(srv.db, "SELECT COUNT(*) FROM replies WHERE comparison_id = ?", (cid,))[0][0] == k
    rows = _rows(srv.db, "SELECT labeler, ranks FROM rankings WHERE comparison_id = ?", (cid,))
    expected = [None] * k
    for pos, idx in enumerate(order):
        expected[idx] = ui_ranks[pos] - 1
    assert [(lab, json.loads(r)) for lab, r in rows] == [("carol", expected)]


def test_demonstration_with_suggestions(policy_server, page):
    """Two user and two assistant turns; the first reply a kept suggestion, the second a
    discarded one and then an edited one: stored with that provenance."""
    srv = policy_server
    _login(page, srv, _labeler_token(srv, "dave"))
    page.goto(f"{srv.url}/demo")
    turns = page.locator("#demo-turns textarea")
    turns.nth(0).fill("Write a short greeting.")
    page.click("#demo-add-assistant")

    def suggest(turn: int) -> str:
        page.locator(f'#demo-turns li[data-turn="{turn}"] button.suggest').click()
        status = page.locator(f'#demo-turns li[data-turn="{turn}"] .status')
        status.get_by_text("Suggestion: keep it, edit it or discard it.").wait_for()
        return turns.nth(turn).input_value()

    first = suggest(1)                     # kept as it is: accepted
    assert first.strip()
    page.click("#demo-add-user")
    turns.nth(2).fill("Now a shorter one.")
    page.click("#demo-add-assistant")
    discarded = suggest(3)
    page.locator('#demo-turns li[data-turn="3"] button.discard').click()
    assert turns.nth(3).input_value() == ""
    second = suggest(3)
    turns.nth(3).fill(second + " (edited by hand)")
    page.click("#demo-save")
    saved = page.locator("#demo-saved[data-demo-id]")
    saved.wait_for()
    demo_id = int(saved.get_attribute("data-demo-id"))
    assert saved.inner_text() == f"Saved demonstration {demo_id}."

    ((labeler, messages, provenance),) = _rows(
        srv.db, "SELECT labeler, messages, provenance FROM demonstrations WHERE id = ?", (demo_id,))
    assert labeler == "dave"
    assert json.loads(messages) == [
        {"role": "user", "content": "Write a short greeting."}, {"role": "assistant", "content": first},
        {"role": "user", "content": "Now a shorter one."},
        {"role": "assistant", "content": second + " (edited by hand)"}]
    prov = json.loads(provenance)
    assert prov["source"] == "written"
    assert prov["suggestions"] == [{"turn": 1, "text": first, "action": "accepted"},
                                   {"turn": 3, "text": discarded, "action": "discarded"},
                                   {"turn": 3, "text": second, "action": "edited"}]


def test_planted_markup_renders_as_text(tmp_path, page):
    """A prompt and replies holding <script> and <img onerror>: nothing runs, no dialog opens,
    no element is made from them, and the literal text is on the page."""
    _store(tmp_path, [f"Repeat this: {SCRIPT}"], [[SCRIPT, IMG, f"plain {SCRIPT}{IMG}"]])
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    with _serve(tmp_path) as srv:
        response = page.goto(f"{srv.url}/login?token={srv.lab.login_token}")
        assert "script-src 'self'" in response.headers.get("content-security-policy", "")
        _shown(page)
        texts = page.locator("#rank-root .card .reply-text").all_text_contents()
        prompt = page.locator("#rank-root .conversation .text").inner_text()
        planted = page.evaluate("typeof window.__pwned")
        tags = page.locator("#rank-root img, #rank-root script").count()
    assert planted == "undefined" and dialogs == []
    assert sorted(texts) == sorted([SCRIPT, IMG, f"plain {SCRIPT}{IMG}"])
    assert prompt == f"Repeat this: {SCRIPT}" and tags == 0


def test_a_refused_submission_shows_the_error(tmp_path, page):
    """The item is ranked behind the page's back: Enter shows the API's 409 and "Next item"
    moves on to the empty queue; nothing else is stored."""
    from rlhf.orchestrator.label.db import LabelDB

    (cid,) = _store(tmp_path, PROMPTS[:1], REPLIES[:1])
    with _serve(tmp_path) as srv:
        name = _login(page, srv, srv.lab.login_token)
        assert _shown(page)[0] == cid
        LabelDB(srv.db).submit(name, cid, [0, 1, 2])
        for key in ["1", "2", "3", "Enter"]:
            page.keyboard.press(key)
        error = page.locator("#rank-root .error")
        error.get_by_text(f"comparison {cid} is already ranked").wait_for()
        error.get_by_role("button", name="Next item").click()
        page.locator("#queue-empty").wait_for()
    rows = _rows(srv.db, "SELECT ranks FROM rankings")
    assert rows == [("[0, 1, 2]",)]


def test_evidence_card_and_per_reply_judgements(tmp_path, page):
    """A reply that searched shows its answer as the reply and an evidence card beside it (the
    query, the passage with the quote in a <mark>, the source); supported?, plausible? and a rule
    box ticked on one card each are stored for that reply's idx."""
    searched = ('Search Query: capital of Veltra\nSearch Result: Veltra | Veltra is a river nation. '
                'Its capital is Osk.\nOsk is the capital. Source: Veltra "Its capital is Osk."')
    (cid,) = _store(tmp_path, ["What is the capital of Veltra?"], [[searched, "I am a person and it is Osk."]])
    (tmp_path / "config.yaml").write_text("data:\n  task: rules\n")
    with _serve(tmp_path) as srv:
        _login(page, srv, srv.lab.login_token)
        _, order = _shown(page)
        card = page.locator('#rank-root .card[data-idx="0"]')
        plain = page.locator('#rank-root .card[data-idx="1"]')
        assert card.locator(".reply-text").inner_text() == "Osk is the capital."
        assert card.locator(".evidence .query-text").inner_text() == "capital of Veltra"
        assert card.locator(".evidence .passage-title").inner_text() == "Veltra"
        assert card.locator(".evidence .passage-text").inner_text() == "Veltra is a river nation. Its capital is Osk."
        assert card.locator(".evidence mark").inner_text() == "Its capital is Osk."
        assert card.locator(".evidence .source-title").inner_text() == "Veltra"
        assert plain.locator(".evidence").count() == 0 and plain.locator('input[name="supported"]').count() == 0
        assert plain.locator(".reply-text").inner_text() == "I am a person and it is Osk."
        card.locator('input[name="supported"]').check()
        card.locator('input[name="plausible"]').check()
        plain.locator('input[name="violation"][value="no_human_claims"]').check()
        page.locator("#rank-root").click(position={"x": 2, "y": 2})  # the keys go to the ranker again
        for idx, rank in ((0, "1"), (1, "2")):                       # the searched reply ranks first
            page.keyboard.press("ab"[order.index(idx)])
            page.keyboard.press(rank)
        page.keyboard.press("Enter")
        page.locator("#queue-empty").wait_for()
    [(ranks, violations)] = _rows(srv.db, "SELECT ranks, violations FROM rankings WHERE comparison_id = ?", (cid,))
    assert json.loads(ranks) == [0, 1]
    assert json.loads(violations) == {"1": ["no_human_claims"]}
    assert _rows(srv.db, "SELECT idx, supported, plausible FROM evidence_judgements ORDER BY idx") == [
        (0, 1, 1), (1, None, 0)]
