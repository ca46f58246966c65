"""JSON encoding and decoding in one place (orjson: fast, exact floats, key order kept), and how a
moment is written in it and everywhere else: ISO 8601 in UTC, to the millisecond, with `Z`
(`2026-12-07T10:00:00.000Z`). Every page, every time field of `/health` and `/debug/runtime`, and the
completion record's `start` use `iso`; durations stay numbers (`uptimeS`, `restingForS`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

JSONDecodeError = orjson.JSONDecodeError


def loads(data: bytes | str) -> Any:
    """Parse JSON; raises JSONDecodeError (a ValueError) on bad input."""
    return orjson.loads(data)


def dumps(value: Any) -> bytes:
    """Compact JSON bytes, keys in insertion order."""
    return orjson.dumps(value)


def dumps_text(value: Any) -> str:
    """Compact JSON as text, for log lines."""
    return orjson.dumps(value, default=str).decode()


def iso(ts: float) -> str:
    """Unix time `ts` as ISO 8601 UTC with milliseconds and `Z`."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_or_none(ts: float | None) -> str | None:
    return None if ts is None else iso(ts)
