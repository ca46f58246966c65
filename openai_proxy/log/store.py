"""The request log shared by all workers (and hosts), written in batches off the request path.

The database is a SQLite file (WAL), or a PostgreSQL database that several hosts share
(`openai_proxy.log.sql`). The completion and retry sinks only append to an in-memory queue (bounded; drops are
counted here, in `/metrics`, and in the database once it is reachable). One writer greenlet per worker
flushes the queue every FLUSH_INTERVAL_S in one transaction: the records, the cumulative counters, the
aggregates and the retention trim (`openai_proxy.log.db`). Every database call runs in a one-thread pool that
owns the worker's one connection: a locked, slow or unreachable database waits in that thread, never
in the gevent hub, so it cannot stall the worker's requests.

A failed write keeps its batch and tries again later (with backoff, reconnecting): the same batch,
unchanged, because a failure may have come after the COMMIT took effect (`openai_proxy.log.db` recognises a
batch it has already written). Records queued meanwhile wait behind it, up to `max_queue` in all.
A value the database refuses is not such a failure: that record is written without it, or skipped,
and counted (`rejected`, `on_reject`); the rest of its batch is written (`openai_proxy.log.db`).

Quick questions that must not wait behind the writer (`/health`'s probe, the pages' sign-out epoch)
go to a second thread with its own short-timeout connection, and are waited for with a hard
deadline (`SideLine`): a locked, hung or unreachable database costs them that deadline at most.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import gevent
from gevent.event import Event
from gevent.lock import Semaphore
from gevent.threadpool import ThreadPool

from openai_proxy.jsonio import iso_or_none
from openai_proxy.log import db as logdb
from openai_proxy.log import stats as logstats
from openai_proxy.log import url as logurl
from openai_proxy.log.db import NEWEST, Batch, LogFilter, LogPage, Position, Queued
from openai_proxy.log.sql import Database, open_database
from openai_proxy.log.stats import MinuteRow, SpendRow
from openai_proxy.redact import redact

log = logging.getLogger("openai_proxy.logstore")

FLUSH_INTERVAL_S = 0.25
MAX_BACKOFF_S = 5.0
MAX_QUEUE = 10_000
BUSY_TIMEOUT_MS = 2_000
PRUNE_INTERVAL_S = 60.0
# /health: how long it waits for its probe of the database.
PROBE_DEADLINE_S = 0.5
# The pages: how long a request with a sign-in cookie waits to learn the last sign-out (a small read),
# and a sign-out to record it. /health asks with a shorter deadline, to answer within its second.
SIGNOUT_READ_DEADLINE_S = 1.0
SIGNOUT_WRITE_DEADLINE_S = 2.0
# A record older than this still waiting for the database means this host's records are not being
# written (batches go every quarter second; a healthy write takes milliseconds).
STALE_RECORD_S = 5.0

T = TypeVar("T")


class LogStore:
    """One worker's access to the shared log: a bounded queue, a writer greenlet, one connection."""

    def __init__(
        self, target: str, retention: int, *, max_queue: int = MAX_QUEUE, host: str | None = None
    ) -> None:
        self.target = target  # a SQLite path or a postgresql:// URL
        self.path = logurl.shown(target)  # what pages and logs may show
        self.backend = "postgresql" if logurl.is_postgres_url(target) else "sqlite"
        self.retention = retention
        self.max_queue = max_queue
        self.host = host or socket.gethostname()
        self.busy_timeout_ms = BUSY_TIMEOUT_MS
        self.dropped = 0
        self.rejected = 0  # records the database refused as they were (written cleaned, or skipped)
        self.write_failures = 0
        self.written = 0
        self.already_written = 0  # batches a retry found written (their first COMMIT's answer was lost)
        self.last_error: str | None = None
        self.last_write_at: float | None = None
        self.consecutive_failures = 0  # writes failed since the last one that worked
        self._writing_since: float | None = None  # a write in progress: since when
        self.on_drop: Callable[[], None] | None = None  # metrics
        # Tables of others that live in the log's database (`openai_proxy.objects`), made with its schema.
        self.extra_schema: list[str] = []
        self.before_close: list[Callable[[], None]] = []  # their last writes, while the connection lives
        self.on_reject: Callable[[int], None] | None = None  # metrics: how many records of a batch
        self._queue: deque[Queued] = deque()
        self._unsure: Batch | None = None  # the batch being written, or waiting to be written again
        self._dropped_saved = 0
        self._seq = 0
        self._writer_id = ""
        self._last_prune = 0.0
        self._peak = 0
        self._peak_dirty = False
        self._pending = Event()
        self._stop = Event()
        self._flushing = Semaphore()
        # Created on first use, by the worker that uses them (never inherited over a fork).
        self._writer: gevent.Greenlet | None = None
        self._pool: ThreadPool | None = None
        self._db: Database | None = None
        self.side = SideLine(target)

    # -- the request path: sinks only queue ---------------------------------------------------------
    def append(self, entry: dict[str, Any]) -> None:
        """Completion sink: queue the (already redacted) record; never blocks, never raises."""
        self._enqueue("completion", entry)

    def append_retry(self, event: dict[str, Any]) -> None:
        """Retry sink (`Upstream.retry_sinks`)."""
        self._enqueue("retry", event)

    def note_peak(self, in_use: int) -> None:
        """A new server-wide high-water mark of parallel upstream calls (`Gate.on_new_peak`)."""
        self._peak = max(self._peak, in_use)
        self._peak_dirty = True
        self._wake()

    @property
    def queued(self) -> int:
        """Records waiting for the database, the batch being written included."""
        return len(self._queue) + (len(self._unsure.items) if self._unsure else 0)

    @property
    def unsaved_dropped(self) -> int:
        """Records this worker dropped that the database does not count yet."""
        return self.dropped - self._dropped_saved

    def _enqueue(self, kind: str, entry: dict[str, Any]) -> None:
        if self.queued >= self.max_queue:
            self.dropped += 1
            if self.on_drop is not None:
                self.on_drop()
            if self.dropped % 1000 == 1:
                log.warning(
                    "log store queue full (%d); %d records dropped so far", self.max_queue, self.dropped
                )
            self._wake()  # the count itself is saved with the next batch
            return
        self._queue.append((kind, entry, time.time()))
        self._wake()

    def _wake(self) -> None:
        if self._writer is None and not self._stop.is_set():
            self._writer = gevent.spawn(self._run)
        if not self._pending.is_set():
            self._pending.set()

    # -- the writer ---------------------------------------------------------------------------------
    def _run(self) -> None:
        delay = FLUSH_INTERVAL_S
        while not self._stop.is_set():
            self._pending.wait()
            self._stop.wait(delay)  # let a batch build up; returns at once on close()
            self._pending.clear()
            try:
                ok = self.flush()
            except Exception:
                log.exception("log store writer failed")
                ok = False
            delay = FLUSH_INTERVAL_S if ok else min(delay * 2, MAX_BACKOFF_S)
            if self._queue or self._peak_dirty or self._unsure or self.unsaved_dropped:
                self._pending.set()

    def flush(self) -> bool:
        """Write what is queued now; False (and the records kept) when the database failed."""
        with self._flushing:  # one batch at a time: a batch in doubt goes first, alone
            batch = self._unsure or self._next_batch()
            if batch is None:
                return True
            self._unsure = batch
            self._writing_since = time.time()
            try:
                written = self._call(self._write, batch)
            except Exception as exc:
                self.write_failures += 1
                self.consecutive_failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("log store %s: write failed (%s); %d records kept for the next try",
                            self.path, self.last_error, self.queued)  # fmt: skip
                return False
            finally:
                self._writing_since = None
            self._unsure = None
        self.consecutive_failures = 0
        if written.rejected:
            self._count_rejected(written)
        self._dropped_saved += batch.dropped
        self.written += len(batch.items) - written.skipped
        self.already_written += not written.fresh
        self.last_error = None
        self.last_write_at = time.time()
        return True

    def _count_rejected(self, written: logdb.Written) -> None:
        self.rejected += written.rejected
        log.warning("log store %s: %d record(s) refused by the database as they were (%s); written without "
                    "the refused values, or skipped", self.path, written.rejected, written.reason)  # fmt: skip
        if self.on_reject is not None:
            self.on_reject(written.rejected)

    def _next_batch(self) -> Batch | None:
        peak, self._peak_dirty = (self._peak if self._peak_dirty else 0), False
        items = [self._queue.popleft() for _ in range(len(self._queue))]
        dropped = self.unsaved_dropped
        if not items and not peak and not dropped:
            return None
        if not self._writer_id:
            self._writer_id = f"{self.host}:{os.getpid()}:{secrets.token_hex(4)}"
        now = time.time()
        prune = now - self._last_prune >= PRUNE_INTERVAL_S
        if prune:
            self._last_prune = now
        self._seq += 1
        return Batch(self._writer_id, self._seq, self.host, os.getpid(), items, peak, dropped, prune, now)

    def close(self) -> None:
        """Flush what is queued, then release the connection and the thread (worker exit, tests)."""
        for hook in self.before_close:
            hook()
        self._stop.set()
        self._pending.set()
        if self._writer is not None:
            self._writer.join(timeout=10)
        if self.flush() and self._queue:
            self.flush()  # what queued up behind a batch that was in doubt
        if self._pool is not None:
            self._call(self._close_db)
            self._pool.kill()
            self._pool = None
        self.side.close()

    # -- reads (pages, /health, the operator's spend page) ------------------------------------------
    def page(self, level: str, where: LogFilter, per_page: int, at: Position = NEWEST) -> LogPage:
        """Records of one level, newest first, from `at`, with the counters and the endpoints seen.

        Records are stored redacted; they are masked once more on the way out, with the secrets known
        now, since rows written by an older version of the proxy may still hold one in clear.
        """
        result = self._call(self._with_db, lambda db: logdb.read_page(db, level, where, per_page, at))
        result.records = redact(result.records)
        return result

    def spend(self, since_day: str) -> list[SpendRow]:
        """Spend per UTC day, client and model from `since_day` ('YYYY-MM-DD') on, all hosts."""
        return self._call(self._with_db, lambda db: logstats.read_spend(db, since_day))

    def minutes(self, since_minute: int) -> list[MinuteRow]:
        """Requests, errors and latency histogram per minute (Unix time // 60), all hosts."""
        return self._call(self._with_db, lambda db: logstats.read_minutes(db, since_minute))

    def probe(self, deadline_s: float = PROBE_DEADLINE_S) -> str | None:
        """None when the database would take a write right now, else why not; asked on the side line,
        never behind the writer, and answered within `deadline_s` whatever the database does.
        Callers that come while a probe runs wait for that one."""
        try:
            self.side.ask(lambda db: db.probe_writable(), deadline_s, share="probe")
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def signed_out_at(self, deadline_s: float = SIGNOUT_READ_DEADLINE_S) -> float:
        """The last sign-out of the operator pages, on any host sharing this log (Unix time, 0 if
        never); raises (NoAnswer, the database's error) when it cannot be known within `deadline_s`."""
        return self.side.ask(logdb.read_signout_epoch, deadline_s, share="signout")

    def sign_out(self, at: float, deadline_s: float = SIGNOUT_WRITE_DEADLINE_S) -> None:
        """Record a sign-out at `at` for every host; raises when it could not be recorded."""
        self.side.ask(lambda db: logdb.raise_signout_epoch(db, at), deadline_s)

    def oldest_waiting_s(self) -> float | None:
        """How long the oldest record not yet written has waited (since its request finished)."""
        items = self._unsure.items if self._unsure is not None and self._unsure.items else self._queue
        return max(0.0, time.time() - items[0][2]) if items else None

    def not_written(self) -> str | None:
        """Why this worker's records are not being written now, from the writer's last known state
        (never asks the database); None while they are."""
        if self.consecutive_failures:
            return (f"the last {self.consecutive_failures} write(s) of this worker's log failed "
                    f"({self.last_error}); {self.queued} record(s) waiting")  # fmt: skip
        oldest = self.oldest_waiting_s()
        if oldest is not None and oldest > STALE_RECORD_S:
            doing = "a write has been waiting on the database" if self._writing_since else "not yet written"
            return f"this worker's oldest record waited {oldest:.1f} s ({doing}); {self.queued} record(s) waiting"
        return None

    def stats(self) -> dict[str, Any]:
        """This worker's side of the store, for /health and the pages."""
        return {
            "backend": self.backend,
            "path": self.path,
            "host": self.host,
            "queued": self.queued,
            "written": self.written,
            "dropped": self.dropped,
            "rejected": self.rejected,
            "unsavedDropped": self.unsaved_dropped,
            "writeFailures": self.write_failures,
            "alreadyWritten": self.already_written,
            "lastError": self.last_error,
            "lastWriteAt": iso_or_none(self.last_write_at),
            "consecutiveFailures": self.consecutive_failures,
            "writingForS": None
            if self._writing_since is None
            else round(time.time() - self._writing_since, 3),
            "oldestWaitingS": None if (oldest := self.oldest_waiting_s()) is None else round(oldest, 3),
        }

    def run(self, fn: Callable[[Database], T]) -> T:
        """`fn(db)` on this worker's connection, in the database thread (once more on a new connection
        if the server went away since the last use). For others that keep a table in the log's database."""
        return self._call(self._with_db, fn)

    # -- in the database thread ---------------------------------------------------------------------
    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._pool is None:
            self._pool = ThreadPool(1)
        ok, value = self._pool.apply(_outcome, (fn, *args))
        if not ok:
            raise value
        return value

    def _connect(self) -> Database:
        if self._db is None:
            db = open_database(self.target, self.busy_timeout_ms)
            try:
                logdb.create_schema(db, self.extra_schema)
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    def _with_db(self, fn: Callable[[Database], T]) -> T:
        """`fn` on the connection; once more on a new one when the server went away since last use."""
        reused = self._db is not None
        db = self._connect()
        try:
            return fn(db)
        except BaseException:
            lost = db.lost
            self._close_db()  # reopened on the next try: the server restarted, the file was replaced
            if not (reused and lost):
                raise
        return fn(self._connect())

    def _write(self, batch: Batch) -> logdb.Written:
        return self._with_db(lambda db: logdb.write_batch(db, batch, self.retention))

    def _close_db(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()


class NoAnswer(Exception):
    """The database did not answer within the deadline (the question may still be running)."""


class SideLine:
    """A second thread and connection for short questions that must not queue behind the writer.

    Each question is waited for with a hard deadline: the thread may stay blocked (a hung server, a
    lock), the caller never does. Questions queue behind each other here, so one that hangs makes
    the next ones miss their deadline too, which is the truth about the database. A question asked
    again while the same one is still running (`share`) waits for that one instead of queueing.
    """

    BUSY_TIMEOUT_MS = 200

    def __init__(self, target: str) -> None:
        self.target = target
        self._pool: ThreadPool | None = None
        self._db: Database | None = None
        self._running: dict[str, tuple[float, Any]] = {}  # share key -> (started, its result)
        self._last: Any = None  # the result of the question asked last

    def ask(self, fn: Callable[[Database], T], deadline_s: float, *, share: str | None = None) -> T:
        """`fn(db)` on the side connection; NoAnswer after `deadline_s`; its error if it failed."""
        if self._pool is None:
            self._pool = ThreadPool(1)
        now = time.monotonic()
        running = self._running.get(share) if share else None
        if running is None or running[1].ready():
            running = (now, self._pool.spawn(_outcome, self._run, fn))
            self._last = running[1]
            if share:
                self._running[share] = running
        try:
            ok, value = running[1].get(timeout=deadline_s)
        except gevent.Timeout:
            waited = time.monotonic() - running[0]
            raise NoAnswer(
                f"the database did not answer within {deadline_s:g} s (asked {waited:.1f} s ago)"
            ) from None
        if not ok:
            raise value
        return value

    def _run(self, fn: Callable[[Database], T]) -> T:
        if self._db is None:
            # No schema work here (several round trips, and a lock on PostgreSQL): the questions
            # cope with tables the writer has not created yet.
            self._db = open_database(self.target, self.BUSY_TIMEOUT_MS, quick=True)
        try:
            return fn(self._db)
        except BaseException:
            db, self._db = self._db, None  # reopened by the next question
            db.rollback()
            db.close()
            raise

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if (self._last is None or self._last.ready()) and self._db is not None:
            pool.apply(self._db.close)
        pool.kill()


def _outcome(fn: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
    # Errors travel back as values: gevent's pool would print a traceback for every failed write.
    try:
        return True, fn(*args)
    except Exception as exc:
        return False, exc
