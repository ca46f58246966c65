"""The proxy in a Flask app: `OpenAIProxy` for a host app, `build_app` for the deployable one; state,
hooks, error handlers, CORS and blueprints."""

from __future__ import annotations

import functools
import logging
import os
import re
import time
import weakref
from typing import Any
from urllib.parse import unquote, urlsplit

from flask import Blueprint, Flask, Response, g, request
from flask_cors import CORS
from flask_cors.core import ACL_ORIGIN as _ALLOW_ORIGIN
from flask_cors.core import ACL_REQUEST_HEADER_PRIVATE_NETWORK as _PRIVATE_NETWORK
from flask_cors.core import get_cors_headers, get_cors_options
from werkzeug.datastructures import Headers
from werkzeug.routing import BaseConverter

from openai_proxy import errors
from openai_proxy.clients import ClientsFileError, load_clients
from openai_proxy.clients.admission import charge
from openai_proxy.config import (
    KNOWN_VARIABLES,
    OTEL_ENDPOINT_VARS,
    OTEL_HEADER_VARS,
    OTEL_PREFIX,
    Config,
    ConfigError,
    build_config,
    load_config,
    read_environment,
)
from openai_proxy.gate import open_gate
from openai_proxy.keys import open_key_pool
from openai_proxy.limits import open_limit_store
from openai_proxy.log import open_log_store
from openai_proxy.log import url as logurl
from openai_proxy.objects import open_object_book
from openai_proxy.observe.completion import CompletionLog
from openai_proxy.observe.metrics import KeyPoolCollector, Metrics
from openai_proxy.observe.prices import load_prices
from openai_proxy.record import RequestRecord, new_request_id
from openai_proxy.redact import SECRETS, WHOLE_WORD_BELOW, redact_text
from openai_proxy.runtime import open_runtime_dir
from openai_proxy.state import ProxyState
from openai_proxy.upstream import Upstream

log = logging.getLogger("openai_proxy")

CORS_METHODS = "GET, POST, DELETE, OPTIONS"
CORS_ALLOW_HEADERS = (
    "Origin, X-Requested-With, Content-Type, Accept, X-Request-Id, Authorization, X-Security-Key"
)
CORS_EXPOSE_HEADERS = "X-Proxy-Request-Id, X-Incoming-Request-Id, Retry-After"
MAX_INCOMING_ID = 200
_CONVERTER = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


class ResponseIdConverter(BaseConverter):
    """A path segment that may be empty, so `/openai2/` answers `Missing response_id` instead of 404."""

    regex = "[^/]*"


class OpenAIProxy:
    """The proxy as a Flask extension.

    `OpenAIProxy(app, url_prefix="/ai")`, or `proxy = OpenAIProxy(); proxy.init_app(app, url_prefix=...)`.
    Settings come from `app.config` under the environment's names (`OPENAI_API_KEY`, `SECURITY_KEY`,
    `OPENAI_PROXY_*`, ...), the environment and dotenv files as fallback; the proxy's state is
    `app.extensions["openai_proxy"]`. Everything it adds hangs off its own blueprint, so the host's
    routes, error handlers, CORS and body limits stay as they were.
    """

    def __init__(
        self, app: Flask | None = None, *, url_prefix: str | None = None, config: Config | None = None
    ):
        self.url_prefix = url_prefix
        self.config = config
        if app is not None:
            self.init_app(app)

    def init_app(
        self, app: Flask, *, url_prefix: str | None = None, config: Config | None = None
    ) -> ProxyState:
        """Serve the proxy's routes and pages in `app`, under `url_prefix` (e.g. "/ai")."""
        prefix = _prefix(url_prefix if url_prefix is not None else self.url_prefix)
        config = config or self.config or config_from_app(app)
        return _install(app, config, prefix, whole_app=False)


def config_from_app(app: Flask) -> Config:
    """Settings from `app.config` under the environment's names, the environment and dotenv files as
    fallback; a value of None in `app.config` counts as unset."""
    values = read_environment()
    for name, value in app.config.items():
        if value is not None and (name in KNOWN_VARIABLES or name.startswith(OTEL_PREFIX)):
            values[name] = str(value)
    return build_config(values)


def build_app(config: Config | None = None) -> Flask:
    """The proxy as a whole app (`app.wsgi`): its rules for the whole URL space, errors and CORS app-wide."""
    # Under gunicorn the master has already said what is missing; workers need not repeat it.
    config = config or load_config(warn=not os.environ.get("OPENAI_PROXY_CONFIG_REPORTED"))
    app = Flask("openai_proxy")
    # Exact paths (contract §2): `//openai` is not `/openai`, and no redirect answers for a route.
    app.url_map.merge_slashes = False
    app.url_map.redirect_defaults = False
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    _install(app, config, "", whole_app=True)
    return app


def _prefix(url_prefix: str | None) -> str:
    """`/ai` from "ai", "/ai/" or "/ai"; "" for none."""
    prefix = (url_prefix or "").strip("/")
    if any(c in prefix for c in "<>?#%\\") or "//" in prefix:
        raise ValueError(f"url_prefix {url_prefix!r} must be a plain path like '/ai'")
    return f"/{prefix}" if prefix else ""


def _install(app: Flask, config: Config, prefix: str, *, whole_app: bool) -> ProxyState:
    if "openai_proxy" in app.extensions:
        raise RuntimeError("OpenAIProxy is already installed on this app")
    _configure_logging()
    # Before anything is made: a bad file stops here. Under gunicorn, the master's copy of the last good one.
    prices = load_prices(config.prices_snapshot or config.prices_file)
    try:
        clients, client_keys = load_clients(
            config.clients_snapshot or config.clients_file,
            config.security_key,
            config.upstream_keys,
            config.openai_api_key,
        )
    except ClientsFileError as exc:
        raise ConfigError(str(exc)) from None
    _register_secrets(app, config, client_keys)

    runtime_dir = open_runtime_dir(config.runtime_dir)
    gate = open_gate(config, runtime_dir)
    log_store = open_log_store(config)
    st = app.extensions["openai_proxy"] = ProxyState(
        config=config,
        upstream=Upstream(config, open_key_pool(clients.upstream_keys, runtime_dir)),
        gate=gate,
        completion_log=CompletionLog(prices=prices, host=config.host_name),
        runtime_dir=runtime_dir,
        log_store=log_store,
        metrics=Metrics(runtime_dir, gate, prices),
        clients=clients,
        limits=open_limit_store(config),
        objects=open_object_book(log_store),
        url_prefix=prefix,
        prices=prices,
    )
    if config.tracing:
        # Imported only now: with tracing off no OpenTelemetry module is loaded at all.
        from openai_proxy.observe.tracing import Tracing

        st.tracing = Tracing(config)
    # Observability hangs off the existing hooks: finished requests, retries, new parallel peaks.
    st.completion_log.sinks += [st.log_store.append, st.metrics.observe, functools.partial(charge, st)]
    st.upstream.retry_sinks.append(st.log_store.append_retry)
    if st.upstream.pool is not None:
        st.metrics.add_collector(KeyPoolCollector(st.upstream.pool))
    gate.on_new_peak = st.log_store.note_peak
    st.log_store.on_drop = st.metrics.log_record_dropped
    st.log_store.on_reject = st.metrics.log_records_rejected

    from openai_proxy.pages.ratelimit import init_limiter
    from openai_proxy.routes import proxy_blueprint

    converter = app.url_map.converters.setdefault("rid", ResponseIdConverter)
    if converter is not ResponseIdConverter:
        raise RuntimeError("the app already has a URL converter named 'rid'; the proxy's routes need theirs")
    # The whole app's own hooks and handlers serve every path (404s included); mounted, the proxy's
    # blueprint carries them, and the host's answers stay the host's.
    root = proxy_blueprint(prefix)
    target: Flask | Blueprint = app if whole_app else root
    _register_request_ids(target, None if whole_app else config.max_body_bytes)
    errors.register(target, errors.LEGACY)
    # Registered after our hooks so flask-cors runs first (after_request runs in reverse) and ours
    # then pins the contract's exact method/header lists on every response, not only preflights.
    cors = {
        "origins": "*",
        "send_wildcard": True,
        "expose_headers": CORS_EXPOSE_HEADERS,
        "methods": CORS_METHODS.split(", "),
    }
    CORS(target, **cors)
    _register_fixed_cors(target, cors)
    _register_record_hooks(root.api, st, prefix)
    st.limiter = init_limiter(app, config, root)
    app.register_blueprint(root, url_prefix=prefix or None)
    return st


def configured_secrets(config: Config) -> dict[str, str]:
    """The configured secrets by where they come from (keys, tokens, passwords inside URLs)."""
    found = {
        "OPENAI_API_KEY": config.openai_api_key,
        "SECURITY_KEY": config.security_key,
        "ACCESS_TOKEN": config.access_token,
        "OPENAI_PROXY_SAFETY_SECRET": config.safety_secret,
    }
    for name, url in (
        ("the outbound proxy URL", config.outbound_proxy),
        ("OPENAI_PROXY_RATELIMIT_STORAGE_URI", config.ratelimit_storage_uri),
        ("OPENAI_PROXY_LIMITS_URI", config.limits_uri),
        ("OPENAI_PROXY_GATE_URI", config.gate_uri),
    ):
        password = urlsplit(url).password if url and "@" in url else None
        found[f"the password in {name}"] = unquote(password) if password else None
    for i, password in enumerate(logurl.secrets(config.log_db)):
        found[f"password {i + 1} in OPENAI_PROXY_LOG_DB"] = password
    otel = dict(config.otel)
    for name in OTEL_HEADER_VARS:
        # `name=value,...`, values percent-encoded: an exporter's API key, typically.
        for i, item in enumerate((otel.get(name) or "").split(",")):
            found[f"header {i + 1} in {name}"] = unquote(item.partition("=")[2].strip())
    for name in OTEL_ENDPOINT_VARS:
        url = otel.get(name) or ""
        password = urlsplit(url).password if "@" in url else None
        found[f"the password in {name}"] = unquote(password) if password else None
    for spec in config.upstream_keys:
        found[f"the upstream key {spec.name}"] = spec.key
    return {name: value for name, value in found.items() if value}


def _register_secrets(app: Flask, config: Config, client_keys: list[str]) -> None:
    """Mask the configured secrets by value wherever they would leave the process, while `app` lives
    (a test may build several apps in one process; the log handlers are shared)."""
    secrets = configured_secrets(config)
    for name, value in secrets.items():
        if len(value) < WHOLE_WORD_BELOW:
            log.warning(
                "CONFIG WARNING: %s is only %d characters long; it is masked in logs, pages and error "
                "messages only where it stands alone, not inside longer words. Use a long random value.",
                name,
                len(value),
            )
    group = ("config", id(app))
    SECRETS.replace(group, [*secrets.values(), *client_keys])
    weakref.finalize(app, SECRETS.replace, group, ())


class RedactingFormatter(logging.Formatter):
    """Log lines (tracebacks included) pass through redaction before they leave the process: known
    secret values (`openai_proxy.redact.SECRETS`, and the current request's own key) and secret shapes."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


def _configure_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    # One line per upstream call is the completion record's job; the SDK's own retry notice is
    # replaced by ours, which carries the request id.
    for name in ("httpx2", "httpcore2", "openai"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _register_request_ids(target: Flask | Blueprint, body_limit: int | None) -> None:
    """Request ids on every answer, preflights, and the contract's exact CORS lists."""

    @target.before_request
    def start_request() -> Response | None:
        req, ctx = request._get_current_object(), g._get_current_object()  # type: ignore[attr-defined]
        ctx.request_id = new_request_id()
        incoming = req.headers.get("X-Request-Id")
        ctx.incoming_request_id = incoming[:MAX_INCOMING_ID] if incoming else None
        if body_limit is not None:
            req.max_content_length = body_limit  # mounted: the host's app-wide limit is not ours to set
        if req.method == "OPTIONS":
            return Response(status=200)
        return None

    @target.after_request
    def finish_request(response: Response) -> Response:
        ctx = g._get_current_object()  # type: ignore[attr-defined]
        headers = response.headers
        headers.add("X-Proxy-Request-Id", getattr(ctx, "request_id", None) or new_request_id())
        incoming = getattr(ctx, "incoming_request_id", None)
        if incoming:
            headers.add("X-Incoming-Request-Id", incoming)
        headers["Access-Control-Allow-Methods"] = CORS_METHODS
        headers["Access-Control-Allow-Headers"] = CORS_ALLOW_HEADERS
        return response


def _register_fixed_cors(target: Flask | Blueprint, options: dict[str, Any]) -> None:
    """The CORS headers of every answer but a preflight, as flask-cors computes them, computed once.

    With every origin allowed and the wildcard sent, flask-cors gives every request that is not a
    preflight (and asks nothing of private networks) the same two headers, yet works them out anew
    each time (its resource patterns, the origin rules, two multidicts: ~4 % of a relayed call's
    CPU). This hook runs just before flask-cors's (after_request hooks run in reverse) and adds
    them; flask-cors then sees its header in place and stops. Preflights, and answers that already
    carry CORS headers (errors, which flask-cors handles as they are raised), are left to it.
    """
    fixed = list(get_cors_headers(get_cors_options(target, options), Headers(), "GET").items())

    @target.after_request
    def add_fixed_cors(response: Response) -> Response:
        req = request._get_current_object()  # type: ignore[attr-defined]
        if req.method == "OPTIONS" or _PRIVATE_NETWORK in req.headers:
            return response
        headers = response.headers
        if _ALLOW_ORIGIN in headers:
            return response
        for name, value in fixed:
            headers.add(name, value)
        return response


def _register_record_hooks(api: Blueprint, state: ProxyState, prefix: str) -> None:
    """Every API request gets a completion record (the parent `api` blueprint carries it)."""
    endpoints: dict[str, str] = {}  # route rule -> the template shown in records and metrics

    # These run on every API request; they look the request and `g` up once (each proxy access
    # costs a context lookup) and cache the per-route endpoint name.
    @api.before_request
    def start_record() -> None:
        req, ctx = request._get_current_object(), g._get_current_object()  # type: ignore[attr-defined]
        rule = req.url_rule
        if rule is None or req.method == "OPTIONS":
            return
        endpoint = endpoints.get(rule.rule)
        if endpoint is None:
            # Records name the route as the contract does (`/openai`), whatever the mount prefix.
            endpoint = endpoints[rule.rule] = _CONVERTER.sub(r"<\1>", rule.rule.removeprefix(prefix))
        rec = ctx.record = RequestRecord(
            endpoint=endpoint,
            method=req.method,
            request_id=ctx.request_id,
            incoming_request_id=ctx.incoming_request_id,
        )
        tracing = state.tracing
        if tracing is not None:
            rec.trace = tracing.start_request(rec, req.environ, prefix + endpoint)
        state.metrics.request_started()

    @api.after_request
    def finish_record(response: Response) -> Response:
        ctx = g._get_current_object()  # type: ignore[attr-defined]
        rec: RequestRecord | None = getattr(ctx, "record", None)
        if rec is None:
            return response
        headers = response.headers
        rec.response_started = time.perf_counter()
        headers.add("Server-Timing", rec.server_timing())
        if rec.status is None:
            rec.status = response.status_code
        if rec.result is None and response.status_code < 400:
            rec.result = "ok"
        response.call_on_close(lambda: state.completion_log.emit(rec))
        limit_headers = getattr(ctx, "ratelimit_headers", None)
        if limit_headers:
            # On /v1 they replace upstream's, which describe the organisation's limits, not this
            # client's. One pass over the headers finds those (set() would scan them once per name).
            present = set(headers.keys(lower=True))
            for name, value in limit_headers:
                if name.lower() in present:
                    headers.set(name, value)
                else:
                    headers.add(name, value)
        return response
