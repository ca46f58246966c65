"""The request log shared by all workers: one SQLite file (WAL), written in batches off the request path.

The completion and retry sinks only append to an in-memory queue (bounded; drops are counted). One
writer greenlet per worker flushes the queue every FLUSH_INTERVAL_S in one transaction: the records,
the cumulative counters and the retention trim (`app.logdb`). Every SQLite call runs in a one-thread
pool that owns the worker's one connection: a locked database waits out `busy_timeout` in that thread,
not in the gevent hub, so it cannot stall the worker's requests. A failing database is counted and
logged, and its batch stays queued for the next flush (with backoff).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import gevent
from gevent.event import Event
from gevent.threadpool import ThreadPool

from app import logdb
from app.logdb import LogFilter, LogPage, Queued
from app.redact import redact

log = logging.getLogger("openai_proxy.logstore")

FLUSH_INTERVAL_S = 0.25
MAX_BACKOFF_S = 5.0
MAX_QUEUE = 10_000
BUSY_TIMEOUT_MS = 2_000
PROBE_BUSY_TIMEOUT_MS = 200

T = TypeVar("T")


class LogStore:
    """One worker's access to the shared log: a bounded queue, a writer greenlet, one connection."""

    def __init__(self, path: str, retention: int, *, max_queue: int = MAX_QUEUE) -> None:
        self.path = path
        self.retention = retention
        self.max_queue = max_queue
        self.busy_timeout_ms = BUSY_TIMEOUT_MS
        self.dropped = 0
        self.write_failures = 0
        self.written = 0
        self.last_error: str | None = None
        self.last_write_at: float | None = None
        self._queue: deque[Queued] = deque()
        self._writing = 0  # records of batches being written right now
        self._peak = 0
        self._peak_dirty = False
        self._pending = Event()
        self._stop = Event()
        # Created on first use, by the worker that uses them (never inherited over a fork).
        self._writer: gevent.Greenlet | None = None
        self._pool: ThreadPool | None = None
        self._db: sqlite3.Connection | None = None

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

    def _enqueue(self, kind: str, entry: dict[str, Any]) -> None:
        if len(self._queue) >= self.max_queue:
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.warning(
                    "log store queue full (%d); %d records dropped so far", self.max_queue, self.dropped
                )
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
            if self._queue or self._peak_dirty:
                self._pending.set()

    def flush(self) -> bool:
        """Write everything queued now; False (and the records kept) when the database failed."""
        batch = [self._queue.popleft() for _ in range(len(self._queue))]
        peak, self._peak_dirty = (self._peak if self._peak_dirty else 0), False
        if not batch and not peak:
            return True
        self._writing += len(batch)
        try:
            self._call(self._write, batch, peak)
        except BaseException as exc:
            self._requeue(batch, peak)
            if not isinstance(exc, Exception):
                raise
            self.write_failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("log store %s: write failed (%s); %d records kept for the next try",
                        self.path, self.last_error, len(self._queue))  # fmt: skip
            return False
        finally:
            self._writing -= len(batch)
        self.written += len(batch)
        self.last_error = None
        self.last_write_at = time.time()
        return True

    def _requeue(self, batch: list[Queued], peak: int) -> None:
        self._queue.extendleft(reversed(batch))
        self._peak_dirty = self._peak_dirty or bool(peak)
        while len(self._queue) > self.max_queue:
            self._queue.popleft()
            self.dropped += 1

    def close(self) -> None:
        """Flush what is queued, then release the connection and the thread (worker exit, tests)."""
        self._stop.set()
        self._pending.set()
        if self._writer is not None:
            self._writer.join(timeout=10)
        self.flush()
        if self._pool is not None:
            self._call(self._close_db)
            self._pool.kill()
            self._pool = None

    # -- reads (pages, /health) ---------------------------------------------------------------------
    def page(self, level: str, where: LogFilter, page: int, per_page: int) -> LogPage:
        """Records of one level, newest first, with the counters and the endpoints seen.

        Records are stored redacted; they are masked once more on the way out, with the secrets known
        now, since rows written by an older version of the proxy may still hold one in clear.
        """
        result = self._call(lambda: logdb.read_page(self._connect(), level, where, page, per_page))
        result.records = redact(result.records)
        return result

    def check_writable(self) -> str | None:
        """None when this worker can take the database's write lock right now, else why not."""
        try:
            self._call(self._probe)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def stats(self) -> dict[str, Any]:
        """This worker's side of the store, for /health."""
        return {
            "path": self.path,
            "queued": len(self._queue) + self._writing,
            "written": self.written,
            "dropped": self.dropped,
            "writeFailures": self.write_failures,
            "lastError": self.last_error,
            "lastWriteAt": self.last_write_at,
        }

    # -- in the database thread ---------------------------------------------------------------------
    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._pool is None:
            self._pool = ThreadPool(1)
        ok, value = self._pool.apply(_outcome, (fn, *args))
        if not ok:
            raise value
        return value

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            folder = os.path.dirname(self.path)
            if folder:
                os.makedirs(folder, exist_ok=True)
            self._db = logdb.connect(self.path, self.busy_timeout_ms)
        return self._db

    def _write(self, batch: list[Queued], peak: int) -> None:
        try:
            logdb.write_batch(self._connect(), batch, os.getpid(), self.retention, peak)
        except BaseException:
            self._close_db()  # reopened on the next try: the file may have been replaced or repaired
            raise

    def _probe(self) -> None:
        db = self._connect()
        db.execute(f"PRAGMA busy_timeout = {PROBE_BUSY_TIMEOUT_MS}")
        try:
            db.execute("BEGIN IMMEDIATE")
            db.execute("ROLLBACK")
        finally:
            db.execute(f"PRAGMA busy_timeout = {self.busy_timeout_ms}")

    def _close_db(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.close()


def _outcome(fn: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
    # Errors travel back as values: gevent's pool would print a traceback for every failed write.
    try:
        return True, fn(*args)
    except Exception as exc:
        return False, exc
