"""Spend per UTC day, client and model, and per-minute request counts with a latency histogram: kept
beside the records in both backends, summed over writers and hosts, exact for known records, never
trimmed by record retention, pruned by age."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from itertools import pairwise

import pytest

from openai_proxy.log import db as logdb
from openai_proxy.log.db import Batch
from openai_proxy.log.sql import open_database
from openai_proxy.log.stats import BOUNDS_MS, MinuteRow, SpendRow, p50_p95, percentile
from openai_proxy.log.store import LogStore
from tests.conftest import SECURITY_KEY, post_json
from tests.support.logpage import CHAT

T = datetime(2030, 1, 1, 23, 59, 30, tzinfo=UTC).timestamp()  # 30 s before a new day and minute
M = int(T // 60)
DAY = 24 * 3600


def completion(ts: float, duration_ms: float, status: int = 200, **fields) -> logdb.Queued:
    return ("completion", {"requestId": f"r{ts}-{duration_ms}", "status": status, "durationMs": duration_ms,
                           **fields}, ts)  # fmt: skip


def write(target: str, writer: str, seq: int, items: list, *, at: float = T, prune: bool = False) -> bool:
    db = open_database(target, 1000)
    try:
        logdb.create_schema(db)
        batch = Batch(writer, seq, writer.split(":")[0], 1, items, 0, 0, prune, at)
        return logdb.write_batch(db, batch, retention=2).fresh
    finally:
        db.close()


def read(target: str, fn: str, since):
    store = LogStore(target, retention=2)
    try:
        return getattr(store, fn)(since)
    finally:
        store.close()


GPT4O = {"client": "acme", "model": "gpt-4o", "upstreamModel": "gpt-4o-2024-08-06"}
FIRST_BATCH = [
    completion(T, 5.0, **GPT4O, usage={"prompt_tokens": 100, "cached_tokens": 20, "completion_tokens": 50},
               costUsd=0.75),
    completion(T, 1000.0, **GPT4O, usage={"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
               costUsd=0.25),
    # No price for this model: counted as unpriced, its tokens still summed.
    completion(T, 10.0, client="acme", model="x-unknown", usage={"prompt_tokens": 7, "completion_tokens": 3},
               costUsd=None),
    # Refused before any client or model was known: no usage, so not unpriced either.
    completion(T, 0.5, status=403, client=None, model=None, usage=None, costUsd=None),
    # Past midnight UTC: the next day, the next minute. Only `model` (no upstreamModel).
    completion(T + 45, 2_000_000.0, status=500, client="acme", model="gpt-4o",
               usage={"prompt_tokens": 1, "completion_tokens": 1}, costUsd=0.5),
    completion(T + 45, 900_000.0, status=499, client="acme", model="gpt-4o", cancelled=True, costUsd=None),
    # Retried attempts are records, not requests: no spend, no minute count.
    ("retry", {"requestId": "r-retry", "attempt": 2, "reason": "HTTP 503"}, T),
]  # fmt: skip


def test_spend_and_minutes_are_exact_summed_over_writers_and_kept_past_retention(log_db):
    assert write(log_db, "h1:1:aa", 1, FIRST_BATCH) is True
    # Another host adds to the same day, client and model.
    assert write(
        log_db, "h2:7:bb", 1, [completion(T, 20.0, **GPT4O, usage={"prompt_tokens": 1}, costUsd=0.5)]
    )
    assert read(log_db, "spend", "2030-01-01") == [
        SpendRow("2030-01-01", "", "", 1, 0, 0, 0, 0.0, 0),
        SpendRow("2030-01-01", "acme", "gpt-4o-2024-08-06", 3, 111, 20, 55, 1.5, 0),
        SpendRow("2030-01-01", "acme", "x-unknown", 1, 7, 0, 3, 0.0, 1),
        SpendRow("2030-01-02", "acme", "gpt-4o", 2, 1, 0, 1, 0.5, 0),
    ]
    assert [r.day for r in read(log_db, "spend", "2030-01-02")] == ["2030-01-02"]
    histogram_m = [0] * 24
    histogram_m[0] = 3  # 5 ms, 10 ms (a bound is inside its bucket), 0.5 ms
    histogram_m[2] = 1  # 20 ms: 16.42 < 20 <= 26.97
    histogram_m[10] = 1  # 1000 ms: 868.19 < 1000 <= 1425.67
    histogram_next = [0] * 23 + [2]  # 15 minutes, and longer, in the last bucket
    # 403 is an error; a client that went away (499, cancelled) is not.
    assert read(log_db, "minutes", M) == [MinuteRow(M, 5, 1, tuple(histogram_m)),
                                          MinuteRow(M + 1, 2, 1, tuple(histogram_next))]  # fmt: skip
    assert read(log_db, "minutes", M + 1) == [MinuteRow(M + 1, 2, 1, tuple(histogram_next))]
    # Record retention (2 per level here) trims records, never the aggregates.
    db = open_database(log_db, 1000)
    try:
        assert db.execute("SELECT level, COUNT(*) FROM records GROUP BY level ORDER BY level").fetchall() == [
            ("error", 2), ("info", 2)
        ]  # fmt: skip
    finally:
        db.close()


def test_a_batch_sent_twice_is_counted_once(log_db):
    items = [completion(T, 5.0, **GPT4O, usage={"prompt_tokens": 3}, costUsd=0.25)]
    assert write(log_db, "h1:1:aa", 1, items) is True
    assert write(log_db, "h1:1:aa", 1, items) is False  # the same writer's batch 1 again
    assert write(log_db, "h1:1:aa", 2, items) is True
    assert write(log_db, "h9:1:cc", 1, items) is True  # another writer's own numbering
    (row,) = read(log_db, "spend", "2030-01-01")
    assert (row.requests, row.prompt_tokens, row.cost_usd) == (3, 9, 0.75)
    assert [(m.requests, m.errors) for m in read(log_db, "minutes", 0)] == [(3, 0)]


def test_old_spend_and_minutes_are_pruned_by_age(log_db):
    write(log_db, "h1:1:aa", 1, FIRST_BATCH)
    later = T + 401 * DAY  # 2031-02-06: spend of 2030-01-01 is over 400 days old, 2030-01-02 is not
    assert write(log_db, "h1:1:aa", 2, [completion(later, 30.0, client="acme", model="m")], at=later)
    assert len(read(log_db, "spend", "2000-01-01")) == 5  # nothing pruned without the flag
    assert write(log_db, "h1:1:aa", 3, [], at=later, prune=True)
    assert [(r.day, r.model) for r in read(log_db, "spend", "2000-01-01")] == [
        ("2030-01-02", "gpt-4o"), ("2031-02-06", "m")
    ]  # fmt: skip
    assert [m.minute for m in read(log_db, "minutes", 0)] == [int(later // 60)]


def test_requests_through_the_proxy_land_in_the_aggregates(log_db, make_app, fake):
    app = make_app(OPENAI_PROXY_LOG_DB=log_db)
    client = app.test_client()
    assert [post_json(client, "/openai", CHAT).status_code for _ in range(3)] == [200] * 3
    assert post_json(client, "/embeddings", {"security_key": SECURITY_KEY}).status_code == 400
    store = app.extensions["openai_proxy"].log_store
    assert store.flush() is True
    rows = store.spend("2000-01-01")
    expected: dict[tuple[str, str], int] = {}
    for r in app.records:
        key = (r["client"] or "", r.get("upstreamModel") or r.get("model") or "")
        expected[key] = expected.get(key, 0) + 1
    assert {(r.client, r.model): r.requests for r in rows} == expected
    chats = [r for r in app.records if r["endpoint"] == "/openai"]
    # costUsd: a number, or null when the model has no price (then the request counts as unpriced).
    priced = [r["costUsd"] for r in chats if isinstance(r.get("costUsd"), int | float)]
    chat_rows = [r for r in rows if r.model == "gpt-4o-mini"]
    assert sum(r.requests for r in chat_rows) == 3
    assert sum(r.prompt_tokens for r in chat_rows) == 75 and sum(r.completion_tokens for r in chat_rows) == 21
    assert sum(r.cached_tokens for r in chat_rows) == 9
    assert math.isclose(sum(r.cost_usd for r in chat_rows), sum(priced))
    assert sum(r.unpriced for r in chat_rows) == 3 - len(priced)
    minutes = store.minutes(0)
    assert sum(m.requests for m in minutes) == 4 and sum(m.errors for m in minutes) == 1
    assert sum(sum(m.histogram) for m in minutes) == 4


def test_percentiles_are_bucket_upper_bounds():
    assert BOUNDS_MS[0] == 10.0 and BOUNDS_MS[-1] == 900_000.0 and len(BOUNDS_MS) == 24
    assert all(b / a == pytest.approx(1.642, abs=0.001) for a, b in pairwise(BOUNDS_MS))
    histogram = [5] + [0] * 9 + [1] + [0] * 13
    assert p50_p95(histogram) == (10.0, 1425.67)
    assert percentile(histogram, 5 / 6) == 10.0 and percentile(histogram, 0.84) == 1425.67
    assert p50_p95([0] * 24) == (None, None)
    assert percentile([0] * 23 + [4], 0.5) == 900_000.0
