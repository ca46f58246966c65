"""Where the request log lives: a SQLite file (one host) or a PostgreSQL database (several hosts).

Both sit behind one small connection interface, so `openai_proxy.log.db` and `openai_proxy.log.stats` write their SQL
once: `?` placeholders, `GREATEST(a, b)`, `INSERT ... ON CONFLICT ... DO UPDATE`, `RETURNING`. The
dialects differ only where they must: placeholders (`%s` for psycopg), `GREATEST` (SQLite's scalar
`MAX`), identity columns and float types in the schema, and how a writer takes the write lock
(SQLite: `BEGIN IMMEDIATE`; PostgreSQL: a transaction-scoped advisory lock, so writers of every host
take turns and the retention trim sees a settled table).

psycopg 3 under gevent (psycopg 3.3, gevent 26, checked by running both ways): psycopg chooses its
wait function once, when it is first imported. If gevent has already patched `select`, it uses a
Python `poll` loop that yields to the hub; otherwise its C wait, which holds the whole process (every
greenlet) while the server works: a `SELECT pg_sleep(1)` on the hub let a 50 ms ticker greenlet run
20 times in the first case and not once in the second. Which one a worker gets depends on import
order (a gunicorn master that imported psycopg before forking hands its workers the blocking one), and
libpq's own work (TLS, result parsing) runs on the calling thread either way. So this module is only
ever called from the log store's one-thread pool (`openai_proxy.log.store`): there, either wait function blocks
that thread alone, and the hub keeps serving requests while the writer waits on the database
(`tests/test_logstore_pg.py` serves requests while a writer using the C wait is stuck behind a lock).
psycopg is imported on first use, in a worker, never at module import. Its `executemany` is slow here
(0.16 ms a row, pipelined or not), so records go in as multi-row INSERTs, and a batch's statements go
out in one pipeline (`pipeline()`).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Sequence
from typing import Any

from openai_proxy.log import url as logurl

# Every write transaction of every host takes this advisory lock first (one 64-bit key, any value
# other applications are unlikely to pick): the log's writers take turns.
WRITE_LOCK_KEY = 0x6F70656E61697078  # "openaipx"
SCHEMA_LOCK_KEY = WRITE_LOCK_KEY + 1
PG_CONNECT_TIMEOUT_S = 3
# What a batch writes to: a session holding one of them locked holds every writer.
LOGGED_TABLES = ("records", "counters", "log_writers", "log_hosts", "spend_daily", "minute_stats")
INSERT_ROWS_PER_STATEMENT = 500  # x 12 columns: well below PostgreSQL's 65535 parameters
# Bounds for one statement and one lock wait: a database that hangs must not hold the writer (and the
# pages, which share its thread) forever. A failed write is retried; nothing is lost.
PG_STATEMENT_TIMEOUT_MS = 30_000
PG_LOCK_TIMEOUT_MS = 10_000
# A host that dies inside a write transaction would hold the write lock until the server notices the
# dead connection (hours, with default keepalives); the server ends such a session after this instead.
PG_IDLE_IN_TRANSACTION_MS = 30_000
# A connection for quick questions (/health's probe, the sign-out epoch), which its callers wait for
# with their own hard deadline: short bounds so that its thread is soon free again. (libpq waits at
# least 2 s for a connection, whatever is asked.)
PG_QUICK_CONNECT_TIMEOUT_S = 2
PG_QUICK_STATEMENT_TIMEOUT_MS = 2_000
PG_QUICK_LOCK_TIMEOUT_MS = 200


class Database:
    """One connection. SQL is written once; `sql()` adapts it to the dialect (cached)."""

    kind = ""
    float_type = "REAL"
    identity = ""
    # Whether its query planner works without statistics about the data, so a query had better say
    # which index to walk (`openai_proxy.log.db.choose_walk`). PostgreSQL keeps statistics (autovacuum).
    plans_blind = False

    def __init__(self) -> None:
        self._sql: dict[str, str] = {}

    def sql(self, text: str) -> str:
        out = self._sql.get(text)
        if out is None:
            out = self._sql[text] = self._translate(text)
        return out

    def _translate(self, text: str) -> str:
        return text

    def ddl(self, text: str) -> str:
        """A schema statement with the dialect's types filled in."""
        return text.format(id=self.identity, float=self.float_type)

    def execute(self, text: str, args: Sequence[Any] = ()) -> Any:
        raise NotImplementedError

    def executemany(self, text: str, rows: Sequence[Sequence[Any]]) -> None:
        raise NotImplementedError

    def insert_rows(self, text: str, rows: Sequence[Sequence[Any]]) -> None:
        """`INSERT ... VALUES (?, ...)` for every row, the fastest way the dialect has."""
        self.executemany(text, rows)

    def begin_write(self) -> None:
        raise NotImplementedError

    def pipeline(self) -> contextlib.AbstractContextManager[Any]:
        """Statements inside are sent without waiting for each answer; a result is read (and errors
        surface) when it is fetched or the block ends."""
        return contextlib.nullcontext()

    def begin_read(self) -> None:
        self.execute("BEGIN")

    def begin_schema(self) -> None:
        self.begin_write()

    def commit(self) -> None:
        self.execute("COMMIT")

    def rollback(self) -> None:
        """Undo the open transaction, if any; never raises (the connection may be gone)."""
        with contextlib.suppress(Exception):
            self.execute("ROLLBACK")

    def columns(self, table: str) -> set[str]:
        raise NotImplementedError

    def probe_writable(self) -> None:
        """Raise when this connection could not write right now."""
        raise NotImplementedError

    def refuses_value(self, exc: BaseException) -> bool:
        """Whether `exc` says a value was refused (too large, NUL, a constraint, not encodable), as
        opposed to the database being unreachable, locked, full or read-only: the first costs one
        record (`openai_proxy.log.db`), the second keeps the whole batch for a later try."""
        return isinstance(exc, ValueError | TypeError | OverflowError)

    def missing_table(self, exc: BaseException) -> bool:
        """Whether `exc` says a table does not exist (yet: the log writer creates them)."""
        return False

    @property
    def lost(self) -> bool:
        """Whether the server went away (a new connection may work where this one cannot)."""
        return False

    def close(self) -> None:
        raise NotImplementedError


class SQLiteDatabase(Database):
    """A SQLite file in WAL mode: readers never wait for the writer; `busy_timeout` bounds lock waits."""

    kind = "sqlite"
    identity = "INTEGER PRIMARY KEY AUTOINCREMENT"
    plans_blind = True  # no ANALYZE is ever run: it assumes every index equally selective
    PROBE_BUSY_TIMEOUT_MS = 200

    def __init__(self, path: str, busy_timeout_ms: int) -> None:
        super().__init__()
        folder = os.path.dirname(path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        self.busy_timeout_ms = busy_timeout_ms
        self.conn = sqlite3.connect(
            path, timeout=busy_timeout_ms / 1000.0, isolation_level=None, check_same_thread=False
        )
        try:
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA synchronous = NORMAL")
            # A write transaction's statement journal (what undoes one statement of it) outgrows
            # SQLite's 64 KiB in memory now that a record touches nine indexes and its totals; on
            # disk it would be a file in TMPDIR, open while the transaction lasts, beside the
            # upload spool (tests/test_audio.py watches that directory). Kept in memory instead.
            self.conn.execute("PRAGMA temp_store = MEMORY")
        except BaseException:
            self.conn.close()
            raise

    def _translate(self, text: str) -> str:
        return text.replace("GREATEST(", "MAX(")  # SQLite's two-argument MAX is the scalar maximum

    def execute(self, text: str, args: Sequence[Any] = ()) -> Any:
        return self.conn.execute(self.sql(text), args)

    def executemany(self, text: str, rows: Sequence[Sequence[Any]]) -> None:
        self.conn.executemany(self.sql(text), rows)

    def begin_write(self) -> None:
        self.execute("BEGIN IMMEDIATE")

    def begin_schema(self) -> None:
        # Deferred: when every table exists nothing is written and no lock is taken, so a worker can
        # (re)open the log while another holds the write lock.
        self.execute("BEGIN")

    def rollback(self) -> None:
        if self.conn.in_transaction:
            super().rollback()

    def columns(self, table: str) -> set[str]:
        return {row[1] for row in self.conn.execute(f"PRAGMA table_info({table})")}

    def refuses_value(self, exc: BaseException) -> bool:
        # OverflowError: an int beyond 64 bits. "database is locked", "disk I/O error" and a full disk
        # are OperationalError: not about a value.
        values = (sqlite3.DataError, sqlite3.IntegrityError, sqlite3.InterfaceError)
        return super().refuses_value(exc) or isinstance(exc, values)

    def missing_table(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.OperationalError) and str(exc).startswith("no such table")

    def probe_writable(self) -> None:
        self.conn.execute(f"PRAGMA busy_timeout = {self.PROBE_BUSY_TIMEOUT_MS}")
        try:
            self.begin_write()
            self.execute("ROLLBACK")
        finally:
            self.conn.execute(f"PRAGMA busy_timeout = {self.busy_timeout_ms}")

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.conn.close()


class PostgresDatabase(Database):
    """One psycopg 3 connection in autocommit mode; transactions are explicit `BEGIN` ... `COMMIT`."""

    kind = "postgresql"
    float_type = "DOUBLE PRECISION"
    identity = "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"

    def __init__(self, url: str, *, quick: bool = False) -> None:
        super().__init__()
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        given = conninfo_to_dict(url)
        # Our defaults where the URL says nothing: a bounded connect, dead peers noticed, a name
        # operators see in pg_stat_activity.
        connect_timeout = PG_QUICK_CONNECT_TIMEOUT_S if quick else PG_CONNECT_TIMEOUT_S
        defaults = {"connect_timeout": connect_timeout, "application_name": "openai-proxy",
                    "keepalives": 1, "keepalives_idle": 30, "tcp_user_timeout": 30_000}  # fmt: skip
        params = {k: v for k, v in defaults.items() if k not in given}
        if quick:
            params["connect_timeout"] = min(
                int(given.get("connect_timeout") or connect_timeout), connect_timeout
            )
        self.conn = psycopg.connect(url, autocommit=True, **params)
        statement, lock = (
            (PG_QUICK_STATEMENT_TIMEOUT_MS, PG_QUICK_LOCK_TIMEOUT_MS)
            if quick
            else (PG_STATEMENT_TIMEOUT_MS, PG_LOCK_TIMEOUT_MS)
        )
        try:
            self.conn.execute(
                "SELECT set_config('statement_timeout', %s, false), set_config('lock_timeout', %s, false),"
                " set_config('idle_in_transaction_session_timeout', %s, false)",
                (str(statement), str(lock), str(PG_IDLE_IN_TRANSACTION_MS)),
            )
        except BaseException:
            self.conn.close()
            raise

    def _translate(self, text: str) -> str:
        return text.replace("?", "%s")  # no `?` or `%` appears in the log's SQL otherwise

    def execute(self, text: str, args: Sequence[Any] = ()) -> Any:
        return self.conn.execute(self.sql(text), args or None)

    def executemany(self, text: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self.conn.cursor().executemany(self.sql(text), rows)  # pipelined: one round trip

    def insert_rows(self, text: str, rows: Sequence[Sequence[Any]]) -> None:
        # Many rows per statement: 1000 records took 160 ms through executemany, 33 ms this way
        # (COPY would be faster still, but cannot run inside a pipeline).
        head, _, group = self._translate(text).rpartition(" VALUES ")
        for start in range(0, len(rows), INSERT_ROWS_PER_STATEMENT):
            chunk = rows[start : start + INSERT_ROWS_PER_STATEMENT]
            self.conn.execute(
                f"{head} VALUES {', '.join([group] * len(chunk))}", [v for r in chunk for v in r]
            )

    def begin_write(self) -> None:
        self.execute("BEGIN")
        self.execute("SELECT pg_advisory_xact_lock(?)", (WRITE_LOCK_KEY,))

    def pipeline(self) -> contextlib.AbstractContextManager[Any]:
        # A batch's dozen statements in one round trip instead of one each (libpq pipeline mode).
        return self.conn.pipeline()

    def begin_read(self) -> None:
        # One snapshot for the counters, the total and the rows of a page.
        self.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def begin_schema(self) -> None:
        # CREATE ... IF NOT EXISTS alone is not safe when two hosts start at once (both may try to
        # create the same table's type); the first one to take this lock creates, the other waits.
        self.execute("BEGIN")
        self.execute("SELECT pg_advisory_xact_lock(?)", (SCHEMA_LOCK_KEY,))

    def columns(self, table: str) -> set[str]:
        rows = self.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = ?",
            (table,),
        ).fetchall()
        return {name for (name,) in rows}

    def probe_writable(self) -> None:
        recovery, read_only = self.execute(
            "SELECT pg_is_in_recovery(), current_setting('transaction_read_only')"
        ).fetchone()
        if recovery or read_only == "on":
            raise RuntimeError("the database is read-only (a standby, or default_transaction_read_only)")
        # A session holding the log's tables locked holds every writer: take the lock an INSERT
        # takes, waiting no longer than this connection's lock_timeout, and give it back.
        self.execute("BEGIN")
        try:
            self.execute(f"LOCK TABLE {', '.join(LOGGED_TABLES)} IN ROW EXCLUSIVE MODE")
        except Exception as exc:
            if not self.missing_table(exc):  # none yet: the writer creates them; nobody holds them
                raise
        finally:
            self.rollback()

    def refuses_value(self, exc: BaseException) -> bool:
        import psycopg
        from psycopg.errors import ProgramLimitExceeded

        # DataError: class 22 (numeric out of range, NUL in text, bad encoding); IntegrityError: 23;
        # ProgramLimitExceeded (54000): e.g. a key too long for its index. Lock and statement
        # timeouts, a read-only server, missing rights are not about a value.
        values = (psycopg.DataError, psycopg.IntegrityError, ProgramLimitExceeded)
        return super().refuses_value(exc) or isinstance(exc, values)

    def missing_table(self, exc: BaseException) -> bool:
        from psycopg.errors import UndefinedTable

        return isinstance(exc, UndefinedTable)

    @property
    def lost(self) -> bool:
        return bool(self.conn.broken or self.conn.closed)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()


def open_database(target: str, busy_timeout_ms: int, *, quick: bool = False) -> Database:
    """A connection to `target`: a `postgresql://` URL or a SQLite file path. `quick`: for short
    questions, with short connect, statement and lock timeouts (SQLite: `busy_timeout_ms` says it)."""
    if logurl.is_postgres_url(target):
        return PostgresDatabase(target, quick=quick)
    return SQLiteDatabase(target, busy_timeout_ms)
