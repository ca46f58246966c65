"""`/log`'s spend tables (per client and model; today, 7 and 30 days) and its last-hour chart."""

from __future__ import annotations

import re
import textwrap
import time
from datetime import UTC, date, datetime

import pytest

from openai_proxy.log.stats import BOUNDS_MS, BUCKETS, MinuteRow, SpendRow
from openai_proxy.pages.spend import Minute, _ms_label, exact_usd, grouped, hour_chart, spend_periods, usd
from tests.conftest import ACCESS_TOKEN, SECURITY_KEY, post_json
from tests.support.fake_upstream import error
from tests.support.logfill import fill
from tests.support.logpage import column

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
PAGE = {"Authorization": f"Bearer {ACCESS_TOKEN}"}
# The fake's chat answer: 25 prompt tokens (3 cached), 7 out; at gpt-4o-mini's prices 7.725e-06 USD.
ONE_CHAT_USD = 7.725e-06


def row(day: str, client: str, model: str, requests: int, cost: float, unpriced: int = 0) -> SpendRow:
    return SpendRow(day, client, model, requests, 10 * requests, 2 * requests, 3 * requests, cost, unpriced)


def test_periods_add_up_the_right_days():
    rows = [row("2026-11-30", "a", "m1", 1, 1.0), row("2026-11-24", "a", "m2", 2, 2.0),
            row("2026-11-23", "b", "m1", 4, 4.0, unpriced=1), row("2026-11-01", "b", "m2", 8, 8.0),
            row("2026-10-31", "b", "m2", 16, 16.0)]  # fmt: skip
    today, week, month = spend_periods(rows, date(2026, 11, 30))
    assert [p.label for p in (today, week, month)] == ["Today", "7 days", "30 days"]
    assert (today.total.requests, week.total.requests, month.total.requests) == (1, 3, 15)
    assert [(t.name, t.requests, t.cost_usd) for t in month.clients] == [("b", 12, 12.0), ("a", 3, 3.0)]
    assert [(t.name, t.requests) for t in month.models] == [("m2", 10), ("m1", 5)]
    assert (month.total.prompt_tokens, month.total.cached_tokens, month.total.completion_tokens) == (
        150,
        30,
        45,
    )
    assert month.total.unpriced == 1 and week.total.unpriced == 0


def test_usd_is_never_shown_as_zero_when_it_is_not():
    (period, *_) = spend_periods([row("2026-11-30", "a", "m", 1, 7.725e-06)], date(2026, 11, 30))
    assert period.total.usd == "$0.000008"
    (period, *_) = spend_periods([row("2026-11-30", "a", "m", 1, 1234.5)], date(2026, 11, 30))
    assert period.total.usd == "$1,234.50"


def test_a_cost_nobody_knows_is_a_dash_never_zero():
    """No request of a row has a cost: a dash (and the title says why), not $0.000000, which reads
    as free. Tokens without a cost (a re-read costs 0) are a real $0."""
    today = date(2026, 11, 30)
    rows = [SpendRow("2026-11-30", "a", "whisper-1", 5, 0, 0, 0, 0.0, 5),
            # Written before a call without usage counted as unpriced: no tokens, no cost either.
            SpendRow("2026-11-30", "a", "whisper-old", 3, 0, 0, 0, 0.0, 0),
            SpendRow("2026-11-30", "a", "re-read", 2, 40, 0, 10, 0.0, 0),
            SpendRow("2026-11-30", "b", "gpt-4o-mini", 1, 25, 3, 7, 7.725e-06, 0)]  # fmt: skip
    (period, *_) = spend_periods(rows, today)
    models = {t.name: t for t in period.models}
    assert (models["whisper-1"].usd, models["whisper-old"].usd) == ("\u2014", "\u2014")
    assert models["whisper-1"].usd_title.startswith("no cost")
    assert models["re-read"].usd == "$0.000000" and models["gpt-4o-mini"].usd == "$0.000008"
    clients = {t.name: t for t in period.clients}
    assert clients["a"].usd == "\u2014" and clients["b"].usd == "$0.000008"
    # Some priced, some not: the priced part, and the title says what it leaves out.
    assert period.total.usd == "$0.000008" and period.total.unpriced == 5
    assert period.total.usd_title == "$0.000007725 for the priced requests; 5 without a price"


def test_a_model_whose_calls_have_no_cost_is_unpriced_in_the_spend_table(log_db, make_app):
    """Transcriptions answered 2xx without usage have no cost (costUsd null) but ran: in both
    backends' aggregates they count as unpriced, and /log's spend row shows a dash, not $0.000000.
    A failed call without usage was not billed: counted, not unpriced."""
    now = time.time()
    if datetime.fromtimestamp(now, UTC).strftime("%H:%M") == "23:59":
        time.sleep(61)  # the records and the page's "Today" on the same UTC day
        now = time.time()
    audio = {"client": "default", "endpoint": "/openai/audio/transcriptions", "model": "whisper-1",
             "upstreamModel": "whisper-1", "durationMs": 5.0, "usage": None, "costUsd": None}  # fmt: skip
    chat = {"client": "default", "endpoint": "/openai", "model": "gpt-4o-mini", "durationMs": 5.0,
            "usage": {"prompt_tokens": 25, "cached_tokens": 3, "completion_tokens": 7}, "costUsd": ONE_CHAT_USD}  # fmt: skip
    items = [("completion", {**audio, "requestId": "w1", "status": 200}, now),
             ("completion", {**audio, "requestId": "w2", "status": 200}, now),
             ("completion", {**audio, "requestId": "w3", "status": 502, "error": {"message": "reset"}}, now),
             ("completion", {**chat, "requestId": "c1", "status": 200}, now)]  # fmt: skip
    assert fill(log_db, iter(items), retention=100) == len(items)
    html = make_app(OPENAI_PROXY_LOG_DB=log_db).test_client().get("/log", headers=PAGE).get_data(as_text=True)
    assert spend_rows(html, "model") == [
        ["gpt-4o-mini", "1", "$0.000008", "25", "3", "7", "0"],
        ["whisper-1", "3", "\u2014", "0", "0", "0", "2"],
    ]
    assert spend_rows(html, "client") == [["default", "4", "$0.000008", "25", "3", "7", "2"]]
    assert "<strong>Today</strong>: 4 requests" in html and "2 unpriced" in html


@pytest.mark.parametrize(
    ("value", "shown"),
    [(5.625e-06, "$0.000006"), (0.0, "$0.000000"), (0.02316, "$0.023160"), (12.5, "$12.500000"),
     (100.0, "$100.00"), (1234567.891, "$1,234,567.89"), (2e-08, "$0.00000002"), (3.5e-07, "$0.00000035"),
     (None, "\u2014"), (float("nan"), "\u2014")],
)  # fmt: skip
def test_costs_are_fixed_point_dollars_everywhere(value, shown):
    """One format for a cost on every page: never an exponent (`5.625e-06`), never 0 for a cost."""
    assert usd(value) == shown
    assert "e" not in exact_usd(value) or value is None or value != value


def test_counts_are_thousands_separated_and_the_latency_axis_has_one_unit():
    assert [grouped(v) for v in (0, 9910, 1_234_567, 25.0, 2.5, "?", None)] == [
        "0", "9,910", "1,234,567", "25", "2.5", "?", ""]  # fmt: skip
    now = 29_000_000
    slow = [MinuteRow(now, 2000, 0, histogram(*[100] * 1700, *[15_000] * 300))]
    svg = str(hour_chart([Minute.of(m) for m in slow], now))
    axis = re.findall(r'<text [^>]*class="axis"[^>]*>([^<]+)</text>', svg)
    assert {"0", "1,000", "2,000"} <= set(axis)  # requests per minute
    assert {"0 s", "10 s", "20 s"} <= set(axis)  # never "20 s" over "0 ms"
    fast = [MinuteRow(now, 3, 0, histogram(100, 200, 300))]
    axis = re.findall(
        r'<text [^>]*class="axis"[^>]*>([^<]+)</text>', str(hour_chart([Minute.of(m) for m in fast], now))
    )
    assert {"0 ms", "250 ms", "500 ms"} <= set(axis) and not any(a.endswith(" s") for a in axis)


def histogram(*durations_ms: float) -> tuple[int, ...]:
    counts = [0] * BUCKETS
    for ms in durations_ms:
        counts[next(i for i, bound in enumerate(BOUNDS_MS) if ms <= bound)] += 1
    return tuple(counts)


def test_the_chart_draws_the_last_hour_only():
    now = 29_000_000
    minutes = [MinuteRow(now - 70, 9, 0, histogram(50)),  # an hour and more ago: not drawn
               MinuteRow(now - 59, 4, 1, histogram(10, 10, 10, 900)),
               MinuteRow(now, 20, 0, histogram(*[100] * 19, 3000))]  # fmt: skip
    svg = str(hour_chart([Minute.of(m) for m in minutes], now))
    assert svg.startswith('<svg class="chart"') and svg.endswith("</svg>")
    bars = re.findall(r'<rect [^>]*class="req"><title>(\d+) requests, (\d+) errors</title>', svg)
    assert bars == [("4", "1"), ("20", "0")]
    assert svg.count('class="err"') == 1

    # Percentiles at bucket resolution: the upper bound of the bucket holding them.
    def label(at_least_ms: float) -> str:
        return _ms_label(round(next(b for b in BOUNDS_MS if b >= at_least_ms)))

    assert re.findall(r"<title>(p50|p95) ([\d.]+ m?s)</title>", svg) == [
        ("p50", label(10)), ("p50", label(100)), ("p95", label(900)), ("p95", label(100))]  # fmt: skip
    assert "<script" not in svg


def test_an_empty_hour_is_an_empty_chart():
    svg = str(hour_chart([], 1000))
    assert 'class="req"' not in svg and "<polyline" not in svg and ">now</text>" in svg


def spend_rows(html: str, by: str) -> list[list[str]]:
    table = re.search(rf'<table class="spend-table" data-by="{by}">(.*?)</table>', html, re.S).group(1)
    body = table.split("<tbody>")[1]
    return [[re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", r, re.S)]
            for r in re.findall(r"<tr>(.*?)</tr>", body, re.S)]  # fmt: skip


def test_log_shows_spend_per_client_and_model_and_the_chart(make_app, fake, tmp_path):
    clients = tmp_path / "clients.toml"
    clients.write_text(textwrap.dedent("""\
        [[client]]
        name = "alpha"
        key = "alpha-key-0123456789"
        """))  # fmt: skip
    app = make_app(OPENAI_PROXY_CLIENTS_FILE=str(clients))
    client = app.test_client()
    for _ in range(3):
        assert (
            post_json(client, "/openai", CHAT, headers={"X-Security-Key": "alpha-key-0123456789"}).status_code
            == 200
        )
    default = {"X-Security-Key": SECURITY_KEY}  # the client "default"
    assert post_json(client, "/openai", CHAT, headers=default).status_code == 200
    fake.push("POST", "/v1/chat/completions", error(500, "boom"))
    assert post_json(client, "/openai", CHAT, headers=default).status_code == 500
    r = post_json(client, "/openai", {**CHAT, "model": "my-local-model"}, headers=default)  # no price
    assert r.status_code == 200
    page = client.get("/log", headers=PAGE)
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert spend_rows(html, "client") == [
        ["alpha", "3", "$0.000023", "75", "9", "21", "0"],  # 3 x 7.725e-06, six decimals
        ["default", "3", "$0.000008", "50", "6", "14", "1"],
    ]
    assert spend_rows(html, "model") == [
        ["gpt-4o-mini", "5", "$0.000031", "100", "12", "28", "0"],
        ["my-local-model", "1", "\u2014", "25", "3", "7", "1"],  # no price: unknown, not free
    ]
    # The same format in the records' cost column; no price is a dash, never 0 or an exponent.
    assert column(html, "cost") == ["\u2014", *["$0.000008"] * 4]
    assert "e-06" not in html.split("<pre")[0]
    assert "<strong>Today</strong>: 6 requests" in html and "1 unpriced" in html
    svg = re.search(r'<svg class="chart".*?</svg>', html, re.S).group(0)
    bars = re.findall(r"<title>(\d+) requests, (\d+) errors</title>", svg)  # one or two minutes
    assert (sum(int(n) for n, _ in bars), sum(int(e) for _, e in bars)) == (6, 1)
    # Drawn for a wide screen and for a phone's (its labels unshrunk); one legend, in the page.
    assert html.count('<svg class="chart"') == 2 and 'viewBox="0 0 360 200"' in html
    assert html.count('class="legend"') == 1
    # Still no script: the chart is inline SVG under the same policy.
    assert "<script" not in html
    assert page.headers["Content-Security-Policy"].startswith("default-src 'none'")
    # The counters keep their labels; the errors page has no spend section.
    assert "Request count: 6" in html
    errors_html = client.get("/log_errors", headers=PAGE).get_data(as_text=True)
    assert 'class="spend-table"' not in errors_html and '<svg class="chart"' not in errors_html


def test_the_log_page_still_answers_when_the_aggregates_cannot_be_read(make_app, fake, monkeypatch):
    app = make_app()
    store = app.extensions["openai_proxy"].log_store

    def broken(*args):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(store, "spend", broken)
    page = app.test_client().get("/log", headers=PAGE)
    assert page.status_code == 200 and "Request count: 0" in page.get_data(as_text=True)
    assert 'class="spend-table"' not in page.get_data(as_text=True)
