"""Hosts and clients on the log's records: each record names its host (OPENAI_PROXY_HOST_NAME) and its
client; `/log` and `/log_errors` show both and filter on `host=` and `client=`, in both backends. A
SQLite log made before records had hosts is upgraded in place."""

from __future__ import annotations

import socket
import sqlite3

from markupsafe import escape

from tests.conftest import SECURITY_KEY, post_json
from tests.support.fake_upstream import error
from tests.support.logpage import AUTH, CHAT, column, counters, link, row_hosts, rows


def html_of(client, path: str = "/log", query: str = "") -> str:
    r = client.get(f"{path}?{query}", headers=AUTH)
    assert r.status_code == 200, r.get_data(as_text=True)[:300]
    return r.get_data(as_text=True)


def rid(response) -> str:
    return response.headers["X-Proxy-Request-Id"]


def test_each_record_names_its_host_and_pages_filter_by_host(log_db, make_app, fake):
    a = make_app(OPENAI_PROXY_LOG_DB=log_db, OPENAI_PROXY_HOST_NAME="web-1.eu")
    b = make_app(OPENAI_PROXY_LOG_DB=log_db, OPENAI_PROXY_HOST_NAME="web-2.eu")
    ca, cb = a.test_client(), b.test_client()
    from_a = [rid(post_json(ca, "/openai", CHAT)) for _ in range(2)]
    from_b = [rid(post_json(cb, "/openai", CHAT))]
    fake.push("GET", "/v1/responses/resp_h", error(503, "busy"), times=1)
    retried = rid(cb.get(f"/openai2/resp_h?security_key={SECURITY_KEY}"))
    assert [r["host"] for r in a.records] == ["web-1.eu"] * 2 and b.records[0]["host"] == "web-2.eu"
    b.extensions["openai_proxy"].log_store.flush()
    html = html_of(ca)
    assert dict(row_hosts(html)) == {
        **dict.fromkeys(from_a, "web-1.eu"),
        **dict.fromkeys([*from_b, retried], "web-2.eu"),
    }
    assert '<select name="host">' in html
    assert '<option value="web-1.eu">web-1.eu</option>' in html and any(
        c.startswith("web-2.eu ") for c in column(html, "host")
    )
    assert [r for r, _ in row_hosts(html_of(ca, query="host=web-2.eu"))] == [retried, *from_b]
    assert [r for r, _ in row_hosts(html_of(cb, query="host=web-1.eu&per_page=1&page=2"))] == [from_a[0]]
    paged = html_of(cb, query="host=web-1.eu&per_page=1")
    older = link(paged, "next")  # the next page starts after this one's last record, filters kept
    assert older.startswith("/log?host=web-1.eu&per_page=1&before=")
    assert [r for r, _ in row_hosts(html_of(cb, query=older.partition("?")[2]))] == [from_a[0]]
    # The retried attempt names the host whose worker made it.
    assert row_hosts(html_of(ca, "/log_errors", "host=web-2.eu")) == [(retried, "web-2.eu")]
    assert row_hosts(html_of(ca, "/log_errors", "host=web-1.eu")) == []
    # An unknown host: no records, and the form keeps the value.
    empty = html_of(ca, query="host=web-9")
    assert rows(empty) == [] and "No records match these filters." in empty
    assert '<option value="web-9" selected>web-9</option>' in empty
    assert counters(empty)["Request count"] == "4"  # counters are never filtered


def test_one_host_gets_no_host_filter_and_names_itself_by_default(make_app, fake):
    app = make_app()
    client = app.test_client()
    post_json(client, "/openai", CHAT)
    assert app.records[0]["host"] == socket.gethostname()
    html = html_of(client)
    assert row_hosts(html) == [(app.records[0]["requestId"], socket.gethostname())]
    assert '<select name="host">' not in html and '<select name="client">' not in html
    assert f'host <span class="mono">{socket.gethostname()}</span> · log store: sqlite' in html


def test_pages_show_and_filter_the_client(log_db, make_app, fake):
    app = make_app(OPENAI_PROXY_LOG_DB=log_db)
    client = app.test_client()
    store = app.extensions["openai_proxy"].log_store
    plain = rid(post_json(client, "/openai", CHAT))
    # Records of named clients (their names come from the clients file, another part of the proxy).
    for name, status in (("acme", 200), ("acme", 429), ("beta", 200), ("<b>x</b>", 200)):
        store.append({"requestId": f"{name}-{status}", "status": status, "client": name, "durationMs": 1.0,
                      "endpoint": "/openai", "method": "POST", "pid": 1})  # fmt: skip
    html = html_of(client)
    assert [r for _, r, _ in rows(html)][-1] == plain
    assert '<select name="client">' in html and '<option value="acme">acme</option>' in html
    assert "beta" in column(html, "client") and str(escape("<b>x</b>")) in html and "<b>x</b>" not in html
    assert [r for _, r, _ in rows(html_of(client, query="client=acme"))] == ["acme-200"]
    assert [r for _, r, _ in rows(html_of(client, "/log_errors", "client=acme"))] == ["acme-429"]
    assert rows(html_of(client, "/log_errors", "client=beta")) == []
    filtered = html_of(client, query="client=acme&status=2xx&per_page=1")
    assert '<option value="acme" selected>acme</option>' in filtered
    both = html_of(client, query="client=beta&host=nowhere")
    assert rows(both) == [] and "No records match these filters." in both


def test_a_sqlite_log_from_before_hosts_is_upgraded_in_place(make_app, fake, tmp_path):
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE records (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, level TEXT NOT NULL,
            kind TEXT NOT NULL, request_id TEXT, incoming_request_id TEXT, upstream_request_id TEXT,
            endpoint TEXT, status INTEGER, pid INTEGER, data TEXT NOT NULL);
        CREATE INDEX records_level_id ON records (level, id);
        CREATE TABLE counters (name TEXT PRIMARY KEY, value REAL NOT NULL);
        INSERT INTO records (ts, level, kind, request_id, endpoint, status, pid, data) VALUES
            (1700000000.0, 'info', 'completion', 'old-1', '/openai', 200, 42,
             '{"requestId": "old-1", "status": 200, "endpoint": "/openai", "pid": 42, "durationMs": 3.0}');
        INSERT INTO counters VALUES ('request_count', 9), ('max_prompt_tokens', 100);
    """)  # fmt: skip
    old.close()
    app = make_app(OPENAI_PROXY_LOG_DB=str(path), OPENAI_PROXY_HOST_NAME="upgraded")
    client = app.test_client()
    new = rid(post_json(client, "/openai", CHAT))
    html = html_of(client)
    assert row_hosts(html) == [(new, "upgraded"), ("old-1", "")]
    assert "2 records" in html  # the old record is in the totals too (counted once, when they were made)
    c = counters(html)
    assert (c["Request count"], c["Max prompt tokens"]) == ("10", "100")
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT request_id, host FROM records ORDER BY id").fetchall() == [
            ("old-1", None), (new, "upgraded")
        ]  # fmt: skip
    finally:
        db.close()
