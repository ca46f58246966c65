"""Errors: the ProxyError tree and the two JSON shapes.

    ProxyError (500 internal_error)
    ├── BadRequest 400 · Unauthorized 401 · Forbidden 403 · NotFound 404 (ObjectNotFound) · RequestTimeout 408
    ├── PayloadTooLarge 413 · RateLimited 429 · ClientLimited 429 · Overloaded 503 (+ Retry-After)
    ├── KeysResting 429 (+ Retry-After) · NoUpstreamKey 503: the key pool has no key for the call
    ├── ObjectsUnavailable 503: who owns a stored object cannot be told now
    ├── ClientCancelled 499 (nothing is sent)
    ├── UpstreamAPIError (upstream's status) · UpstreamBadResponse 502 · UpstreamTransport 502
    ├── UpstreamTimeout 504
    └── Internal 500

`openai_proxy.upstream.classify` turns any exception of an upstream call into one of these. `render` answers
one in either shape: the legacy routes' `{"error": {message, type, code, requestId, ...}}`, or
OpenAI's own `{"error": {message, type, param, code}}` on `/v1`, so the SDKs raise the right class.
`register` installs the handlers, on the app (legacy shape) or on a blueprint (its own shape).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from flask import Blueprint, Flask, Response, g, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from openai_proxy import jsonio
from openai_proxy.record import RequestRecord, new_request_id

log = logging.getLogger("openai_proxy")

LEGACY = "legacy"
OPENAI = "openai"


class ProxyError(Exception):
    """An error the proxy answers with; `status`, `type` and `code` follow the error table in README.md."""

    status = 500
    type = "internal_error"
    code = "OPENAI_PROXY_INTERNAL"
    result = "internal_error"
    # The `type` and `code` in OpenAI's shape, where OpenAI has its own words for the case.
    openai_type: str | None = None
    openai_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        upstream: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.headers = headers or {}
        self.upstream = upstream

    def body(self, request_id: str, incoming_request_id: str | None = None) -> dict[str, Any]:
        """The legacy-route JSON error body."""
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.type,
            "code": self.code,
            "requestId": request_id,
        }
        if incoming_request_id:
            error["incomingRequestId"] = incoming_request_id
        if self.upstream:
            error["upstream"] = self.upstream
        return {"error": error}

    def note_on(self, record: RequestRecord) -> None:
        """Settle `record` with this error: its result, and its error as the legacy body has it."""
        record.fail(self.result, self.message, self.type, self.code, upstream=self.upstream or None)

    def openai_body(self, request_id: str) -> dict[str, Any]:
        """The same error in OpenAI's own shape, for the `/v1` surface (the SDKs parse this one)."""
        return {
            "error": {
                "message": f"{self.message} (proxy request id {request_id})",
                "type": self.openai_type or self.type,
                "param": None,
                "code": self.openai_code or self.code,
            }
        }


class BadRequest(ProxyError):
    status, type, code, result = 400, "validation_error", "OPENAI_PROXY_BAD_REQUEST", "validation_error"
    openai_type = "invalid_request_error"


class Unauthorized(ProxyError):
    status, type, code, result = 401, "invalid_request_error", "OPENAI_PROXY_UNAUTHORIZED", "forbidden"


class Forbidden(ProxyError):
    status, type, code, result = 403, "forbidden", "OPENAI_PROXY_FORBIDDEN", "forbidden"


class UnpricedModel(Forbidden):
    """A client with a budget asked for a model the price table cannot price: its cost could not be
    counted, so the budget could not hold (contract §14)."""

    code = "OPENAI_PROXY_UNPRICED_MODEL"
    openai_type, openai_code = "invalid_request_error", "model_not_priced"


class NotFound(ProxyError):
    status, type, code, result = 404, "not_found", "OPENAI_PROXY_NOT_FOUND", "not_found"


class ObjectNotFound(NotFound):
    """A stored object that is not the client's (`openai_proxy.objects`): upstream is not called."""

    openai_type = "invalid_request_error"  # what OpenAI says for an id it does not know


class ObjectsUnavailable(ProxyError):
    """The proxy cannot tell who owns a stored object (its database does not answer): closed, 503."""

    status, type, code, result = (
        503,
        "objects_unavailable",
        "OPENAI_PROXY_OBJECTS_UNAVAILABLE",
        "objects_unavailable",
    )

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class RequestTimeout(ProxyError):
    """The client stopped sending its body for longer than OPENAI_PROXY_UPLOAD_IDLE_TIMEOUT_S."""

    status, type, code, result = 408, "request_timeout", "OPENAI_PROXY_REQUEST_TIMEOUT", "request_timeout"
    openai_type = "invalid_request_error"


class PayloadTooLarge(ProxyError):
    status, type, code, result = (
        413,
        "payload_too_large",
        "OPENAI_PROXY_PAYLOAD_TOO_LARGE",
        "payload_too_large",
    )


class RateLimited(ProxyError):
    status, type, code, result = 429, "rate_limited", "OPENAI_PROXY_RATE_LIMITED", "rate_limited"


class ClientLimited(ProxyError):
    """A named client is past one of its own limits (rpm, tpm, a USD budget): OpenAI's words on /v1."""

    status, type, code, result = 429, "rate_limited", "OPENAI_PROXY_CLIENT_LIMIT", "client_limited"
    _OPENAI = {
        "requests": ("requests", "rate_limit_exceeded"),
        "tokens": ("tokens", "rate_limit_exceeded"),
        "daily_usd": ("insufficient_quota", "insufficient_quota"),
        "monthly_usd": ("insufficient_quota", "insufficient_quota"),
    }

    def __init__(self, limit: str, message: str, headers: dict[str, str]) -> None:
        super().__init__(message, headers=headers)
        self.limit = limit
        self.openai_type, self.openai_code = self._OPENAI[limit]


class KeysResting(RateLimited):
    """Every upstream key the call may use rests after a 429: upstream is not called."""

    code = "OPENAI_PROXY_UPSTREAM_KEYS_RESTING"
    openai_type, openai_code = "requests", "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))})


class NoUpstreamKey(ProxyError):
    """No upstream key may take the call until an operator acts (all revoked, or none serves it):
    503, since the proxy cannot serve it now, rather than 502, which would blame an answer of OpenAI."""

    status, type, code, result = (
        503,
        "upstream_keys_unavailable",
        "OPENAI_PROXY_NO_UPSTREAM_KEY",
        "no_upstream_key",
    )


class UpstreamAPIError(ProxyError):
    type, code, result = "upstream_api_error", "OPENAI_PROXY_UPSTREAM_API_ERROR", "upstream_api_error"


class UpstreamBadResponse(ProxyError):
    status, type, code, result = (
        502,
        "upstream_bad_response",
        "OPENAI_PROXY_UPSTREAM_BAD_RESPONSE",
        "upstream_bad_response",
    )


class UpstreamTransport(ProxyError):
    status, type, code, result = 502, "upstream_transport", "OPENAI_PROXY_TRANSPORT", "upstream_transport"


class UpstreamTimeout(ProxyError):
    status, type, code, result = 504, "upstream_timeout", "OPENAI_PROXY_TIMEOUT", "upstream_timeout"


class Overloaded(ProxyError):
    status, type, code, result = 503, "proxy_overloaded", "OPENAI_PROXY_OVERLOADED", "overloaded"

    def __init__(self, message: str = "Too many parallel requests; retry shortly") -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class ClientCancelled(ProxyError):
    """The client went away; nothing is sent, the record says 499."""

    status, type, code, result = 499, "client_cancelled", "OPENAI_PROXY_CLIENT_CANCELLED", "client_cancelled"


class Internal(ProxyError):
    pass


def render(err: ProxyError, shape: str = LEGACY) -> Response:
    """The JSON error answer in `shape`; also settles the request's completion record."""
    rec: RequestRecord | None = g.get("record")
    request_id = g.get("request_id") or new_request_id()
    incoming = rec.incoming_request_id if rec else g.get("incoming_request_id")
    legacy = err.body(request_id, incoming)
    body = err.openai_body(request_id) if shape == OPENAI else legacy
    if rec is not None:
        rec.status = err.status
        rec.cancelled = rec.cancelled or isinstance(err, ClientCancelled)
        err.note_on(rec)
    response = Response(jsonio.dumps(body), status=err.status, mimetype="application/json")
    for name, value in err.headers.items():
        response.headers[name] = value
    return response


def from_http_exception(err: HTTPException) -> ProxyError:
    """werkzeug's own errors (routing, body limits) as ProxyErrors."""
    if isinstance(err, RequestEntityTooLarge):
        limit = g.get("body_limit") or request.max_content_length
        return PayloadTooLarge(f"Request body exceeds the {limit}-byte limit")
    if err.code in (404, 405):
        return NotFound("Not Found")
    if err.code == 400:
        return BadRequest(err.description or "Bad request")
    return ProxyError(err.description or err.name, status=err.code)


def register(target: Flask | Blueprint, shape: str = LEGACY) -> None:
    """Answer every error raised under `target` in `shape` (a blueprint's handlers win for its views)."""

    def on_proxy_error(err: ProxyError) -> Response:
        return render(err, shape)

    def on_http_error(err: HTTPException) -> Response:
        return render(from_http_exception(err), shape)

    def on_bug(err: Exception) -> Response:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return render(Internal("Internal proxy error"), shape)

    target.register_error_handler(ProxyError, on_proxy_error)
    target.register_error_handler(HTTPException, on_http_error)
    target.register_error_handler(Exception, on_bug)
