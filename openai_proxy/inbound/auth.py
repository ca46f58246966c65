"""Client authentication: the security key for API routes, the access token for operator pages."""

from __future__ import annotations

import functools
import hashlib
import hmac
import time
from collections.abc import Callable, Mapping
from typing import Any

from werkzeug.datastructures import Headers

from openai_proxy.clients import key_digest
from openai_proxy.errors import Forbidden

# The configured secrets are few and fixed: hash them once, not on every request.
_expected_digest = functools.lru_cache(maxsize=16)(key_digest)


def constant_time_equal(provided: str, expected: str) -> bool:
    """Compare secrets without leaking their content or length through timing."""
    return hmac.compare_digest(key_digest(provided), _expected_digest(expected))


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


BEARER, QUERY, COOKIE = "bearer", "query", "cookie"
# The operator pages' sign-in cookie: `<issued unix time>.<hex HMAC-SHA256>`, keyed by ACCESS_TOKEN, so it
# never contains the token and every cookie stops working when ACCESS_TOKEN changes. A sign-out records
# its time with the log store (shared by every host); a cookie issued at or before the last sign-out
# is refused everywhere.
SESSION_COOKIE = "openai_proxy_pages"
SESSION_MAX_AGE = 12 * 3600
_SESSION_LABEL = "openai-proxy operator pages session v1"
_CLOCK_SKEW = 60  # hosts behind one balancer may disagree a little about the time


def _session_mac(access_token: str, issued: int) -> str:
    key = access_token.encode("utf-8", "surrogatepass")
    return hmac.new(key, f"{_SESSION_LABEL}|{issued}".encode(), hashlib.sha256).hexdigest()


class SignedOut(Forbidden):
    """A sign-in cookie issued before the last sign-out (on any host)."""


class SessionUnchecked(Forbidden):
    """A sign-in cookie that cannot be checked against the last sign-out now: refused (fail closed)."""


def session_cookie_value(access_token: str, now: float | None = None, signed_out_at: float = 0.0) -> str:
    """A fresh sign-in cookie value for the pages, valid for SESSION_MAX_AGE seconds. Issued after
    `signed_out_at` even within the second of a sign-out (dated a second or so ahead: within the
    allowed clock skew)."""
    issued = max(int(time.time() if now is None else now), int(signed_out_at) + 1)
    return f"{issued}.{_session_mac(access_token, issued)}"


def session_cookie_valid(
    value: str, access_token: str, now: float | None = None, signed_out_at: float = 0.0
) -> bool:
    """Whether `value` was issued with this ACCESS_TOKEN less than SESSION_MAX_AGE seconds ago and
    after `signed_out_at` (the last sign-out, Unix time)."""
    issued_text, _, mac = value.partition(".")
    if not (issued_text.isascii() and issued_text.isdigit() and len(issued_text) <= 12 and len(mac) == 64):
        return False
    issued = int(issued_text)
    age = (time.time() if now is None else now) - issued
    expected = _session_mac(access_token, issued)
    return (
        hmac.compare_digest(mac.encode("ascii", "replace"), expected.encode())
        and -_CLOCK_SKEW <= age <= SESSION_MAX_AGE
        and issued > signed_out_at
    )


def presented_access_token(headers: Headers, query: Mapping[str, Any]) -> tuple[str | None, str]:
    """The token a page request carries and where: a Bearer header wins over `?access_token=`."""
    token = bearer_token(headers)
    if token:
        return token, BEARER
    value = query.get("access_token")
    return (str(value), QUERY) if value else (None, QUERY)


def require_access_token(
    expected: str | None,
    headers: Headers,
    query: Mapping[str, Any],
    cookies: Mapping[str, str] | None = None,
    signed_out_at: Callable[[], float] | None = None,
) -> str:
    """Guard for the operator pages: a Bearer header, `?access_token=`, or the sign-in cookie.

    Returns which one admitted the request (BEARER, QUERY or COOKIE); raises Forbidden otherwise.
    A token that was sent is judged alone: a valid cookie does not excuse a wrong token. A cookie is
    also checked against the last sign-out (`signed_out_at()`, asked only for a cookie that is
    otherwise valid); when that cannot be known, the cookie is refused.
    """
    if not expected:
        raise Forbidden("The proxy has no ACCESS_TOKEN configured; this page is disabled")
    provided, source = presented_access_token(headers, query)
    if provided:
        if not constant_time_equal(provided, expected):
            raise Forbidden("Invalid access_token")
        return source
    cookie = (cookies or {}).get(SESSION_COOKIE)
    if cookie:
        if not session_cookie_valid(cookie, expected):
            raise Forbidden("Sign-in expired or ACCESS_TOKEN changed; sign in again")
        if signed_out_at is not None:
            try:
                last_sign_out = signed_out_at()
            except Exception:
                raise SessionUnchecked(
                    "The sign-in cannot be checked now (the log database does not answer); send the access token"
                ) from None
            if not session_cookie_valid(cookie, expected, signed_out_at=last_sign_out):
                raise SignedOut("Signed out; sign in again")
        return COOKIE
    raise Forbidden("Missing access_token")
