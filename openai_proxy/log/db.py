"""What the request log stores and how the pages query it: the schema, batch writes, reads.

Plain functions on a `openai_proxy.log.sql.Database` (SQLite or PostgreSQL, one set of SQL); `openai_proxy.log.store`
decides when and in which thread they run.

A batch is written at most once. Each store numbers its batches, and the transaction that writes one
first moves the store's row in `log_writers` to that number. A batch whose COMMIT got no answer (the
connection dropped after sending it) is kept and sent again, unchanged and with the same number: if
the first COMMIT had taken effect, the row already holds the number and the retry writes nothing.
So a lost answer neither loses nor duplicates records, counters or aggregates.

No record can stop the log. Values are made storable on the way in (token counts outside
0..2**53 count as unknown, NUL leaves text columns, spend keys are bounded), and when the database
still refuses a batch for a value (an overflow, a NUL, a constraint; not a lost connection or a
lock), the batch is written again record by record in one transaction, each record in a savepoint:
as it is, else cleaned (absurd numbers nulled, NUL replaced, marked `logRejected`), else cleaned and
without its share of the spend and minute aggregates, else skipped. Every record that was not written
as it was is counted (`log_hosts.rejected`, the pages, `openai_proxy_log_rejected_records_total`).
"""

from __future__ import annotations

import math
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
    "CREATE INDEX IF NOT EXISTS records_level_ts_id ON records (level, ts, id)",
    # How many records each level holds per endpoint, client, host and status, kept by every write
    # and trim: the pages' totals and filter choices, and the retention trim, never count `records`.
    # NULLs are '' and 0 here (part of the key).
    """CREATE TABLE IF NOT EXISTS record_totals (
        level TEXT NOT NULL, endpoint TEXT NOT NULL, client TEXT NOT NULL, host TEXT NOT NULL,
        status INTEGER NOT NULL, n BIGINT NOT NULL,
        PRIMARY KEY (level, endpoint, client, host, status)
    )""",
    "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value {float} NOT NULL)",
    # One row per store (a worker's lifetime): the number of the last batch it wrote.
    """CREATE TABLE IF NOT EXISTS log_writers (
        writer TEXT PRIMARY KEY, host TEXT NOT NULL, seq BIGINT NOT NULL, updated {float} NOT NULL
    )""",
    # Per host: records its workers dropped from a full queue, records the database refused as they
    # were (written cleaned, or skipped), and when it last wrote.
    """CREATE TABLE IF NOT EXISTS log_hosts (
        host TEXT PRIMARY KEY, dropped BIGINT NOT NULL, last_write {float} NOT NULL,
        rejected BIGINT NOT NULL DEFAULT 0
    )""",
    # Small shared values: the operator pages' last sign-out (`signout_epoch`, Unix time).
    "CREATE TABLE IF NOT EXISTS log_settings (name TEXT PRIMARY KEY, value {float} NOT NULL)",
    *logstats.SCHEMA,
)
# Columns added since the first release: a log created by an older version gets them at start.
ADDED_COLUMNS = {
    "records": (("host", "TEXT"), ("client", "TEXT")),
    "log_hosts": (("rejected", "BIGINT NOT NULL DEFAULT 0"),),
}
# Made after the added columns. A filtered page walks one of these newest first and stops after a
# page (keyset pagination): without them a filter that matches a few records among a million reads
# all the others. (A log of a million records made by an older version builds them once, at start.)
INDEXES = (
    # Replaced by records_level_ts_id: with the id in it, a page number's offset is skipped in the
    # index alone on PostgreSQL too (an index-only scan), and the order needs no sort for ties.
    "DROP INDEX IF EXISTS records_level_ts",
    "CREATE INDEX IF NOT EXISTS records_level_client_ts ON records (level, client, ts, id)",
    "CREATE INDEX IF NOT EXISTS records_level_status_ts ON records (level, status, ts, id)",
    "CREATE INDEX IF NOT EXISTS records_level_endpoint_ts ON records (level, endpoint, ts, id)",
    # A request id (the proxy's, the client's or upstream's) finds its records at once.
    "CREATE INDEX IF NOT EXISTS records_request_id ON records (request_id)",
    "CREATE INDEX IF NOT EXISTS records_incoming_request_id ON records (incoming_request_id)",
    "CREATE INDEX IF NOT EXISTS records_upstream_request_id ON records (upstream_request_id)",
)
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
    "INSERT INTO log_hosts (host, dropped, rejected, last_write) VALUES (?, ?, ?, ?) ON CONFLICT (host)"
    " DO UPDATE SET dropped = log_hosts.dropped + excluded.dropped,"
    " rejected = log_hosts.rejected + excluded.rejected,"
    " last_write = GREATEST(log_hosts.last_write, excluded.last_write)"
)
# Keep the `retention` newest records of a level: the totals say how many there are, so the trim
# reads only the oldest ones it deletes (finding the (retention+1)-th newest read `retention` index
# entries per batch: a million, four times a second, on a full log of a million).
_LEVEL_COUNT = "SELECT COALESCE(SUM(n), 0) FROM record_totals WHERE level = ?"
_TRIM = (
    "DELETE FROM records WHERE id IN (SELECT id FROM records WHERE level = ? ORDER BY id LIMIT ?)"
    " RETURNING level, endpoint, client, host, status"
)
_ADD_TOTAL = (
    "INSERT INTO record_totals (level, endpoint, client, host, status, n) VALUES (?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (level, endpoint, client, host, status) DO UPDATE SET n = record_totals.n + excluded.n"
)
_SUBTRACT_TOTAL = "UPDATE record_totals SET n = n - ? WHERE level = ? AND endpoint = ? AND client = ? AND host = ? AND status = ?"
# The totals of a log written before they were kept (run once, the first time it is opened since).
_TOTALS_MISSING = "SELECT EXISTS (SELECT 1 FROM records) AND NOT EXISTS (SELECT 1 FROM record_totals)"
_BACKFILL_TOTALS = (
    "INSERT INTO record_totals (level, endpoint, client, host, status, n)"
    " SELECT level, SUBSTR(COALESCE(endpoint, ''), 1, 200), SUBSTR(COALESCE(client, ''), 1, 200),"
    " SUBSTR(COALESCE(host, ''), 1, 200), COALESCE(status, 0), COUNT(*) FROM records GROUP BY 1, 2, 3, 4, 5"
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
        for statement in INDEXES:
            db.execute(statement)
        # Records but no totals: a log written before totals were kept. (Asked after the statements
        # above, which take SQLite's write lock only when they create something: a read first would
        # pin a snapshot that another worker's schema write makes stale, and fail.)
        if db.execute(_TOTALS_MISSING).fetchone()[0]:
            db.execute(_BACKFILL_TOTALS)
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
        usage = e.get("usage") if isinstance(e.get("usage"), dict) else {}
        if e.get("usageSource") == "estimated":
            usage = {}
        out["request_count"] += 1
        out["total_request_time"] += seconds
        out["max_request_time"] = max(out["max_request_time"], seconds)
        # A client that went away is counted as cancelled, not as an error of the proxy or upstream.
        out["error_count"] += logstats.is_error(e)
        out["overload_count"] += bool(e.get("overloaded"))
        out["cancelled_count"] += bool(e.get("cancelled"))
        out["retry_count"] += logstats.count(e.get("retries"))
        for kind in ("prompt", "cached", "completion"):
            tokens = logstats.count(usage.get(f"{kind}_tokens"))
            out[f"max_{kind}_tokens"] = max(out[f"max_{kind}_tokens"], float(tokens))
    return out


def text_column(value: Any) -> str | None:
    """A value for a TEXT column that every backend takes (PostgreSQL refuses NUL in text)."""
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return text.replace("\x00", "\ufffd")


def int_column(value: Any) -> int | None:
    """A value for an INTEGER column: a 64-bit whole number, else NULL."""
    ok = isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63
    return value if ok else None


def clean_entry(value: Any) -> Any:
    """`value` with what a database may refuse taken out: numbers beyond +-2**53 and non-finite ones
    become null, NUL in text becomes U+FFFD, anything that is not JSON becomes its text."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -logstats.MAX_COUNT < value < logstats.MAX_COUNT else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {clean_entry(str(k)): clean_entry(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_entry(v) for v in value]
    return clean_entry(str(value))


@dataclass
class Written:
    """What `write_batch` did."""

    fresh: bool  # False: the batch had been written before (by a try whose COMMIT answer was lost)
    rejected: int = 0  # records the database refused as they were: written cleaned, or skipped
    skipped: int = 0  # of those, records not written at all
    reason: str | None = None  # the first refusal, for the log


# One record, ready to insert: (kind, the entry as stored, its level, its row).
Prepared = tuple[str, dict[str, Any], str, tuple[Any, ...]]


def prepare(batch: Batch, kind: str, entry: dict[str, Any], ts: float) -> Prepared:
    if kind != "completion":  # completion records were built and redacted by completion_log
        entry = redact({**entry, "pid": batch.pid, "host": batch.host})
    level = level_of(kind, entry)
    row = (ts, level, kind, text_column(entry.get("requestId")), text_column(entry.get("incomingRequestId")),
           text_column(entry.get("upstreamRequestId")), text_column(entry.get("endpoint")),
           int_column(entry.get("status")), int_column(entry.get("pid", batch.pid)), text_column(batch.host),
           text_column(entry.get("client")), dumps_text(entry))  # fmt: skip
    return kind, entry, level, row


def write_batch(db: Database, batch: Batch, retention: int) -> Written:
    """Insert the records, add to the counters and aggregates, trim to `retention`: one transaction.

    Not fresh when this batch had been written already (by a try whose COMMIT answer was lost):
    nothing is written twice. A value the database refuses costs that record, never the batch.
    """
    try:
        prepared = [prepare(batch, kind, entry, ts) for kind, entry, ts in batch.items]
        return Written(_write_together(db, batch, prepared, retention))
    except Exception as exc:
        if db.lost or not db.refuses_value(exc):
            raise  # the database, not a value: the batch is kept and sent again, unchanged
    return _write_one_by_one(db, batch, retention)


def _write_together(db: Database, batch: Batch, prepared: list[Prepared], retention: int) -> bool:
    try:
        with db.pipeline():  # everything up to the claim's answer in one round trip (PostgreSQL)
            db.begin_write()
            claim = db.execute(_CLAIM, (batch.writer, batch.host, batch.seq, batch.at))
            _insert(db, prepared)
            _finish(db, batch, {level for _, _, level, _ in prepared}, 0, retention)
            fresh = claim.fetchone() is not None
        if not fresh:  # written before: undo this copy
            db.rollback()
            return False
        db.commit()
    except BaseException:
        db.rollback()
        raise
    return True


def _write_one_by_one(db: Database, batch: Batch, retention: int) -> Written:
    """The batch again, each record in a savepoint, so a refused value costs only its record."""
    rejected, skipped, reason, levels = 0, 0, None, set()
    try:
        db.begin_write()
        if db.execute(_CLAIM, (batch.writer, batch.host, batch.seq, batch.at)).fetchone() is None:
            db.rollback()
            return Written(False)
        for kind, entry, ts in batch.items:
            level, refusal = _write_record(db, batch, kind, entry, ts)
            if level is None:
                skipped += 1
            else:
                levels.add(level)
            if refusal is not None:
                rejected += 1
                reason = reason or refusal
        _finish(db, batch, levels, rejected, retention)
        db.commit()
    except BaseException:
        db.rollback()
        raise
    return Written(True, rejected, skipped, reason)


def _write_record(
    db: Database, batch: Batch, kind: str, entry: dict[str, Any], ts: float
) -> tuple[str | None, str | None]:
    """(the level it was written at, or None if skipped; why the database refused it as it was, or None)."""
    refusal: str | None = None
    for step in ("as it is", "cleaned", "without aggregates"):
        db.execute("SAVEPOINT log_record")
        try:
            candidate = entry if refusal is None else {**clean_entry(entry), "logRejected": refusal}
            prepared = prepare(batch, kind, candidate, ts)
            _insert(db, [prepared], aggregates=step != "without aggregates")
        except Exception as exc:
            if db.lost or not db.refuses_value(exc):
                raise
            db.execute("ROLLBACK TO SAVEPOINT log_record")
            db.execute("RELEASE SAVEPOINT log_record")
            refusal = refusal or f"{type(exc).__name__}: {exc}"[:300]
            continue
        db.execute("RELEASE SAVEPOINT log_record")
        return prepared[2], refusal
    return None, refusal


def _insert(db: Database, prepared: list[Prepared], *, aggregates: bool = True) -> None:
    """Records, their totals, their counters and (unless told not to) their spend and minute aggregates."""
    db.insert_rows(_INSERT, [row for _, _, _, row in prepared])
    totals: dict[tuple[Any, ...], int] = {}
    for _, _, level, row in prepared:
        key = total_key(level, row[6], row[10], row[9], row[7])
        totals[key] = totals.get(key, 0) + 1
    db.executemany(_ADD_TOTAL, [(*key, n) for key, n in sorted(totals.items())])
    completions = [(entry, row[0]) for kind, entry, _, row in prepared if kind == "completion"]
    if not completions:
        return
    totals = tally(e for e, _ in completions)
    db.executemany(_ADD, [(k, v) for k, v in sorted(totals.items()) if k in SUMS])
    db.executemany(_RAISE, [(k, v) for k, v in sorted(totals.items()) if k in MAXIMA])
    if aggregates:
        logstats.add(db, completions)


def _finish(db: Database, batch: Batch, levels: set[str], rejected: int, retention: int) -> None:
    """What a batch writes besides its records: the peak, the host's row, the trim, the pruning."""
    if batch.peak:
        db.execute(_RAISE, ("max_parallel", float(batch.peak)))
    db.execute(_HOST, (batch.host, batch.dropped, rejected, batch.at))
    for level in sorted(levels):
        _trim(db, level, retention)
    if batch.prune:
        logstats.prune(db, batch.at)
        db.execute("DELETE FROM log_writers WHERE updated < ?", (batch.at - WRITERS_KEEP_S,))


def total_key(
    level: str, endpoint: Any, client: Any, host: Any, status: Any
) -> tuple[str, str, str, str, int]:
    """A record's row in `record_totals` (as `_BACKFILL_TOTALS` makes it from a stored record)."""

    def text(value: Any) -> str:
        return logstats.key_text(value) if value is not None else ""

    return level, text(endpoint), text(client), text(host), status if status is not None else 0


def _trim(db: Database, level: str, retention: int) -> None:
    """Delete a level's oldest records beyond `retention`, and take them off the totals."""
    excess = int(db.execute(_LEVEL_COUNT, (level,)).fetchone()[0]) - retention
    if excess <= 0:
        return
    gone: dict[tuple[Any, ...], int] = {}
    for row in db.execute(_TRIM, (level, excess)).fetchall():
        key = total_key(*row)
        gone[key] = gone.get(key, 0) + 1
    db.executemany(_SUBTRACT_TOTAL, [(n, *key) for key, n in sorted(gone.items())])
    db.execute("DELETE FROM record_totals WHERE level = ? AND n <= 0", (level,))


_SIGNOUT = "signout_epoch"


def read_signout_epoch(db: Database) -> float:
    """When the operator pages were last signed out of (Unix time; 0 if never), on any host."""
    try:
        row = db.execute("SELECT value FROM log_settings WHERE name = ?", (_SIGNOUT,)).fetchone()
    except Exception as exc:
        if not db.missing_table(exc):
            raise
        return 0.0  # a log made before sign-outs were recorded: none was
    return float(row[0]) if row else 0.0


def raise_signout_epoch(db: Database, at: float) -> None:
    """Record a sign-out at `at`: every sign-in cookie issued until then stops working.

    Cookies carry whole seconds and one issued within the second of a sign-out is dated a second
    after it (`openai_proxy.inbound.auth.session_cookie_value`), so each sign-out also moves the epoch
    at least a second past the last one: it ends those cookies too.
    """
    upsert = (
        "INSERT INTO log_settings (name, value) VALUES (?, ?)"
        " ON CONFLICT (name) DO UPDATE SET value = GREATEST(log_settings.value + 1, excluded.value)"
    )
    at = float(int(at))
    try:
        db.execute(upsert, (_SIGNOUT, at))
    except Exception as exc:
        if not db.missing_table(exc):
            raise
        create_schema(db)
        db.execute(upsert, (_SIGNOUT, at))


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

    def where(self, level: str, walk: str | None = None) -> tuple[str, list[Any]]:
        """The SQL condition and its arguments. `walk`: the one filter column whose index the query
        may use (`choose_walk`; "level": none of them, only the level's index in time order); the
        others are written as expressions (`status + 0`, `client || ''`), which no index serves, so
        the database cannot pick an index the totals say is worse. None: any (the database chooses)."""

        def col(name: str) -> str:
            if walk is None or walk == name or (name == "level" and walk != "request_id"):
                return name
            return f"({name} + 0)" if name == "status" else f"({name} || '')"

        sql, args = [f"{col('level')} = ?"], [level]
        if self.status is not None:
            sql.append(f"{col('status')} = ?")
            args.append(self.status)
        if self.status_class is not None:
            sql.append(f"{col('status')} BETWEEN ? AND ?")
            args += [self.status_class * 100, self.status_class * 100 + 99]
        for column in ("endpoint", "host", "client"):
            if getattr(self, column):
                sql.append(f"{col(column)} = ?")
                args.append(getattr(self, column))
        if self.request_id:
            # Spelled out (not `? IN (...)`), so that each database can use an index per column.
            sql.append("(request_id = ? OR incoming_request_id = ? OR upstream_request_id = ?)")
            args += [self.request_id] * 3
        return " AND ".join(sql), args

    def matches(self, endpoint: str, client: str, host: str, status: int) -> bool:
        """Whether records of this `record_totals` row pass the filter (the request id aside)."""
        if self.status is not None and status != self.status:
            return False
        if self.status_class is not None and status // 100 != self.status_class:
            return False
        return all(
            wanted is None or wanted[: logstats.MAX_KEY_CHARS] == have
            for wanted, have in ((self.endpoint, endpoint), (self.client, client), (self.host, host))
        )


@dataclass(frozen=True)
class Cursor:
    """A record's place in the pages' order (newest first: finish time, then id): where the next
    or previous page starts. Written `<ts>_<id>` in links; the time as Python writes a float, so it
    reads back exactly."""

    ts: float
    id: int

    def __str__(self) -> str:
        return f"{self.ts!r}_{self.id}"

    @classmethod
    def parse(cls, text: str) -> Cursor:
        """The cursor `text` names; ValueError when it names none."""
        ts, sep, ident = text.partition("_")
        if not sep or not ident.isascii() or not ident.isdigit() or len(ident) > 19:
            raise ValueError(text)
        value = float(ts)
        if not math.isfinite(value) or not ts.isascii():
            raise ValueError(text)
        return cls(value, int(ident))


@dataclass(frozen=True)
class Position:
    """Which page: the newest (default), the records older than `before`, those newer than `after`,
    or the `page`-th page counted from the newest (an offset: links use cursors, bookmarks may not)."""

    before: Cursor | None = None
    after: Cursor | None = None
    page: int = 1


NEWEST = Position()


@dataclass
class LogPage:
    """One page of records (newest first) and what the page shows around them."""

    records: list[dict[str, Any]]
    total: int | None  # records that pass the filter, from the totals; None with a request id
    counters: dict[str, float]
    endpoints: list[str]
    hosts: list[str] = field(default_factory=list)  # every host that has written to the log
    clients: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)  # per host, as saved in the database
    rejected: dict[str, int] = field(
        default_factory=dict
    )  # per host: records the database refused as they were
    older: Cursor | None = None  # where the next older page starts, if there is one
    newer: Cursor | None = None  # where the next newer page ends, if there is one
    # Of the records that pass the filter: requests (not retried attempts, which have no status),
    # and the requests the other level holds; None with a request id.
    requests: int | None = None
    elsewhere: int | None = None


def empty_counters() -> dict[str, float]:
    return dict.fromkeys(SUMS + MAXIMA, 0.0)


def read_counters(db: Database) -> dict[str, float]:
    counters = empty_counters()
    counters.update((name, float(value)) for name, value in db.execute("SELECT name, value FROM counters"))
    return counters


_COLUMNS = "SELECT id, ts, kind, host, data FROM records"
_NEWEST_FIRST = "ORDER BY ts DESC, id DESC"


# The filter columns with an index of their own, (level, column, ts, id): see INDEXES.
WALKABLE = ("client", "endpoint", "status")
# Reading every record of a status class and sorting them costs about this many walked index entries
# each (a range of (level, status, ts) is not in time order).
SORT_COST = 3


def choose_walk(where: LogFilter, totals: list[tuple[str, str, str, int, int]], wanted: int) -> str:
    """Which index a page's query should walk to find `wanted` records (the page, and any offset
    before it), judged from the exact totals the database's planner does not have: the level's
    index in time order ("level"), or the index of one filter column ("client", "request_id"...). Walking an index in time order
    reads about `wanted` x (its records / the records that pass) entries; a status class, whose
    range is not in time order, reads all of its records and sorts them. Without this, SQLite (no
    statistics) walks the status index for `status=200` when `client=` would find a rare client's
    page at once, or sorts every 2xx record of a level."""
    if where.request_id:
        return "request_id"  # its own indexes find a handful of records (SQLite would walk the level)
    passing = sum(n for e, c, h, s, n in totals if where.matches(e, c, h, s))
    if not passing:
        return "level"
    level = sum(n for *_, n in totals)
    best, cost = "level", wanted * level / passing
    for column in WALKABLE:
        if column == "status" and where.status is None and where.status_class is None:
            continue
        if column != "status" and getattr(where, column) is None:
            continue
        alone = LogFilter(**{k: getattr(where, k) for k in (("status", "status_class") if column == "status"
                                                            else (column,))})  # fmt: skip
        in_index = sum(n for e, c, h, s, n in totals if alone.matches(e, c, h, s))
        if column == "status" and where.status is None:
            walked = SORT_COST * in_index
        else:
            walked = min(in_index, wanted * in_index / passing)
        if walked < cost:
            best, cost = column, walked
    return best


def _select_records(
    db: Database, level: str, where: LogFilter, at: Position, per_page: int, walk: str | None = None
) -> list[Any]:
    """One query: the page's records and one more (which says whether there is a page beyond),
    newest first, walking an index from the cursor (keyset pagination): the same cost on page 1 and
    page 20,000. `page` skips in the index alone (the ids), then reads that page's rows."""
    sql, args = where.where(level, walk)
    if at.after is not None:  # the page above: walked oldest first from the cursor, then turned
        rows = db.execute(
            f"{_COLUMNS} WHERE {sql} AND ts >= ? AND (ts > ? OR id > ?) ORDER BY ts, id LIMIT ?",
            [*args, at.after.ts, at.after.ts, at.after.id, per_page + 1],
        ).fetchall()
        return rows[::-1]
    if at.before is not None:
        sql += " AND ts <= ? AND (ts < ? OR id < ?)"
        args += [at.before.ts, at.before.ts, at.before.id]
    if at.page > 1 and at.before is None:
        return db.execute(
            f"{_COLUMNS} WHERE id IN (SELECT id FROM records WHERE {sql} {_NEWEST_FIRST} LIMIT ? OFFSET ?)"
            f" {_NEWEST_FIRST}",
            [*args, per_page + 1, (at.page - 1) * per_page],
        ).fetchall()
    return db.execute(f"{_COLUMNS} WHERE {sql} {_NEWEST_FIRST} LIMIT ?", [*args, per_page + 1]).fetchall()


def read_page(db: Database, level: str, where: LogFilter, per_page: int, at: Position = NEWEST) -> LogPage:
    """Records of one level, newest first, with the counters, the number of records that pass the
    filter, the endpoints and clients seen at that level, the hosts that write to the log and the
    records each of them dropped. One query reads `records`; the rest comes from small tables."""
    # One read transaction, so the counters, the totals and the rows agree with each other.
    db.begin_read()
    try:
        # Both levels' (a small table): this page's, and how many requests the other page holds.
        every = db.execute(
            "SELECT level, endpoint, client, host, status, n FROM record_totals WHERE n > 0"
        ).fetchall()
        totals = [(e, c, h, s, int(n)) for lv, e, c, h, s, n in every if lv == level]
        others = [(e, c, h, s, int(n)) for lv, e, c, h, s, n in every if lv != level]
        found = [row for row in totals if where.matches(*row[:4])]
        found_elsewhere = [row for row in others if where.matches(*row[:4])]
        # Nothing passes the filter: no need to look (an index walk that finds nothing reads it all).
        walk = choose_walk(where, totals, at.page * per_page + 1) if db.plans_blind else None
        rows = _select_records(db, level, where, at, per_page, walk) if found or where.request_id else []
        # Every host that has written to this log, on both pages (a small table; no scan of records).
        hosts = db.execute("SELECT host, dropped, rejected FROM log_hosts ORDER BY host").fetchall()
        counters = read_counters(db)
    except BaseException:
        db.rollback()
        raise
    db.commit()
    more = len(rows) > per_page
    if at.after is not None:
        rows, newer_beyond = rows[-per_page:], more
    else:
        rows, newer_beyond = rows[:per_page], at.before is not None or at.page > 1
    records = []
    for i, ts, kind, host, data in rows:
        record = {**loads(data), "id": i, "ts": ts, "kind": kind}
        record.setdefault("host", host)  # records from before hosts were recorded have none
        records.append(record)
    first, last = (records[0], records[-1]) if records else (None, None)
    older_beyond = more if at.after is None else bool(records)
    return LogPage(
        records,
        None if where.request_id else sum(n for *_, n in found),
        counters,
        sorted({e for e, *_ in totals if e}),
        [host for host, _, _ in hosts],
        sorted({c for _, c, *_ in totals if c}),
        {host: int(n) for host, n, _ in hosts if n},
        {host: int(n) for host, _, n in hosts if n},
        older=Cursor(last["ts"], last["id"]) if last and older_beyond else None,
        newer=Cursor(first["ts"], first["id"]) if first and newer_beyond else None,
        requests=None if where.request_id else sum(n for *_, status, n in found if status),
        elsewhere=None if where.request_id else sum(n for *_, status, n in found_elsewhere if status),
    )
