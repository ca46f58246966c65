"""Several hosts, one request log in PostgreSQL: real gunicorn servers (different ports, runtime dirs and
host names) against a real PostgreSQL on loopback, which is stopped and started mid-run."""

from __future__ import annotations

import gevent
import pytest
import requests

from tests.support.logpage import AUTH, CHAT, CLOSE, counters, row_hosts, rows
from tests.support.postgres_server import wait_until
from tests.test_metrics import samples, value

pytestmark = pytest.mark.gunicorn
PAGES = {"OPENAI_PROXY_PAGES_RATE_LIMIT": "1000/minute"}


def host(gunicorn_server, tmp_path, name: str, log_db: str, workers: int = 2, **env: str):
    return gunicorn_server(workers=workers, OPENAI_PROXY_LOG_DB=log_db, OPENAI_PROXY_HOST_NAME=name,
                           OPENAI_PROXY_RUNTIME_DIR=str(tmp_path / f"run-{name}"), **PAGES, **env)  # fmt: skip


def send(server, n: int, body: dict = CHAT) -> list[requests.Response]:
    jobs = [gevent.spawn(requests.post, f"{server.url}/openai", json=body, headers=CLOSE, timeout=10)
            for _ in range(n)]  # fmt: skip
    gevent.joinall(jobs, raise_error=True)
    return [job.value for job in jobs]


def page(server, path: str = "/log", query: str = "") -> requests.Response:
    return requests.get(f"{server.url}{path}?per_page=500&{query}", headers={**CLOSE, **AUTH}, timeout=10)


def shown(server, path: str = "/log", query: str = "") -> dict[str, str]:
    """request id -> host of every record the page shows (only once the page can be read)."""
    r = page(server, path, query)
    return dict(row_hosts(r.text)) if r.status_code == 200 else {}


def test_every_hosts_records_and_summed_counters_on_either_hosts_page(
    postgres_db, gunicorn_server, fake, tmp_path
):
    a = host(gunicorn_server, tmp_path, "host-a", postgres_db.url)
    b = host(gunicorn_server, tmp_path, "host-b", postgres_db.url)
    from_a = {r.headers["X-Proxy-Request-Id"] for r in send(a, 6)}
    from_b = {r.headers["X-Proxy-Request-Id"] for r in send(b, 4)}
    denied = send(b, 1, {**CHAT, "security_key": "wrong"})[0]
    assert denied.status_code == 403
    expected = {**dict.fromkeys(from_a, "host-a"), **dict.fromkeys(from_b, "host-b")}
    for server in (a, b):
        assert wait_until(lambda server=server: shown(server) == expected)
        html = page(server).text
        c = counters(html)
        assert (c["Request count"], c["Error count"]) == ("11", "1")
        assert ">Dropped log records: 0<" in html
        assert '<select name="host">' in html  # more than one host: the filter is offered
        assert shown(server, query="host=host-b") == dict.fromkeys(from_b, "host-b")
        assert shown(server, "/log_errors") == {denied.headers["X-Proxy-Request-Id"]: "host-b"}
    assert postgres_db.query("SELECT host, dropped FROM log_hosts ORDER BY host") == [
        ("host-a", 0), ("host-b", 0)
    ]  # fmt: skip


def test_postgresql_stopped_mid_run_then_every_queued_record_arrives_once(
    postgres_db, gunicorn_server, fake, tmp_path
):
    server = host(gunicorn_server, tmp_path, "host-a", postgres_db.url)
    sent = [r.headers["X-Proxy-Request-Id"] for r in send(server, 4)]
    wait_until(lambda: set(shown(server)) == set(sent))
    postgres_db.server.stop()
    try:
        during = send(server, 12)
        assert [r.status_code for r in during] == [200] * 12
        r = page(server)
        assert r.status_code == 503 and "The log store cannot be read: OperationalError" in r.text
        health = requests.get(f"{server.url}/health", headers={**CLOSE, **AUTH}, timeout=10).json()
        assert health["status"] == "degraded" and health["logStore"]["writable"] is False
    finally:
        postgres_db.server.start()
    sent += [r.headers["X-Proxy-Request-Id"] for r in during]
    wait_until(lambda: set(shown(server)) == set(sent), timeout=30)
    html = page(server).text
    assert sorted(rid for _, rid, _ in rows(html)) == sorted(sent)  # each once
    assert counters(html)["Request count"] == "16" and ">Dropped log records: 0<" in html
    assert postgres_db.query("SELECT COUNT(*), COUNT(DISTINCT request_id) FROM records") == [(16, 16)]
    assert postgres_db.query("SELECT SUM(requests) FROM minute_stats") == [(16,)]


def test_a_full_queue_during_an_outage_is_counted_on_the_page_and_in_metrics(
    postgres_db, gunicorn_server, fake, tmp_path
):
    server = host(
        gunicorn_server, tmp_path, "host-a", postgres_db.url, workers=1, OPENAI_PROXY_LOG_MAX_QUEUE="3"
    )
    assert page(server).status_code == 200
    postgres_db.server.stop()
    try:
        during = send(server, 8)
        assert [r.status_code for r in during] == [200] * 8
        r = page(server)
        assert r.status_code == 503 and ">Dropped log records: 5<" in r.text
        assert "3 queued, 5 dropped (5 not yet counted in the database)" in r.text
    finally:
        postgres_db.server.start()
    wait_until(lambda: len(shown(server)) == 3, timeout=30)

    def dropped_saved() -> bool:
        return postgres_db.query("SELECT host, dropped FROM log_hosts") == [("host-a", 5)]

    wait_until(dropped_saved)
    html = page(server).text
    kept = {rid for _, rid, _ in rows(html)}
    assert len(kept) == 3 and kept <= {r.headers["X-Proxy-Request-Id"] for r in during}
    assert ">Dropped log records: 5<" in html and 'data-host="host-a">host-a: 5</span>' in html
    assert "0 queued, 5 dropped (0 not yet counted in the database)" in html
    metrics = samples(requests.get(f"{server.url}/metrics", headers={**CLOSE, **AUTH}, timeout=10).text)
    assert value(metrics, "openai_proxy_log_dropped_total") == 5
