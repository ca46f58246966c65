"""The outbound half of every API request: one way to call upstream, and the ways to answer with it.

`forward(call)` is the pipeline: take a gate slot (503 when none), send while watching the client
(a client that leaves cancels the call), classify failures, and on failure give the slot back. Its
result owns the upstream response and the slot until it is answered:
- `fetch(call)` reads the answer whole (capped) and releases; an error status becomes the
  UpstreamAPIError of the contract. `relay_json` answers upstream's JSON bytes as they are.
  `read_within` reads an answer whole only if it is small, and leaves a big one to be relayed.
- `stream_events(call)` relays an event stream; the relay releases when the stream really ends.
- `/v1` shapes the answer itself (`openai_proxy.routes.v1`), from the same `forward`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from flask import Response, request

from openai_proxy import jsonio
from openai_proxy.clients.admission import admit, note_models
from openai_proxy.errors import Overloaded, UpstreamBadResponse
from openai_proxy.gate import SlotGuard
from openai_proxy.inbound.disconnect import cancel_current_greenlet
from openai_proxy.objects.guard import claim
from openai_proxy.record import RequestRecord
from openai_proxy.state import state
from openai_proxy.stream.relay import Relay
from openai_proxy.stream.sse import EventRelay
from openai_proxy.upstream import JSON_HEADERS, READ_MARGIN_S, UpstreamCall, UpstreamResponse
from openai_proxy.upstream.classify import classify, upstream_api_error
from openai_proxy.upstream.client import MAX_ERROR_BODY, Headers
from openai_proxy.usage import estimate_json, note_answer

T = TypeVar("T")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def take_slot(record: RequestRecord) -> SlotGuard:
    """A gate slot for one upstream call, or 503 + Retry-After: 1 right away (never queues).

    The client's own model allowlist and limits are judged first (403 / 429, `openai_proxy.clients.admission`)."""
    admit(record)
    gate = state().gate
    slot = gate.try_acquire()
    if slot is None:
        record.overloaded = True
        raise Overloaded()
    return SlotGuard(gate, slot)


def watched(work: Callable[[], T]) -> T:
    """Run upstream work; a client that leaves meanwhile cancels it (ClientCancelled, 499), and every
    failure comes out as a ProxyError."""
    watch = cancel_current_greenlet(request.environ)
    try:
        return work()
    except Exception as exc:
        raise classify(exc) from exc
    finally:
        watch.stop()


@dataclass
class Forwarded:
    """An upstream response whose headers are in, and the slot it holds until it is answered."""

    response: UpstreamResponse
    slot: SlotGuard

    def release(self) -> None:
        self.response.close()
        self.slot.release()


def forward(call: UpstreamCall) -> Forwarded:
    """Take a slot and send the call (any status comes back); on failure the slot is given back.

    A call about a stored object of another client is refused first (`openai_proxy.objects.guard`)."""
    claim(call)
    slot = take_slot(call.record)
    try:
        response = watched(lambda: state().upstream.send(call))
    except BaseException:
        slot.release()
        raise
    return Forwarded(response, slot)


def read_whole(forwarded: Forwarded) -> bytes:
    """The whole body (capped); the response and the slot are released whatever happens."""
    try:
        return watched(lambda: _read_capped(forwarded.response))
    finally:
        forwarded.release()


def read_within(forwarded: Forwarded, limit: int) -> bytes | None:
    """The whole body if it ends within `limit` bytes (the response and the slot are then released),
    else None: the response keeps what was read for whoever relays it. Released on failure."""
    try:
        body = watched(lambda: forwarded.response.read_within(limit))
    except BaseException:
        forwarded.release()
        raise
    if body is not None:
        forwarded.release()
    return body


def _read_capped(response: UpstreamResponse) -> bytes:
    """An error answer is read up to MAX_ERROR_BODY, others up to the configured limit."""
    limit = MAX_ERROR_BODY if response.status_code >= 400 else state().config.max_response_bytes
    return response.read_body(limit)


@dataclass
class Fetched:
    """An upstream 2xx answer, read whole."""

    status: int
    headers: Headers
    body: bytes

    def json(self) -> Any:
        """The body as JSON; garbage is 502 upstream_bad_response."""
        try:
            return jsonio.loads(self.body)
        except jsonio.JSONDecodeError:
            raise UpstreamBadResponse(f"OpenAI answered {self.status} with a body that is not JSON") from None


def fetch(call: UpstreamCall) -> Fetched:
    """Call upstream and read its answer whole; an error status raises UpstreamAPIError.

    Sending and reading are one watched piece of work (one client watch, not two)."""
    claim(call)
    slot = take_slot(call.record)
    upstream = state().upstream

    def send_and_read() -> tuple[UpstreamResponse, bytes]:
        response = upstream.send(call)
        try:
            return response, _read_capped(response)
        finally:
            response.close()

    try:
        response, body = watched(send_and_read)
    finally:
        slot.release()
    call.record.upstream_done_at = time.perf_counter()
    if response.status_code >= 400:
        raise upstream_api_error(response.status_code, response.headers, body)
    return Fetched(response.status_code, response.headers, body)


def json_call(method: str, path: str, req: Any, *, json: dict[str, Any] | None = None, **fields: Any):
    """An UpstreamCall for a parsed API request (`openai_proxy.inbound.web.ApiRequest`), with an optional JSON body."""
    forwarded_fields = json if json is not None else fields.get("form")
    if isinstance(forwarded_fields, Mapping):
        note_models(req.record, forwarded_fields)  # what goes upstream is what the allowlist judges
    if json is not None:
        body = jsonio.dumps(json)
        req.record.estimate = estimate_json(len(body), json)
        fields.update(body=body, headers=[*JSON_HEADERS, *fields.get("headers", ())])
    return UpstreamCall(
        method, path, record=req.record, timeout=req.timeout, credentials=req.credentials, **fields
    )


def json_response(payload: bytes, status: int = 200) -> Response:
    return Response(payload, status=status, mimetype="application/json")


def relay_json(call: UpstreamCall, transform: Callable[[Any], Any] | None = None) -> Response:
    """Answer what upstream sent: its bytes as they are, unless `transform` must add to them."""
    fetched = fetch(call)
    data = fetched.json()
    note_answer(call.record, data)
    if call.record.object_watch is not None:
        call.record.object_watch(data)  # a new object's owner is recorded before the client sees its id
    if transform is None:
        return json_response(fetched.body, fetched.status)
    return json_response(jsonio.dumps(transform(data)), fetched.status)


def stream_events(call: UpstreamCall) -> Response:
    """Open an upstream event stream and answer with the SSE relay; failures before it starts are JSON.

    The gate slot is held until the relay is closed, i.e. for the whole stream.
    """
    call.record.stream = True
    forwarded = forward(call)
    response = forwarded.response
    try:
        if response.status_code >= 400:
            body = read_whole(forwarded)
            raise upstream_api_error(response.status_code, response.headers, body)
        content_type = response.headers.get("content-type") or ""
        if not content_type.startswith("text/event-stream"):
            raise UpstreamBadResponse(
                f"OpenAI answered {response.status_code} without an event stream ({content_type or 'no type'})"
            )
    except BaseException:
        forwarded.release()
        raise
    relay = EventRelay(forwarded.response, **relay_args(call.record, forwarded.slot))
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
        "max_event_bytes": config.max_sse_event_bytes,
    }


def relay_response(relay: Relay, status: int, headers: Any, content_type: str | None) -> Response:
    """A Flask response whose body is `relay`, passed through as the WSGI body itself (no per-chunk
    re-encoding layer); the relay then owns closing the response, so the record still goes out."""
    response = Response(
        relay, status=status, headers=headers, content_type=content_type, direct_passthrough=True
    )
    relay.on_close = response.close
    return response
