"""JSON encoding and decoding in one place (orjson: fast, exact floats, key order kept)."""

from __future__ import annotations

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
