"""Operator-facing pages. `/` says the proxy runs and shows no secrets; the others need ACCESS_TOKEN.

`/health`, `/health2`, `/log`, `/log_errors`, `/debug/runtime`, `/metrics`: `?access_token=` or a Bearer
header, and throttled by `app.ratelimit` (checked first, so guessing tokens is throttled too).
"""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, Response, current_app, g, render_template, request, url_for

from app import __version__, jsonio
from app.auth import require_access_token
from app.errors import BadRequest
from app.health import deep_check, liveness, runtime_info
from app.logdb import LogFilter, LogPage, empty_counters
from app.state import state

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
# The guarded pages answer any method, as the original did.
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
PER_PAGE, MAX_PER_PAGE = 50, 500
TABS = (("Requests", "pages.log"), ("Errors", "pages.log_errors"))
# The page loads nothing and runs no script: even a value that slipped past escaping could not act.
HTML_CSP = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"


@bp.before_request
def guard() -> None:
    if request.endpoint in GUARDED:
        require_access_token(state().config.access_token, request.headers, request.args)


@bp.after_request
def page_headers(response: Response) -> Response:
    if request.endpoint in GUARDED:
        response.headers["Cache-Control"] = "no-store"
        response.headers["Referrer-Policy"] = "no-referrer"  # the token may be in the URL
        response.headers["X-Content-Type-Options"] = "nosniff"
        if response.mimetype == "text/html":
            response.headers["Content-Security-Policy"] = HTML_CSP
    return response


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
    token = {"access_token": request.args["access_token"]} if "access_token" in request.args else {}
    filters = {"status": request.args.get("status", "").strip(), "endpoint": where.endpoint,
               "request_id": where.request_id, "per_page": per_page if per_page != PER_PAGE else None}  # fmt: skip
    pages = max(1, -(-result.total // per_page))

    def here(page: int) -> str:
        params = {**filters, **token, "page": page if page > 1 else None}
        return f"{request.path}?{urlencode({k: v for k, v in params.items() if v})}"

    html = render_template(
        "log.html",
        title=title,
        counters=counter_lines(result.counters, st.gate.in_use(), st.gate.peak),
        records=[_shown(r) for r in result.records],
        total=result.total,
        page=page,
        pages=pages,
        newer=here(page - 1) if page > 1 else None,
        older=here(page + 1) if page < pages else None,
        tabs=[(name, url_for(ep, **token), ep == request.endpoint) for name, ep in TABS],
        clear=url_for(request.endpoint or "pages.log", **token),
        endpoints=result.endpoints,
        filters=filters,
        hidden={**token, **({"per_page": per_page} if filters["per_page"] else {})},
        error=error,
        store=st.log_store.stats(),
        pid=os.getpid(),
        version=__version__,
    )
    return Response(html, status=200 if error is None else 503, mimetype="text/html")


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
