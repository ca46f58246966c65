"""Small, shared checks for request fields; each failure is a 400 with a message naming the field."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from openai_proxy.errors import BadRequest

# RFC 9110 §5.5: a field value is visible ASCII, space, tab and obs-text (latin-1 bytes 0x80-0xFF).
# CR and LF would end the header (request smuggling), NUL and other controls are refused by servers.
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")


def header_value(name: str, value: str) -> str:
    """`value` if it can be sent as an HTTP header value as it is, else 400 naming `name`."""
    if not _FIELD_VALUE.fullmatch(value):
        raise BadRequest(
            f"{name} contains characters that cannot go into an HTTP header "
            "(control characters such as CR, LF or NUL, or text outside latin-1)"
        )
    return value


def is_truthy(value: Any) -> bool:
    """JavaScript truthiness, which clients of the original Node proxy rely on (`"false"` is truthy)."""
    if value is None or value is False:
        return False
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value != 0 and not (isinstance(value, float) and math.isnan(value))
    if isinstance(value, str):
        return value != ""
    return True


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def optional_number(body: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    """A number within [low, high], or None when absent."""
    value = body.get(name)
    if value is None:
        return None
    if not is_number(value) or not low <= value <= high:
        raise BadRequest(f"{name} must be a number between {low} and {high}")
    return value


def optional_positive_int(body: Mapping[str, Any], name: str) -> int | None:
    """An integer > 0, or None when absent."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise BadRequest(f"{name} must be a positive integer")
    return value


def optional_choice(value: Any, name: str, choices: tuple[str, ...]) -> str | None:
    """One of `choices`, or None when absent."""
    if value is None:
        return None
    if value not in choices:
        allowed = ", ".join(choices)
        raise BadRequest(f"{name} must be one of: {allowed}")
    return value


def query_int(raw: str | None, name: str, *, minimum: int | None = None) -> int | None:
    """An integer query parameter (digits, optional sign), or None when absent."""
    if raw is None or raw == "":
        return None
    text = raw.strip()
    if not (text.lstrip("+-").isdigit() and text.lstrip("+-").isascii()):
        raise BadRequest(f"{name} must be an integer")
    value = int(text)
    if minimum is not None and value < minimum:
        raise BadRequest(f"{name} must be an integer >= {minimum}")
    return value
