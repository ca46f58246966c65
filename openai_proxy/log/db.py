"""What the request log stores and how the pages query it: the schema, batch writes, reads.

Plain functions on a `openai_proxy.log.sql.Database` (SQLite or PostgreSQL, one set of SQL); `openai_proxy.log.store`
decides when and in which thread they run.

A batch is written at most once. Each store numbers its batches, and the transaction that writes one
first moves the store's row in `log_writers` to that number. A batch whose COMMIT got no answer (the
connection dropped after sending it) is kept and sent again, unchanged and with the same number: if
the first COMMIT had taken effect, the row already holds the number and the retry writes nothing.
So a lost answer neither loses nor duplicates records, counters or aggregates.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from openai_proxy.jsonio import dumps_text, loads
from openai_proxy.log import stats as logstats
from openai_proxy.log.sql import Database
from openai_proxy.redact import redact

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS records (
        id {id},
        ts {float} NOT NULL,  -- when the request finished (pages sort by it: workers flush in batches)
        level TEXT NOT NULL,
        kind TEXT NOT NULL,
        request_id TEXT,
        incoming_request_id TEXT,
        upstream_request_id TEXT,
        endpoint TEXT,
        status INTEGER,
        pid INTEGER,
        host TEXT,
        client TEXT,
        data TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS records_level_id ON records (level, id)",
    "CREATE INDEX IF NOT EXISTS records_level_ts ON records (level, ts)",
    "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value {float} NOT NULL)",
    # One row per store (a worker's lifetime): the number of the last batch it wrote.
    """CREATE TABLE IF NOT EXISTS log_writers (
        writer TEXT PRIMARY KEY, host TEXT NOT NULL, seq BIGINT NOT NULL, updated {float} NOT NULL
    )""",
    # Per host: records its workers dropped from a full queue, and when it last wrote.
    """CREATE TABLE IF NOT EXISTS log_hosts (
        host TEXT PRIMARY KEY, dropped BIGINT NOT NULL, last_write {float} NOT NULL
    )""",
    *logstats.SCHEMA,
)
# Columns added since the first release: a log created by an older version gets them at start.
ADDED_COLUMNS = {"records": (("host", "TEXT"), ("client", "TEXT"))}
WRITERS_KEEP_S = 30 * 24 * 3600

_INSERT = (
    "INSERT INTO records (ts, level, kind, request_id, incoming_request_id, upstream_request_id,"
    " endpoint, status, pid, host, client, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_CLAIM = (
    "INSERT INTO log_writers (writer, host, seq, updated) VALUES (?, ?, ?, ?) ON CONFLICT (writer)"
    " DO UPDATE SET seq = excluded.seq, updated = excluded.updated WHERE log_writers.seq < excluded.seq"
    " RETURNING seq"
)
_ADD = (
    "INSERT INTO counters (name, value) VALUES (?, ?)"
    " ON CONFLICT (name) DO UPDATE SET value = counters.value + excluded.value"
)
_RAISE = (
    "INSERT INTO counters (name, value) VALUES (?, ?)"
    " ON CONFLICT (name) DO UPDATE SET value = GREATEST(counters.value, excluded.value)"
)
_HOST = (
    "INSERT INTO log_hosts (host, dropped, last_write) VALUES (?, ?, ?) ON CONFLICT (host) DO UPDATE"
    " SET dropped = log_hosts.dropped + excluded.dropped,"
    " last_write = GREATEST(log_hosts.last_write, excluded.last_write)"
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


@dataclass
class Batch:
    """What one write transaction stores. Sent again unchanged when its outcome is unknown."""

    writer: str  # the store that queued it: host, pid and a random tag
    seq: int  # the store's batch number, rising
    host: str
    pid: int
    items: list[Queued] = field(default_factory=list)
    peak: int = 0  # a new high-water mark of parallel upstream calls, or 0
    dropped: int = 0  # records the store dropped since its last written batch
    prune: bool = False  # also forget old aggregates and writers (now and then, not every batch)
    at: float = 0.0


def create_schema(db: Database, extra: Iterable[str] = ()) -> None:
    """Create what is missing, `extra` statements too, in one transaction (idempotent; safe when two
    hosts start at once)."""
    db.begin_schema()
    try:
        for statement in (*SCHEMA, *extra):
            db.execute(db.ddl(statement))
        for table, added in ADDED_COLUMNS.items():
            have = db.columns(table)
            for name, kind in added:
                if name not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
        db.commit()
    except BaseException:
        db.rollback()
        raise


def level_of(kind: str, entry: dict[str, Any]) -> str:
    """`/log` shows requests that ended well; `/log_errors` the rest, and every retried attempt."""
    status = entry.get("status")
    return "info" if kind == "completion" and isinstance(status, int) and status < 400 else "error"


def tally(entries: Iterable[dict[str, Any]]) -> dict[str, float]:
    """What completion records add to the summed counters and the maxima they may raise."""
    out = dict.fromkeys(SUMS + MAXIMA[:-1], 0.0)
    for e in entries:
        seconds = (e.get("durationMs") or 0.0) / 1000.0
        # The maxima are what upstream reported: an estimate (a cut stream's) is not a count.
        usage = (e.get("usage") or {}) if e.get("usageSource") != "estimated" else {}
        out["request_count"] += 1
        out["total_request_time"] += seconds
        out["max_request_time"] = max(out["max_request_time"], seconds)
        # A client that went away is counted as cancelled, not as an error of the proxy or upstream.
        out["error_count"] += logstats.is_error(e)
        out["overload_count"] += bool(e.get("overloaded"))
        out["cancelled_count"] += bool(e.get("cancelled"))
        out["retry_count"] += e.get("retries") or 0
        for kind in ("prompt", "cached", "completion"):
            out[f"max_{kind}_tokens"] = max(out[f"max_{kind}_tokens"], usage.get(f"{kind}_tokens") or 0)
    return out


def write_batch(db: Database, batch: Batch, retention: int) -> bool:
    """Insert the records, add to the counters and aggregates, trim to `retention`: one transaction.

    False when this batch had been written already (by a try whose COMMIT answer was lost): nothing
    is written twice.
    """
    rows, completions, levels = [], [], set()
    for kind, entry, ts in batch.items:
        level = level_of(kind, entry)
        levels.add(level)
        if kind == "completion":
            completions.append((entry, ts))  # built and redacted by completion_log
        else:
            entry = redact({**entry, "pid": batch.pid, "host": batch.host})
        rows.append((ts, level, kind, entry.get("requestId"), entry.get("incomingRequestId"),
                     entry.get("upstreamRequestId"), entry.get("endpoint"), entry.get("status"),
                     entry.get("pid", batch.pid), batch.host, entry.get("client"), dumps_text(entry)))  # fmt: skip
    totals = tally(e for e, _ in completions) if completions else {}
    if batch.peak:
        totals["max_parallel"] = batch.peak
    try:
        with db.pipeline():  # everything up to the claim's answer in one round trip (PostgreSQL)
            db.begin_write()
            claim = db.execute(_CLAIM, (batch.writer, batch.host, batch.seq, batch.at))
            db.insert_rows(_INSERT, rows)
            db.executemany(_ADD, [(k, v) for k, v in sorted(totals.items()) if k in SUMS])
            db.executemany(_RAISE, [(k, v) for k, v in sorted(totals.items()) if k in MAXIMA])
            logstats.add(db, completions)
            db.execute(_HOST, (batch.host, batch.dropped, batch.at))
            for level in sorted(levels):
                db.execute(_TRIM, (level, level, retention))
            if batch.prune:
                logstats.prune(db, batch.at)
                db.execute("DELETE FROM log_writers WHERE updated < ?", (batch.at - WRITERS_KEEP_S,))
            fresh = claim.fetchone() is not None
        if not fresh:  # written before: undo this copy
            db.rollback()
            return False
        db.commit()
    except BaseException:
        db.rollback()
        raise
    return True


@dataclass(frozen=True)
class LogFilter:
    """Which records a page shows: a status (`404`) or class (`4xx`), an endpoint, a request id, a
    host, a client."""

    status: int | None = None
    status_class: int | None = None
    endpoint: str | None = None
    request_id: str | None = None
    host: str | None = None
    client: str | None = None

    def where(self, level: str) -> tuple[str, list[Any]]:
        sql, args = ["level = ?"], [level]
        if self.status is not None:
            sql.append("status = ?")
            args.append(self.status)
        if self.status_class is not None:
            sql.append("status BETWEEN ? AND ?")
            args += [self.status_class * 100, self.status_class * 100 + 99]
        for column in ("endpoint", "host", "client"):
            if getattr(self, column):
                sql.append(f"{column} = ?")
                args.append(getattr(self, column))
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
    hosts: list[str] = field(default_factory=list)  # every host that has written to the log
    clients: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)  # per host, as saved in the database


def empty_counters() -> dict[str, float]:
    return dict.fromkeys(SUMS + MAXIMA, 0.0)


def read_counters(db: Database) -> dict[str, float]:
    counters = empty_counters()
    counters.update((name, float(value)) for name, value in db.execute("SELECT name, value FROM counters"))
    return counters


def _distinct(db: Database, column: str, level: str) -> list[str]:
    sql = f"SELECT DISTINCT {column} FROM records WHERE level = ? AND {column} IS NOT NULL ORDER BY 1"
    return [value for (value,) in db.execute(sql, (level,))]


def read_page(db: Database, level: str, where: LogFilter, page: int, per_page: int) -> LogPage:
    """Records of one level, newest first, with the counters, the endpoints and clients seen at that
    level, the hosts that write to the log and the records each of them dropped."""
    sql, args = where.where(level)
    # One read transaction, so the counters, the total and the rows agree with each other.
    db.begin_read()
    try:
        total = db.execute(f"SELECT COUNT(*) FROM records WHERE {sql}", args).fetchone()[0]
        rows = db.execute(
            f"SELECT id, ts, kind, host, data FROM records WHERE {sql} ORDER BY ts DESC, id DESC LIMIT ? OFFSET ?",
            [*args, per_page, (page - 1) * per_page],
        ).fetchall()
        seen = {column: _distinct(db, column, level) for column in ("endpoint", "client")}
        # Every host that has written to this log, on both pages (a small table; no scan of records).
        hosts = db.execute("SELECT host, dropped FROM log_hosts ORDER BY host").fetchall()
        counters = read_counters(db)
    except BaseException:
        db.rollback()
        raise
    db.commit()
    records = []
    for i, ts, kind, host, data in rows:
        record = {**loads(data), "id": i, "ts": ts, "kind": kind}
        record.setdefault("host", host)  # records from before hosts were recorded have none
        records.append(record)
    return LogPage(records, int(total), counters, seen["endpoint"], [host for host, _ in hosts], seen["client"],
                   {host: int(n) for host, n in hosts if n})  # fmt: skip
