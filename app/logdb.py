"""What the request log stores and how the pages query it: the SQLite schema, batch writes, reads.

Plain functions on a connection; `app.logstore` decides when and in which thread they run.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from app.jsonio import dumps_text, loads
from app.redact import redact

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,  -- when the request finished (pages sort by it: workers flush in batches)
    level TEXT NOT NULL,
    kind TEXT NOT NULL,
    request_id TEXT,
    incoming_request_id TEXT,
    upstream_request_id TEXT,
    endpoint TEXT,
    status INTEGER,
    pid INTEGER,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS records_level_id ON records (level, id);
CREATE INDEX IF NOT EXISTS records_level_ts ON records (level, ts);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value REAL NOT NULL);
"""
_INSERT = (
    "INSERT INTO records (ts, level, kind, request_id, incoming_request_id, upstream_request_id,"
    " endpoint, status, pid, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_ADD = "INSERT INTO counters VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = value + excluded.value"
_RAISE = (
    "INSERT INTO counters VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = MAX(value, excluded.value)"
)
# Keep the `retention` newest records of a level: delete from the (retention+1)-th newest down.
_TRIM = (
    "DELETE FROM records WHERE level = ? AND id <= "
    "(SELECT id FROM records WHERE level = ? ORDER BY id DESC LIMIT 1 OFFSET ?)"
)
# Cumulative counters: sums only grow, maxima only rise. `max_parallel` comes from the gate.
SUMS = (
    "request_count",
    "total_request_time",
    "error_count",
    "overload_count",
    "cancelled_count",
    "retry_count",
)
MAXIMA = (
    "max_request_time",
    "max_prompt_tokens",
    "max_cached_tokens",
    "max_completion_tokens",
    "max_parallel",
)

Queued = tuple[str, dict[str, Any], float]  # (kind: completion | retry, entry, time it finished)


def connect(path: str, busy_timeout_ms: int) -> sqlite3.Connection:
    """Open (and create) the database in WAL mode: readers never wait for the writer."""
    db = sqlite3.connect(
        path, timeout=busy_timeout_ms / 1000.0, isolation_level=None, check_same_thread=False
    )
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.executescript(SCHEMA)
    except BaseException:
        db.close()
        raise
    return db


def level_of(kind: str, entry: dict[str, Any]) -> str:
    """`/log` shows requests that ended well; `/log_errors` the rest, and every retried attempt."""
    status = entry.get("status")
    return "info" if kind == "completion" and isinstance(status, int) and status < 400 else "error"


def tally(entries: Iterable[dict[str, Any]]) -> dict[str, float]:
    """What completion records add to the summed counters and the maxima they may raise."""
    out = dict.fromkeys(SUMS + MAXIMA[:-1], 0.0)
    for e in entries:
        seconds = (e.get("durationMs") or 0.0) / 1000.0
        usage = e.get("usage") or {}
        out["request_count"] += 1
        out["total_request_time"] += seconds
        out["max_request_time"] = max(out["max_request_time"], seconds)
        # A client that went away is counted as cancelled, not as an error of the proxy or upstream.
        out["error_count"] += (e.get("status") or 0) >= 400 and not e.get("cancelled")
        out["overload_count"] += bool(e.get("overloaded"))
        out["cancelled_count"] += bool(e.get("cancelled"))
        out["retry_count"] += e.get("retries") or 0
        for kind in ("prompt", "cached", "completion"):
            out[f"max_{kind}_tokens"] = max(out[f"max_{kind}_tokens"], usage.get(f"{kind}_tokens") or 0)
    return out


def write_batch(db: sqlite3.Connection, batch: list[Queued], pid: int, retention: int, peak: int) -> None:
    """Insert the records, update the counters and trim to `retention`, all in one transaction."""
    rows, completions, levels = [], [], set()
    for kind, entry, ts in batch:
        level = level_of(kind, entry)
        levels.add(level)
        if kind == "completion":
            completions.append(entry)  # built and redacted by completion_log
        else:
            entry = redact({**entry, "pid": pid})
        rows.append((ts, level, kind, entry.get("requestId"), entry.get("incomingRequestId"),
                     entry.get("upstreamRequestId"), entry.get("endpoint"), entry.get("status"),
                     entry.get("pid", pid), dumps_text(entry)))  # fmt: skip
    totals = tally(completions) if completions else {}
    if peak:
        totals["max_parallel"] = peak
    db.execute("BEGIN IMMEDIATE")
    try:
        db.executemany(_INSERT, rows)
        db.executemany(_ADD, [(k, v) for k, v in totals.items() if k in SUMS])
        db.executemany(_RAISE, [(k, v) for k, v in totals.items() if k in MAXIMA])
        for level in levels:
            db.execute(_TRIM, (level, level, retention))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


@dataclass(frozen=True)
class LogFilter:
    """Which records a page shows: a status (`404`) or class (`4xx`), an endpoint, a request id."""

    status: int | None = None
    status_class: int | None = None
    endpoint: str | None = None
    request_id: str | None = None

    def where(self, level: str) -> tuple[str, list[Any]]:
        sql, args = ["level = ?"], [level]
        if self.status is not None:
            sql.append("status = ?")
            args.append(self.status)
        if self.status_class is not None:
            sql.append("status BETWEEN ? AND ?")
            args += [self.status_class * 100, self.status_class * 100 + 99]
        if self.endpoint:
            sql.append("endpoint = ?")
            args.append(self.endpoint)
        if self.request_id:
            sql.append("? IN (request_id, incoming_request_id, upstream_request_id)")
            args.append(self.request_id)
        return " AND ".join(sql), args


@dataclass
class LogPage:
    """One page of records (newest first) and what the page shows around them."""

    records: list[dict[str, Any]]
    total: int
    counters: dict[str, float]
    endpoints: list[str]


def empty_counters() -> dict[str, float]:
    return dict.fromkeys(SUMS + MAXIMA, 0.0)


def read_counters(db: sqlite3.Connection) -> dict[str, float]:
    counters = empty_counters()
    counters.update(db.execute("SELECT name, value FROM counters").fetchall())
    return counters


def read_page(db: sqlite3.Connection, level: str, where: LogFilter, page: int, per_page: int) -> LogPage:
    """Records of one level, newest first, with the counters and the endpoints seen at that level."""
    sql, args = where.where(level)
    # One read transaction, so the counters, the total and the rows agree with each other.
    db.execute("BEGIN")
    try:
        total = db.execute(f"SELECT COUNT(*) FROM records WHERE {sql}", args).fetchone()[0]
        rows = db.execute(
            f"SELECT id, ts, kind, data FROM records WHERE {sql} ORDER BY ts DESC, id DESC LIMIT ? OFFSET ?",
            [*args, per_page, (page - 1) * per_page],
        ).fetchall()
        endpoints = db.execute(
            "SELECT DISTINCT endpoint FROM records WHERE level = ? AND endpoint IS NOT NULL ORDER BY 1",
            (level,),
        ).fetchall()
        counters = read_counters(db)
    finally:
        db.execute("COMMIT")
    records = [{**loads(data), "id": i, "ts": ts, "kind": kind} for i, ts, kind, data in rows]
    return LogPage(records, total, counters, [e for (e,) in endpoints])
