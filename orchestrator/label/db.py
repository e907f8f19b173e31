"""What people do in `rlhf label serve`, stored in the run's comparison store.

The tables live in the same SQLite file as the comparisons (schema: recipe/comparisons.py):
`labelers` (name, sha256 of the token), `rankings` (one row per labeler and comparison:
ranks per reply idx, display order, seconds, violations, note), `evidence_judgements` (per
ranking and reply: supported?, plausible?), `leases` (who holds a handed-out comparison until
when) and `demonstrations` (conversations people wrote, with where their assistant turns
came from).

Rule violations are ticked per reply and stored as JSON {"<reply idx>": [rule names]}, which
is what the rule reward model learns from (a reply idx absent: no rule broken). The older form,
one list for the whole comparison, is still accepted and stored as a list (it does not say
which reply broke the rule). Each reply handed out carries `evidence`: its search, passages,
answer and citation as orchestrator/evidence/format.py parses them (None when it did not
search), so the page shows the evidence as a card beside the answer.

The queue, for labeler L:
- a comparison is pending for L when L has not ranked it and either nobody has ranked it
  (its replies.rank are NULL: a machine labeler's ranks count as done) or one other person
  has and it is drawn for overlap (a fixed `overlap` share, by a hash of seed and id);
- one labeler holds it at a time: handing it out writes a lease that expires after
  `lease_s`; an expired lease frees it again;
- order: `uncertainty` (smallest reward-model score margin first, from `margins`; items
  without one after, oldest first), `random` (a fixed shuffle per labeler) or `fifo`.

Every write is one `BEGIN IMMEDIATE` transaction on its own connection, so two labelers
submitting at once are serialised by SQLite (WAL mode) and lose nothing; a second
submission for the same (comparison, labeler) is refused by the UNIQUE key as well.
Refusals are `Refused(status, message)`: the web app turns them into JSON errors.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import secrets
import sqlite3
import statistics
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.evidence.format import parse
from rlhf.orchestrator.label.agreement import kendall_tau_b, pairwise_agreement
from rlhf.orchestrator.recipe.comparisons import ComparisonStore

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ROLES = ("system", "user", "assistant")
ACTIONS = ("accepted", "edited", "discarded")


class Refused(Exception):
    """A request the store turns down: HTTP `status` and a one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class LabelDB:
    """The labeling side of `RUN_DIR/comparisons.sqlite`; safe to share between threads."""

    def __init__(self, path: str | Path, lease_s: float = 600.0, overlap: float = 0.1, order: str = "fifo",
                 seed: int = 0, rules: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        ComparisonStore(self.path).close()  # creates or upgrades the schema
        self.lease_s, self.overlap, self.order, self.seed = float(lease_s), float(overlap), order, seed
        self.rules = dict(rules or {})
        self.margins: dict[int, float] = {}  # comparison id -> RM score margin (order uncertainty)

    @contextmanager
    def _tx(self, write: bool = False):
        """One connection per call; a write is a BEGIN IMMEDIATE transaction (committed or rolled back)."""
        db = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None)
        try:
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    # ------------------------------------------------------------------ labelers

    def add_labeler(self, name: str) -> str:
        """Adds a labeler; returns the token (only its hash is stored)."""
        if not NAME.fullmatch(name or ""):
            raise BadInput(f"labeler name {name!r}: use 1-64 letters, digits, '_', '.' or '-'")
        token = secrets.token_urlsafe(24)
        with self._tx(write=True) as db:
            if db.execute("SELECT 1 FROM labelers WHERE name = ?", (name,)).fetchone():
                raise BadInput(f"labeler {name!r} exists already in {self.path} (revoke it or pick another name)")
            db.execute("INSERT INTO labelers (name, token_hash, created) VALUES (?, ?, ?)",
                       (name, hash_token(token), _now_iso()))
        return token

    def labelers(self) -> list[dict]:
        with self._tx() as db:
            rows = db.execute("SELECT name, created, revoked FROM labelers ORDER BY created, name").fetchall()
        return [{"name": n, "created": c, "revoked": r} for n, c, r in rows]

    def has_labelers(self) -> bool:
        return any(lab["revoked"] is None for lab in self.labelers())

    def revoke(self, name: str) -> None:
        with self._tx(write=True) as db:
            cur = db.execute("UPDATE labelers SET revoked = ? WHERE name = ? AND revoked IS NULL", (_now_iso(), name))
            if cur.rowcount == 0:
                raise BadInput(f"no active labeler {name!r} in {self.path} (see rlhf label list)")

    def authenticate(self, token: str) -> str:
        """The labeler a token belongs to; 401 for an unknown token, 403 for a revoked one."""
        with self._tx() as db:
            row = db.execute("SELECT name, revoked FROM labelers WHERE token_hash = ?", (hash_token(token),)).fetchone()
        if row is None:
            raise Refused(401, "unknown token")
        if row[1] is not None:
            raise Refused(403, f"the token of labeler {row[0]!r} was revoked")
        return row[0]

    def is_revoked(self, name: str) -> bool:
        with self._tx() as db:
            row = db.execute("SELECT revoked FROM labelers WHERE name = ?", (name,)).fetchone()
        return row is not None and row[0] is not None

    # ------------------------------------------------------------------ queue

    def drawn_for_overlap(self, comparison_id: int) -> bool:
        """Whether a comparison goes to a second labeler: a fixed `overlap` share of ids."""
        digest = hashlib.sha1(f"{self.seed}:{comparison_id}".encode()).digest()
        return int.from_bytes(digest[:4], "big") / 2 ** 32 < self.overlap

    def _pending(self, db, labeler: str, now: float) -> list[int]:
        """Ids pending for `labeler` (see the module docstring), not leased to someone else, in queue order."""
        rows = db.execute("""
            SELECT c.id,
                   (SELECT COUNT(*) FROM rankings k WHERE k.comparison_id = c.id),
                   EXISTS (SELECT 1 FROM rankings k WHERE k.comparison_id = c.id AND k.labeler = ?),
                   EXISTS (SELECT 1 FROM replies r WHERE r.comparison_id = c.id AND r.rank IS NULL),
                   EXISTS (SELECT 1 FROM leases l WHERE l.comparison_id = c.id AND l.labeler != ? AND l.expires > ?)
            FROM comparisons c ORDER BY c.id""", (labeler, labeler, now)).fetchall()
        ids = [cid for cid, n, mine, unranked, held in rows
               if not mine and not held and ((n == 0 and unranked) or (n == 1 and self.drawn_for_overlap(cid)))]
        if self.order == "random":
            random.Random(f"{self.seed}:{labeler}").shuffle(ids)
        elif self.order == "uncertainty":
            ids.sort(key=lambda cid: (cid not in self.margins, self.margins.get(cid, 0.0), cid))
        return ids

    def _item(self, db, cid: int, order: list[int]) -> dict:
        messages = json.loads(db.execute("SELECT prompt_messages FROM comparisons WHERE id = ?", (cid,)).fetchone()[0])
        texts = dict(db.execute("SELECT idx, text FROM replies WHERE comparison_id = ?", (cid,)).fetchall())
        return {"id": cid, "prompt_messages": messages,
                "replies": [{"idx": i, "text": texts[i], "evidence": evidence_view(texts[i])} for i in order]}

    def _lease(self, db, labeler: str, cid: int, now: float) -> list[int]:
        """Leases `cid` to `labeler` (keeping the display order of a lease they still hold)."""
        held = db.execute("SELECT display_order FROM leases WHERE comparison_id = ? AND labeler = ? AND expires > ?",
                          (cid, labeler, now)).fetchone()
        if held:
            order = json.loads(held[0])
            db.execute("UPDATE leases SET expires = ? WHERE comparison_id = ?", (now + self.lease_s, cid))
            return order
        k = db.execute("SELECT COUNT(*) FROM replies WHERE comparison_id = ?", (cid,)).fetchone()[0]
        order = list(range(k))
        random.SystemRandom().shuffle(order)  # blind: the sampling order says which policy wrote what
        db.execute("INSERT OR REPLACE INTO leases (comparison_id, labeler, display_order, issued, expires) "
                   "VALUES (?, ?, ?, ?, ?)", (cid, labeler, json.dumps(order), now, now + self.lease_s))
        return order

    def take(self, labeler: str, limit: int) -> list[dict]:
        """Up to `limit` items for `labeler`, leased to them: the ones they hold first, then the queue."""
        now = time.time()
        with self._tx(write=True) as db:
            mine = {cid for (cid,) in db.execute("SELECT comparison_id FROM leases WHERE labeler = ? AND expires > ?",
                                                 (labeler, now))}
            ids = sorted(self._pending(db, labeler, now), key=lambda cid: cid not in mine)[:limit]  # stable
            return [self._item(db, cid, self._lease(db, labeler, cid, now)) for cid in ids]

    def take_one(self, labeler: str, cid: int) -> dict:
        """One comparison by id, leased to `labeler` (404 unknown, 409 done or held by someone else)."""
        now = time.time()
        with self._tx(write=True) as db:
            self._check_open(db, labeler, cid, now)
            return self._item(db, cid, self._lease(db, labeler, cid, now))

    def _check_open(self, db, labeler: str, cid: int, now: float) -> int:
        """Raises unless `labeler` may rank `cid` now; returns its number of replies."""
        k = db.execute("SELECT COUNT(*) FROM replies WHERE comparison_id = ?", (cid,)).fetchone()[0]
        if k == 0:
            raise Refused(404, f"no comparison {cid}")
        if db.execute("SELECT 1 FROM rankings WHERE comparison_id = ? AND labeler = ?", (cid, labeler)).fetchone():
            raise Refused(409, f"comparison {cid} is already ranked by {labeler}")
        other = db.execute("SELECT labeler FROM leases WHERE comparison_id = ? AND labeler != ? AND expires > ?",
                           (cid, labeler, now)).fetchone()
        if other:
            raise Refused(409, f"comparison {cid} is leased to another labeler now (your lease expired or was "
                               f"never taken); fetch the queue again")
        if cid not in self._pending(db, labeler, now):
            raise Refused(409, f"comparison {cid} is already ranked (nothing left to rank for {labeler})")
        return k

    # ------------------------------------------------------------------ submissions

    def submit(self, labeler: str, cid: int, ranks, better_reply: str | None = None, violations=None,
               note: str | None = None, unacceptable: bool = False, evidence=None) -> int:
        """Stores `labeler`'s ranking of `cid` (ranks[idx], 0 = best); returns the ranking's id.
        `violations`: {"<idx>": [rule names]} (or the older plain list); `evidence`:
        {"<idx>": {"supported": bool | None, "plausible": bool}}. The first ranking also fills
        replies.rank; a better reply becomes a demonstration."""
        now = time.time()
        with self._tx(write=True) as db:
            k = self._check_open(db, labeler, cid, now)
            violations = self._check_violations(violations, k)
            judgements = _check_judgements(evidence, k)
            if not isinstance(ranks, list) or len(ranks) != k:
                raise Refused(400, f"ranks: comparison {cid} has {k} replies, give {k} ranks (one per idx), "
                                   f"got {len(ranks) if isinstance(ranks, list) else type(ranks).__name__}")
            if any(not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < k for r in ranks):
                raise Refused(400, f"ranks: each must be an int in 0..{k - 1} (0 = best), got {ranks}")
            lease = db.execute("SELECT display_order, issued FROM leases WHERE comparison_id = ? AND labeler = ?",
                               (cid, labeler)).fetchone()
            order, seconds = (json.loads(lease[0]), now - lease[1]) if lease else (list(range(k)), None)
            try:
                cur = db.execute(
                    "INSERT INTO rankings (comparison_id, labeler, ranks, display_order, seconds, unacceptable, "
                    "violations, note, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (cid, labeler, json.dumps(ranks), json.dumps(order), seconds, int(bool(unacceptable)),
                     json.dumps(violations), note or None, _now_iso()))
            except sqlite3.IntegrityError:
                raise Refused(409, f"comparison {cid} is already ranked by {labeler}") from None
            db.executemany("INSERT INTO evidence_judgements (ranking_id, idx, supported, plausible) VALUES (?, ?, ?, ?)",
                           [(cur.lastrowid, i, s, p) for i, s, p in judgements])
            db.executemany("UPDATE replies SET rank = ? WHERE comparison_id = ? AND idx = ? AND rank IS NULL",
                           [(r, cid, i) for i, r in enumerate(ranks)])
            db.execute("DELETE FROM leases WHERE comparison_id = ?", (cid,))
            if better_reply and better_reply.strip():
                prompt = json.loads(db.execute("SELECT prompt_messages FROM comparisons WHERE id = ?",
                                               (cid,)).fetchone()[0])
                self._insert_demo(db, labeler, prompt + [{"role": "assistant", "content": better_reply.strip()}],
                                  {"source": "better_reply", "comparison_id": cid}, cid)
            return int(cur.lastrowid)

    def _check_violations(self, violations, k: int) -> list[str] | dict[str, list[str]]:
        """The `violations` of a submission, checked: a list of known rule names, or a dict
        from reply idx ("0".."k-1") to such lists (empty lists dropped, names sorted)."""
        if violations is None:  # not judged: stored as the old empty list, which says nothing per reply
            return []
        if isinstance(violations, list):
            self._check_rules(violations, "violations")
            return list(violations)
        if not isinstance(violations, dict):
            raise Refused(400, f"violations: must be {{\"<reply idx>\": [rule names]}} or a list, "
                               f"got {type(violations).__name__}")
        out = {}
        for key, names in violations.items():
            _reply_idx(key, k, "violations")
            if not isinstance(names, list):
                raise Refused(400, f"violations[{key}]: must be a list of rule names, got {type(names).__name__}")
            self._check_rules(names, f"violations[{key}]")
            if names:
                out[str(int(key))] = sorted(set(names))
        return dict(sorted(out.items(), key=lambda kv: int(kv[0])))

    def _check_rules(self, names: list, key: str) -> None:
        if any(not isinstance(n, str) for n in names):
            raise Refused(400, f"{key}: rule names must be strings")
        unknown = sorted(set(names) - set(self.rules))
        if unknown:
            raise Refused(400, f"{key}: unknown rules {unknown}; known: {sorted(self.rules)}")

    def evidence_judgements(self) -> list[dict]:
        """Every stored supported?/plausible? judgement, oldest ranking first."""
        with self._tx() as db:
            rows = db.execute("SELECT k.comparison_id, k.labeler, e.idx, e.supported, e.plausible "
                              "FROM evidence_judgements e JOIN rankings k ON k.id = e.ranking_id "
                              "ORDER BY k.id, e.idx").fetchall()
        return [{"comparison_id": c, "labeler": lab, "idx": i, "supported": None if s is None else bool(s),
                 "plausible": bool(p)} for c, lab, i, s, p in rows]

    def add_comparison(self, messages: list[dict], replies: list[str], reply_ids: list[list[int]],
                       policy: str) -> int:
        """A chat-and-compare comparison: stored unranked in the store's newest round (1 if empty)."""
        from rlhf.orchestrator.data.labelers import prompt_key

        check_messages(messages, "messages", last="user")
        with ComparisonStore(self.path) as store:
            rounds = store._db.execute("SELECT MAX(round) FROM comparisons").fetchone()[0]
            return store.add(max(int(rounds or 1), 1), prompt_key(messages), policy, messages, replies, reply_ids)

    def add_demonstration(self, labeler: str, messages, suggestions) -> int:
        """A conversation a person wrote (both sides), with the provenance of its assistant turns."""
        check_messages(messages, "messages", last="assistant")
        if not isinstance(suggestions, list):
            raise Refused(400, "suggestions: must be a list of {turn, text, action}")
        for i, s in enumerate(suggestions):
            turn = s.get("turn") if isinstance(s, dict) else None
            if not isinstance(turn, int) or isinstance(turn, bool) or not 0 <= turn < len(messages) \
                    or messages[turn]["role"] != "assistant":
                raise Refused(400, f"suggestions[{i}].turn: must index an assistant message, got {turn!r}")
            if not isinstance(s.get("text"), str) or s.get("action") not in ACTIONS:
                raise Refused(400, f"suggestions[{i}]: needs text (str) and action ({' | '.join(ACTIONS)})")
        provenance = {"source": "written",
                      "suggestions": [{"turn": s["turn"], "text": s["text"], "action": s["action"]} for s in suggestions]}
        with self._tx(write=True) as db:
            return self._insert_demo(db, labeler, messages, provenance, None)

    @staticmethod
    def _insert_demo(db, labeler: str, messages: list[dict], provenance: dict, cid: int | None) -> int:
        cur = db.execute("INSERT INTO demonstrations (labeler, messages, provenance, comparison_id, created) "
                         "VALUES (?, ?, ?, ?, ?)", (labeler, json.dumps(messages), json.dumps(provenance), cid,
                                                    _now_iso()))
        return int(cur.lastrowid)

    # ------------------------------------------------------------------ reading

    def demonstrations(self) -> list[dict]:
        with self._tx() as db:
            rows = db.execute("SELECT id, labeler, messages, provenance, comparison_id, created FROM demonstrations "
                              "ORDER BY id").fetchall()
        return [{"id": i, "labeler": lab, "messages": json.loads(m), "provenance": json.loads(p),
                 "comparison_id": c, "created": t} for i, lab, m, p, c, t in rows]

    def stats(self) -> dict:
        """Per labeler: count, median seconds, agreement and Kendall tau-b with the others on the
        items both ranked (means over those items); plus the store's totals."""
        with self._tx() as db:
            rows = db.execute("SELECT comparison_id, labeler, ranks, seconds FROM rankings").fetchall()
            names = [n for (n,) in db.execute("SELECT name FROM labelers WHERE revoked IS NULL")]
            total = db.execute("SELECT COUNT(*) FROM comparisons").fetchone()[0]
            pending = db.execute("SELECT COUNT(DISTINCT comparison_id) FROM replies WHERE rank IS NULL").fetchone()[0]
            demos = db.execute("SELECT COUNT(*) FROM demonstrations").fetchone()[0]
        by_item: dict[int, dict[str, list[int]]] = {}
        seconds: dict[str, list[float]] = {}
        for cid, who, ranks, secs in rows:
            by_item.setdefault(cid, {})[who] = json.loads(ranks)
            seconds.setdefault(who, [])
            if secs is not None:
                seconds[who].append(float(secs))
        pairs: dict[str, list[tuple[float, float | None]]] = {}
        for ranked in by_item.values():
            for a in ranked:
                for b in ranked:
                    if a != b:
                        pairs.setdefault(a, []).append((pairwise_agreement(ranked[a], ranked[b]),
                                                        kendall_tau_b(ranked[a], ranked[b])))
        people = []
        for who in sorted(set(seconds) | set(names)):
            mine = pairs.get(who, [])
            taus = [t for _, t in mine if t is not None]
            people.append({"name": who, "count": sum(who in r for r in by_item.values()),
                           "median_seconds": statistics.median(seconds[who]) if seconds.get(who) else None,
                           "agreement": statistics.fmean(a for a, _ in mine) if mine else None,
                           "kendall_tau": statistics.fmean(taus) if taus else None,
                           "overlap_items": sum(who in r and len(r) > 1 for r in by_item.values())})
        return {"labelers": people, "totals": {"comparisons": total, "ranked": total - pending, "pending": pending,
                                               "rankings": len(rows), "demonstrations": demos,
                                               "labelers": len(names)}}


def evidence_view(text: str) -> dict | None:
    """What the page shows of a reply that searched (None when it did not): its queries, the
    passages the search inserted, the answer and citation, and whether the quote is verbatim in
    a passage of the cited title (whitespace-normalised), so the card can highlight it."""
    t = parse(text)
    if not t.searched:
        return None
    passages = [{"title": p.title, "text": p.text} for p in t.retrieved]
    found = bool(t.quote) and any(p["title"] == t.cited_title and t.quote in p["text"] for p in passages)
    return {"queries": t.queries, "passages": passages, "answer": t.answer, "cited_title": t.cited_title,
            "quote": t.quote, "quote_found": found}


def _reply_idx(key, k: int, field: str) -> int:
    if not isinstance(key, str) or not key.isdigit() or not 0 <= int(key) < k:
        raise Refused(400, f"{field}: keys must be reply idx \"0\"..\"{k - 1}\", got {key!r}")
    return int(key)


def _check_judgements(evidence, k: int) -> list[tuple[int, int | None, int]]:
    """{"<idx>": {"supported": bool | None, "plausible": bool}} -> rows (idx, supported, plausible)."""
    if evidence is None:
        return []
    if not isinstance(evidence, dict):
        raise Refused(400, f"evidence: must be {{\"<reply idx>\": {{supported, plausible}}}}, got "
                           f"{type(evidence).__name__}")
    rows = []
    for key, judged in evidence.items():
        idx = _reply_idx(key, k, "evidence")
        if not isinstance(judged, dict) or set(judged) - {"supported", "plausible"} \
                or not isinstance(judged.get("plausible"), bool) \
                or not isinstance(judged.get("supported"), (bool, type(None))):
            raise Refused(400, f"evidence[{key}]: must be {{\"supported\": true|false|null, \"plausible\": true|false}}")
        supported = judged.get("supported")
        rows.append((idx, None if supported is None else int(supported), int(judged["plausible"])))
    return sorted(rows)


def check_messages(messages, key: str, last: str) -> None:
    """A conversation from a request: a list of {role, content} strings ending with a `last` turn."""
    if not isinstance(messages, list) or not messages:
        raise Refused(400, f"{key}: must be a non-empty list of {{role, content}}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise Refused(400, f"{key}[{i}]: needs role ({' | '.join(ROLES)}) and content (a string)")
    if messages[-1]["role"] != last:
        raise Refused(400, f"{key}: must end with a {last} turn, ends with {messages[-1]['role']}")
