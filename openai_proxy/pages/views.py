"""Operator-facing pages. `/` says the proxy runs and shows no secrets; the others need ACCESS_TOKEN.

`/health`, `/health2`, `/log`, `/log_errors`, `/debug/runtime`, `/metrics`: a Bearer header,
`?access_token=` or the sign-in cookie, and throttled by `openai_proxy.pages.ratelimit` (checked first, so guessing
tokens is throttled too, on `/signin` as well).

Browsers sign in once: `?access_token=` on an HTML page, or the form of `/signin`, sets an HttpOnly
cookie (an HMAC keyed by ACCESS_TOKEN, never the token) and redirects (303) to the page without the
token, so no link, form or history entry of the pages carries it. A browser without a valid cookie
gets the sign-in form (401; 403 after a wrong token); scripts keep getting the JSON 403.
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

from openai_proxy import __version__, jsonio
from openai_proxy.errors import BadRequest, Forbidden
from openai_proxy.inbound.auth import (
    QUERY,
    SESSION_COOKIE,
    SESSION_MAX_AGE,
    constant_time_equal,
    presented_access_token,
    require_access_token,
    session_cookie_value,
)
from openai_proxy.log.db import LogFilter, LogPage, empty_counters
from openai_proxy.pages import spend as spend_view
from openai_proxy.pages.health import deep_check, liveness, runtime_info
from openai_proxy.state import state

logger = logging.getLogger("openai_proxy.pages")

bp = Blueprint("pages", __name__)

GUARDED = {
    "pages.health",
    "pages.health2",
    "pages.log",
    "pages.log_errors",
    "pages.debug_runtime",
    "pages.metrics",
}
HEALTH2 = "pages.health2"
# Pages a person reads in a browser: they sign in with a cookie instead of a token in every link.
HTML_PAGES = {"/log": "pages.log", "/log_errors": "pages.log_errors"}
SIGNIN, SIGNOUT = "pages.signin", "pages.signout"
# What app.ratelimit throttles: the guarded pages and the sign-in form (guessing the token there too).
THROTTLED = GUARDED | {SIGNIN}
# The guarded pages answer any method, as the original did.
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
PER_PAGE, MAX_PER_PAGE = 50, 500
TABS = (("Requests", "pages.log"), ("Errors", "pages.log_errors"))
# The page loads nothing and runs no script: even a value that slipped past escaping could not act.
HTML_CSP = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"


@bp.before_request
def guard() -> Response | None:
    endpoint = request.endpoint
    if endpoint not in GUARDED:
        return None
    expected = state().config.access_token
    if endpoint not in HTML_PAGES.values():
        require_access_token(expected, request.headers, request.args, request.cookies)
        return None
    here = page_url(request.path, request.args.items(multi=True))
    try:
        source = require_access_token(expected, request.headers, request.args, request.cookies)
    except Forbidden:
        if not expected or not wants_html():
            raise
        if presented_access_token(request.headers, request.args)[0]:
            return signin_form(here, "That access token is not valid.", 403)
        if SESSION_COOKIE in request.cookies:
            response = signin_form(
                here, "Your sign-in has expired or the access token changed; sign in again."
            )
            _clear_cookie(response)
            return response
        return signin_form(here)
    if source == QUERY:
        return _signed_in(expected, here)  # the same page, the token out of the address bar
    return None


@bp.after_request
def page_headers(response: Response) -> Response:
    if request.endpoint in THROTTLED or request.endpoint == SIGNOUT:
        response.headers["Cache-Control"] = "no-store"
        # Nothing the pages link to learns where the operator came from (the page, its filters).
        response.headers["Referrer-Policy"] = "no-referrer"
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
    response = redirect(url_for(SIGNIN), 303)
    _clear_cookie(response)
    return response


def signin_form(target: str, error: str | None = None, status: int = 401) -> Response:
    """The sign-in page, posting to `/signin` and then going on to `target` (a local page path)."""
    html = render_template(
        "signin.html",
        action=url_for(SIGNIN),
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
    response = redirect(target, 303)
    response.set_cookie(
        SESSION_COOKIE,
        session_cookie_value(access_token),
        max_age=SESSION_MAX_AGE,
        path="/",
        secure=request.is_secure,
        httponly=True,
        samesite="Strict",
    )
    return response


def _clear_cookie(response: Response) -> None:
    response.delete_cookie(
        SESSION_COOKIE, path="/", secure=request.is_secure, httponly=True, samesite="Strict"
    )


def wants_html() -> bool:
    """A browser asks for text/html by name; scripts send no Accept or `*/*` and get JSON errors."""
    return any(value == "text/html" and quality > 0 for value, quality in request.accept_mimetypes)


def page_url(path: str, params: Iterable[tuple[str, str]]) -> str:
    """`path` with its query parameters, minus any access_token."""
    query = urlencode([(k, v) for k, v in params if k != "access_token"])
    return f"{path}?{query}" if query else path


def local_page(target: str | None) -> str:
    """`target` when it is one of the HTML pages of this server (path and query), else `/log`.

    Only a known path is ever redirected to, so no `next` can send a browser elsewhere (no open redirect).
    """
    default = "/log"
    if not target or not target.startswith("/") or any(c in target for c in "\\\r\n\t"):
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or parts.path not in HTML_PAGES:
        return default
    return page_url(parts.path, parse_qsl(parts.query, keep_blank_values=True))


@bp.get("/")
def index():
    return render_template("index.html", version=__version__)


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
    where, page, per_page = log_query(request.args)
    # This worker's queued records first, so a page is never behind the worker that serves it.
    st.log_store.flush()
    error = None
    try:
        result = st.log_store.page(level, where, page, per_page)
    except Exception as exc:
        error = f"The log store cannot be read: {type(exc).__name__}: {exc}"
        result = LogPage([], 0, empty_counters(), [])
    filters = {"status": request.args.get("status", "").strip(), "endpoint": where.endpoint,
               "host": where.host, "client": where.client, "request_id": where.request_id,
               "per_page": per_page if per_page != PER_PAGE else None}  # fmt: skip
    pages = max(1, -(-result.total // per_page))

    def here(page: int) -> str:
        params = {**filters, "page": page if page > 1 else None}
        return page_url(request.path, [(k, str(v)) for k, v in params.items() if v])

    spend, chart = _activity(st) if level == "info" and not error else (None, None)
    store = st.log_store.stats()
    # Fleet-wide: what every host saved in the database, plus what this worker could not save yet.
    dropped = sum(result.dropped.values()) + store["unsavedDropped"]
    html = render_template(
        "log.html",
        title=title,
        counters=[
            *counter_lines(result.counters, st.gate.in_use(), st.gate.peak),
            ("Dropped log records", str(dropped)),
            # Saved in the same transaction as the rest of their batch: the database's count is whole.
            ("Rejected log records", str(sum(result.rejected.values()))),
        ],
        dropped_by_host=result.dropped,
        rejected_by_host=result.rejected,
        records=[_shown(r) for r in result.records],
        total=result.total,
        page=page,
        pages=pages,
        newer=here(page - 1) if page > 1 else None,
        older=here(page + 1) if page < pages else None,
        tabs=[(name, url_for(ep), ep == request.endpoint) for name, ep in TABS],
        clear=url_for(request.endpoint or "pages.log"),
        signout=url_for(SIGNOUT),
        endpoints=result.endpoints,
        hosts=result.hosts,
        clients=result.clients,
        spend=spend,
        chart=chart,
        filters=filters,
        hidden={"per_page": per_page} if filters["per_page"] else {},
        error=error,
        store=store,
        pid=os.getpid(),
        version=__version__,
    )
    return Response(html, status=200 if error is None else 503, mimetype="text/html")


def _activity(st: Any) -> tuple[list[spend_view.Period] | None, Markup | None]:
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
    chart = spend_view.hour_chart([spend_view.Minute.of(m) for m in minutes], minute)
    return spend_view.spend_periods(rows, today), chart


def _shown(record: dict[str, Any]) -> dict[str, Any]:
    """A stored record plus its display time and its full JSON (escaped by the template like all else)."""
    data = {k: v for k, v in record.items() if k not in ("id", "ts", "kind")}
    when = datetime.fromtimestamp(record["ts"], UTC).isoformat(sep=" ", timespec="milliseconds")[:23]
    return {**record, "time": when, "pretty": json.dumps(data, indent=2, ensure_ascii=False)}


_STATUS = re.compile(r"([1-5])xx", re.I)


def log_query(args: Any) -> tuple[LogFilter, int, int]:
    """Filters and pagination from the query string; nonsense gets a 400 that says what is expected."""
    status = (args.get("status") or "").strip()
    where: dict[str, Any] = {}
    if status.isdigit() and len(status) == 3:
        where["status"] = int(status)
    elif _STATUS.fullmatch(status):
        where["status_class"] = int(status[0])
    elif status:
        raise BadRequest("status must be a code like 404 or a class like 4xx")
    where["endpoint"] = (args.get("endpoint") or "").strip()[:200] or None
    where["request_id"] = (args.get("request_id") or "").strip()[:200] or None
    where["host"] = (args.get("host") or "").strip()[:200] or None
    where["client"] = (args.get("client") or "").strip()[:200] or None
    page = _positive(args.get("page"), "page", 1, 1_000_000)
    per_page = _positive(args.get("per_page"), "per_page", PER_PAGE, MAX_PER_PAGE)
    return LogFilter(**where), page, per_page


def _positive(raw: str | None, name: str, default: int, maximum: int) -> int:
    if raw is None or raw.strip() == "":
        return default
    if not raw.strip().isdigit() or not 1 <= int(raw) <= maximum:
        raise BadRequest(f"{name} must be an integer from 1 to {maximum}")
    return int(raw)


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
