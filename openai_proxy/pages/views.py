"""Operator-facing pages. `/` says the proxy runs and shows no secrets; the others need ACCESS_TOKEN.

`/health`, `/health2`, `/log`, `/log_errors`, `/debug/runtime`, `/metrics`: a Bearer header,
`?access_token=` or the sign-in cookie, and throttled by `openai_proxy.pages.ratelimit` (checked first, so guessing
tokens is throttled too, on `/signin` as well).

Browsers sign in once: `?access_token=` on an HTML page, or the form of `/signin`, sets an HttpOnly
cookie (an HMAC keyed by ACCESS_TOKEN, never the token) and redirects (303) to the page without the
token, so no link, form or history entry of the pages carries it. A browser without a valid cookie
gets the sign-in form (401; 403 after a wrong token); scripts keep getting the JSON 403.

The cookie is `SameSite=Lax`: a link to `/log` from a chat or a dashboard opens the page signed in
(with `Strict` the browser would leave the cookie out of such a top-level navigation). Lax still
keeps it out of cross-site POSTs, subrequests and frames, the pages change nothing on GET, and the
one POST that changes state, `/signout`, also refuses another origin. Signing out records its time
with the log store, which every host shares: cookies issued before it stop working everywhere.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from flask import Blueprint, Response, current_app, g, redirect, render_template, request, url_for
from markupsafe import Markup

from openai_proxy import jsonio
from openai_proxy.errors import BadRequest, Forbidden
from openai_proxy.inbound.auth import (
    QUERY,
    SESSION_COOKIE,
    SESSION_MAX_AGE,
    SessionUnchecked,
    SignedOut,
    constant_time_equal,
    presented_access_token,
    require_access_token,
    session_cookie_value,
)
from openai_proxy.jsonio import iso
from openai_proxy.log.db import NEWEST, Cursor, LogFilter, LogPage, Position, empty_counters
from openai_proxy.log.store import SIGNOUT_READ_DEADLINE_S
from openai_proxy.pages import spend as spend_view
from openai_proxy.pages.health import deep_check, last_reload, liveness, runtime_info, upstream_keys
from openai_proxy.state import state
from openai_proxy.version import __version__

logger = logging.getLogger("openai_proxy.pages")

# Its templates live under `templates/openai_proxy/`, so a host app's own `log.html` cannot shadow ours.
bp = Blueprint("pages", __name__, template_folder="templates")

# Views are named without their blueprints (`view()`): the proxy may be mounted in a host app, where
# its blueprints nest under its own, so full endpoint names differ between deployments.
GUARDED = {"health", "health2", "log", "log_errors", "debug_runtime", "metrics"}
HEALTH2 = "health2"
# Pages a person reads in a browser: they sign in with a cookie instead of a token in every link.
HTML_PAGES = ("log", "log_errors")
# What app.ratelimit throttles: the guarded pages and the sign-in form (guessing the token there too).
THROTTLED = GUARDED | {"signin"}
# The guarded pages answer any method, as the original did.
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
PER_PAGE, MAX_PER_PAGE = 50, 500
TABS = (("Requests", "log"), ("Errors", "log_errors"))
# The page loads nothing and runs no script: even a value that slipped past escaping could not act.
HTML_CSP = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"


def view() -> str:
    """The current view's own name, whatever blueprints it is nested in."""
    return (request.endpoint or "").rpartition(".")[2]


# /health answers within a second: its cookie check gets this much, its probe of the log the rest.
HEALTH_SIGNOUT_READ_S = 0.3


def _authenticate() -> str:
    """Which credential admits this request (see `require_access_token`), or Forbidden."""
    st = state()
    deadline = HEALTH_SIGNOUT_READ_S if view() == "health" else SIGNOUT_READ_DEADLINE_S
    return require_access_token(
        st.config.access_token,
        request.headers,
        request.args,
        request.cookies,
        lambda: st.log_store.signed_out_at(deadline),
    )


@bp.before_request
def guard() -> Response | None:
    endpoint = view()
    if endpoint not in GUARDED:
        return None
    expected = state().config.access_token
    if endpoint not in HTML_PAGES:
        _authenticate()
        return None
    here = page_url(request.script_root + request.path, request.args.items(multi=True))
    try:
        source = _authenticate()
    except Forbidden as exc:
        if not expected or not wants_html():
            raise
        if presented_access_token(request.headers, request.args)[0]:
            return signin_form(here, "That access token is not valid.", 403)
        if isinstance(exc, SessionUnchecked):  # the cookie may be good: keep it
            return signin_form(here, "Your sign-in cannot be checked right now: the log database does not "
                                     "answer. Try again shortly, or open the page with the access token.", 503)  # fmt: skip
        if SESSION_COOKIE in request.cookies:
            message = (
                "You signed out; sign in again."
                if isinstance(exc, SignedOut)
                else "Your sign-in has expired or the access token changed; sign in again."
            )
            response = signin_form(here, message)
            _clear_cookie(response)
            return response
        return signin_form(here)
    if source == QUERY:
        return _signed_in(expected, here)  # the same page, the token out of the address bar
    return None


@bp.after_request
def page_headers(response: Response) -> Response:
    if view() in THROTTLED or view() == "signout":
        response.headers["Cache-Control"] = "no-store"
        # Nothing the pages link to elsewhere learns where the operator came from (the page, its
        # filters). `same-origin`, not `no-referrer`: under `no-referrer` browsers send `Origin: null`
        # with the pages' own form posts, and sign-out could not tell its own origin from another.
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["X-Content-Type-Options"] = "nosniff"
        if response.mimetype == "text/html":
            response.headers["Content-Security-Policy"] = HTML_CSP
    return response


@bp.route("/signin", methods=["GET", "POST"])
def signin():
    target = local_page(request.form.get("next") if request.method == "POST" else request.args.get("next"))
    expected = state().config.access_token
    if not expected:
        return signin_form(target, "The proxy has no ACCESS_TOKEN configured; the pages are disabled.", 403)
    if request.method == "GET":
        return signin_form(target, status=200)
    token = request.form.get("access_token", "")
    if not token:
        return signin_form(target, "Enter the access token.", 403)
    if not constant_time_equal(token, expected):
        return signin_form(target, "That access token is not valid.", 403)
    return _signed_in(expected, target)


@bp.post("/signout")
def signout():
    """End the session on every host (when it is a signed-in browser's or a token's), and this
    browser's cookie in any case. Only from the pages' own origin: another site cannot sign out."""
    if not same_origin():
        raise Forbidden("Sign-out is only accepted from the pages of this server")
    try:
        _authenticate()
        signed_in = True
    except SessionUnchecked:
        signed_in = True  # a good cookie whose sign-out cannot be checked: recording it will say why
    except Forbidden:
        signed_in = False  # an expired or foreign cookie: nothing to end beyond this browser's
    response = redirect(url_for(".signin"), 303)
    if signed_in:
        try:
            state().log_store.sign_out(time.time())
        except Exception as exc:
            logger.warning("sign-out could not be recorded in the log store: %s: %s", type(exc).__name__, exc)
            response = signin_form(
                url_for(".log"),
                "Signed out in this browser only: the sign-out could not be recorded for the other "
                f"browsers and hosts ({type(exc).__name__}). Sign out again when the log database answers.",
                503,
            )
    _clear_cookie(response)
    return response


def same_origin() -> bool:
    """Whether a state-changing request comes from this server's own pages. A browser says so in
    `Sec-Fetch-Site` (sent to HTTPS and localhost only), else in `Origin`, which it sends with every
    POST (`null` when it will not say: refused); a client that sends neither is not a browser, and
    cannot be made to post by another site."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site == "same-origin"
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == request.host.lower()


def signin_form(target: str, error: str | None = None, status: int = 401) -> Response:
    """The sign-in page, posting to `/signin` and then going on to `target` (a local page path)."""
    html = render_template(
        "openai_proxy/signin.html",
        action=url_for(".signin"),
        next=target,
        error=error,
        hours=SESSION_MAX_AGE // 3600,
        version=__version__,
    )
    response = Response(html, status=status, mimetype="text/html")
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="openai-proxy pages"'
    return response


def _signed_in(access_token: str, target: str) -> Response:
    try:
        signed_out_at = state().log_store.signed_out_at()
    except Exception:
        signed_out_at = 0.0  # a cookie issued now; it works once the last sign-out can be read again
    response = redirect(target, 303)
    response.set_cookie(
        SESSION_COOKIE,
        session_cookie_value(access_token, signed_out_at=signed_out_at),
        max_age=SESSION_MAX_AGE,
        path="/",
        secure=request.is_secure,
        httponly=True,
        samesite="Lax",
    )
    return response


def _clear_cookie(response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/", secure=request.is_secure, httponly=True, samesite="Lax")


def wants_html() -> bool:
    """A browser asks for text/html by name; scripts send no Accept or `*/*` and get JSON errors."""
    return any(value == "text/html" and quality > 0 for value, quality in request.accept_mimetypes)


def page_url(path: str, params: Iterable[tuple[str, str]]) -> str:
    """`path` with its query parameters, minus any access_token."""
    query = urlencode([(k, v) for k, v in params if k != "access_token"])
    return f"{path}?{query}" if query else path


def local_page(target: str | None) -> str:
    """`target` when it is one of the HTML pages of this server (path and query), else the log page.

    Only a known path is ever redirected to, so no `next` can send a browser elsewhere (no open redirect).
    Paths are whole (`url_for`): under a prefix or a mount point they include it.
    """
    default = url_for(".log")
    if not target or not target.startswith("/") or any(c in target for c in "\\\r\n\t"):
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or parts.path not in {url_for(f".{name}") for name in HTML_PAGES}:
        return default
    return page_url(parts.path, parse_qsl(parts.query, keep_blank_values=True))


@bp.get("/")
def index():
    return render_template("openai_proxy/index.html", version=__version__, log=url_for(".log"))


@bp.route("/health", methods=METHODS)
def health():
    return _json(liveness(state()))


@bp.route("/health2", methods=METHODS)
def health2():
    body, status = deep_check(state(), g.request_id)
    return _json(body, status)


@bp.route("/debug/runtime", methods=METHODS)
def debug_runtime():
    return _json(runtime_info(state(), current_app))


@bp.route("/metrics", methods=METHODS)
def metrics():
    body, content_type = state().metrics.exposition()
    return Response(body, content_type=content_type)


@bp.route("/log", methods=METHODS)
def log():
    return _log_page("info", "Requests")


@bp.route("/log_errors", methods=METHODS)
def log_errors():
    return _log_page("error", "Errors")


def _json(body: Any, status: int = 200) -> Response:
    return Response(jsonio.dumps(body), status=status, mimetype="application/json")


def _log_page(level: str, title: str) -> Response:
    st = state()
    try:
        where, at, per_page = log_query(request.args)
    except BadRequest as exc:
        if not wants_html():
            raise  # scripts get the JSON error
        return _bad_query(title, exc.message)
    # This worker's queued records first, so a page is never behind the worker that serves it.
    st.log_store.flush()
    error = None
    try:
        result = st.log_store.page(level, where, per_page, at)
    except Exception as exc:
        error = f"The log store cannot be read: {type(exc).__name__}: {exc}"
        result = LogPage([], 0, empty_counters(), [])
    filters = {"status": request.args.get("status", "").strip(), "endpoint": where.endpoint,
               "host": where.host, "client": where.client, "request_id": where.request_id,
               "per_page": per_page if per_page != PER_PAGE else None}  # fmt: skip

    def here(**position: Any) -> str:
        params = {**filters, **position}
        return page_url(request.script_root + request.path, [(k, str(v)) for k, v in params.items() if v])

    spend, chart = _activity(st) if level == "info" and not error else (None, None)
    store = st.log_store.stats()
    # Fleet-wide: what every host saved in the database, plus what this worker could not save yet.
    dropped = sum(result.dropped.values()) + store["unsavedDropped"]
    first_page = at == NEWEST
    records = [_shown(r) for r in result.records]
    html = render_template(
        "openai_proxy/log.html",
        title=title,
        errors=level == "error",
        counters=[
            *counter_lines(result.counters, st.gate.in_use(), st.gate.peak),
            ("Dropped log records", str(dropped)),
            # Saved in the same transaction as the rest of their batch: the database's count is whole.
            ("Rejected log records", str(sum(result.rejected.values()))),
        ],
        dropped_by_host=result.dropped,
        rejected_by_host=result.rejected,
        records=records,
        tokens_ch=tokens_width(records),
        total=result.total,
        page=at.page if at.before is None and at.after is None else None,
        pages=None if result.total is None else max(1, -(-result.total // per_page)),
        newest=None if first_page else here(),
        newer=here(after=result.newer) if result.newer else None,
        older=here(before=result.older) if result.older else None,
        requests=result.requests,
        elsewhere=result.elsewhere,
        other=other_page(filters),
        tabs=[(name, url_for(f".{ep}"), ep == view()) for name, ep in TABS],
        clear=url_for(f".{view()}"),
        signout=url_for(".signout"),
        endpoints=result.endpoints,
        hosts=result.hosts,
        clients=result.clients,
        spend=spend,
        chart=chart,
        keys=keys_panel(st),
        reloads=reload_panel(st),
        filters=filters,
        hidden={"per_page": per_page} if filters["per_page"] else {},
        error=error,
        store=store,
        usd=spend_view.usd,
        exact_usd=spend_view.exact_usd,
        grouped=spend_view.grouped,
        pid=os.getpid(),
        version=__version__,
    )
    return Response(html, status=200 if error is None else 503, mimetype="text/html")


def other_page(filters: dict[str, Any]) -> tuple[str, str]:
    """The other tab (Errors from Requests, Requests from Errors): its name, and its address with
    the same filters, from its first page."""
    name, endpoint = next((name, ep) for name, ep in TABS if ep != view())
    return name, page_url(url_for(f".{endpoint}"), [(k, str(v)) for k, v in filters.items() if v])


def _bad_query(title: str, message: str) -> Response:
    """The page's form again, with what was typed and what is wrong (400), without reading the log."""
    typed = {name: shown_value(request.args.get(name, "")) for name in FILTERS}
    filters = {**typed, "per_page": None}
    html = render_template(
        "openai_proxy/log.html", title=title, invalid=True, error=message, counters=[], dropped_by_host={},
        rejected_by_host={}, records=[], total=0, page=1, pages=1, newest=None, newer=None, older=None,
        tokens_ch=0, keys=None, reloads=None, usd=spend_view.usd, exact_usd=spend_view.exact_usd, grouped=spend_view.grouped,
        tabs=[(name, url_for(f".{ep}"), ep == view()) for name, ep in TABS],
        clear=url_for(f".{view()}"), signout=url_for(".signout"), endpoints=[], hosts=[],
        clients=[], spend=None, chart=None, filters=filters, hidden={}, store=state().log_store.stats(),
        pid=os.getpid(), version=__version__,
    )  # fmt: skip
    return Response(html, status=400, mimetype="text/html")


def shown_value(text: str) -> str:
    """A typed value as the form shows it again: control characters replaced, at most 200 characters."""
    return _CONTROL.sub("\ufffd", text)[:MAX_FILTER_CHARS]


def _activity(st: Any) -> tuple[list[spend_view.Period] | None, dict[str, Markup] | None]:
    """Spend for today, 7 and 30 days and the last hour's chart, from the log's aggregates (all hosts)."""
    now = time.time()
    today = datetime.fromtimestamp(now, UTC).date()
    minute = int(now // 60)
    try:
        rows = st.log_store.spend((today - timedelta(days=29)).isoformat())
        minutes = st.log_store.minutes(minute - 59)
    except Exception:
        logger.exception("the log store's aggregates cannot be read")
        return None, None
    shown = [spend_view.Minute.of(m) for m in minutes]
    chart = {name: spend_view.hour_chart(shown, minute, width)
             for name, width in (("wide", spend_view.WIDTH), ("narrow", spend_view.NARROW))}  # fmt: skip
    return spend_view.spend_periods(rows, today), chart


TOKEN_FIELDS = ("prompt_tokens", "cached_tokens", "completion_tokens")  # the tokens column: in · cached · out


def _shown(record: dict[str, Any]) -> dict[str, Any]:
    """A stored record plus its display time and its full JSON (escaped by the template like all else)."""
    data = {k: v for k, v in record.items() if k not in ("id", "ts", "kind")}
    flags = [name for name in ("stream", "overloaded", "cancelled") if record.get(name)]
    if record.get("timeoutSource") in ("clamped", "invalid"):
        flags.append(f"timeout {record['timeoutSource']}")
    retries = record.get("retries")
    if isinstance(retries, int) and retries > 0:  # rare: a flag says it better than a column of zeros
        flags.append(f"{retries} retr{'y' if retries == 1 else 'ies'}")
    cost = record.get("costUsd")
    usage = record.get("usage")
    tokens = None
    if isinstance(usage, dict) and usage:
        tokens = " · ".join(spend_view.grouped(usage.get(k) or 0) for k in TOKEN_FIELDS)
    return {**record, "time": iso(record["ts"]), "flags": flags, "tokens": tokens,
            "costUsd": cost if isinstance(cost, int | float) and not isinstance(cost, bool) else None,
            "pretty": json.dumps(data, indent=2, ensure_ascii=False)}  # fmt: skip


def tokens_width(records: list[dict[str, Any]]) -> float:
    """How wide (in `ch`, the width of a digit) the tokens column must be for this page's figures to
    show whole: a digit is 1ch in tabular figures; a separator (`,`, ` · `) is narrower, at most 0.6ch
    in the usual sans fonts."""
    texts = [r["tokens"] for r in records if r.get("tokens")]
    return round(max((sum(1 if c.isdigit() else 0.6 for c in t) for t in texts), default=0), 1)


def keys_panel(st: Any) -> dict[str, Any]:
    """The upstream key pool as this server sees it: each key's state, resting time, and its calls
    and 429s since the server started (every worker's), for the panel beside the counters."""
    pool = upstream_keys(st)
    calls: dict[str, dict[str, Any]] = {}
    none: dict[str, Any] = {"calls": 0, "rateLimited": 0}
    if pool["pooled"]:
        try:
            calls = st.metrics.key_calls_by_key()
        except Exception:  # the counts are a nicety: the page and the keys' states still show
            logger.exception("the upstream keys' call counts cannot be read")
            none = {"calls": "?", "rateLimited": "?"}
    return {
        "pooled": pool["pooled"],
        "keys": [{**key, **calls.get(key["name"], none)} for key in pool["keys"]],
    }


def reload_panel(st: Any) -> list[dict[str, Any]]:
    """The clients and prices files: which file, and what the last reload (`kill -HUP`) made of it."""
    config = st.config
    reload = last_reload(st.runtime_dir)
    refused = {p.get("file"): p.get("problem") for p in (reload or {}).get("problems") or ()}
    out = []
    for what, path, without in (("clients", config.clients_file, "no file: SECURITY_KEY's client only"),
                                ("prices", config.prices_file, "no file: the shipped price table")):  # fmt: skip
        if what in refused:
            result = f"refused, the previous {what} stay in use: {refused[what]}"
        elif path:
            result = "reloaded" if reload else "loaded at start"
        else:
            result = without
        out.append({"file": what.capitalize(), "path": path or "—", "ok": what not in refused, "result": result,
                    "at": reload["at"] if reload else iso(st.started_at)})  # fmt: skip
    return out


# ASCII only: `str.isdigit` and `\d` also take "²" or "٣", which `int()` then refuses (a 500).
_STATUS = re.compile(r"[1-5][0-9][0-9]|[1-5]xx", re.I | re.ASCII)
_DIGITS = re.compile(r"[0-9]{1,7}", re.ASCII)
# NUL (which PostgreSQL refuses in text) and the other control characters are in no endpoint, host,
# client name or request id.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
FILTERS = ("status", "endpoint", "host", "client", "request_id")
MAX_FILTER_CHARS = 200
MAX_PAGE = 1_000_000


def log_query(args: Any) -> tuple[LogFilter, Position, int]:
    """Filters and pagination from the query string; nonsense gets a 400 that says what is expected."""
    status = _text_filter(args, "status")
    where: dict[str, Any] = {}
    if status and not _STATUS.fullmatch(status):
        raise BadRequest("status must be a code like 404 or a class like 4xx")
    if status and status[1:].isdigit():
        where["status"] = int(status)
    elif status:
        where["status_class"] = int(status[0])
    for name in ("endpoint", "request_id", "host", "client"):
        where[name] = _text_filter(args, name)[:MAX_FILTER_CHARS] or None
    page = _positive(args.get("page"), "page", 1, MAX_PAGE)
    per_page = _positive(args.get("per_page"), "per_page", PER_PAGE, MAX_PER_PAGE)
    before, after = _cursor(args, "before"), _cursor(args, "after")
    if before and after:
        raise BadRequest("give before or after, not both")
    return LogFilter(**where), Position(before, after, 1 if before or after else page), per_page


def _cursor(args: Any, name: str) -> Cursor | None:
    text = _text_filter(args, name)
    if not text:
        return None
    try:
        return Cursor.parse(text[:MAX_FILTER_CHARS])
    except ValueError:
        raise BadRequest(f"{name} must be a place in the log as the page's links give it") from None


def _text_filter(args: Any, name: str) -> str:
    value = (args.get(name) or "").strip()
    if _CONTROL.search(value):
        raise BadRequest(f"{name} must not contain control characters")
    return value


def _positive(raw: str | None, name: str, default: int, maximum: int) -> int:
    text = (raw or "").strip()
    if not text:
        return default
    if not _DIGITS.fullmatch(text) or not 1 <= int(text) <= maximum:
        raise BadRequest(f"{name} must be an integer from 1 to {maximum}")
    return int(text)


def counter_lines(c: dict[str, float], current: int, known_peak: int) -> list[tuple[str, str]]:
    """The original proxy's counters, same labels (operators' scripts scrape `Label: value`)."""
    count = int(c["request_count"])
    total = c["total_request_time"]
    return [
        ("Request count", str(count)),
        ("Total request time", f"{total:.1f}"),
        ("Average request time", f"{total / count if count else 0.0:.1f}"),
        ("Max request time", f"{c['max_request_time']:.1f}"),
        ("Current parallel requests", str(current)),
        ("Max parallel requests", str(max(int(c["max_parallel"]), current, known_peak))),
        ("Max prompt tokens", str(int(c["max_prompt_tokens"]))),
        ("Max cached tokens", str(int(c["max_cached_tokens"]))),
        ("Max completion tokens", str(int(c["max_completion_tokens"]))),
        ("Error count", str(int(c["error_count"]))),
        ("Overload count", str(int(c["overload_count"]))),
        ("Cancelled request count", str(int(c["cancelled_count"]))),
        ("Retry count", str(int(c["retry_count"]))),
    ]
