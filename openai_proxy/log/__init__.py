"""The request log store: SQLite or PostgreSQL, its queries and aggregates.

`open_log_store` makes one worker's store for `OPENAI_PROXY_LOG_DB` (`url`): `store.LogStore`, which
queues records off the request path and writes them in batches from a thread of its own, to a
SQLite file (one host) or a PostgreSQL database several hosts share (`sql`). The rest of the library
sees it as `RequestLog`: the completion and retry sinks, the pages' reads, `/health`'s checks, and
the stored objects' owners (`openai_proxy.objects`), whose table lives in the same database.

Stdlib-only imports (like every package face; DESIGN "Layout"): the gunicorn master imports
`log.url` to check the setting, and the store is imported where it is opened.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from openai_proxy.config import Config
    from openai_proxy.log.db import LogFilter, LogPage, Position
    from openai_proxy.log.sql import Database
    from openai_proxy.log.stats import MinuteRow, SpendRow

T = TypeVar("T")


class RequestLog(Protocol):
    """One worker's access to the request log, as the app, the pages and the object book use it."""

    path: str  # the database as pages and logs may show it (no password)
    host: str  # this server's name on the records it writes
    # Metrics: told of each record dropped (the queue was full) and of records the database refused.
    on_drop: Callable[[], None] | None
    on_reject: Callable[[int], None] | None
    # Others' tables in the log's database (the object book's): made with the schema, and their last
    # writes done before the connection closes.
    extra_schema: list[str]
    before_close: list[Callable[[], None]]

    def append(self, entry: dict[str, Any]) -> None:
        """Completion sink: queue the (already redacted) record; never blocks, never raises."""
        ...

    def append_retry(self, event: dict[str, Any]) -> None:
        """Retry sink (`Upstream.retry_sinks`)."""
        ...

    def note_peak(self, in_use: int) -> None:
        """A new high-water mark of parallel upstream calls (the gate's `on_new_peak`)."""
        ...

    def flush(self) -> bool:
        """Write what is queued now; False (and the records kept) when the database failed."""
        ...

    def page(self, level: str, where: LogFilter, per_page: int, at: Position = ...) -> LogPage:
        """Records of one level, newest first, from `at` (the newest by default), with the counters."""
        ...

    def spend(self, since_day: str) -> list[SpendRow]:
        """Spend per UTC day, client and model from `since_day` ('YYYY-MM-DD') on, all hosts."""
        ...

    def minutes(self, since_minute: int) -> list[MinuteRow]:
        """Requests, errors and latency per minute (Unix time // 60), all hosts."""
        ...

    def probe(self, deadline_s: float = ...) -> str | None:
        """None when the database would take a write right now, else why not, within `deadline_s`."""
        ...

    def not_written(self) -> str | None:
        """Why this worker's records are not being written now (never asks the database); None while
        they are."""
        ...

    def signed_out_at(self, deadline_s: float = ...) -> float:
        """The last sign-out of the operator pages on any host (Unix time, 0 if never); raises when it
        cannot be known within `deadline_s`."""
        ...

    def sign_out(self, at: float, deadline_s: float = ...) -> None:
        """Record a sign-out at `at` for every host; raises when it could not be recorded."""
        ...

    def stats(self) -> dict[str, Any]:
        """This worker's side of the store, for `/health` and the pages."""
        ...

    def run(self, fn: Callable[[Database], T]) -> T:
        """`fn(db)` on this worker's connection, in the database thread (for others' tables)."""
        ...

    def close(self) -> None:
        """Flush what is queued, then release the connection and the thread."""
        ...


def open_log_store(config: Config) -> RequestLog:
    """This worker's store for `OPENAI_PROXY_LOG_DB`: records queued here, written in batches."""
    from openai_proxy.log.store import LogStore  # gevent and its thread pool, sqlite3

    return LogStore(
        config.log_db, config.log_retention, max_queue=config.log_max_queue, host=config.host_name
    )
