"""/log, /log_errors and the sign-in page as a browser lays them out, at a desktop width (1,400 px) and
a phone's (390 px), with a log of 10,000 records: facts measured in headless Chromium, and a
screenshot of each page (the path is printed) to look at."""

from __future__ import annotations

import re
import secrets
import time

import pytest
from gevent.pywsgi import WSGIServer

from openai_proxy.runtime import write_reload_status
from tests.conftest import ACCESS_TOKEN, ISO_MS, SECURITY_KEY, free_port
from tests.support.fake_upstream import error
from tests.support.logfill import fill, records
from tests.support.logpage import CHAT, TOKEN, link
from tests.support.webdriver import CHROMEDRIVER, CHROMIUM, Browser

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="Chromium and its WebDriver are not installed (Debian packages `chromium` and `chromium-driver`), "
        "so the pages' layout cannot be measured in a real browser",
    ),
]
WIDTHS = (1400, 390)
ONE_LINE_PX = 40  # a record row at 1,400 px: one line of text and its padding
CARD_PX = 200  # a record at 390 px: a card of a few short lines
USD = re.compile(r"\$[0-9][0-9,]*\.[0-9]+|\u2014")

# What the page says about itself, measured where it is drawn.
MEASURE = """
const box = e => e.getBoundingClientRect();
const rows = [...document.querySelectorAll('tr[data-kind]')];
const spend = [...document.querySelectorAll('.spend-table tbody tr')].map(r => box(r).height);
const line = n => document.querySelector('polyline.' + n);
const tables = [...document.querySelectorAll('.spend-table')].slice(0, 2).map(t => box(t).top);
return {
  innerWidth: window.innerWidth, scrollWidth: document.documentElement.scrollWidth,
  rowHeights: rows.map(r => box(r).height),
  rightmost: Math.max(0, ...[...document.querySelectorAll('main *')].filter(e => !e.closest('.scroll'))
                                                                   .map(e => box(e).right)),
  times: rows.map(r => r.querySelector('.c-time summary').textContent),
  costs: [...document.querySelectorAll('td.c-cost')].map(c => c.textContent.trim()),
  spendHeights: spend, spendTops: tables,
  fills: Object.fromEntries(['p50', 'p95'].map(n => [n, line(n) && getComputedStyle(line(n)).fill])),
  barFill: document.querySelector('rect.req') && getComputedStyle(document.querySelector('rect.req')).fill,
  keys: [...document.querySelectorAll('.keys-table tbody tr')].map(r => [...r.cells].map(c => c.textContent.trim())),
  files: [...document.querySelectorAll('.reload-table tbody tr')].map(r => r.textContent.replace(/\\s+/g, ' ').trim()),
  // What a box hides sideways (scrollWidth past its width), per spend table and for the key panel.
  spendOverflow: [...document.querySelectorAll('.spend-tables > .scroll')].map(s => s.scrollWidth - s.clientWidth),
  keysOverflow: [...document.querySelectorAll('.keys-table')].map(t => t.parentElement.scrollWidth - t.parentElement.clientWidth),
  // Flags (stream, 1 retry...) inside their endpoint cell and not cut; token figures not cut.
  flags: [...document.querySelectorAll('td.c-endpoint .flag')].map(f => {
    const cell = box(f.closest('td'));
    return box(f).right <= cell.right + 0.5 && box(f).left >= cell.left && f.scrollWidth <= f.clientWidth;
  }),
  tokensCut: [...document.querySelectorAll('td.c-tokens')].filter(c => c.scrollWidth > c.clientWidth)
                                                           .map(c => c.textContent),
  // Every time on one line: one box, one line high.
  timeLines: [...document.querySelectorAll('main time, tr[data-kind] summary')].map(t =>
    [t.textContent, t.getClientRects().length, box(t).height]),
  // The chart's label size as drawn: its font size times the scale of the SVG shown.
  chartFont: [...document.querySelectorAll('svg.chart')].filter(c => box(c).width > 0).map(c =>
    Math.min(...[...c.querySelectorAll('text')].map(t =>
      parseFloat(getComputedStyle(t).fontSize) * box(c).width / c.viewBox.baseVal.width))),
  // The pager again under the records, with the same links.
  pagerBelow: (() => {
    const below = document.querySelector('nav.pager-below'), table = document.querySelector('table.records');
    return below && table && {under: box(below).top >= box(table).bottom,
                              older: !!below.querySelector('a[rel=next]'),
                              olderAbove: !!document.querySelector('nav.pager:not(.pager-below) a[rel=next]')};
  })(),
};
"""


@pytest.fixture
def server(make_app, fake, tmp_path):
    """An app on a real socket over a log of 10,000 records, a pool of two keys (one resting after a
    429) and a reload that refused the prices file."""
    log = str(tmp_path / "openai-proxy.sqlite3")
    started = time.monotonic()
    assert fill(log, records(10_000, time.time(), 3 * 86400)) == 10_000
    print(f"10,000 records written in {time.monotonic() - started:.1f} s")
    # The pool's keys get names of their own: their counts are the process's, every app's of the run.
    names = (f"alpha{secrets.token_hex(3)}", f"beta{secrets.token_hex(3)}")
    app = make_app(OPENAI_PROXY_LOG_DB=log, OPENAI_PROXY_LOG_RETENTION="100000", OPENAI_API_KEY=None,
                   OPENAI_API_KEYS=f"{names[0]}=sk-alpha-0123456789abcd,{names[1]}=sk-beta-0123456789wxyz")  # fmt: skip
    client = app.test_client()
    fake.push(
        "POST",
        "/v1/chat/completions",
        error(429, "Rate limit reached for requests", headers={"Retry-After": "600"}),
        times=1,
    )
    for _ in range(3):
        assert client.post("/openai", json={**CHAT, "security_key": SECURITY_KEY}).status_code == 200
    st = app.extensions["openai_proxy"]
    write_reload_status(
        st.runtime_dir, [{"file": "prices", "problem": "prices.toml, line 3: not valid TOML"}]
    )
    port = free_port()
    wsgi = WSGIServer(("127.0.0.1", port), app, log=None)
    wsgi.start()
    yield f"http://127.0.0.1:{port}", names
    wsgi.stop()


@pytest.fixture
def browser(tmp_path):
    browser = Browser(tmp_path / "profile", tmp_path / "screenshots")
    yield browser
    browser.close()
    print(f"screenshots in {tmp_path / 'screenshots'}")


def measure(browser: Browser, name: str) -> dict:
    browser.execute("document.querySelectorAll('details.period').forEach(d => d.open = true)")
    facts = browser.execute(MEASURE)
    browser.screenshot(f"{name}-top")
    browser.full_screenshot(f"{name}-full")
    return facts


@pytest.mark.parametrize("width", WIDTHS)
def test_the_log_pages_at_desktop_and_phone_widths(server, browser, width):
    server, (alpha_name, beta_name) = server
    browser.set_viewport(width)
    browser.get(f"{server}/log?{TOKEN}")
    assert browser.title == "openai-proxy · Requests"
    for path in ("/log", "/log_errors", "/log?client=rare-client&status=2xx"):
        browser.get(server + path)
        name = f"{width}{path.replace('/', '-').replace('?', '-').replace('&', '-').replace('=', '_')}"
        facts = measure(browser, name)
        # Nothing wider than the screen: no sideways scrolling of the page (a wide table scrolls in its box).
        assert facts["innerWidth"] == width and facts["scrollWidth"] <= width, (name, facts["scrollWidth"])
        assert facts["rightmost"] <= width, name
        heights = facts["rowHeights"]
        assert heights, name
        if width > 1000:  # one line per record
            assert max(heights) <= ONE_LINE_PX, (name, max(heights))
        else:
            assert max(heights) <= CARD_PX, (name, max(heights))
        assert all(re.fullmatch(ISO_MS, t) for t in facts["times"]), facts["times"][:3]
        # A time is one token: never "2026-12-07T" over "13:06:34.467Z".
        split = [t for t in facts["timeLines"] if t[1] != 1 or t[2] >= 24]
        assert facts["timeLines"] and split == [], (name, split)
        # The endpoint's flags are shown whole; so are the token figures.
        assert facts["flags"] and all(facts["flags"]), (name, facts["flags"].count(False))
        assert facts["tokensCut"] == [], (name, facts["tokensCut"][:3])
        assert all(n <= 0 for n in facts["keysOverflow"]), (name, facts["keysOverflow"])
        # The pager's links under the records too.
        below = facts["pagerBelow"]
        assert below["under"] and below["older"] == below["olderAbove"], (name, below)
        assert below["older"] or "?" in path, name  # thousands of records: more than a page
        if path.startswith("/log?") or path == "/log":
            # Lines are lines and bars are bars: an open polyline with a fill is a wedge.
            assert facts["fills"] == {"p50": "none", "p95": "none"}
            assert facts["barFill"] not in (None, "none")
            # Costs in fixed-point dollars, a dash for none, never an exponent.
            assert facts["costs"] and all(USD.fullmatch(c) for c in facts["costs"]), facts["costs"][:5]
            # Each spend row as tall as its own text: the shorter table is not stretched to the other.
            spend = facts["spendHeights"]
            assert max(spend) - min(spend) < 2, spend
            if width > 1000:
                assert facts["spendTops"][0] == facts["spendTops"][1]  # side by side
                # ...each in its half without a sideways scrollbar (a phone's scroll: they cannot fit).
                overflow = facts["spendOverflow"]
                assert overflow and max(overflow) <= 0, overflow
            # Chart labels readable where they are drawn: at least 9 px, on a phone too.
            (font,) = facts["chartFont"]
            assert font >= 9, (name, font)
        # The key pool and the files' last reload, beside the counters on both pages.
        alpha, beta = facts["keys"]
        assert (alpha[0], alpha[1], alpha[3], alpha[4]) == (f"{alpha_name} …abcd", "resting", "1", "1")
        assert re.fullmatch(ISO_MS, alpha[2]) and beta == [f"{beta_name} …wxyz", "active", "—", "3", "0"]
        assert facts["files"][1].startswith("Prices") and "refused, the previous prices stay in use: " \
            "prices.toml, line 3: not valid TOML" in facts["files"][1]  # fmt: skip

    # The full record: one click on its time opens it under the record.
    browser.get(f"{server}/log_errors")
    browser.click("tr[data-kind] summary")
    shown = browser.execute(
        "const row = document.querySelector('tr.record-json');"
        "return [getComputedStyle(row).display, row.getBoundingClientRect().height, row.textContent];"
    )
    assert shown[0] in ("table-row", "block") and shown[1] > 100 and '"requestId"' in shown[2]
    browser.screenshot(f"{width}-log_errors-record-open")

    # Older pages, through the pager's links (keyset: each starts after the last record shown).
    browser.get(f"{server}/log?per_page=20")
    first = browser.execute(MEASURE)["times"]
    older = server + link(browser.source, "next")
    assert older.startswith(f"{server}/log?per_page=20&before=")
    browser.click("a[rel=next]")
    assert browser.wait_for_url(older) == older
    second = browser.execute(MEASURE)["times"]
    assert len(second) == 20 and second[0] <= first[-1]

    # An empty filter says so; the page keeps its shape.
    browser.get(f"{server}/log?client=nobody")
    assert browser.text(".empty") == "No records match these filters."
    facts = measure(browser, f"{width}-log-empty")
    assert facts["scrollWidth"] <= width and facts["rowHeights"] == []


@pytest.mark.parametrize("width", WIDTHS)
def test_the_sign_in_page_at_desktop_and_phone_widths(server, browser, width):
    server, _ = server
    browser.set_viewport(width)
    browser.get(f"{server}/log")
    assert browser.title == "openai-proxy · Sign in"
    browser.type("input[name=access_token]", "not-the-token")
    browser.click("form button[type=submit]")
    assert browser.wait_for_url(f"{server}/signin") == f"{server}/signin"
    assert browser.text(".banner") == "That access token is not valid."
    facts = browser.execute(
        "const b = document.querySelector('main').getBoundingClientRect();"
        "return [window.innerWidth, document.documentElement.scrollWidth, b.left, b.right];"
    )
    assert facts[0] == width and facts[1] <= width and facts[2] >= 8 and facts[3] <= width - 8, facts
    browser.screenshot(f"{width}-signin-refused")
    browser.type("input[name=access_token]", ACCESS_TOKEN)
    browser.click("form button[type=submit]")
    assert browser.wait_for_url(f"{server}/log") == f"{server}/log"
