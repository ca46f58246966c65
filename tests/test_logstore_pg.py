"""The request log in PostgreSQL: never in the way of requests (psycopg off the hub), a server that
goes away and comes back, a COMMIT whose answer is lost, the schema made by whichever host comes first,
retention and counters across hosts."""

from __future__ import annotations

import socket

import gevent
import pytest

from openai_proxy.log import db as logdb
from openai_proxy.log.db import LogFilter
from openai_proxy.log.sql import WRITE_LOCK_KEY, open_database
from openai_proxy.log.store import LogStore
from tests.conftest import post_json
from tests.support.logpage import AUTH, CHAT, counters, row_hosts, rows
from tests.support.postgres_server import wait_until
from tests.test_metrics import samples, value

WAITING_WRITER = (
    "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = 'openai-proxy'"
    " AND wait_event_type = 'Lock' AND wait_event = 'advisory'"
)


def entry(rid: str, status: int = 200, **extra) -> dict:
    return {"requestId": rid, "status": status, "durationMs": 250.0, "endpoint": "/openai", **extra}


def stored_ids(db) -> list[str]:
    return [rid for (rid,) in db.query("SELECT request_id FROM records ORDER BY id")]


def counter(db, name: str) -> float:
    found = db.query("SELECT value FROM counters WHERE name = %s", name)
    return found[0][0] if found else 0.0


def page_html(client, path: str = "/log", query: str = "") -> tuple[int, str]:
    r = client.get(f"{path}?per_page=500&{query}", headers=AUTH)
    return r.status_code, r.get_data(as_text=True)


def test_requests_are_served_while_the_writer_waits_on_a_lock(postgres_db, make_app, fake, monkeypatch):
    """psycopg runs in the store's thread: a writer stuck in the database never holds the gevent hub.

    With psycopg's C wait function, the one a worker gets when psycopg was imported before gevent
    patched `select`: called on the hub, it would stop every greenlet until the lock wait timed out.
    """
    waiting_module = pytest.importorskip("psycopg.waiting")
    if not hasattr(waiting_module, "wait_c"):
        pytest.skip("psycopg has no C wait function here (no psycopg[binary] or [c])")
    monkeypatch.setattr(waiting_module, "wait", waiting_module.wait_c)
    app = make_app(OPENAI_PROXY_LOG_DB=postgres_db.url)
    client = app.test_client()
    store = app.extensions["openai_proxy"].log_store
    first = post_json(client, "/openai", CHAT).headers["X-Proxy-Request-Id"]
    assert store.flush() is True
    holder = postgres_db.server.connect(postgres_db.name)
    holder.execute("SELECT pg_advisory_lock(%s)", (WRITE_LOCK_KEY,))  # what another host's write holds
    try:
        queued = [post_json(client, "/openai", CHAT)]  # the writer greenlet takes it and waits
        waiting = wait_until(lambda: postgres_db.query(WAITING_WRITER, postgres_db.name))
        queued += [post_json(client, "/openai", CHAT) for _ in range(5)]
        assert [r.status_code for r in queued] == [200] * 6
        # Served while the same writer was still waiting for the lock, in its thread.
        assert postgres_db.query(WAITING_WRITER, postgres_db.name) == waiting
        assert store.queued == 6 and store.written == 1
    finally:
        holder.execute("SELECT pg_advisory_unlock(%s)", (WRITE_LOCK_KEY,))
        holder.close()
    expected = [first] + [r.headers["X-Proxy-Request-Id"] for r in queued]
    wait_until(lambda: len(stored_ids(postgres_db)) == 7)
    store.flush()
    assert sorted(stored_ids(postgres_db)) == sorted(expected)
    assert counter(postgres_db, "request_count") == 7


class CuttingRelay:
    """A loopback TCP relay in front of PostgreSQL that can lose the server's answer to a COMMIT
    (the COMMIT itself reaches the server and takes effect), or refuse new connections."""

    def __init__(self, port: int) -> None:
        self.target = ("127.0.0.1", port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut_next_commit = False
        self.refuse = False
        self.cuts = 0
        self._acceptor = gevent.spawn(self._accept)

    def url(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def _accept(self) -> None:
        while True:
            conn, _ = self.listener.accept()
            if self.refuse:
                conn.close()
                continue
            upstream = socket.create_connection(self.target)
            state = {"commit_sent": False}
            gevent.spawn(self._pipe, conn, upstream, state, True)
            gevent.spawn(self._pipe, upstream, conn, state, False)

    def _pipe(self, src: socket.socket, dst: socket.socket, state: dict, from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_client and self.cut_next_commit and b"COMMIT" in data:
                    state["commit_sent"] = True
                elif not from_client and state["commit_sent"]:
                    # The server has answered the COMMIT: it took effect. The client never hears it.
                    self.cut_next_commit = False
                    self.cuts += 1
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            s.close()

    def close(self) -> None:
        self._acceptor.kill()
        self.listener.close()


@pytest.fixture
def relay(postgres_db):
    relay = CuttingRelay(postgres_db.server.port)
    yield relay
    relay.close()


def test_a_lost_commit_answer_neither_loses_nor_duplicates_records(postgres_db, relay):
    store = LogStore(relay.url(postgres_db.name), retention=100, host="h1")
    try:
        for i in range(3):
            store.append(entry(f"a{i}"))
        assert store.flush() is True
        relay.cut_next_commit = True
        for i in range(2):
            store.append(entry(f"b{i}", usage={"prompt_tokens": 5}, costUsd=0.25, model="m"))
        # The answer is lost; the store reconnects at once and sends the same batch again, which the
        # database recognises as written.
        assert store.flush() is True
        assert relay.cuts == 1 and store.already_written == 1 and store.write_failures == 0
        assert stored_ids(postgres_db) == ["a0", "a1", "a2", "b0", "b1"]
        assert counter(postgres_db, "request_count") == 5
        assert postgres_db.query(
            "SELECT requests, prompt_tokens, cost_usd FROM spend_daily WHERE model = 'm'"
        ) == [(2, 10, 0.5)]
        assert postgres_db.query("SELECT SUM(requests) FROM minute_stats") == [(5,)]
    finally:
        store.close()


def test_a_batch_in_doubt_waits_for_the_database_and_is_written_once(postgres_db, relay):
    store = LogStore(relay.url(postgres_db.name), retention=100, host="h1", max_queue=4)
    try:
        store.append(entry("a0"))
        assert store.flush() is True
        relay.cut_next_commit = relay.refuse = True  # the answer is lost and the database unreachable
        store.append(entry("b0"))
        store.append(entry("b1"))
        assert store.flush() is False
        assert stored_ids(postgres_db) == ["a0", "b0", "b1"]  # it did commit
        # Records queued meanwhile wait behind the batch in doubt; the bound counts both.
        store.append(entry("c0"))
        store.append(entry("c1"))
        store.append(entry("c2"))
        assert (store.queued, store.dropped, store.unsaved_dropped) == (4, 1, 1)
        assert store.flush() is False and store.stats()["lastError"].startswith("OperationalError")
        relay.refuse = False
        assert store.flush() is True and store.already_written == 1
        assert store.queued == 2
        assert store.flush() is True and store.queued == 0
        assert stored_ids(postgres_db) == ["a0", "b0", "b1", "c0", "c1"]
        assert counter(postgres_db, "request_count") == 5
        assert postgres_db.query("SELECT host, dropped FROM log_hosts") == [("h1", 1)]
        assert store.unsaved_dropped == 0
    finally:
        store.close()


def test_postgresql_stopped_mid_run_loses_nothing_and_requests_never_fail(postgres_db, make_app, fake):
    app = make_app(OPENAI_PROXY_LOG_DB=postgres_db.url, OPENAI_PROXY_HOST_NAME="host-a")
    client = app.test_client()
    before = [post_json(client, "/openai", CHAT).headers["X-Proxy-Request-Id"] for _ in range(2)]
    assert page_html(client)[0] == 200
    postgres_db.server.stop()
    try:
        during = [post_json(client, "/openai", CHAT) for _ in range(5)]
        assert [r.status_code for r in during] == [200] * 5
        health = client.get("/health", headers=AUTH).get_json()
        assert health["status"] == "degraded" and health["logStore"]["writable"] is False
        assert health["logStore"]["queued"] == 5 and health["logStore"]["backend"] == "postgresql"
        assert "OperationalError" in health["logStore"]["error"]
        status, html = page_html(client)
        assert status == 503 and "The log store cannot be read: OperationalError" in html
    finally:
        postgres_db.server.start()
    sent = before + [r.headers["X-Proxy-Request-Id"] for r in during]
    store = app.extensions["openai_proxy"].log_store
    wait_until(lambda: store.queued == 0)
    status, html = page_html(client)
    assert status == 200
    assert [rid for _, rid, _ in rows(html)] == sent[::-1]
    assert {host for _, host in row_hosts(html)} == {"host-a"}
    assert counters(html)["Request count"] == "7" and ">Dropped log records: 0<" in html
    assert client.get("/health", headers=AUTH).get_json()["status"] == "ok"


def test_a_full_queue_while_postgresql_is_down_is_counted_on_the_page_and_in_metrics(
    postgres_db, make_app, fake
):
    app = make_app(OPENAI_PROXY_LOG_DB=postgres_db.url, OPENAI_PROXY_LOG_MAX_QUEUE="2",
                   OPENAI_PROXY_HOST_NAME="host-a")  # fmt: skip
    client = app.test_client()
    assert page_html(client)[0] == 200
    metrics_before = samples(client.get("/metrics", headers=AUTH).get_data(as_text=True))
    postgres_db.server.stop()
    try:
        sent = [post_json(client, "/openai", CHAT) for _ in range(7)]
        assert [r.status_code for r in sent] == [200] * 7
        status, html = page_html(client)
        assert status == 503 and ">Dropped log records: 5<" in html  # this worker's, not saved yet
        assert "2 queued, 5 dropped (5 not yet counted in the database)" in html
    finally:
        postgres_db.server.start()
    store = app.extensions["openai_proxy"].log_store
    wait_until(lambda: store.queued == 0 and store.unsaved_dropped == 0)
    metrics = samples(client.get("/metrics", headers=AUTH).get_data(as_text=True))
    delta = value(metrics, "openai_proxy_log_dropped_total") - value(
        metrics_before, "openai_proxy_log_dropped_total"
    )
    assert delta == 5
    status, html = page_html(client)
    assert status == 200
    assert [rid for _, rid, _ in rows(html)] == [r.headers["X-Proxy-Request-Id"] for r in sent[1::-1]]
    assert (
        ">Dropped log records: 5<" in html
        and '<span class="mono" data-host="host-a">host-a: 5</span>' in html
    )
    assert postgres_db.query("SELECT host, dropped FROM log_hosts") == [("host-a", 5)]


def test_two_hosts_share_retention_and_counters(postgres_db):
    first, second = (LogStore(postgres_db.url, retention=3, host=h) for h in ("h1", "h2"))
    try:
        first.append(entry("a", durationMs=5000.0, usage={"prompt_tokens": 10}))
        first.append(entry("b", status=500))
        assert first.flush()
        second.append(entry("c", durationMs=2000.0, usage={"prompt_tokens": 40}, overloaded=True))
        second.append(entry("d"))
        second.note_peak(7)
        assert second.flush()
        first.note_peak(3)  # a lower peak on one host never lowers the fleet's
        first.append(entry("e"))
        assert first.flush()
        page = second.page("info", LogFilter(), 50)
        assert [r["requestId"] for r in page.records] == ["e", "d", "c"]  # the newest 3 of the fleet
        assert [(r["requestId"], r["host"]) for r in page.records] == [("e", "h1"), ("d", "h2"), ("c", "h2")]
        assert page.hosts == ["h1", "h2"] and page.total == 3
        c = page.counters
        assert (c["request_count"], c["error_count"], c["overload_count"]) == (5, 1, 1)
        assert (c["total_request_time"], c["max_request_time"]) == (7.75, 5.0)
        assert (c["max_prompt_tokens"], c["max_parallel"]) == (40, 7)
        assert [r["requestId"] for r in first.page("error", LogFilter(host="h1"), 50).records] == ["b"]
        assert first.page("error", LogFilter(host="h2"), 50).records == []
    finally:
        first.close()
        second.close()


def test_the_schema_is_made_once_when_hosts_start_at_the_same_time(postgres_db):
    def start() -> set[str]:
        db = open_database(postgres_db.url, 1000)
        try:
            logdb.create_schema(db)
            return db.columns("records")
        finally:
            db.close()

    jobs = [gevent.spawn(start) for _ in range(8)]
    gevent.joinall(jobs, raise_error=True)
    assert all(job.value == jobs[0].value for job in jobs) and {"host", "client"} <= jobs[0].value
    tables = postgres_db.query(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1"
    )
    assert [t for (t,) in tables] == ["counters", "log_hosts", "log_settings", "log_writers", "minute_stats",
                                      "record_totals", "records", "spend_daily"]  # fmt: skip


def test_an_unreachable_database_never_fails_requests(make_app, fake):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    client = make_app(
        OPENAI_PROXY_LOG_DB=f"postgresql://proxy:hunter2secret@127.0.0.1:{port}/log"
    ).test_client()
    assert [post_json(client, "/openai", CHAT).status_code for _ in range(3)] == [200] * 3
    status, html = page_html(client)
    assert status == 503 and "The log store cannot be read: OperationalError: connection failed" in html
    assert "hunter2secret" not in html
    health = client.get("/health", headers=AUTH)
    body = health.get_json()
    assert health.status_code == 200 and body["logStore"]["writable"] is False
    assert (
        body["logStore"]["queued"] == 3 and body["logStore"]["path"] == f"postgresql://127.0.0.1:{port}/log"
    )
    assert "hunter2secret" not in health.get_data(as_text=True)


def test_a_large_batch_is_written_whole_in_several_statements(postgres_db):
    store = LogStore(postgres_db.url, retention=5000, host="h1")
    try:
        for i in range(1201):  # three multi-row INSERTs of at most 500 rows
            store.append(entry(f"r{i:04d}", status=200 if i % 3 else 503))
        assert store.flush() is True and store.written == 1201
        assert stored_ids(postgres_db) == [f"r{i:04d}" for i in range(1201)]
        assert postgres_db.query("SELECT level, COUNT(*) FROM records GROUP BY level ORDER BY level") == [
            ("error", 401), ("info", 800)
        ]  # fmt: skip
        assert (counter(postgres_db, "request_count"), counter(postgres_db, "error_count")) == (1201, 401)
    finally:
        store.close()
