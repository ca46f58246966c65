"""The shared request log: records and counters in SQLite or PostgreSQL, across workers and restarts,
never in the way. Tests that take `log_db` run once per backend."""

from __future__ import annotations

import re
import sqlite3
import time

import gevent
import pytest
import requests

from openai_proxy.log.store import LogStore
from tests.conftest import SECURITY_KEY, post_json
from tests.support.fake_upstream import delay, error
from tests.support.logpage import AUTH, CHAT, CLOSE, counters, rows, served_by


@pytest.fixture
def app(log_db, make_app):
    return make_app(OPENAI_PROXY_LOG_DB=log_db)


def log_html(client, path: str = "/log", query: str = "") -> str:
    r = client.get(f"{path}?{query}", headers=AUTH)
    assert r.status_code == 200, r.get_data(as_text=True)[:500]
    return r.get_data(as_text=True)


def test_records_and_counters_appear_after_requests(client, fake):
    ok = [post_json(client, "/openai", CHAT).headers["X-Proxy-Request-Id"] for _ in range(2)]
    bad = post_json(client, "/openai", {**CHAT, "security_key": "wrong"}).headers["X-Proxy-Request-Id"]
    html = log_html(client)
    assert [rid for _, rid, _ in rows(html)] == ok[::-1]  # newest first
    assert [rid for _, rid, _ in rows(log_html(client, "/log_errors"))] == [bad]
    c = counters(html)
    assert (c["Request count"], c["Error count"], c["Overload count"], c["Cancelled request count"]) == (
        "3",
        "1",
        "0",
        "0",
    )
    assert (c["Max prompt tokens"], c["Max cached tokens"], c["Max completion tokens"]) == ("25", "3", "7")
    assert c["Current parallel requests"] == "0" and c["Max parallel requests"] == "1"
    # Seconds with one decimal; how long the calls took depends on the machine (a first connection
    # on a busy one takes tens of milliseconds), so only the shape and the order are exact.
    longest, total = float(c["Max request time"]), float(c["Total request time"])
    assert re.fullmatch(r"\d+\.\d", c["Max request time"]) and 0.0 <= longest <= total < 30.0


def test_retention_trims_records_but_not_counters_and_both_survive_a_restart(log_db, make_app, fake):
    app = make_app(OPENAI_PROXY_LOG_RETENTION="3", OPENAI_PROXY_LOG_DB=log_db)
    client = app.test_client()
    sent = [post_json(client, "/openai", CHAT).headers["X-Proxy-Request-Id"] for _ in range(5)]
    post_json(client, "/openai", {"security_key": "nope"})
    html = log_html(client)
    assert [rid for _, rid, _ in rows(html)] == sent[:1:-1]
    # The rest are on the other page, which the line links to (retention kept 3 of 5 here).
    assert '3 records (1 more request on <a href="/log_errors">Errors</a>) · page 1 of 1' in html
    assert counters(html)["Request count"] == "6" and counters(html)["Error count"] == "1"
    app.extensions["openai_proxy"].log_store.close()  # the worker exits

    restarted = make_app(OPENAI_PROXY_LOG_RETENTION="3", OPENAI_PROXY_LOG_DB=log_db).test_client()
    html = log_html(restarted)
    assert [rid for _, rid, _ in rows(html)] == sent[:1:-1]
    assert counters(html)["Request count"] == "6"
    post_json(restarted, "/openai", CHAT)
    assert counters(log_html(restarted))["Request count"] == "7"


def test_retries_are_stored_as_error_records(client, fake):
    fake.push("GET", "/v1/responses/resp_r", error(503, "busy"), times=1)
    r = client.get(f"/openai2/resp_r?security_key={SECURITY_KEY}")
    assert r.status_code == 200
    rid = r.headers["X-Proxy-Request-Id"]
    assert rows(log_html(client)) == [("completion", rid, rows(log_html(client))[0][2])]
    errors = log_html(client, "/log_errors")
    assert [(kind, r_id) for kind, r_id, _ in rows(errors)] == [("retry", rid)]
    assert "attempt 2 · HTTP 503" in errors
    assert ">Retry count: 1<" in errors


def test_max_parallel_requests_is_the_servers_high_water_mark(log_db, make_app, fake):
    app = make_app(OPENAI_PROXY_LOG_DB=log_db)
    fake.push("POST", "/v1/chat/completions", delay(0.5), times=3)
    jobs = [gevent.spawn(post_json, app.test_client(), "/openai", CHAT) for _ in range(3)]
    gevent.joinall(jobs, raise_error=True)
    assert [job.value.status_code for job in jobs] == [200] * 3
    client = app.test_client()
    c = counters(log_html(client))
    assert (c["Max parallel requests"], c["Current parallel requests"]) == ("3", "0")
    post_json(client, "/openai", CHAT)  # one at a time never lowers the peak
    assert counters(log_html(client))["Max parallel requests"] == "3"


def test_a_locked_sqlite_database_never_fails_or_slows_requests(make_app, fake, tmp_path):
    app = make_app()
    store = app.extensions["openai_proxy"].log_store
    store.busy_timeout_ms = 100
    client = app.test_client()
    first = post_json(client, "/openai", CHAT).headers["X-Proxy-Request-Id"]
    log_html(client)  # creates the database
    locker = sqlite3.connect(store.path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        during = [post_json(client, "/openai", CHAT) for _ in range(3)]
        assert [r.status_code for r in during] == [200] * 3
        assert time.monotonic() - started < 1.0
        html = log_html(client)  # still readable (WAL), its own flush failed
        assert [rid for _, rid, _ in rows(html)] == [first]
        health = client.get("/health", headers=AUTH).get_json()
        assert health["status"] == "degraded" and health["logStore"]["writable"] is False
        assert "locked" in health["logStore"]["error"] and health["logStore"]["queued"] == 3
        assert health["logStore"]["writeFailures"] >= 1
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    html = log_html(client)
    assert [rid for _, rid, _ in rows(html)] == [r.headers["X-Proxy-Request-Id"] for r in during[::-1]] + [
        first
    ]
    assert counters(html)["Request count"] == "4"
    assert client.get("/health", headers=AUTH).get_json()["logStore"]["writable"] is True


def test_a_broken_sqlite_database_never_fails_requests(make_app, fake, tmp_path):
    path = tmp_path / "not-a-database.sqlite3"
    path.write_bytes(b"this is not an SQLite file" * 100)
    client = make_app(OPENAI_PROXY_LOG_DB=str(path)).test_client()
    assert [post_json(client, "/openai", CHAT).status_code for _ in range(3)] == [200] * 3
    r = client.get("/log", headers=AUTH)
    assert r.status_code == 503
    assert "The log store cannot be read: DatabaseError: file is not a database" in r.get_data(as_text=True)
    health = client.get("/health", headers=AUTH)
    assert health.status_code == 200
    assert health.get_json()["logStore"]["writable"] is False
    assert health.get_json()["logStore"]["queued"] == 3


def test_the_queue_is_bounded_and_counts_what_it_drops(log_db):
    store = LogStore(log_db, retention=10, max_queue=3)
    try:
        for i in range(5):
            store.append({"requestId": f"r{i}", "status": 200, "durationMs": 1.0})
        assert store.stats()["queued"] == 3 and store.dropped == 2
        assert store.flush() is True
        assert store.written == 3
    finally:
        store.close()


@pytest.mark.gunicorn
def test_records_from_every_worker_on_every_workers_page_and_after_a_restart(gunicorn_server, fake, tmp_path):
    env = {
        "OPENAI_PROXY_PAGES_RATE_LIMIT": "1000/minute",
        "OPENAI_PROXY_LOG_DB": str(tmp_path / "shared.sqlite3"),
    }
    server = gunicorn_server(workers=2, **env)
    sent: set[str] = set()
    pids: set[int] = set()
    for _ in range(5):  # until both workers have served some (the kernel picks the worker)
        jobs = [
            gevent.spawn(requests.post, server.url + "/openai", json=CHAT, headers=CLOSE, timeout=10)
            for _ in range(20)
        ]
        gevent.joinall(jobs, raise_error=True)
        sent |= {job.value.headers["X-Proxy-Request-Id"] for job in jobs}
        html = _wait_for(server.url, sent)
        pids |= {pid for _, rid, pid in rows(html) if rid in sent}
        if len(pids) == 2:
            break
    assert len(pids) == 2, "one worker served every request"
    # Each worker's page shows the records the other worker wrote.
    seen_from: dict[int, set[int]] = {}
    for _ in range(40):
        html = requests.get(f"{server.url}/log?per_page=500", headers={**CLOSE, **AUTH}, timeout=10).text
        seen_from.setdefault(served_by(html), set()).update(pid for _, _, pid in rows(html))
        if len(seen_from) == 2:
            break
    assert set(seen_from) == pids and all(shown == pids for shown in seen_from.values())
    assert counters(html)["Request count"] == str(len(sent))
    server.stop()  # SIGTERM: each worker flushes what it still has queued

    again = gunicorn_server(workers=1, **env)
    html = requests.get(f"{again.url}/log?per_page=500", headers={**CLOSE, **AUTH}, timeout=10).text
    assert {rid for _, rid, _ in rows(html)} == sent
    assert counters(html)["Request count"] == str(len(sent))


def _wait_for(url: str, request_ids: set[str]) -> str:
    deadline = time.monotonic() + 5
    while True:
        html = requests.get(f"{url}/log?per_page=500", headers={**CLOSE, **AUTH}, timeout=10).text
        if request_ids <= {rid for _, rid, _ in rows(html)} or time.monotonic() > deadline:
            return html
        time.sleep(0.1)
