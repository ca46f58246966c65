"""ProxyError and its kinds, the one JSON error shape, and classification of upstream failures."""

from __future__ import annotations

import re
from typing import Any

import httpx2
import openai

from app.redact import redact_text


class ProxyError(Exception):
    """An error the proxy answers with; `status`, `type` and `code` follow the error table in README.md."""

    status = 500
    type = "internal_error"
    code = "OPENAI_PROXY_INTERNAL"
    result = "internal_error"

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

    def openai_body(self, request_id: str) -> dict[str, Any]:
        """The same error in OpenAI's own shape, for the `/v1` surface (the SDKs parse this one)."""
        return {
            "error": {
                "message": f"{self.message} (proxy request id {request_id})",
                "type": self.type,
                "param": None,
                "code": self.code,
            }
        }


class BadRequest(ProxyError):
    status, type, code, result = 400, "validation_error", "OPENAI_PROXY_BAD_REQUEST", "validation_error"


class Unauthorized(ProxyError):
    status, type, code, result = 401, "invalid_request_error", "OPENAI_PROXY_UNAUTHORIZED", "forbidden"


class Forbidden(ProxyError):
    status, type, code, result = 403, "forbidden", "OPENAI_PROXY_FORBIDDEN", "forbidden"


class NotFound(ProxyError):
    status, type, code, result = 404, "not_found", "OPENAI_PROXY_NOT_FOUND", "not_found"


class PayloadTooLarge(ProxyError):
    status, type, code, result = (
        413,
        "payload_too_large",
        "OPENAI_PROXY_PAYLOAD_TOO_LARGE",
        "payload_too_large",
    )


class RateLimited(ProxyError):
    status, type, code, result = 429, "rate_limited", "OPENAI_PROXY_RATE_LIMITED", "rate_limited"


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


_TIMEOUT_WORDS = re.compile(r"time(d)?[ -]?out|ETIMEDOUT", re.I)
_TRANSPORT_WORDS = re.compile(
    r"ECONNRESET|ECONNREFUSED|connection|socket|network|EPIPE|EHOSTUNREACH|DNS", re.I
)


def upstream_error_message(err: openai.APIStatusError) -> tuple[str, dict[str, Any]]:
    """The client-facing message (`"<status> <upstream message>"`, redacted) and the upstream summary."""
    body = err.body
    detail: dict[str, Any] = body.get("error", body) if isinstance(body, dict) else {}
    if not isinstance(detail, dict):
        detail = {"message": str(detail)}
    message = detail.get("message")
    if not isinstance(message, str) or not message:
        message = (err.response.text or "").strip()[:500] if not isinstance(body, dict) else err.message
    upstream: dict[str, Any] = {"status": err.status_code}
    if err.request_id:
        upstream["requestId"] = err.request_id
    for key in ("type", "code", "param"):
        value = detail.get(key)
        if value is not None:
            upstream[key] = redact_text(str(value))
    return redact_text(f"{err.status_code} {message}"), upstream


def classify(exc: BaseException) -> ProxyError:
    """Map any exception from an upstream call to a ProxyError: by type first, text only as a last resort."""
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, openai.APIStatusError):
        message, upstream = upstream_error_message(exc)
        headers = {}
        retry_after = exc.response.headers.get("retry-after")
        if retry_after:
            headers["Retry-After"] = retry_after
        return UpstreamAPIError(message, status=exc.status_code, headers=headers, upstream=upstream)
    if isinstance(exc, openai.APITimeoutError | httpx2.TimeoutException):
        return UpstreamTimeout("Timeout while waiting for OpenAI response")
    if isinstance(exc, openai.APIConnectionError | httpx2.TransportError | ConnectionError):
        cause = exc.__cause__ or exc
        return UpstreamTransport(redact_text(f"Could not reach OpenAI: {type(cause).__name__}: {cause}"))
    if isinstance(exc, openai.APIResponseValidationError):
        return UpstreamBadResponse("OpenAI returned a response the proxy could not read")
    text = str(exc)
    if isinstance(exc, openai.OpenAIError | OSError):
        if _TIMEOUT_WORDS.search(text):
            return UpstreamTimeout("Timeout while waiting for OpenAI response")
        if _TRANSPORT_WORDS.search(text):
            return UpstreamTransport(redact_text(f"Could not reach OpenAI: {text}"))
    return Internal("Internal proxy error")
