"""The shared request pipeline of the API routes.

parse (size-limited) -> authenticate -> (route validates and builds its call) -> take a gate slot ->
call upstream -> shape the answer. Routes compose these pieces; nothing here knows a route.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx2
from flask import Response, g, request
from werkzeug.datastructures import FileStorage, MultiDict

from app import jsonio
from app.auth import provided_security_key, require_security_key
from app.context import RequestRecord, TimeoutDecision
from app.disconnect import cancel_current_greenlet
from app.errors import BadRequest, Overloaded, PayloadTooLarge, ProxyError, UpstreamBadResponse, classify
from app.gate import SlotGuard
from app.multipart import Spool, read_limited_form
from app.relay import Relay, as_source
from app.sse import EventRelay
from app.state import state
from app.upstream import JSON_HEADERS, READ_MARGIN_S, Credentials
from app.usage import usage_of

T = TypeVar("T")

# Never forwarded upstream, whatever the route.
CONTROL_FIELDS = ("security_key", "openai_api_key", "project", "organization", "timeout")
OVERRIDE_FIELDS = ("openai_api_key", "project", "organization")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class ApiRequest:
    """A parsed, authenticated API request: what to forward, as whom, and how long to wait."""

    body: dict[str, Any]
    credentials: Credentials
    timeout: TimeoutDecision
    record: RequestRecord


def record() -> RequestRecord:
    """The completion record of the current API request."""
    return g.record


def decide_timeout(raw: Any, default_ms: int, max_ms: int) -> TimeoutDecision:
    """README "Timeouts": absent -> default; not a number, or < 1 -> default (invalid); above max -> max."""
    if raw is None or (isinstance(raw, str) and raw.strip() == ""):
        return TimeoutDecision(float(default_ms), "default")
    value: float | None
    if isinstance(raw, bool):
        value = None
    elif isinstance(raw, int | float):
        value = float(raw)
    else:
        try:
            value = float(str(raw).strip())
        except ValueError:
            value = None
    if value is None or not math.isfinite(value) or value < 1:
        return TimeoutDecision(float(default_ms), "invalid")
    if value > max_ms:
        return TimeoutDecision(float(max_ms), "clamped")
    return TimeoutDecision(value, "provided")


def read_limited_body(limit: int) -> bytes:
    """The whole request body, or 413: before reading when Content-Length says so, else while reading."""
    g.body_limit = limit
    # One byte of slack tells a body exactly at the limit from one that goes on past it: werkzeug
    # stops a chunked body at the limit without saying whether more was coming.
    request.max_content_length = limit + 1
    raw = request.get_data(cache=False)
    if len(raw) > limit:
        raise PayloadTooLarge(f"Request body exceeds the {limit}-byte limit")
    return raw


def read_json_body(*, allow_empty: bool = False) -> dict[str, Any]:
    """The request body as a JSON object, whatever Content-Type says; 413 before reading if too big."""
    raw = read_limited_body(state().config.max_body_bytes)
    if not raw.strip():
        if allow_empty:
            return {}
        raise BadRequest("Request body is empty; expected a JSON object")
    try:
        body = jsonio.loads(raw)
    except jsonio.JSONDecodeError as exc:
        raise BadRequest(f"Invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("Request body must be a JSON object")
    return body


def _override(sources: tuple[Mapping[str, Any], ...], name: str) -> str | None:
    for source in sources:
        value = source.get(name)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise BadRequest(f"{name} must be a string")
        return value
    return None


def authorize(*sources: Mapping[str, Any]) -> Credentials:
    """Check the security key and resolve the per-request upstream credentials."""
    st = state()
    require_security_key(st.config.security_key, provided_security_key(request.headers, *sources))
    return st.upstream.credentials(*(_override(sources, name) for name in OVERRIDE_FIELDS))


def _timeout_from(*sources: Mapping[str, Any]) -> TimeoutDecision:
    config = state().config
    raw = next((s.get("timeout") for s in sources if s.get("timeout") is not None), None)
    decision = decide_timeout(raw, config.upstream_timeout_ms, config.effective_max_timeout_ms)
    record().timeout = decision
    return decision


def json_request(*, allow_empty: bool = False, strip: tuple[str, ...] = ()) -> ApiRequest:
    """A JSON-body request: parsed, authenticated, control fields taken out of the forwarded body."""
    body = read_json_body(allow_empty=allow_empty)
    query = request.args
    credentials = authorize(body, query)
    timeout = _timeout_from(body, query)
    for name in (*CONTROL_FIELDS, *strip):
        body.pop(name, None)
    return ApiRequest(body=body, credentials=credentials, timeout=timeout, record=record())


def query_request() -> ApiRequest:
    """A GET/DELETE request: key, overrides and timeout from the query string (or headers)."""
    query = request.args
    credentials = authorize(query)
    timeout = _timeout_from(query)
    return ApiRequest(body={}, credentials=credentials, timeout=timeout, record=record())


@dataclass
class FormRequest(ApiRequest):
    """A multipart API request: `body` is a MultiDict of its text fields, `files` its file parts.

    The spooled files stay open until `close()`, or the end of a `with` block.
    """

    files: MultiDict[str, FileStorage]
    spool: Spool

    def close(self) -> None:
        self.spool.close()

    def __enter__(self) -> FormRequest:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def form_request(limit: int) -> FormRequest:
    """A multipart request: parsed (files on disk, `limit` bytes each at most), authenticated, control
    fields taken out. Use it in a `with` block so the files are closed when the call is done."""
    fields, files, spool = read_limited_form(limit)
    query = request.args
    try:
        credentials = authorize(fields, query)
        timeout = _timeout_from(fields, query)
    except ProxyError:
        spool.close()
        raise
    for name in CONTROL_FIELDS:
        fields.pop(name, None)
    return FormRequest(
        body=fields, credentials=credentials, timeout=timeout, record=record(), files=files, spool=spool
    )


def take_slot() -> SlotGuard:
    """A gate slot for one upstream call, or 503 + Retry-After: 1 right away (never queues)."""
    gate = state().gate
    slot = gate.try_acquire()
    if slot is None:
        record().overloaded = True
        raise Overloaded()
    return SlotGuard(gate, slot)


def _note_model(rec: RequestRecord, forwarded: Mapping[str, Any] | None) -> None:
    """The model the client asked for (JSON body or form fields), for the completion record."""
    model = forwarded.get("model") if isinstance(forwarded, Mapping) else None
    if isinstance(model, str):
        rec.model = model


def _json_args(json: dict[str, Any] | None) -> dict[str, Any]:
    return {} if json is None else {"content": jsonio.dumps(json), "headers": JSON_HEADERS}


def watched(call: Callable[[], T]) -> T:
    """Run an upstream call; a client that leaves meanwhile cancels it (ClientCancelled, 499), and
    every failure comes out as a ProxyError."""
    watch = cancel_current_greenlet(request.environ)
    try:
        return call()
    except Exception as exc:
        raise classify(exc) from exc
    finally:
        watch.stop()


def _send_watched(method: str, path: str, req: ApiRequest, **send_args: Any) -> httpx2.Response:
    upstream = state().upstream
    return watched(
        lambda: upstream.send(
            method, path, record=req.record, credentials=req.credentials, timeout=req.timeout, **send_args
        )
    )


def call_upstream(
    method: str,
    path: str,
    req: ApiRequest,
    *,
    json: dict[str, Any] | None = None,
    **send_args: Any,
) -> httpx2.Response:
    """Take a slot, make the call, give the slot back; failures come out as ProxyErrors."""
    _note_model(req.record, json if json is not None else send_args.get("body"))
    send_args.update(_json_args(json))
    slot = take_slot()
    try:
        return _send_watched(method, path, req, **send_args)
    finally:
        slot.release()


def stream_upstream(
    method: str,
    path: str,
    req: ApiRequest,
    *,
    json: dict[str, Any] | None = None,
    **send_args: Any,
) -> Response:
    """Open an upstream event stream and answer with the SSE relay; failures before it starts are JSON.

    The gate slot is held until the relay is closed, i.e. for the whole stream.
    """
    req.record.stream = True
    _note_model(req.record, json)
    send_args.update(_json_args(json))
    slot = take_slot()
    try:
        response = _send_watched(method, path, req, stream=True, **send_args)
        _require_event_stream(response)
    except BaseException:
        slot.release()
        raise
    relay = EventRelay(as_source(response), **relay_args(req.record, slot))
    return relay_response(relay, 200, SSE_HEADERS, "text/event-stream")


def relay_args(rec: RequestRecord, slot: SlotGuard, *, stream: bool = True) -> dict[str, Any]:
    """What every relay needs: the record, the slot it will free, the client, and how long to wait."""
    config = state().config
    return {
        "record": rec,
        "slot": slot,
        "environ": request.environ,
        "idle_s": config.sse_keepalive_interval_ms / 1000.0 if stream else None,
        "max_silence_s": config.effective_max_timeout_ms / 1000.0 + READ_MARGIN_S,
    }


def relay_response(relay: Relay, status: int, headers: Any, content_type: str | None) -> Response:
    """A Flask response whose body is `relay`, passed through as the WSGI body itself (no per-chunk
    re-encoding layer); the relay then owns closing the response, so the record still goes out."""
    response = Response(
        relay, status=status, headers=headers, content_type=content_type, direct_passthrough=True
    )
    relay.on_close = response.close
    return response


def _require_event_stream(response: httpx2.Response) -> None:
    content_type = response.headers.get("content-type", "")
    if not content_type.startswith("text/event-stream"):
        response.close()
        raise UpstreamBadResponse(
            f"OpenAI answered {response.status_code} without an event stream ({content_type or 'no type'})"
        )


def upstream_json(response: httpx2.Response) -> Any:
    """Parse an upstream 2xx body; garbage becomes 502 upstream_bad_response."""
    try:
        return jsonio.loads(response.content)
    except jsonio.JSONDecodeError:
        raise UpstreamBadResponse(
            f"OpenAI answered {response.status_code} with a body that is not JSON"
        ) from None


def json_response(payload: bytes, status: int = 200) -> Response:
    return Response(payload, status=status, mimetype="application/json")


def relay_json(response: httpx2.Response, transform: Callable[[Any], Any] | None = None) -> Response:
    """Answer what upstream sent: its bytes as they are, unless `transform` must add to them."""
    data = upstream_json(response)
    record().usage = usage_of(data)
    if transform is None:
        return json_response(response.content, response.status_code)
    return json_response(jsonio.dumps(transform(data)), response.status_code)
