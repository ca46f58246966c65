"""What `/health`, `/health2` and `/debug/runtime` report.

`/health` is cheap (no upstream call, no tokens): liveness and readiness, answered within a second
whatever the log database does (it reads the log writer's last known state, and its probe of the
database has a hard deadline on a connection of its own), with `"status": "degraded"` and the
`reasons` while something is wrong. `/health2` makes one real, minimal upstream call through the
same client, gate and error classification as the API routes.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import sqlite3
import time
from typing import Any

from flask import Flask

from openai_proxy import jsonio, pipeline
from openai_proxy.errors import ProxyError
from openai_proxy.jsonio import iso
from openai_proxy.record import RequestRecord, TimeoutDecision
from openai_proxy.runtime import reload_status
from openai_proxy.state import API_ENDPOINTS, ProxyState
from openai_proxy.upstream import CONNECT_TIMEOUT_S, JSON_HEADERS, RETRIES_IDEMPOTENT, UpstreamCall
from openai_proxy.version import __version__

# One output token of DEFAULT_MODEL: enough to prove the key, the network and the model work.
HEALTH2_MAX_TOKENS = 1
HEALTH2_TIMEOUT_MS = 15_000
# The routes that use the SDK's retries (see the route table in README.md); every other API call is create-style (billed)
# and never retried, and `/v1` leaves retries to the client's SDK. The routes pass `retries=`
# themselves: this table is what operators see on /debug/runtime.
RETRIED_ROUTES = {
    ("POST", "/openai2/input_tokens"),
    ("GET", "/openai2/<response_id>"),
    ("GET", "/openai2/<response_id>/input_items"),
    ("DELETE", "/openai2/<response_id>"),
}
VERSIONED = (
    "flask",
    "gunicorn",
    "gevent",
    "geventhttpclient",
    "openai",
    "httpx2",
    "flask-limiter",
    "prometheus-client",
    "psycopg",
)
_CONVERTER = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


def _uptime(st: ProxyState) -> dict[str, Any]:
    return {
        "version": __version__,
        "pid": os.getpid(),
        "startedAt": iso(st.started_at),
        "uptimeS": round(time.time() - st.started_at, 1),
    }


def liveness(st: ProxyState) -> dict[str, Any]:
    """Ready means API routes can serve (SECURITY_KEY or a named client is configured); a server told
    to stop is draining and not ready (in-flight work finishes, `/ready` says 503). Anything in
    `reasons` (see `degraded_reasons`) only degrades: the API keeps serving."""
    config = st.config
    draining = st.draining()
    ready = len(st.clients) > 0 and not draining
    # Counted first: asking Redis is also what finds out whether it answers.
    gate = {"inUse": st.gate.in_use(), "limit": st.gate.limit, "heldByThisWorker": st.gate.held_here()}
    gate.update(st.gate.status())
    limits = st.limits.status()
    keys = upstream_keys(st)
    objects = st.objects.stats()
    store_error = st.log_store.probe()
    not_written = st.log_store.not_written()
    reload = last_reload(st.runtime_dir)
    reasons = degraded_reasons(len(st.clients) > 0, gate, limits, keys, store_error, not_written, reload)
    if objects["pending"]:
        reasons.append(
            f"stored objects: {objects['pending']} owners wait to be written to the log database "
            "(this worker answers for them meanwhile)"
        )
    return {
        "status": "draining" if draining else "degraded" if reasons else "ok",
        "ready": ready,
        "draining": draining,
        "reasons": reasons,
        **_uptime(st),
        "config": {
            "loaded": True,
            "securityKeySet": bool(config.security_key),
            "openaiApiKeySet": bool(config.openai_api_key),
            "warnings": list(config.warnings),
        },
        "clients": {"count": len(st.clients), "file": config.clients_file},
        "reload": reload,
        "limits": limits,
        "gate": gate,
        "logStore": {
            "writable": store_error is None,
            "error": store_error,
            "recordsWritten": not_written is None,
            "notWritten": not_written,
            **st.log_store.stats(),
        },
        "upstreamKeys": keys,
        "storedObjects": objects,
    }


def degraded_reasons(
    has_clients: bool,
    gate: dict[str, Any],
    limits: dict[str, Any],
    keys: dict[str, Any],
    store_error: str | None,
    not_written: str | None,
    reload: dict[str, Any] | None,
) -> list[str]:
    """Why this host is not all it should be, one sentence each; empty when it is."""
    reasons = []
    if not has_clients:
        reasons.append("clients: no client key is configured (SECURITY_KEY or a clients file)")
    if not_written:
        reasons.append(f"log: this host's records are not being written: {not_written}")
    if store_error:
        reasons.append(f"log: the database would not take a write now: {store_error}")
    if gate.get("fallback"):
        since = gate.get("redis", {}).get("unreachableSince")
        reasons.append(
            f"gate: Redis does not answer (since {since}); this host's own gate stands in for the fleet's"
        )
    if limits.get("usingFallback"):
        reasons.append("limits: Redis does not answer; client limits count on this host only")
    if keys["allRevoked"]:
        reasons.append("upstream keys: every key of the pool is revoked (401, 403 or insufficient_quota)")
    if reload and not reload.get("ok"):
        at = reload.get("at")
        for refused in reload.get("problems") or ():
            what = refused.get("file", "a")
            reasons.append(f"reload at {at}: the {what} file was refused, the previous {what} stay in use: "
                           f"{refused.get('problem')}")  # fmt: skip
    return reasons


def last_reload(runtime_dir: str) -> dict[str, Any] | None:
    """The last reload of the clients and prices files (`at`, `ok`, `problems`), its time in ISO."""
    status = reload_status(runtime_dir)
    if status is None:
        return None
    at = status.get("at")
    return {**status, "at": iso(float(at)) if isinstance(at, int | float) else None}


def upstream_keys(st: ProxyState) -> dict[str, Any]:
    """The key pool (name, last four characters, state, resting until per key); a lone
    OPENAI_API_KEY is not pooled: it is always used, and not shown."""
    pool = st.upstream.pool
    if pool is None:
        return {"pooled": False, "allRevoked": False, "keys": []}
    keys = pool.describe()
    return {"pooled": True, "allRevoked": all(k["state"] == "revoked" for k in keys), "keys": keys}


def deep_check(st: ProxyState, request_id: str) -> tuple[dict[str, Any], int]:
    """One minimal chat completion upstream: 200 with its latency, or 503 with the classified error."""
    config = st.config
    record = RequestRecord(endpoint="/health2", method="POST", request_id=request_id)
    body = {
        "model": config.default_model,
        "messages": [{"role": "user", "content": "ping"}],
        "max_completion_tokens": HEALTH2_MAX_TOKENS,
    }
    timeout = TimeoutDecision(float(min(HEALTH2_TIMEOUT_MS, config.upstream_timeout_ms)), "default")
    report: dict[str, Any] = {"model": config.default_model, "baseUrl": config.openai_base_url}
    started = time.perf_counter()
    call = UpstreamCall(
        "POST",
        "/chat/completions",
        record=record,
        timeout=timeout,
        credentials=st.upstream.credentials(None, None, None),
        body=jsonio.dumps(body),
        headers=JSON_HEADERS,
    )
    try:
        pipeline.fetch(call).json()
    except ProxyError as err:
        report.update(latencyMs=_ms_since(started), error=err.body(request_id)["error"])
        return {"status": "fail", **report}, 503
    report.update(latencyMs=_ms_since(started), upstreamRequestId=record.upstream_request_id)
    return {"status": "ok", **report}, 200


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 1)


def runtime_info(st: ProxyState, app: Flask) -> dict[str, Any]:
    """Effective settings (never a secret), derived timeouts and limits, retries per route, versions."""
    config = st.config
    return {
        **_uptime(st),
        "config": config.public_view(),
        "timeouts": {
            "defaultMs": config.upstream_timeout_ms,
            "maxMs": config.effective_max_timeout_ms,
            "meaning": "wait for upstream response headers, per attempt",
            "connectS": CONNECT_TIMEOUT_S,
            # One socket bound for reads mid-body and for a streamed upload upstream stops taking.
            "readS": st.upstream.settings.read_timeout,
            "writeS": st.upstream.settings.read_timeout,
            "sseKeepaliveMs": config.sse_keepalive_interval_ms,
        },
        "limits": {
            "maxParallelRequests": config.max_parallel_requests,
            "maxBodyBytes": config.max_body_bytes,
            "maxAudioBytes": config.max_audio_bytes,
            "pagesRateLimit": config.pages_rate_limit,
            "health2RateLimit": config.health2_rate_limit,
            "logRetention": config.log_retention,
        },
        "retries": {
            "policy": "SDK retries: connection errors, timeouts, 408/409/429/5xx, honouring Retry-After",
            "routes": retries_per_route(app, st.url_prefix),
        },
        "versions": versions(),
    }


def retries_per_route(app: Flask, prefix: str = "") -> dict[str, int]:
    """`"METHOD /path": retries` for every API route the app serves."""
    out: dict[str, int] = {}
    for rule in app.url_map.iter_rules():
        if not rule.endpoint.startswith(API_ENDPOINTS):
            continue
        path = _CONVERTER.sub(r"<\1>", rule.rule.removeprefix(prefix))
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            out[f"{method} {path}"] = RETRIES_IDEMPOTENT if (method, path) in RETRIED_ROUTES else 0
    return dict(sorted(out.items(), key=lambda item: item[0].split(" ", 1)[::-1]))


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "sqlite": sqlite3.sqlite_version}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
