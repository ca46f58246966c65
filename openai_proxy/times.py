"""How the proxy writes a moment: ISO 8601 in UTC, to the millisecond, with `Z`
(`2026-12-07T10:00:00.000Z`). Every page, every time field of `/health` and `/debug/runtime`, and
the completion record's `start` use it; durations stay numbers (`uptimeS`, `restingForS`)."""

from __future__ import annotations

from datetime import UTC, datetime


def iso(ts: float) -> str:
    """Unix time `ts` as ISO 8601 UTC with milliseconds and `Z`."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_or_none(ts: float | None) -> str | None:
    return None if ts is None else iso(ts)
