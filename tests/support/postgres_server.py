"""A real PostgreSQL for the tests: Debian's `initdb` / `pg_ctl` on a loopback port, from a temp dir.

The shared request log talks to PostgreSQL; a fake would hide what it depends on (transactions,
advisory locks, `ON CONFLICT`, a server that goes away mid-run). One server per test session, trust
authentication on 127.0.0.1 only, no durability settings (the tests never crash the machine). Each
test gets a database of its own (`CREATE DATABASE` copies an empty template: fast). Tests that stop
the server (`stop()`) start it again on the same port (`start()`), so a URL handed to a running
proxy stays valid.

`initdb` refuses to run as root: when the suite runs as root the server runs as the `postgres` user
the Debian package creates (through `runuser`), in a temp dir that user owns.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.servers import free_port

SERVER_USER = "postgres"
_names = itertools.count(1)


def postgres_bin_dir() -> str | None:
    """`/usr/lib/postgresql/<newest version>/bin`, or None when the Debian package is not installed."""
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not found:
        return None
    newest = max(found, key=lambda p: int(p.split("/")[-3]) if p.split("/")[-3].isdigit() else 0)
    return os.path.dirname(newest)


class PostgresServer:
    """One PostgreSQL cluster: initdb once, then start and stop at will on the same port."""

    def __init__(self, bin_dir: str) -> None:
        self.bin_dir = bin_dir
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="openai-proxy-pg-")
        self.data = os.path.join(self.dir, "data")
        self.logfile = os.path.join(self.dir, "server.log")
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam(SERVER_USER)
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._as_user = ["runuser", "-u", SERVER_USER, "--"]
        self._run("initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--locale=C", "--no-sync", "--no-instructions")  # fmt: skip

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*self._as_user, os.path.join(self.bin_dir, tool), *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr or done.stdout}")
        return done

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    @property
    def running(self) -> bool:
        return os.path.exists(os.path.join(self.data, "postmaster.pid"))

    def start(self) -> PostgresServer:
        # Loopback TCP only (no Unix socket to place), and no waiting for the disk: a test server.
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200")  # fmt: skip
        self._run("pg_ctl", "-D", self.data, "-l", self.logfile, "-o", options, "-w", "-t", "60", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop it (`fast`: connections are cut, as when a database host goes away; `immediate`: a crash)."""
        if self.running:
            self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "60", "stop")

    def connect(self, dbname: str = "postgres") -> Any:
        """An autocommit psycopg connection, for setting up and checking from the tests."""
        import psycopg

        return psycopg.connect(self.url(dbname), autocommit=True, connect_timeout=10)

    def create_database(self) -> str:
        name = f"t{os.getpid()}_{next(_names)}"
        with self.connect() as db:
            db.execute(f"CREATE DATABASE {name} TEMPLATE template0")
        return name

    def drop_database(self, name: str) -> None:
        with self.connect() as db:
            db.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


class PostgresDatabase:
    """A fresh database of the session's server, for one test."""

    def __init__(self, server: PostgresServer, name: str) -> None:
        self.server = server
        self.name = name

    @property
    def url(self) -> str:
        return self.server.url(self.name)

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Run one statement on a new connection and return its rows ([] when it returns none)."""
        with self.server.connect(self.name) as db:
            cur = db.execute(sql, args or None)
            return cur.fetchall() if cur.description else []


@pytest.fixture(scope="session")
def postgres_session() -> Iterator[PostgresServer]:
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (Debian package postgresql; ./test.sh installs it as root)")
    if os.geteuid() == 0 and (shutil.which("runuser") is None or not _user_exists(SERVER_USER)):
        pytest.skip("running as root, and there is no `postgres` user or `runuser` to run initdb as")
    server = PostgresServer(bin_dir).start()
    yield server
    server.close()


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture
def postgres_db(postgres_session: PostgresServer) -> Iterator[PostgresDatabase]:
    """An empty database of its own on the session's server, running (restarted if a test stopped it)."""
    if not postgres_session.running:
        postgres_session.start()
    db = PostgresDatabase(postgres_session, postgres_session.create_database())
    yield db
    if not postgres_session.running:
        postgres_session.start()
    postgres_session.drop_database(db.name)


def wait_until(predicate: Any, timeout: float = 15.0, interval: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy (returned) or the deadline passes (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {predicate}")
        time.sleep(interval)


@pytest.fixture(params=["sqlite", "postgresql"])
def log_db(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """OPENAI_PROXY_LOG_DB for each backend in turn: a SQLite file, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "openai-proxy.sqlite3")
    return request.getfixturevalue("postgres_db").url
