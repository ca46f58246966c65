"""Secret redaction for everything that leaves the process: logs, pages and client-facing messages."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

REDACTED = "[REDACTED]"

_SECRET_KEY = re.compile(r"(authorization|cookie|api[_-]?key|token|security[_-]?key|secret|password)$", re.I)

# Order matters: a Bearer value may itself be an sk- key; mask the whole value once.
_BEARER = re.compile(r"(?i)\b(bearer\s+)([A-Za-z0-9._~+/=-]+)")
_SK_KEY = re.compile(r"\b(sk-[A-Za-z0-9_-]{4,})")
_QUERY_SECRET = re.compile(
    r"(?i)([?&;\s]|^)((?:[a-z0-9_-]*(?:api[_-]?key|token|secret|password|signature|sig)|key|security_key)=)"
    r"([^&\s\"'#]+)"
)


def mask(secret: str) -> str:
    """`***` plus the last four characters, so an operator can tell keys apart without seeing them."""
    return "***" + secret[-4:] if len(secret) > 8 else "***"


# Every pattern below needs one of these; most text has none, and one search is cheaper than three.
_MAY_HOLD_SECRET = re.compile(r"(?i)sk-|bearer|=")


def redact_text(text: str | None) -> str | None:
    """Mask `sk-...` keys, `Bearer ...` values and secret-looking `key=value` query parameters."""
    if not text or not _MAY_HOLD_SECRET.search(text):
        return text
    text = _BEARER.sub(lambda m: m.group(1) + mask(m.group(2)), text)
    text = _SK_KEY.sub(lambda m: mask(m.group(1)), text)
    return _QUERY_SECRET.sub(lambda m: m.group(1) + m.group(2) + mask(m.group(3)), text)


def is_secret_key(name: str) -> bool:
    """Field or header names whose value is a secret whatever it looks like."""
    return bool(_SECRET_KEY.search(name))


def redact(value: Any) -> Any:
    """Deep copy of `value` with secret-named fields replaced and secrets in strings masked."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if isinstance(k, str) and is_secret_key(k) and v not in (None, "") else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value
