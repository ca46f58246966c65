"""The object book, kept in the request log's database (`OPENAI_PROXY_LOG_DB`): one table, shared by
every worker of a host (SQLite) or by every host (PostgreSQL).

Writes are synchronous, unlike the log's records: a create call's answer reaches the client only
once the owner of the new id is in the database, so a follow-up sent at once to another worker or
host finds it. They run in the log store's database thread, on its connection (`LogStore.run`), and
wait at most RECORD_WAIT_S. A write that fails or is too slow keeps its row in this worker (which
answers for it at once) and is written again every few seconds until the database takes it; while
the database is failing, records do not wait for it at all, so a sick database slows no request. An
id's owner never changes (ids are unique; the first writer wins), so each worker keeps a cache of the
answers it found; a "no record" answer is never cached (another worker may record it the next moment).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

import gevent

from openai_proxy.log import RequestLog
from openai_proxy.log.sql import Database
from openai_proxy.objects import BookUnavailable, Owner

log = logging.getLogger("openai_proxy.objects")

T = TypeVar("T")

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS stored_objects (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        client TEXT NOT NULL,
        key_name TEXT,  -- the upstream key of the pool that created it; NULL: not a pool key
        created {float} NOT NULL,
        host TEXT
    )""",
)
_INSERT = (
    "INSERT INTO stored_objects (id, kind, client, key_name, created, host) VALUES (?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (id) DO NOTHING"
)
_SELECT = "SELECT kind, client, key_name FROM stored_objects WHERE id = ?"

RECORD_WAIT_S = 2.0
LOOKUP_WAIT_S = 2.0
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 5.0
CACHE_SIZE = 20_000
MAX_PENDING = 100_000
LOG_EVERY_S = 10.0


class LogObjectBook:
    """`openai_proxy.objects.ObjectBook` in the log's database, with this worker's cache and pending rows."""

    def __init__(self, store: RequestLog) -> None:
        self._store = store
        store.extra_schema.extend(SCHEMA)
        store.before_close.append(self.close)
        self._cache: OrderedDict[str, Owner] = OrderedDict()
        self._pending: dict[str, tuple[Owner, float]] = {}  # not yet in the database
        self._failing = False
        self._retry: gevent.Greenlet | None = None
        self._closed = False
        self._lookup_failure_logged = -LOG_EVERY_S

    # -- recording ----------------------------------------------------------------------------------
    def record(self, kind: str, object_id: str, client: str, key_name: str | None) -> None:
        if object_id in self._cache or object_id in self._pending:
            return  # recorded already (a batch retrieved again names its files again): the first wins
        owner = Owner(kind, client, key_name)
        entry = (owner, time.time())
        self._pending[object_id] = entry
        if len(self._pending) > MAX_PENDING:  # the database has been away for very long
            self._pending.pop(next(iter(self._pending)))
        if self._failing or not self._write({object_id: entry}, RECORD_WAIT_S):
            self._retry_soon()

    def _write(self, rows: dict[str, tuple[Owner, float]], wait_s: float) -> bool:
        values = [(oid, o.kind, o.client, o.key_name, at, self._store.host) for oid, (o, at) in rows.items()]
        try:
            self._bounded(lambda db: db.executemany(_INSERT, values), wait_s)
        except BookUnavailable as exc:
            if not self._failing:
                log.warning("stored objects: cannot write to %s (%s); %d kept in this worker until it can",
                            self._store.path, exc, len(self._pending))  # fmt: skip
            self._failing = True
            return False
        if self._failing:
            log.info("stored objects: %s takes writes again", self._store.path)
        self._failing = False
        for oid, entry in rows.items():
            if self._pending.get(oid) is entry:
                del self._pending[oid]
                self._remember(oid, entry[0])
        return True

    def _retry_soon(self) -> None:
        if (self._retry is None or self._retry.dead) and not self._closed:
            self._retry = gevent.spawn(self._retry_loop)

    def _retry_loop(self) -> None:
        delay = RETRY_FIRST_S
        while self._pending and not self._closed:
            gevent.sleep(delay)
            ok = self._write(dict(self._pending), RECORD_WAIT_S)
            delay = RETRY_FIRST_S if ok else min(delay * 2, RETRY_MAX_S)

    # -- looking up ---------------------------------------------------------------------------------
    def owner(self, object_id: str) -> Owner | None:
        found = self._cache.get(object_id)
        if found is not None:
            self._cache.move_to_end(object_id)
            return found
        pending = self._pending.get(object_id)
        if pending is not None:
            return pending[0]
        try:
            row = self._bounded(lambda db: db.execute(_SELECT, (object_id,)).fetchone(), LOOKUP_WAIT_S)
        except BookUnavailable as exc:
            now = time.monotonic()
            if now - self._lookup_failure_logged >= LOG_EVERY_S:
                self._lookup_failure_logged = now
                log.warning("stored objects: cannot read %s (%s)", self._store.path, exc)
            raise
        if row is None:
            return None
        owner = Owner(*row)
        self._remember(object_id, owner)
        return owner

    def _remember(self, object_id: str, owner: Owner) -> None:
        cache = self._cache
        cache[object_id] = owner
        if len(cache) > CACHE_SIZE:
            cache.popitem(last=False)

    def _bounded(self, fn: Callable[[Database], T], wait_s: float) -> T:
        """`fn` on the log's connection, waiting `wait_s` at most (the thread may finish it later)."""
        timer = gevent.Timeout.start_new(wait_s)
        try:
            return self._store.run(fn)
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            raise BookUnavailable(f"no answer from the database within {wait_s:g} s") from None
        except Exception as exc:
            raise BookUnavailable(f"{type(exc).__name__}: {exc}") from exc
        finally:
            timer.close()

    def close(self) -> None:
        """One last try for rows still pending (the worker is stopping), then stop retrying."""
        self._closed = True
        if self._retry is not None:
            self._retry.kill(block=False)
        if self._pending:
            self._write(dict(self._pending), RECORD_WAIT_S)

    def stats(self) -> dict[str, Any]:
        return {"pending": len(self._pending), "cached": len(self._cache), "failing": self._failing}
