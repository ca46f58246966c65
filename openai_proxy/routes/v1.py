"""`/v1/...`: the OpenAI-compatible surface for the official SDKs (`base_url=<proxy>/v1`).

Every path is relayed; the named ones only give the completion records and metrics a readable
endpoint instead of `/v1/<path>`. Errors here are in OpenAI's own shape.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

from flask import Blueprint, Response

from openai_proxy import errors, jsonio, pipeline
from openai_proxy.inbound import web
from openai_proxy.pipeline import Forwarded
from openai_proxy.routes import passthrough
from openai_proxy.routes.passthrough import PassthroughRequest
from openai_proxy.stream.relay import Relay
from openai_proxy.stream.sse import PassthroughEventRelay
from openai_proxy.usage import HEAD_BYTES, note_answer, summary_of_big

bp = Blueprint("v1", __name__, url_prefix="/v1")
errors.register(bp, errors.OPENAI)

METHODS = ["GET", "POST", "DELETE", "PUT", "PATCH"]
NAMED_ENDPOINTS = (
    "/chat/completions", "/responses", "/responses/compact", "/responses/input_tokens",
    "/responses/<response_id>", "/responses/<response_id>/input_items", "/responses/<response_id>/cancel",
    "/embeddings", "/audio/transcriptions", "/models", "/models/<model>",
)  # fmt: skip
FREE_ENDPOINTS = frozenset({"/responses/input_tokens"})
# JSON answers up to this are read whole (usage for the record); bigger ones, of a known size or
# not, are relayed as they arrive (usage then comes from their last TAIL_BYTES), so memory per call
# stays bounded whatever upstream sends.
READ_WHOLE_MAX = 1024 * 1024
TAIL_BYTES = 64 * 1024
SSE_EXTRA_HEADERS = [("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")]
# The `id` OpenAI puts first in an object, read from a big answer's first bytes.
LEADING_ID = re.compile(rb'\s*\{\s*"id"\s*:\s*"([^"\\]{1,256})"')


def relay_v1(**_route_args: Any) -> Response:
    req = passthrough.build_request()  # the whole body is in before the slot is taken
    record = web.record()
    record.model, record.timeout = req.model, req.timeout
    # A GET reads what an earlier request made and paid for (`note_answer` knows the exception);
    # counting input tokens runs no model.
    record.billable = req.method != "GET" and req.path not in FREE_ENDPOINTS
    try:
        forwarded = pipeline.forward(req.call(record))
    finally:
        req.close()  # the body is all upstream once its answer's headers are in
    try:
        return _answer(forwarded, req, record)
    except BaseException:
        forwarded.release()
        raise


for _rule in NAMED_ENDPOINTS:
    bp.add_url_rule(_rule, view_func=relay_v1, methods=METHODS, endpoint=f"relay{_rule}")
bp.add_url_rule("/<path:subpath>", view_func=relay_v1, methods=METHODS, endpoint="relay")


def _answer(forwarded: Forwarded, req: PassthroughRequest, record: Any) -> Response:
    """Shape upstream's answer: errors and small JSON read whole, streams and the rest relayed."""
    upstream = forwarded.response
    headers = passthrough.response_headers(upstream)
    content_type = upstream.headers.get("content-type") or ""
    length = upstream.headers.get("content-length")
    size = int(length) if length is not None and length.isdigit() else None
    if upstream.status_code >= 400:
        return _whole_answer(pipeline.read_whole(forwarded), forwarded, record, headers)
    if content_type.startswith("application/json") and (size is None or size <= READ_WHOLE_MAX):
        # Without a length, only reading tells a small answer from a big one (which is then relayed).
        body = pipeline.read_within(forwarded, READ_WHOLE_MAX)
        if body is not None:
            return _whole_answer(body, forwarded, record, headers)
    if content_type.startswith("text/event-stream"):
        record.stream = True
        relay: Relay = PassthroughEventRelay(
            upstream,
            strip_usage_chunk=req.strip_usage_chunk,
            needs_end_marker=req.path == "/chat/completions" or req.path.startswith("/responses"),
            **pipeline.relay_args(record, forwarded.slot),
        )
        return pipeline.relay_response(relay, upstream.status_code, headers + SSE_EXTRA_HEADERS, None)
    if size is not None:
        headers.append(("Content-Length", str(size)))
    kind = JsonTailRelay if content_type.startswith("application/json") else Relay
    relay = kind(upstream, **pipeline.relay_args(record, forwarded.slot, stream=False))
    return pipeline.relay_response(relay, upstream.status_code, headers, None)


class JsonTailRelay(Relay):
    """A JSON answer too big to read whole, relayed as it arrives; only its first and last bytes are
    kept, and its usage and model are read from them (`openai_proxy.usage.summary_of_big`), so it is
    priced like any other answer, or has no usage if none is found there (never a wrong one)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head = b""
        self._tail = b""

    def on_data(self, chunk: bytes) -> bytes:
        if len(self._head) < HEAD_BYTES:
            self._head += chunk[: HEAD_BYTES - len(self._head)]
            watch = self._record.object_watch
            if watch is not None and watch.waiting and (found := LEADING_ID.match(self._head)):
                watch({"id": found.group(1).decode("utf-8", "replace")})
        keep = TAIL_BYTES - len(chunk)
        self._tail = (self._tail[-keep:] if keep > 0 else b"") + chunk[-TAIL_BYTES:]
        return chunk

    def on_end(self) -> None:
        note_answer(self._record, summary_of_big(self._head, self._tail))


def _whole_answer(body: bytes, forwarded: Forwarded, record: Any, headers: list[tuple[str, str]]) -> Response:
    status = forwarded.response.status_code
    if status >= 400:
        body, summary = passthrough.redacted_error_body(body)
        record.fail(
            "upstream_api_error",
            **summary,
            upstream={"status": status, "requestId": record.upstream_request_id},
        )
    elif body[:1] == b"{":
        with contextlib.suppress(jsonio.JSONDecodeError):
            data = jsonio.loads(body)
            note_answer(record, data)
            if record.object_watch is not None:
                record.object_watch(data)  # a new object's owner, recorded before the client sees its id
    return Response(body, status=status, headers=headers)
