"""Aggregates the log keeps beside its records: spend per UTC day, client and model, and per-minute
request counts with a latency histogram. Both are summed over every worker and host (each write adds
its batch in the same transaction as the records) and are never trimmed by record retention: spend is
kept SPEND_KEEP_DAYS, minutes MINUTE_KEEP_MINUTES.

Plain functions on a `openai_proxy.log.sql.Database`; `openai_proxy.log.store` runs them in its database thread.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from openai_proxy.log.sql import Database

SPEND_KEEP_DAYS = 400
MINUTE_KEEP_MINUTES = 2 * 24 * 60
# Upper bounds (ms) of the latency buckets: 24 steps of x1.64 from 10 ms to 15 minutes, the longest a
# stream may last. A duration lands in the first bucket whose bound it does not exceed; longer ones
# land in the last.
BUCKETS = 24
BOUNDS_MS = tuple(round(10.0 * 90_000.0 ** (i / (BUCKETS - 1)), 2) for i in range(BUCKETS))
_B = [f"b{i:02d}" for i in range(BUCKETS)]

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS spend_daily (
        day TEXT NOT NULL,  -- 'YYYY-MM-DD', UTC, of when the request finished
        client TEXT NOT NULL,
        model TEXT NOT NULL,
        requests BIGINT NOT NULL,
        prompt_tokens BIGINT NOT NULL,
        cached_tokens BIGINT NOT NULL,
        completion_tokens BIGINT NOT NULL,
        cost_usd {float} NOT NULL,
        unpriced BIGINT NOT NULL,  -- requests that ran (usage, or a 2xx answer) with no cost (costUsd null)
        PRIMARY KEY (day, client, model)
    )""",
    f"""CREATE TABLE IF NOT EXISTS minute_stats (
        minute BIGINT PRIMARY KEY,  -- Unix time // 60 of when the requests finished
        requests BIGINT NOT NULL,
        errors BIGINT NOT NULL,
        {", ".join(f"{b} BIGINT NOT NULL DEFAULT 0" for b in _B)}
    )""",
)
_SPEND_COLUMNS = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "cost_usd", "unpriced")
_ADD_SPEND = (
    f"INSERT INTO spend_daily (day, client, model, {', '.join(_SPEND_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (day, client, model) DO UPDATE SET "
    + ", ".join(f"{c} = spend_daily.{c} + excluded.{c}" for c in _SPEND_COLUMNS)
)
_MINUTE_COLUMNS = ("requests", "errors", *_B)
_ADD_MINUTE = (
    f"INSERT INTO minute_stats (minute, {', '.join(_MINUTE_COLUMNS)}) VALUES (?, {', '.join('?' * len(_MINUTE_COLUMNS))})"
    " ON CONFLICT (minute) DO UPDATE SET "
    + ", ".join(f"{c} = minute_stats.{c} + excluded.{c}" for c in _MINUTE_COLUMNS)
)


class SpendRow(NamedTuple):
    day: str
    client: str
    model: str
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_usd: float
    unpriced: int


class MinuteRow(NamedTuple):
    minute: int
    requests: int
    errors: int
    histogram: tuple[int, ...]  # counts per bucket of BOUNDS_MS


def day_of(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def bucket_of(duration_ms: float) -> int:
    return min(bisect_left(BOUNDS_MS, duration_ms), BUCKETS - 1)


def is_error(entry: dict[str, Any]) -> bool:
    """The log's error rule: a status >= 400 that is not the client going away (499, cancelled)."""
    return (entry.get("status") or 0) >= 400 and not entry.get("cancelled")


# A token count the log sums or compares is below this (float-exact, and far below BIGINT's 2**63 even
# summed over years); anything else upstream reports is nonsense, counted as unknown (0).
MAX_COUNT = 2**53
# Spend rows are keyed by client and model: long enough for any real name, short enough for any index.
MAX_KEY_CHARS = 200


def count(value: Any) -> int:
    """A token count as the aggregates use it: a whole number from 0 to MAX_COUNT, else 0 (unknown)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_COUNT
    return value if ok else 0


def key_text(value: Any) -> str:
    """A spend key (client, model) any database takes: text, no NUL, at most MAX_KEY_CHARS."""
    text = value if isinstance(value, str) else str(value)
    return text.replace("\x00", "\ufffd")[:MAX_KEY_CHARS]


def ran(entry: dict[str, Any]) -> bool:
    """Whether a request may have been billed: upstream reported usage, or answered 2xx (a
    transcription whose format reports no usage, a model without a price). A refused or failed
    request without usage was not."""
    status = entry.get("status")
    usage = entry.get("usage")
    return bool(isinstance(usage, dict) and usage) or (isinstance(status, int) and 200 <= status < 300)


def aggregate(completions: Iterable[tuple[dict[str, Any], float]]) -> tuple[list[tuple], list[tuple]]:
    """(spend rows, minute rows) to add for these (entry, finished at) pairs, in key order (so that
    concurrent writers lock rows in the same order)."""
    spend: dict[tuple[str, str, str], list[Any]] = {}
    minutes: dict[int, list[int]] = {}
    for entry, ts in completions:
        model = entry.get("upstreamModel") or entry.get("model") or ""
        key = (day_of(ts), key_text(entry.get("client") or ""), key_text(model))
        row = spend.setdefault(key, [0, 0, 0, 0, 0.0, 0])
        usage = entry.get("usage") if isinstance(entry.get("usage"), dict) else None
        cost = entry.get("costUsd")
        priced = isinstance(cost, int | float) and not isinstance(cost, bool) and math.isfinite(cost)
        row[0] += 1
        if usage:
            row[1] += count(usage.get("prompt_tokens"))
            row[2] += count(usage.get("cached_tokens"))
            row[3] += count(usage.get("completion_tokens"))
        if priced:
            row[4] += float(cost)
        elif ran(entry):  # its cost is unknown, not 0
            row[5] += 1
        counts = minutes.setdefault(int(ts // 60), [0] * (2 + BUCKETS))
        counts[0] += 1
        counts[1] += is_error(entry)
        duration = entry.get("durationMs")
        counts[2 + bucket_of(float(duration) if isinstance(duration, int | float) else 0.0)] += 1
    return (
        [(*key, *spend[key]) for key in sorted(spend)],
        [(minute, *minutes[minute]) for minute in sorted(minutes)],
    )


def add(db: Database, completions: Sequence[tuple[dict[str, Any], float]]) -> None:
    """Add a batch's completion records to the aggregates (inside the caller's write transaction)."""
    if not completions:
        return
    spend, minutes = aggregate(completions)
    db.executemany(_ADD_SPEND, spend)
    db.executemany(_ADD_MINUTE, minutes)


def prune(db: Database, now: float) -> None:
    """Forget spend older than SPEND_KEEP_DAYS and minutes older than MINUTE_KEEP_MINUTES."""
    oldest_day = (datetime.fromtimestamp(now, UTC) - timedelta(days=SPEND_KEEP_DAYS)).strftime("%Y-%m-%d")
    db.execute("DELETE FROM spend_daily WHERE day < ?", (oldest_day,))
    db.execute("DELETE FROM minute_stats WHERE minute < ?", (int(now // 60) - MINUTE_KEEP_MINUTES,))


def read_spend(db: Database, since_day: str) -> list[SpendRow]:
    """Spend per day, client and model from `since_day` ('YYYY-MM-DD', UTC) on, in that order."""
    rows = db.execute(
        f"SELECT day, client, model, {', '.join(_SPEND_COLUMNS)} FROM spend_daily WHERE day >= ? "
        "ORDER BY day, client, model",
        (since_day,),
    ).fetchall()
    return [SpendRow(d, c, m, int(r), int(p), int(ca), int(co), float(cost), int(u))
            for d, c, m, r, p, ca, co, cost, u in rows]  # fmt: skip


def read_minutes(db: Database, since_minute: int) -> list[MinuteRow]:
    """Requests, errors and the latency histogram per minute (Unix time // 60) from `since_minute` on."""
    rows = db.execute(
        f"SELECT minute, {', '.join(_MINUTE_COLUMNS)} FROM minute_stats WHERE minute >= ? ORDER BY minute",
        (since_minute,),
    ).fetchall()
    return [MinuteRow(int(r[0]), int(r[1]), int(r[2]), tuple(int(n) for n in r[3:])) for r in rows]


def percentile(histogram: Sequence[int], q: float) -> float | None:
    """The `q` quantile (0 < q <= 1) of a latency histogram, in ms, at bucket resolution: the upper
    bound of the bucket holding it, so the true value is at most that and above the bucket below
    (a factor of ~1.64). None for an empty histogram; the last bucket also holds everything longer."""
    total = sum(histogram)
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for i, n in enumerate(histogram):
        seen += n
        if seen >= rank:
            return BOUNDS_MS[i]
    return BOUNDS_MS[-1]


def p50_p95(histogram: Sequence[int]) -> tuple[float | None, float | None]:
    """Median and 95th percentile latency (ms, bucket resolution; see `percentile`)."""
    return percentile(histogram, 0.5), percentile(histogram, 0.95)
