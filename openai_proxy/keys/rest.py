"""How long a key rests after a 429 (rate limit): what upstream says, within bounds.

Upstream says it one of these ways, taken in this order:
- `retry-after-ms: 120` (milliseconds, OpenAI's own),
- `Retry-After: 20` (seconds) or `Retry-After: Wed, 21 Oct 2015 07:28:00 GMT` (an HTTP date),
- `x-ratelimit-reset-requests: 1s` / `x-ratelimit-reset-tokens: 6m0s` (Go durations: `120ms`,
  `1m30s`, `1h2m3.5s`): of the limits that say `x-ratelimit-remaining-*: 0` the longest reset, else
  the shortest reset given (the proxy cannot tell which limit was hit; a key back too early costs
  one more 429).
Whatever it says is kept between MIN_REST_S (a `0` would otherwise send the next call straight back
into the limit) and MAX_REST_S (a daily limit or a broken header would otherwise take the key out for
hours; after this long one call finds out, and its 429 sets the next rest). Nothing readable: None,
and the pool's back-off applies.
"""

from __future__ import annotations

import math
import re
import time
from email.utils import parsedate_to_datetime
from typing import Any

MIN_REST_S = 0.1
MAX_REST_S = 600.0
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:h|ms|m|s|us|µs|ns))+")
_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|ns)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def rest_seconds(headers: Any) -> float | None:
    """Seconds a key should rest after this 429, bounded; None when upstream gives no usable time."""
    value = _number(headers.get("retry-after-ms"), 1e-3)
    if value is None:
        value = _retry_after(headers.get("retry-after"))
    if value is None:
        value = _reset(headers)
    if value is None:
        return None
    return min(max(value, MIN_REST_S), MAX_REST_S)


def _number(raw: str | None, scale: float = 1.0) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw.strip())
    except ValueError:
        return None
    return value * scale if math.isfinite(value) and value >= 0 else None


def _retry_after(raw: str | None) -> float | None:
    value = _number(raw)
    if value is not None or raw is None:
        return value
    try:
        when = parsedate_to_datetime(raw.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT; a zoneless one is read as such
        return None
    return max(when.timestamp() - time.time(), 0.0)


def duration_seconds(raw: str | None) -> float | None:
    """A Go duration (`6m0s`, `120ms`) or a plain number of seconds; None if it is neither."""
    if raw is None:
        return None
    text = raw.strip()
    plain = _number(text)
    if plain is not None:
        return plain
    if not _DURATION.fullmatch(text):
        return None
    return sum(float(amount) * _UNIT_S[unit] for amount, unit in _PART.findall(text))


def _reset(headers: Any) -> float | None:
    resets = {}
    for kind in ("requests", "tokens"):
        value = duration_seconds(headers.get(f"x-ratelimit-reset-{kind}"))
        if value is not None:
            resets[kind] = value
    if not resets:
        return None
    exhausted = [
        v for kind, v in resets.items() if (headers.get(f"x-ratelimit-remaining-{kind}") or "").strip() == "0"
    ]
    return max(exhausted) if exhausted else min(resets.values())
