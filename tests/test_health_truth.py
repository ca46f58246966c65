"""`/health` answers within a second whatever the log database does (locked, silent, down), and says
`degraded` with the reason while this host's records are not written, while the last reload was
refused, or while Redis is bypassed."""

from __future__ import annotations

import signal
import socket
import sqlite3
import textwrap
import time

import pytest
import requests

from tests.conftest import post_json
from tests.support.logpage import AUTH, CHAT, CLOSE
from tests.support.postgres_server import wait_until

BOUND_S = 1.0  # the contract's bound for /health
NOT_WRITTEN = "log: this host's records are not being written: "
WOULD_NOT_WRITE = "log: the database would not take a write now: "


def timed_health(get, bound_s: float | None = BOUND_S) -> dict:
    """/health through `get` (a Flask test client's or a real server's), checked against the bound."""
    started = time.monotonic()
    r = get()
    took = time.monotonic() - started
    assert r.status_code == 200
    assert bound_s is None or took < bound_s, f"/health took {took:.2f} s"
    return r.json() if hasattr(r, "ok") else r.get_json()


def health_of(client):
    return lambda: client.get("/health", headers=AUTH)


def reasons_with(get, text: str, timeout: float = 15.0, bound_s: float | None = BOUND_S) -> list[str]:
    """Ask /health (each answer within the bound) until one of its reasons contains `text`."""

    def found():
        body = timed_health(get, bound_s)
        return (
            body["reasons"]
            if body["status"] == "degraded" and any(text in r for r in body["reasons"])
            else None
        )

    return wait_until(found, timeout=timeout, interval=0.2)


def ok_again(get) -> dict:
    return wait_until(lambda: (b := timed_health(get))["status"] == "ok" and b, interval=0.2)


@pytest.mark.slow
def test_health_within_a_second_while_another_connection_holds_the_sqlite_log_locked(make_app, fake):
    app = make_app()
    client = app.test_client()
    store = app.extensions["openai_proxy"].log_store
    assert post_json(client, "/openai", CHAT).status_code == 200 and store.flush()
    health = timed_health(health_of(client))
    assert (health["status"], health["reasons"], health["logStore"]["recordsWritten"]) == ("ok", [], True)
    locker = sqlite3.connect(store.target, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # another session's write transaction, held
    locker.execute("INSERT INTO counters (name, value) VALUES ('another-session', 1)")
    try:
        assert [post_json(client, "/openai", CHAT).status_code for _ in range(3)] == [200] * 3
        health = timed_health(health_of(client))
        assert health["status"] == "degraded" and health["logStore"]["writable"] is False
        assert f"{WOULD_NOT_WRITE}OperationalError: database is locked" in health["reasons"]
        # The writer waits out its busy timeout in its own thread, fails, and /health says so.
        (reason,) = [r for r in reasons_with(health_of(client), NOT_WRITTEN) if r.startswith(NOT_WRITTEN)]
        assert "write(s) of this worker's log failed (OperationalError: database is locked)" in reason
        assert reason.endswith("; 3 record(s) waiting")
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    health = ok_again(health_of(client))
    assert health["logStore"]["consecutiveFailures"] == 0 and health["logStore"]["queued"] == 0


def test_health_within_a_second_while_a_session_holds_the_postgresql_log_tables(postgres_db, make_app, fake):
    app = make_app(OPENAI_PROXY_LOG_DB=postgres_db.url)
    client = app.test_client()
    store = app.extensions["openai_proxy"].log_store
    assert post_json(client, "/openai", CHAT).status_code == 200 and store.flush()
    assert timed_health(health_of(client))["status"] == "ok"
    holder = postgres_db.server.connect(postgres_db.name)
    holder.execute("BEGIN")
    holder.execute("LOCK TABLE records IN ACCESS EXCLUSIVE MODE")
    try:
        assert [post_json(client, "/openai", CHAT).status_code for _ in range(3)] == [200] * 3
        health = timed_health(health_of(client))
        assert health["status"] == "degraded"
        assert (
            f"{WOULD_NOT_WRITE}LockNotAvailable: canceling statement due to lock timeout" in health["reasons"]
        )
        # The writer waits for the lock (up to its lock_timeout): the records' age says they wait.
        reasons = reasons_with(health_of(client), NOT_WRITTEN)
        assert any(
            "oldest record waited" in r and "a write has been waiting on the database" in r for r in reasons
        )
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    ok_again(health_of(client))
    assert store.queued == 0


@pytest.mark.slow
def test_health_within_a_second_when_the_log_database_accepts_and_never_answers(make_app, fake):
    # The kernel completes every TCP handshake for a listening socket; nobody ever reads or answers.
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        port = silent.getsockname()[1]
        client = make_app(OPENAI_PROXY_LOG_DB=f"postgresql://proxy@127.0.0.1:{port}/log").test_client()
        assert [post_json(client, "/openai", CHAT).status_code for _ in range(3)] == [200] * 3
        for _ in range(3):  # the first probe still hangs in its thread; later ones say so, as fast
            health = timed_health(health_of(client))
            assert health["status"] == "degraded" and health["logStore"]["writable"] is False
            (reason,) = [r for r in health["reasons"] if r.startswith(WOULD_NOT_WRITE)]
            assert "NoAnswer: the database did not answer within 0.5 s (asked " in reason
        # The writer's own connect times out (3 s): from then on its failures are the reason too.
        reasons = reasons_with(health_of(client), NOT_WRITTEN)
        assert any("failed (ConnectionTimeout: connection timeout expired" in r for r in reasons), reasons
    finally:
        silent.close()


def test_health_within_a_second_and_degraded_while_postgresql_is_down(postgres_db, make_app, fake):
    app = make_app(OPENAI_PROXY_LOG_DB=postgres_db.url)
    client = app.test_client()
    assert post_json(client, "/openai", CHAT).status_code == 200
    assert app.extensions["openai_proxy"].log_store.flush()
    postgres_db.server.stop()
    try:
        assert [post_json(client, "/openai", CHAT).status_code for _ in range(2)] == [200] * 2
        health = timed_health(health_of(client))
        assert health["status"] == "degraded"
        assert any(r.startswith(f"{WOULD_NOT_WRITE}OperationalError: ") for r in health["reasons"])
        reasons_with(health_of(client), NOT_WRITTEN)
    finally:
        postgres_db.server.start()
    # Back to ok, and every record kept meanwhile written (the writer retries with its back-off, so
    # the first ok may still see the last one queued).
    get = health_of(client)
    wait_until(
        lambda: (h := timed_health(get))["status"] == "ok" and h["logStore"]["queued"] == 0, interval=0.2
    )


# ---- a refused reload --------------------------------------------------------------------------------


def client_entry(name: str, key: str) -> str:
    return f'[[client]]\nname = "{name}"\nkey = "{key}"\n\n'


PRICES = textwrap.dedent("""\
    [models."house-model"]
    input = 1.0
    output = 2.0
    """)


@pytest.mark.gunicorn
def test_a_refused_reload_is_degraded_until_a_good_one_and_a_bad_prices_file_stops_nothing(
    gunicorn_server, fake, tmp_path
):
    clients, prices = tmp_path / "clients.toml", tmp_path / "prices.toml"
    clients.write_text(client_entry("alpha", "alpha-key-0123456789"))
    prices.write_text(PRICES)
    server = gunicorn_server(workers=2, OPENAI_PROXY_CLIENTS_FILE=str(clients),
                             OPENAI_PROXY_PRICES_FILE=str(prices))  # fmt: skip

    def get():
        return requests.get(server.url + "/health", headers={**AUTH, **CLOSE}, timeout=10)

    def call() -> int:
        headers = {"X-Security-Key": "alpha-key-0123456789", **CLOSE}
        return requests.post(server.url + "/openai", json=CHAT, headers=headers, timeout=30).status_code

    health = timed_health(get)
    assert (health["status"], health["reload"]) == ("ok", None)
    # After a SIGHUP nobody accepts until a new worker has booted (gunicorn retires the old ones at
    # once): seconds on a busy machine, for every request. Not what is tested here: no bound.

    clients.write_text(
        client_entry("alpha", "alpha-key-0123456789") + '[[client]]\nname = "b"\nkey = "k"\nrpm = 0\n'
    )
    server.proc.send_signal(signal.SIGHUP)
    refused = f"the clients file was refused, the previous clients stay in use: {clients}:8: client 'b': "
    reasons = reasons_with(get, refused, bound_s=None)
    assert next(r for r in reasons if refused in r).startswith("reload at ")
    assert call() == 200

    # A prices file that does not parse: refused like the clients file (it used to stop the master).
    prices.write_text("garbage = [\n")
    server.proc.send_signal(signal.SIGHUP)
    reasons = reasons_with(get, "the prices file was refused, the previous prices stay in use: "
                           f"OPENAI_PROXY_PRICES_FILE={str(prices)!r}, line 1: not valid TOML", bound_s=None)  # fmt: skip
    assert any("the clients file was refused" in r for r in reasons)  # still bad, still said
    assert server.proc.poll() is None
    # Workers started after the refused reload run with the last good prices.
    wait_until(lambda: "Prices file not reloaded" in server.log_text())
    assert {call() for _ in range(6)} == {200}

    clients.write_text(client_entry("alpha", "alpha-key-0123456789"))
    prices.write_text(PRICES)
    server.proc.send_signal(signal.SIGHUP)
    health = wait_until(
        lambda: (b := timed_health(get, None))["status"] == "ok" and b, timeout=30, interval=0.2
    )
    assert health["reload"]["ok"] is True and health["reload"]["problems"] == []
    assert {call() for _ in range(4)} == {200}


# ---- Redis bypassed ----------------------------------------------------------------------------------


def test_health_is_degraded_while_client_limits_count_on_this_host_only(
    make_app, fake, redis_server, tmp_path
):
    path = tmp_path / "clients.toml"
    path.write_text(client_entry("limited", "limited-key-0123456789").replace("\n\n", "\nrpm = 100\n\n"))
    client = make_app(
        OPENAI_PROXY_CLIENTS_FILE=str(path), OPENAI_PROXY_LIMITS_URI=redis_server.url
    ).test_client()
    limited = {"X-Security-Key": "limited-key-0123456789"}
    assert post_json(client, "/openai", CHAT, headers=limited).status_code == 200
    assert timed_health(health_of(client))["status"] == "ok"
    redis_server.stop()
    try:
        assert post_json(client, "/openai", CHAT, headers=limited).status_code == 200  # counted here now
        health = timed_health(health_of(client))
        assert health["status"] == "degraded" and health["limits"]["usingFallback"] is True
        assert health["reasons"] == ["limits: Redis does not answer; client limits count on this host only"]
    finally:
        redis_server.start()
