"""Upstream failures as ProxyErrors: an error answer of upstream's (`upstream_api_error`), and any
exception of an upstream call (`classify`), judged by type first, text only as a last resort."""

from __future__ import annotations

import re
from typing import Any

import httpx2
import openai

from openai_proxy import jsonio
from openai_proxy.errors import (
    BadRequest,
    Internal,
    KeysResting,
    NoUpstreamKey,
    ProxyError,
    UpstreamAPIError,
    UpstreamBadResponse,
    UpstreamTimeout,
    UpstreamTransport,
)
from openai_proxy.keys.pool import KeysUnavailable
from openai_proxy.redact import redact_text
from openai_proxy.upstream.client import BadUpstreamResponse

_TIMEOUT_WORDS = re.compile(r"time(d)?[ -]?out|ETIMEDOUT", re.I)
_TRANSPORT_WORDS = re.compile(
    r"ECONNRESET|ECONNREFUSED|connection|socket|network|EPIPE|EHOSTUNREACH|DNS", re.I
)


def upstream_api_error(status: int, headers: Any, body: bytes) -> UpstreamAPIError:
    """Upstream's error answer as ours: `"<status> <upstream message>"` (redacted), its status, type,
    code and request id, and its `Retry-After`."""
    detail: dict[str, Any] = {}
    try:
        parsed = jsonio.loads(body) if body else None
    except jsonio.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        inner = parsed.get("error", parsed)
        detail = inner if isinstance(inner, dict) else {"message": str(inner)}
    message = detail.get("message")
    if not isinstance(message, str) or not message:
        message = body.decode("utf-8", "replace").strip()[:500] or "(no message)"
    upstream: dict[str, Any] = {"status": status}
    request_id = headers.get("x-request-id")
    if request_id:
        upstream["requestId"] = request_id
    for key in ("type", "code", "param"):
        value = detail.get(key)
        if value is not None:
            upstream[key] = redact_text(str(value))
    extra = {"Retry-After": headers.get("retry-after")} if headers.get("retry-after") else {}
    return UpstreamAPIError(
        redact_text(f"{status} {message}"), status=status, headers=extra, upstream=upstream
    )


def classify(exc: BaseException) -> ProxyError:
    """Map any exception from an upstream call to a ProxyError: by type first, text only as a last resort."""
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, KeysUnavailable):
        if exc.retry_after is None:
            return NoUpstreamKey(str(exc))
        return KeysResting(str(exc), exc.retry_after)
    if isinstance(exc, openai.APIStatusError):
        response = exc.response
        return upstream_api_error(exc.status_code, response.headers, response.content)
    if isinstance(exc, BadUpstreamResponse):
        return UpstreamBadResponse(redact_text(f"OpenAI sent a response the proxy cannot read: {exc}"))
    if isinstance(exc, openai.APITimeoutError | httpx2.TimeoutException):
        return UpstreamTimeout("Timeout while waiting for OpenAI response")
    if isinstance(exc, httpx2.LocalProtocolError):
        return BadRequest(redact_text(str(exc)))
    if isinstance(exc, openai.APIConnectionError | httpx2.TransportError | ConnectionError):
        cause = exc.__cause__ if isinstance(exc, openai.APIConnectionError) and exc.__cause__ else exc
        if isinstance(cause, BadUpstreamResponse):
            return classify(cause)
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
