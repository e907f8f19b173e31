"""The labeling web app behind `rlhf label serve RUN_DIR` (FastAPI; pages in templates/, the
script and styles in static/, shipped in the package: no CDN, no build step).

Who may do what:
- `create_app` makes a one-time login token (printed in the serve line, as Jupyter does);
  `GET /login?token=...` with it, or with a labeler's token (`rlhf label add-labeler`), sets
  a session cookie (HttpOnly, SameSite=Strict) and goes to the ranking page. The one-time
  token signs in as "owner" and works once.
- The JSON API takes `Authorization: Bearer TOKEN` (a labeler's token) or the session cookie;
  a POST with the cookie also needs the session's CSRF token in `X-CSRF-Token` (the pages read
  it from their <meta name="csrf-token">).
- Errors are JSON `{"error": "..."}`: 400 bad body, 401 no or unknown token, 403 revoked
  token or missing CSRF token, 404 unknown item or no policy, 409 a lease someone else holds,
  an item already ranked, 413 a body over label.max_body_kb.
- Every response carries a strict Content-Security-Policy (scripts and styles from this
  origin only, no inline code), so a model reply holding markup cannot run; the page also
  renders replies as text only.

The API is the one contract the page and scripts share (tests/integration/test_label_api.py):
GET /api/queue?limit=N, GET /api/comparisons/{id} (each reply: idx, text, evidence), POST
/api/comparisons/{id}/ranking (ranks, violations per reply idx, evidence judgements per reply idx, ...),
GET /api/stats, GET /api/config, POST /api/chat, POST /api/alternatives, POST /api/demonstrations.
"""
from __future__ import annotations

import json
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from rlhf.orchestrator.errors import BadInput
from rlhf.orchestrator.label.db import LabelDB, Refused, check_messages

HERE = Path(__file__).resolve().parent
SESSION_COOKIE = "rlhf_label_session"
OWNER = "owner"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY", "Cache-Control": "no-store"}
PAGES = ("rank", "chat", "demo", "stats")
MAX_QUEUE = 100


@dataclass
class Session:
    labeler: str
    csrf: str


class Policy:
    """The model labelers chat with (--policy): transformers on this process's CPU (or GPU),
    one generation at a time."""

    def __init__(self, path: str, max_new_tokens: int, temperature: float) -> None:
        from rlhf.orchestrator.models.chat import generation_stop_ids, load_chat_model

        self.path = str(path)
        self.model, self.tokenizer = load_chat_model(path)
        self.model.eval()
        self.stop_ids = generation_stop_ids(self.model, self.tokenizer)
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self._lock = threading.Lock()

    def replies(self, messages: list[dict], n: int) -> list[tuple[str, list[int]]]:
        import torch

        from rlhf.orchestrator.models.chat import fit_context, generate_replies

        with self._lock, torch.no_grad():
            ids, _ = fit_context(self.model, self.tokenizer, messages, self.max_new_tokens)
            return generate_replies(self.model, self.tokenizer, ids, n, self.max_new_tokens, self.temperature,
                                    self.stop_ids)


@dataclass
class LabelApp:
    app: object                      # the FastAPI (ASGI) app
    db: LabelDB
    login_token: str                 # one-time: signs in as "owner" once
    policy: Policy | None = None
    k: int = 4
    sessions: dict[str, Session] = field(default_factory=dict)


def create_app(run_dir: str | Path, policy: str | Policy | None = None, config=None) -> LabelApp:
    """The app over RUN_DIR/comparisons.sqlite. `config`: an ExperimentConfig (default: the run
    folder's config.yaml, else the defaults); `policy`: a model folder or a loaded Policy."""
    run = Path(run_dir)
    cfg = config if config is not None else run_config(run)
    lab_cfg = cfg.label
    rules = lab_cfg.rules or task_rules(cfg)
    db = LabelDB(run / "comparisons.sqlite", lease_s=lab_cfg.lease_s, overlap=lab_cfg.overlap,
                 order=lab_cfg.order, seed=lab_cfg.seed, rules=rules)
    if isinstance(policy, (str, Path)):
        policy = Policy(str(policy), cfg.rollout.max_new_tokens, cfg.rollout.temperature)
    state = LabelApp(app=None, db=db, login_token=secrets.token_urlsafe(24), policy=policy, k=lab_cfg.k)
    limit = lab_cfg.max_body_kb * 1024
    templates = Jinja2Templates(directory=str(HERE / "templates"))  # autoescapes .html
    app = FastAPI(title="rlhf label", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    state.app = app

    @app.middleware("http")
    async def guard(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > limit):
            response = _error(413, f"request body over {lab_cfg.max_body_kb} KiB (label.max_body_kb)")
        else:
            response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.exception_handler(Refused)
    async def refused(request, err: Refused):
        return _error(err.status, str(err))

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):
        return _error(err.status_code, str(err.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "body", "path"))
        return _error(400, f"{where or 'request'}: {first.get('msg', 'invalid')}")

    def who(request: Request, post: bool = False) -> str:
        """The labeler making this request (Bearer token or session cookie + CSRF on POST)."""
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return db.authenticate(auth[7:].strip())
        session = state.sessions.get(request.cookies.get(SESSION_COOKIE, ""))
        if session is None:
            raise Refused(401, "sign in: Authorization: Bearer TOKEN, or the login URL's session cookie")
        if session.labeler != OWNER and db.is_revoked(session.labeler):
            raise Refused(403, f"the token of labeler {session.labeler!r} was revoked")
        if post and not secrets.compare_digest(request.headers.get("x-csrf-token", ""), session.csrf):
            raise Refused(403, "missing or wrong X-CSRF-Token (the page's <meta name=\"csrf-token\">)")
        return session.labeler

    async def body(request: Request) -> dict:
        raw = await request.body()
        if len(raw) > limit:
            raise Refused(413, f"request body over {lab_cfg.max_body_kb} KiB (label.max_body_kb)")
        try:
            data = json.loads(raw or b"{}")
        except (ValueError, UnicodeDecodeError) as err:
            raise Refused(400, f"body: not JSON ({err})") from None
        if not isinstance(data, dict):
            raise Refused(400, "body: must be a JSON object")
        return data

    def need_policy() -> Policy:
        if state.policy is None:
            raise Refused(404, "this server has no policy to sample from (start it with --policy CHECKPOINT)")
        return state.policy

    # ------------------------------------------------------------------ pages

    @app.get("/login")
    async def login(request: Request, token: str | None = None):
        if token is None:
            return templates.TemplateResponse(request, "login.html", {"error": None})
        if state.login_token and secrets.compare_digest(token, state.login_token):
            state.login_token = ""  # one time
            name = OWNER
        else:
            try:
                name = await run_in_threadpool(db.authenticate, token)
            except Refused as err:
                return templates.TemplateResponse(request, "login.html", {"error": str(err)},
                                                  status_code=err.status)
        sid = secrets.token_urlsafe(32)
        state.sessions[sid] = Session(labeler=name, csrf=secrets.token_urlsafe(32))
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(SESSION_COOKIE, sid, httponly=True, samesite="strict", path="/")
        return response

    def page(name: str):
        async def show(request: Request):
            try:
                labeler = who(request)
            except Refused:
                return RedirectResponse("/login", status_code=303)
            session = state.sessions[request.cookies[SESSION_COOKIE]] if SESSION_COOKIE in request.cookies \
                else Session(labeler, "")
            return templates.TemplateResponse(request, f"{name}.html", {
                "page": name, "labeler": labeler, "csrf_token": session.csrf, "policy": state.policy is not None,
                "rules": [{"name": n, "text": t} for n, t in rules.items()], "k": state.k, "order": db.order})
        return show

    for name in PAGES:
        app.add_api_route("/" if name == "rank" else f"/{name}", page(name), methods=["GET"], include_in_schema=False)

    # ------------------------------------------------------------------ API

    @app.get("/api/config")
    async def config_(request: Request):
        return {"labeler": who(request), "rules": [{"name": n, "text": t} for n, t in rules.items()],
                "policy": state.policy is not None, "k": state.k, "order": db.order}

    @app.get("/api/queue")
    async def queue(request: Request, limit: int = 10):
        labeler = who(request)
        if not 1 <= limit <= MAX_QUEUE:
            raise Refused(400, f"limit: must be 1..{MAX_QUEUE}, got {limit}")
        return await run_in_threadpool(db.take, labeler, limit)

    @app.get("/api/comparisons/{cid}")
    async def one(request: Request, cid: int):
        return await run_in_threadpool(db.take_one, who(request), cid)

    @app.post("/api/comparisons/{cid}/ranking")
    async def rank(request: Request, cid: int):
        labeler, data = who(request, post=True), await body(request)
        _check_fields(data, {"ranks": list, "better_reply": str, "violations": (dict, list), "note": str,
                             "unacceptable": bool, "evidence": dict}, required=("ranks",))
        ranking = await run_in_threadpool(db.submit, labeler, cid, data["ranks"], data.get("better_reply"),
                                          data.get("violations"), data.get("note"), bool(data.get("unacceptable")),
                                          data.get("evidence"))
        return {"ok": True, "ranking_id": ranking}

    @app.get("/api/stats")
    async def stats(request: Request):
        who(request)
        return await run_in_threadpool(db.stats)

    @app.post("/api/chat")
    async def chat(request: Request):
        who(request, post=True)
        data = await body(request)
        check_messages(data.get("messages"), "messages", last="user")
        [(reply, _)] = await run_in_threadpool(need_policy().replies, data["messages"], 1)
        return {"reply": reply}

    @app.post("/api/alternatives")
    async def alternatives(request: Request):
        labeler, data = who(request, post=True), await body(request)
        check_messages(data.get("messages"), "messages", last="user")
        k = data.get("k", state.k)
        if not isinstance(k, int) or isinstance(k, bool) or not 2 <= k <= 9:
            raise Refused(400, f"k: must be an int in 2..9, got {k!r}")
        policy = need_policy()
        samples = await run_in_threadpool(policy.replies, data["messages"], k)
        cid = await run_in_threadpool(db.add_comparison, data["messages"], [t for t, _ in samples],
                                      [ids for _, ids in samples], policy.path)
        await run_in_threadpool(db.take_one, labeler, cid)  # the asker ranks it first
        return {"comparison_id": cid}

    @app.post("/api/demonstrations")
    async def demonstration(request: Request):
        labeler, data = who(request, post=True), await body(request)
        demo = await run_in_threadpool(db.add_demonstration, labeler, data.get("messages"),
                                       data.get("suggestions", []))
        return {"id": demo}

    @app.api_route("/api/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def unknown(rest: str):
        raise Refused(404, f"no such API route: /api/{rest}")

    return state


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _check_fields(data: dict, types: dict[str, type], required: tuple[str, ...]) -> None:
    for key in required:
        if key not in data:
            raise Refused(400, f"{key}: missing")
    for key, value in data.items():
        if key not in types:
            raise Refused(400, f"{key}: unknown field (known: {', '.join(types)})")
        if value is not None and not isinstance(value, types[key]):
            want = " or ".join(t.__name__ for t in types[key]) if isinstance(types[key], tuple) else types[key].__name__
            raise Refused(400, f"{key}: must be {want}, got {type(value).__name__}")


def run_config(run: Path):
    """The run folder's config.yaml (as the pipeline wrote it), else the defaults."""
    from rlhf.orchestrator.config import ExperimentConfig, load_config

    path = run / "config.yaml"
    return load_config(str(path), []) if path.is_file() else ExperimentConfig()


def task_rules(cfg) -> dict[str, str]:
    """The rules labelers can tick when label.rules is empty: the task's `rules` (name -> text)."""
    from rlhf.orchestrator.tasks import load_task

    try:
        task = load_task(cfg.data.task)
    except BadInput:
        return {}
    return dict(getattr(task, "rules", None) or {})
