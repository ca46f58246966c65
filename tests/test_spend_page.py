"""`/log`'s spend tables (per client and model; today, 7 and 30 days) and its last-hour chart."""

from __future__ import annotations

import re
import textwrap
from datetime import date

import pytest

from openai_proxy.log.stats import BOUNDS_MS, BUCKETS, MinuteRow, SpendRow
from openai_proxy.pages.spend import Minute, _ms_label, exact_usd, hour_chart, spend_periods, usd
from tests.conftest import ACCESS_TOKEN, SECURITY_KEY, post_json
from tests.support.fake_upstream import error
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
        ["my-local-model", "1", "$0.000000", "25", "3", "7", "1"],
    ]
    # The same format in the records' cost column; no price is a dash, never 0 or an exponent.
    assert column(html, "cost") == ["\u2014", *["$0.000008"] * 4]
    assert "e-06" not in html.split("<pre")[0]
    assert "<strong>Today</strong>: 6 requests" in html and "1 unpriced" in html
    svg = re.search(r'<svg class="chart".*?</svg>', html, re.S).group(0)
    bars = re.findall(r"<title>(\d+) requests, (\d+) errors</title>", svg)  # one or two minutes
    assert (sum(int(n) for n, _ in bars), sum(int(e) for _, e in bars)) == (6, 1)
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
