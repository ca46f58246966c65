"""`/v1/...`: the OpenAI-compatible surface for the official SDKs (`base_url=<proxy>/v1`).

Every path is relayed; the named ones only give the completion records and metrics a readable
endpoint instead of `/v1/<path>`.
"""

from __future__ import annotations

import contextlib
from typing import Any

from flask import Blueprint, Response

from app import api, jsonio, passthrough
from app.gate import SlotGuard
from app.passthrough import PassthroughRequest
from app.relay import Relay, as_source
from app.sse import PassthroughEventRelay
from app.state import state
from app.upstream import MAX_ERROR_BODY
from app.usage import usage_of

bp = Blueprint("v1", __name__, url_prefix="/v1")

METHODS = ["GET", "POST", "DELETE", "PUT", "PATCH"]
NAMED_ENDPOINTS = (
    "/chat/completions", "/responses", "/responses/compact", "/responses/input_tokens",
    "/responses/<response_id>", "/responses/<response_id>/input_items", "/responses/<response_id>/cancel",
    "/embeddings", "/audio/transcriptions", "/models", "/models/<model>",
)  # fmt: skip
# JSON answers up to this size are read whole (usage for the record); bigger ones stream through.
READ_WHOLE_MAX = 8 * 1024 * 1024
SSE_EXTRA_HEADERS = [("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")]


def relay_v1(**_route_args: Any) -> Response:
    req = passthrough.build_request()
    record = api.record()
    record.model, record.timeout = req.model, req.timeout
    slot = api.take_slot()
    try:
        upstream = api.watched(lambda: _send(req, record))
    except BaseException:
        slot.release()
        raise
    return _answer(upstream, req, record, slot)


for _rule in NAMED_ENDPOINTS:
    bp.add_url_rule(_rule, view_func=relay_v1, methods=METHODS, endpoint=f"relay{_rule}")
bp.add_url_rule("/<path:subpath>", view_func=relay_v1, methods=METHODS, endpoint="relay")


def _send(req: PassthroughRequest, record: Any) -> Any:
    return state().upstream.relay(
        req.method, req.path, req.query, req.headers, req.body,
        record=record, timeout=req.timeout, content_length=req.content_length,
    )  # fmt: skip


def _answer(upstream: Any, req: PassthroughRequest, record: Any, slot: SlotGuard) -> Response:
    """Shape upstream's answer: errors and small JSON read whole, streams and the rest relayed."""
    headers = passthrough.response_headers(upstream)
    content_type = upstream.headers.get("content-type") or ""
    length = upstream.headers.get("content-length")
    if upstream.status_code >= 400 or (
        content_type.startswith("application/json") and (length is None or int(length) <= READ_WHOLE_MAX)
    ):
        return _read_whole(upstream, record, slot, headers)
    if content_type.startswith("text/event-stream"):
        record.stream = True
        relay: Relay = PassthroughEventRelay(
            as_source(upstream),
            strip_usage_chunk=req.strip_usage_chunk,
            needs_end_marker=req.path == "/chat/completions" or req.path.startswith("/responses"),
            **api.relay_args(record, slot),
        )
        return api.relay_response(relay, upstream.status_code, headers + SSE_EXTRA_HEADERS, None)
    if length is not None:
        headers.append(("Content-Length", length))
    relay = Relay(as_source(upstream), **api.relay_args(record, slot, stream=False))
    return api.relay_response(relay, upstream.status_code, headers, None)


def _read_whole(upstream: Any, record: Any, slot: SlotGuard, headers: list[tuple[str, str]]) -> Response:
    try:
        body = api.watched(upstream.read)
    finally:
        upstream.close()
        slot.release()
    status = upstream.status_code
    if status >= 400:
        body, summary = passthrough.redacted_error_body(body[:MAX_ERROR_BODY])
        record.result = "upstream_api_error"
        record.error = {**summary, "upstream": {"status": status, "requestId": record.upstream_request_id}}
    elif body[:1] == b"{":
        with contextlib.suppress(jsonio.JSONDecodeError):
            record.usage = usage_of(jsonio.loads(body))
    return Response(body, status=status, headers=headers)
