"""Client authentication: the security key for API routes, the access token for operator pages."""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

from werkzeug.datastructures import Headers

from app.errors import Forbidden


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


# The configured secrets are few and fixed: hash them once, not on every request.
_expected_digest = functools.lru_cache(maxsize=16)(_digest)


def constant_time_equal(provided: str, expected: str) -> bool:
    """Compare secrets without leaking their content or length through timing."""
    return hmac.compare_digest(_digest(provided), _expected_digest(expected))


def bearer_token(headers: Headers) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, if any."""
    value = headers.get("Authorization", "")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def provided_security_key(headers: Headers, *sources: Mapping[str, Any]) -> str | None:
    """The key a client sent: `X-Security-Key`, a Bearer header, then body/form/query `security_key`."""
    header_key = headers.get("X-Security-Key")
    if header_key:
        return header_key.strip()
    token = bearer_token(headers)
    if token:
        return token
    for source in sources:
        value = source.get("security_key")
        if isinstance(value, str) and value:
            return value
    return None


def require_security_key(expected: str | None, provided: str | None) -> None:
    """Raise Forbidden unless the proxy has a key and the client sent exactly it."""
    if not expected:
        raise Forbidden("The proxy has no SECURITY_KEY configured; API routes are disabled")
    if not provided:
        raise Forbidden("Missing security_key")
    if not constant_time_equal(provided, expected):
        raise Forbidden("Invalid security_key")


def require_access_token(expected: str | None, headers: Headers, query: Mapping[str, Any]) -> None:
    """Guard for the operator pages: `?access_token=` or a Bearer header."""
    if not expected:
        raise Forbidden("The proxy has no ACCESS_TOKEN configured; this page is disabled")
    provided = bearer_token(headers) or query.get("access_token")
    if not provided:
        raise Forbidden("Missing access_token")
    if not constant_time_equal(str(provided), expected):
        raise Forbidden("Invalid access_token")
