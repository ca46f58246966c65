"""No upstream answer can stop the request log: a record the database refuses for its values is written
without them (or skipped) and counted; the rest of its batch, and every later one, is written."""

from __future__ import annotations

import pytest

from openai_proxy.log import db as logdb
from openai_proxy.log import stats as logstats
from openai_proxy.log.store import LogStore
from tests.conftest import post_json
from tests.support.fake_upstream import chat_completion
from tests.support.logpage import AUTH, CHAT, counters, rows
from tests.support.postgres_server import wait_until
from tests.test_metrics import samples, value

REJECTED = "openai_proxy_log_rejected_records_total"


# Absurd counts go to a model of their own: the process's metrics are shared by the tests, and a
# counter at 2**63 would swallow the small counts other tests add to gpt-4o-mini's series.
HUGE = {**CHAT, "model": "huge-usage"}


def answer_with_usage(usage: dict):
    body = chat_completion("huge-usage", usage=usage)
    return lambda req, conn: conn.send_json(200, body)


def log_page(client, path: str = "/log") -> str:
    r = client.get(f"{path}?per_page=500", headers=AUTH)
    assert r.status_code == 200, r.get_data(as_text=True)[:500]
    return r.get_data(as_text=True)


def rejected_metric(client) -> float:
    found = samples(client.get("/metrics", headers=AUTH).get_data(as_text=True))
    return value(found, REJECTED) if (REJECTED, frozenset()) in found else 0.0


def hundred_calls_all_arrive(app, client, before: list[str]) -> str:
    """100 normal calls after `before`: every record reaches the log, in order; the page's HTML."""
    sent = [post_json(client, "/openai", CHAT) for _ in range(100)]
    assert [r.status_code for r in sent] == [200] * 100
    store = app.extensions["openai_proxy"].log_store
    wait_until(lambda: store.flush() and store.queued == 0)
    html = log_page(client)
    expected = before + [r.headers["X-Proxy-Request-Id"] for r in sent]
    assert [rid for _, rid, _ in rows(html)] == expected[::-1]
    assert counters(html)["Request count"] == str(len(expected))
    return html


def test_an_answer_with_2_63_prompt_tokens_never_stops_the_sqlite_log(make_app, fake):
    app = make_app()
    client = app.test_client()
    huge = {"prompt_tokens": 2**63, "completion_tokens": 1, "total_tokens": 2**63 + 1}
    fake.push("POST", "/v1/chat/completions", answer_with_usage(huge), times=1)
    r = post_json(client, "/openai", HUGE)
    assert r.status_code == 200
    html = hundred_calls_all_arrive(app, client, [r.headers["X-Proxy-Request-Id"]])
    # The absurd count is not a count: the maxima and the day's spend hold the 100 real calls only.
    assert counters(html)["Max prompt tokens"] == "25"
    store = app.extensions["openai_proxy"].log_store
    spend = {
        row.model: (row.requests, row.prompt_tokens, row.completion_tokens)
        for row in store.spend("2000-01-01")
    }
    # One count out of 0 <= n < 2**53 makes the whole usage unknown (contract §14): nothing counted.
    assert spend == {"gpt-4o-mini": (100, 2500, 700), "huge-usage": (1, 0, 0)}
    # Nor in the metrics: the absurd usage counts nothing, and the series around it keep counting.
    found = samples(client.get("/metrics", headers=AUTH).get_data(as_text=True))
    tokens = {kind: value(found, "openai_proxy_tokens_total", model="huge-usage", kind=kind)
              for kind in ("prompt", "completion")}  # fmt: skip
    assert tokens == {"prompt": 0.0, "completion": 0.0}
    assert value(found, "openai_proxy_tokens_total", model="gpt-4o-mini", kind="prompt") >= 2500


def test_two_answers_of_2_62_tokens_never_stop_the_postgresql_log(postgres_db, make_app, fake):
    app = make_app(OPENAI_PROXY_LOG_DB=postgres_db.url)
    client = app.test_client()
    fake.push("POST", "/v1/chat/completions", answer_with_usage({"prompt_tokens": 2**62}), times=2)
    first = [post_json(client, "/openai", HUGE) for _ in range(2)]
    assert [r.status_code for r in first] == [200, 200]
    hundred_calls_all_arrive(app, client, [r.headers["X-Proxy-Request-Id"] for r in first])
    assert postgres_db.query("SELECT model, requests, prompt_tokens FROM spend_daily ORDER BY model") == [
        ("gpt-4o-mini", 100, 2500), ("huge-usage", 2, 0)
    ]  # fmt: skip


# ---- what the store does with a value the database refuses ----------------------------------------


@pytest.fixture
def unguarded(monkeypatch):
    """Let values reach the database as they are: what a store gets that its guards do not know."""
    monkeypatch.setattr(logstats, "count", lambda value: value if isinstance(value, int) else 0)
    monkeypatch.setattr(logstats, "key_text", lambda value: value)
    monkeypatch.setattr(logdb, "text_column", lambda value: value)


def entry(rid: str, **extra) -> dict:
    return {"requestId": rid, "status": 200, "durationMs": 5.0, "endpoint": "/openai", "client": "acme",
            "model": "m", **extra}  # fmt: skip


def test_a_refused_record_is_written_without_its_bad_values_and_its_batch_with_it(log_db, unguarded):
    store = LogStore(log_db, retention=100, host="h1")
    told: list[int] = []
    store.on_reject = told.append
    try:
        store.append(entry("a", usage={"prompt_tokens": 5}))
        store.append(entry("bad", usage={"prompt_tokens": 2**63, "completion_tokens": 3}))
        store.append(entry("c", usage={"prompt_tokens": 7}))
        assert store.flush() is True
        assert (store.written, store.rejected, told) == (3, 1, [1])
        page = store.page("info", logdb.LogFilter(), 50)
        assert [r["requestId"] for r in page.records] == ["c", "bad", "a"]
        bad = page.records[1]
        assert bad["usage"] == {"prompt_tokens": None, "completion_tokens": 3}
        assert bad["logRejected"].startswith(("OverflowError", "NumericValueOutOfRange"))
        assert page.rejected == {"h1": 1}
        (row,) = store.spend("2000-01-01")
        assert (row.requests, row.prompt_tokens, row.completion_tokens) == (3, 12, 3)
        # The next batch goes the fast way again.
        store.append(entry("d", usage={"prompt_tokens": 1}))
        assert store.flush() is True and (store.written, store.rejected) == (4, 1)
    finally:
        store.close()


def test_a_record_that_cannot_be_written_even_cleaned_is_skipped_and_counted(log_db, unguarded, monkeypatch):
    monkeypatch.setattr(logdb, "clean_entry", lambda value: value)  # cleaning does not help this one
    store = LogStore(log_db, retention=100, host="h1")
    try:
        store.append(entry("a"))
        # An endpoint no database takes: NUL for PostgreSQL, an int beyond 64 bits for SQLite.
        store.append(entry("bad", endpoint="x\x00y" if log_db.startswith("postgresql") else 2**64))
        store.append(entry("c"))
        assert store.flush() is True and (store.written, store.rejected) == (2, 1)
        page = store.page("info", logdb.LogFilter(), 50)
        assert [r["requestId"] for r in page.records] == ["c", "a"]
        assert page.rejected == {"h1": 1} and page.counters["request_count"] == 2
    finally:
        store.close()


def test_a_spend_row_past_bigint_costs_the_aggregates_of_its_records_not_the_records(
    postgres_db, make_app, fake
):
    """A spend row another writer left at the top of BIGINT: every record that adds to it is written,
    counted, and shown; only its share of that row is left out."""
    app = make_app(OPENAI_PROXY_LOG_DB=postgres_db.url, OPENAI_PROXY_HOST_NAME="host-a")
    client = app.test_client()
    first = post_json(client, "/openai", CHAT)
    assert first.status_code == 200
    assert "Rejected log records: 0<" in log_page(client) and rejected_metric(client) == 0
    postgres_db.query("UPDATE spend_daily SET prompt_tokens = 9223372036854775800 RETURNING day")
    html = hundred_calls_all_arrive(app, client, [first.headers["X-Proxy-Request-Id"]])
    assert ">Rejected log records: 100<" in html
    assert '<span class="mono" data-host="host-a">host-a: 100</span>' in html
    assert rejected_metric(client) == 100
    assert postgres_db.query("SELECT requests, prompt_tokens FROM spend_daily") == [(1, 9223372036854775800)]
    # Which aggregate refused is not known to the store: those records add to neither.
    assert postgres_db.query("SELECT SUM(requests) FROM minute_stats") == [(1,)]
    (record,) = [r for r in app.extensions["openai_proxy"].log_store.page(
        "info", logdb.LogFilter(), 1).records]  # fmt: skip
    assert record["logRejected"] == "NumericValueOutOfRange: bigint out of range"


def test_a_model_name_with_nul_or_of_any_length_reaches_the_postgresql_log(postgres_db, make_app, fake):
    app = make_app(OPENAI_PROXY_LOG_DB=postgres_db.url)
    client = app.test_client()
    sent = [post_json(client, "/openai", {**CHAT, "model": model}) for model in ("gpt\x00x", "m" * 20_000)]
    assert [r.status_code for r in sent] == [200, 200]
    html = hundred_calls_all_arrive(app, client, [r.headers["X-Proxy-Request-Id"] for r in sent])
    assert ">Rejected log records: 0<" in html
    models = [m for (m,) in postgres_db.query("SELECT model FROM spend_daily ORDER BY model")]
    assert models == ["gpt-4o-mini", "gpt\ufffdx", "m" * 200]
