"""The operator pages: access token, sign-in cookie, rate limits, escaping, redaction, filters, health,
runtime info."""

from __future__ import annotations

import html as htmllib
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from email.utils import parsedate_to_datetime
from urllib.parse import urlencode

import pytest
import requests
from gevent.pywsgi import WSGIServer
from markupsafe import escape

from openai_proxy.inbound.auth import SESSION_COOKIE, session_cookie_valid, session_cookie_value
from openai_proxy.pages.views import HTML_CSP
from openai_proxy.runtime import write_reload_status
from tests.conftest import ACCESS_TOKEN, ISO_MS, SECURITY_KEY, UPSTREAM_KEY, free_port, post_json
from tests.support.fake_upstream import error
from tests.support.logfill import fill
from tests.support.logpage import AUTH, CHAT, CLOSE, TOKEN, counters, link, rows
from tests.support.webdriver import CHROMEDRIVER, Browser

GUARDED = ("/health", "/health2", "/log", "/log_errors", "/debug/runtime", "/metrics")
HTML_PAGES = ("/log", "/log_errors")
JSON_PAGES = ("/health", "/health2", "/debug/runtime", "/metrics")
BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
XSS_ID = "<script>document.title='pwned'</script>"
XSS_MODEL = "<img src=x onerror=\"document.title='pwned'\">"


def expected_error(response, message: str, type_: str, code: str) -> dict:
    return {"error": {"message": message, "type": type_, "code": code,
                      "requestId": response.headers["X-Proxy-Request-Id"]}}  # fmt: skip


@pytest.mark.parametrize("path", GUARDED)
def test_pages_need_the_access_token(client, path):
    r = client.get(path)
    assert r.status_code == 403
    assert r.get_json() == expected_error(r, "Missing access_token", "forbidden", "OPENAI_PROXY_FORBIDDEN")
    r = client.post(f"{path}?access_token=wrong")
    assert r.status_code == 403
    assert r.get_json() == expected_error(r, "Invalid access_token", "forbidden", "OPENAI_PROXY_FORBIDDEN")
    assert "Set-Cookie" not in r.headers
    # The HTML pages trade a token in the query for the sign-in cookie (below); the others answer at once.
    assert client.get(f"{path}?{TOKEN}").status_code == (303 if path in HTML_PAGES else 200)
    assert client.get(path, headers=AUTH).status_code == 200


@pytest.mark.parametrize("path", GUARDED)
def test_pages_are_closed_without_an_access_token_configured(make_app, path):
    client = make_app(ACCESS_TOKEN=None).test_client()
    r = client.get(f"{path}?access_token=anything")
    assert r.status_code == 403
    assert r.get_json() == expected_error(
        r,
        "The proxy has no ACCESS_TOKEN configured; this page is disabled",
        "forbidden",
        "OPENAI_PROXY_FORBIDDEN",
    )


def set_cookie(response) -> tuple[str, str, dict[str, str]]:
    """The one Set-Cookie of `response`: name, value and attributes (names lowercased, flags map to "")."""
    headers = response.headers.getlist("Set-Cookie")
    assert len(headers) == 1, headers
    first, *attributes = headers[0].split("; ")
    name, _, value = first.partition("=")
    return name, value, {k.lower(): v for k, _, v in (a.partition("=") for a in attributes)}


def sign_in(client, path: str = "/log") -> str:
    """Sign `client` in through a page's query; the cookie's value."""
    r = client.get(f"{path}?{TOKEN}")
    assert r.status_code == 303, r.get_data(as_text=True)[:300]
    return client.get_cookie(SESSION_COOKIE).value


@pytest.mark.parametrize("path", HTML_PAGES)
def test_a_token_in_the_query_becomes_a_cookie_and_leaves_the_address(client, fake, path):
    post_json(client, "/openai", {**CHAT, "security_key": "no"})
    r = client.get(f"{path}?status=4xx&{TOKEN}&per_page=2&access_token=again", headers=BROWSER)
    assert r.status_code == 303
    assert r.headers["Location"] == f"{path}?status=4xx&per_page=2"  # relative, other parameters kept
    assert (r.headers["Referrer-Policy"], r.headers["Cache-Control"]) == ("same-origin", "no-store")
    name, value, attributes = set_cookie(r)
    assert name == "openai_proxy_pages"
    assert re.fullmatch(r"[0-9]+\.[0-9a-f]{64}", value) and ACCESS_TOKEN not in value
    assert 0 <= time.time() - int(value.split(".")[0]) < 60  # issued now
    assert attributes.keys() == {"expires", "max-age", "httponly", "path", "samesite"}  # no Secure over http
    assert (attributes["max-age"], attributes["path"], attributes["samesite"]) == ("43200", "/", "Lax")
    expires = parsedate_to_datetime(attributes["expires"]).timestamp()
    assert time.time() + 43200 - 60 < expires <= time.time() + 43200 + 1
    # The browser follows with the cookie alone: the page, with no token anywhere in it.
    page = client.get(r.headers["Location"], headers=BROWSER)
    assert page.status_code == 200 and "Set-Cookie" not in page.headers
    html = page.get_data(as_text=True)
    assert counters(html)["Error count"] == "1" and len(rows(html)) == (path == "/log_errors")
    assert "access_token" not in html and ACCESS_TOKEN not in html


def test_the_cookie_is_secure_over_https(client):
    r = client.get(f"/log?{TOKEN}", base_url="https://proxy.example")
    assert r.status_code == 303 and r.headers["Location"] == "/log"
    assert "secure" in set_cookie(r)[2]
    r = client.post("/signin", data={"access_token": ACCESS_TOKEN}, base_url="https://proxy.example")
    assert r.status_code == 303 and "secure" in set_cookie(r)[2]
    r = client.post("/signout", base_url="https://proxy.example")
    assert set_cookie(r)[2].keys() == {"expires", "max-age", "httponly", "path", "samesite", "secure"}


def test_a_signed_in_page_carries_no_token_in_links_forms_or_pagers(client, fake):
    for _ in range(5):
        post_json(client, "/openai", CHAT)
    sign_in(client)
    for path in ("/log?per_page=2", "/log?per_page=2&page=2&status=2xx", "/log_errors?per_page=1"):
        r = client.get(path, headers=BROWSER)
        assert r.status_code == 200
        html = r.get_data(as_text=True)
        assert "access_token" not in html and ACCESS_TOKEN not in html, path
        assert (r.headers["Referrer-Policy"], r.headers["Content-Security-Policy"]) == (
            "same-origin",
            HTML_CSP,
        )
        assert '<form class="signout" method="post" action="/signout">' in html
    html = client.get("/log?per_page=2&page=2", headers=BROWSER).get_data(as_text=True)
    assert link(html, "first") == "/log?per_page=2"
    assert link(html, "prev").startswith("/log?per_page=2&after=")
    assert link(html, "next").startswith("/log?per_page=2&before=")
    assert '<input type="hidden" name="per_page" value="2">' in html
    assert '<a href="/log">Requests</a>' not in html  # the current tab is marked, the other plain
    assert '<a href="/log_errors">Errors</a>' in html and '<a href="/log">Clear</a>' in html


def test_a_browser_without_the_cookie_gets_the_sign_in_form_and_scripts_get_json(client):
    r = client.get("/log_errors?status=5xx&page=1", headers=BROWSER)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="openai-proxy pages"'
    assert r.headers["Content-Type"] == "text/html; charset=utf-8" and "Set-Cookie" not in r.headers
    assert (r.headers["Referrer-Policy"], r.headers["Content-Security-Policy"]) == ("same-origin", HTML_CSP)
    assert r.headers["Cache-Control"] == "no-store"
    html = r.get_data(as_text=True)
    assert "<title>openai-proxy · Sign in</title>" in html and 'role="alert"' not in html
    assert '<form method="post" action="/signin">' in html
    assert '<input type="hidden" name="next" value="/log_errors?status=5xx&amp;page=1">' in html
    assert html.count('type="password"') == 1 and "<script" not in html
    # A wrong token: the form again, saying so, with 403 and no cookie.
    r = client.get("/log?access_token=wrong&status=4xx", headers=BROWSER)
    assert r.status_code == 403 and "Set-Cookie" not in r.headers
    html = r.get_data(as_text=True)
    assert '<div class="banner" role="alert">That access token is not valid.</div>' in html
    assert 'name="next" value="/log?status=4xx"' in html and "wrong" not in html
    # Scripts (no text/html asked for by name) keep the JSON 403.
    for accept in ({}, {"Accept": "*/*"}, {"Accept": "application/json"}, {"Accept": "text/html;q=0"}):
        r = client.get("/log", headers=accept)
        assert r.status_code == 403
        assert r.get_json() == expected_error(
            r, "Missing access_token", "forbidden", "OPENAI_PROXY_FORBIDDEN"
        )
    # The JSON pages never show the form.
    r = client.get("/health", headers=BROWSER)
    assert r.status_code == 403 and r.get_json()["error"]["message"] == "Missing access_token"


def test_the_sign_in_form(client):
    r = client.get("/signin?next=/log_errors%3Fstatus%3D4xx")
    assert r.status_code == 200 and "WWW-Authenticate" not in r.headers
    assert (r.headers["Referrer-Policy"], r.headers["Content-Security-Policy"]) == ("same-origin", HTML_CSP)
    assert (r.headers["Cache-Control"], r.headers["X-Content-Type-Options"]) == ("no-store", "nosniff")
    assert '<input type="hidden" name="next" value="/log_errors?status=4xx">' in r.get_data(as_text=True)
    for token, message in (("wrong", "That access token is not valid."), ("", "Enter the access token.")):
        r = client.post("/signin", data={"access_token": token, "next": "/log_errors?status=4xx"})
        assert r.status_code == 403 and "Set-Cookie" not in r.headers
        assert f'<div class="banner" role="alert">{message}</div>' in r.get_data(as_text=True)
        assert client.get_cookie(SESSION_COOKIE) is None
    r = client.post("/signin", data={"access_token": ACCESS_TOKEN, "next": "/log_errors?status=4xx"})
    assert r.status_code == 303 and r.headers["Location"] == "/log_errors?status=4xx"
    assert r.headers["Referrer-Policy"] == "same-origin" and set_cookie(r)[0] == SESSION_COOKIE
    assert client.get("/log_errors?status=4xx", headers=BROWSER).status_code == 200
    # Without `next` the sign-in lands on /log.
    assert client.post("/signin", data={"access_token": ACCESS_TOKEN}).headers["Location"] == "/log"


def test_the_sign_in_form_says_when_the_pages_are_disabled(make_app):
    client = make_app(ACCESS_TOKEN=None).test_client()
    for r in (client.get("/signin"), client.post("/signin", data={"access_token": "anything"})):
        assert r.status_code == 403 and "Set-Cookie" not in r.headers
        assert "The proxy has no ACCESS_TOKEN configured; the pages are disabled." in r.get_data(as_text=True)


@pytest.mark.parametrize(
    "target",
    ["https://evil.example/", "//evil.example", "//evil.example/log", "/\\evil.example", "\\\\evil.example",
     "https:/evil.example/log", "http://localhost/log", "javascript:alert(1)", "/\t/evil.example",
     " //evil.example", "/log/../..//evil.example", "/signout", "/health", "/log@evil.example", "log", ""],
)  # fmt: skip
def test_sign_in_never_redirects_away_from_the_pages(client, target):
    r = client.post("/signin", data={"access_token": ACCESS_TOKEN, "next": target})
    assert r.status_code == 303 and r.headers["Location"] == "/log"
    html = client.get(f"/signin?{urlencode({'next': target})}").get_data(as_text=True)
    assert '<input type="hidden" name="next" value="/log">' in html


def test_sign_in_keeps_a_page_query_but_never_a_token_in_it(client):
    r = client.post("/signin", data={"access_token": ACCESS_TOKEN,
                                     "next": "/log_errors?access_token=x&endpoint=/openai&status=4xx#top"})  # fmt: skip
    assert r.headers["Location"] == "/log_errors?endpoint=%2Fopenai&status=4xx"


def test_the_cookie_opens_every_guarded_page_and_a_bearer_header_never_redirects(client, fake):
    sign_in(client)
    for path in GUARDED:
        r = client.get(path, headers=BROWSER)
        assert r.status_code == 200, path
        assert "Set-Cookie" not in r.headers and r.headers["Referrer-Policy"] == "same-origin"
    other = client.application.test_client()  # no cookie: scripts and Prometheus
    for path in GUARDED:
        for headers in (AUTH, {**AUTH, **BROWSER}):
            r = other.get(path, headers=headers)
            assert r.status_code == 200 and "Set-Cookie" not in r.headers and "Location" not in r.headers
    for path in JSON_PAGES:  # monitoring scripts keep their query token, with no redirect and no cookie
        r = other.get(f"{path}?{TOKEN}", headers=BROWSER)
        assert r.status_code == 200 and "Set-Cookie" not in r.headers, path
    # A token that was sent is judged alone: a valid cookie does not excuse a wrong one.
    r = client.get("/health?access_token=wrong")
    assert r.status_code == 403 and r.get_json()["error"]["message"] == "Invalid access_token"


def test_the_cookie_stops_working_when_the_access_token_changes(make_app):
    first = make_app().test_client()
    cookie = sign_in(first)
    assert first.get("/log", headers=BROWSER).status_code == 200
    rotated = make_app(ACCESS_TOKEN="a-new-access-token").test_client()
    rotated.set_cookie(SESSION_COOKIE, cookie)
    r = rotated.get("/log?status=4xx", headers=BROWSER)
    assert r.status_code == 401
    assert "Your sign-in has expired or the access token changed; sign in again." in r.get_data(as_text=True)
    name, value, attributes = set_cookie(r)  # the stale cookie is cleared
    assert (name, value, attributes["max-age"]) == (SESSION_COOKIE, "", "0")
    rotated.set_cookie(SESSION_COOKIE, cookie)
    for path in GUARDED:
        r = rotated.get(path)
        assert r.status_code == 403, path
        assert r.get_json() == expected_error(
            r, "Sign-in expired or ACCESS_TOKEN changed; sign in again", "forbidden", "OPENAI_PROXY_FORBIDDEN"
        )
    assert rotated.get("/log", headers={"Authorization": "Bearer a-new-access-token"}).status_code == 200


@pytest.mark.parametrize(
    "value",
    [ACCESS_TOKEN, "", "garbage", "1.2", f"{int(time.time())}.{'0' * 64}",
     session_cookie_value(ACCESS_TOKEN, now=time.time() - 43200 - 5),  # older than 12 h
     session_cookie_value(ACCESS_TOKEN, now=time.time() + 3600),  # issued in the future
     session_cookie_value(ACCESS_TOKEN) + "0", "x" + session_cookie_value(ACCESS_TOKEN)],
)  # fmt: skip
def test_forged_expired_or_mangled_cookies_are_refused(client, value):
    client.set_cookie(SESSION_COOKIE, value)
    assert client.get("/log", headers=BROWSER).status_code == 401
    assert client.get("/metrics").status_code == 403


def test_cookie_validity_by_age():
    now = 1_800_000_000
    assert session_cookie_valid(session_cookie_value("t", now=now), "t", now=now + 43200)
    assert not session_cookie_valid(session_cookie_value("t", now=now), "t", now=now + 43201)
    assert session_cookie_valid(session_cookie_value("t", now=now + 30), "t", now=now)  # a little clock skew
    assert not session_cookie_valid(session_cookie_value("t", now=now), "u", now=now)


def test_sign_out_clears_the_cookie_and_shows_the_sign_in_page(client):
    sign_in(client)
    r = client.post("/signout")
    assert r.status_code == 303 and r.headers["Location"] == "/signin"
    assert r.headers["Referrer-Policy"] == "same-origin"
    name, value, attributes = set_cookie(r)
    assert (name, value, attributes["max-age"], attributes["path"]) == (SESSION_COOKIE, "", "0", "/")
    assert attributes["expires"] == "Thu, 01 Jan 1970 00:00:00 GMT"
    assert client.get_cookie(SESSION_COOKIE) is None
    assert client.get("/log", headers=BROWSER).status_code == 401
    assert client.get("/signin").status_code == 200
    assert client.get("/signout").status_code == 404  # state changes only by POST


def test_pages_are_rate_limited_with_the_json_error(make_app, fake):
    client = make_app(
        OPENAI_PROXY_PAGES_RATE_LIMIT="2/minute", OPENAI_PROXY_HEALTH2_RATE_LIMIT="1/minute"
    ).test_client()
    answers = [client.get("/health", headers=AUTH) for _ in range(2)]
    assert [r.status_code for r in answers] == [200, 200]
    # Retry-After asks a client to come back later: a 429 or a 503 says it, a 200 never does.
    assert [("Retry-After" in r.headers, r.headers["X-RateLimit-Remaining"]) for r in answers] == [
        (False, "1"), (False, "0")]  # fmt: skip
    r = client.get("/health", headers=AUTH)
    assert r.status_code == 429
    assert r.get_json() == expected_error(
        r, "Too many requests: 2 per 1 minute; try again later", "rate_limited", "OPENAI_PROXY_RATE_LIMITED"
    )
    assert 0 < int(r.headers["Retry-After"]) <= 60
    # Each page counts on its own; /health2 (which spends tokens) has its own lower limit.
    assert [client.get("/log", headers=AUTH).status_code for _ in range(3)] == [200, 200, 429]
    assert [client.get("/health2", headers=AUTH).status_code for _ in range(2)] == [200, 429]
    assert client.get("/health2", headers=AUTH).get_json()["error"]["message"] == (
        "Too many requests: 1 per 1 minute; try again later"
    )
    # Guessing the token is throttled too.
    assert [client.get("/debug/runtime?access_token=guess").status_code for _ in range(3)] == [403, 403, 429]
    # ... on the sign-in form as well, and a right token after the limit gets no cookie.
    assert [client.post("/signin", data={"access_token": "guess"}).status_code for _ in range(2)] == [
        403,
        403,
    ]
    r = client.post("/signin", data={"access_token": ACCESS_TOKEN})
    assert r.status_code == 429 and "Set-Cookie" not in r.headers
    assert r.get_json()["error"]["code"] == "OPENAI_PROXY_RATE_LIMITED"
    # `/` and the API routes are never throttled here.
    assert {client.get("/").status_code for _ in range(5)} == {200}
    assert {post_json(client, "/openai", CHAT).status_code for _ in range(5)} == {200}


def test_values_are_escaped_and_counters_keep_the_original_labels(log_db, make_app, fake):
    client = make_app(OPENAI_PROXY_LOG_DB=log_db).test_client()
    r = post_json(client, "/openai", {**CHAT, "model": XSS_MODEL}, headers={"X-Request-Id": XSS_ID})
    assert r.status_code == 200
    page = client.get("/log", headers=AUTH)
    text = page.get_data(as_text=True)
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "<script>document.title" not in text and "<img src=x" not in text
    assert escape(XSS_ID) in text and escape(XSS_MODEL) in text
    assert "script-src" not in page.headers["Content-Security-Policy"]  # default-src 'none': no script at all
    assert page.headers["Cache-Control"] == "no-store" and page.headers["Referrer-Policy"] == "same-origin"
    assert counters(text)["Request count"] == "1"


def test_secrets_are_redacted_on_the_pages(log_db, make_app, fake):
    client = make_app(OPENAI_PROXY_LOG_DB=log_db).test_client()
    secret = "sk-live-abcdefghijklmnop5678"
    fake.push("POST", "/v1/chat/completions", error(401, f"Incorrect API key provided: {secret}"))
    post_json(
        client, "/openai", {**CHAT, "openai_api_key": secret}, headers={"X-Request-Id": f"Bearer {secret}"}
    )
    text = client.get("/log_errors", headers=AUTH).get_data(as_text=True)
    assert "401 Incorrect API key provided: ***5678" in text
    assert "abcdefghijklmnop" not in text
    assert "client request id: Bearer ***5678" in text


def test_filters_and_pagination(log_db, make_app, fake):
    client = make_app(OPENAI_PROXY_LOG_DB=log_db).test_client()
    ok = [post_json(client, "/openai", CHAT).headers["X-Proxy-Request-Id"] for _ in range(3)]
    emb = post_json(client, "/embeddings", {"security_key": SECURITY_KEY, "input": "x"}).headers[
        "X-Proxy-Request-Id"
    ]
    tagged = post_json(client, "/openai", CHAT, headers={"X-Request-Id": "client-42"}).headers[
        "X-Proxy-Request-Id"
    ]
    denied = post_json(client, "/openai", {**CHAT, "security_key": "no"}).headers["X-Proxy-Request-Id"]
    post_json(client, "/embeddings", {"security_key": SECURITY_KEY})  # 400 missing input

    def ids(path: str, query: str = "") -> list[str]:
        r = client.get(f"{path}?{query}", headers=AUTH)
        assert r.status_code == 200
        return [rid for _, rid, _ in rows(r.get_data(as_text=True))]

    assert ids("/log", "&endpoint=/embeddings") == [emb]
    assert ids("/log", "&status=2xx") == [tagged, emb, *ok[::-1]]
    assert ids("/log", "&status=201") == []
    assert ids("/log", "&request_id=client-42") == [tagged]
    assert ids("/log", f"&request_id={ok[0]}") == [ok[0]]
    assert ids("/log_errors", "&status=403") == [denied]
    assert len(ids("/log_errors", "&status=4xx")) == 2
    page2 = client.get("/log?per_page=2&page=2&status=2xx", headers=AUTH).get_data(as_text=True)
    assert [rid for _, rid, _ in rows(page2)] == ok[:0:-1] and "5 records · page 2 of 3" in page2
    # Older and newer pages start at a record of this one (keyset), and the links keep the filters.
    older, newer = link(page2, "next"), link(page2, "prev")
    assert older.startswith("/log?status=2xx&per_page=2&before=")
    assert newer.startswith("/log?status=2xx&per_page=2&after=")
    assert link(page2, "first") == "/log?status=2xx&per_page=2"
    assert ids("/log", older.partition("?")[2]) == [ok[0]]
    assert ids("/log", newer.partition("?")[2]) == [tagged, emb]
    last = client.get(older, headers=AUTH).get_data(as_text=True)
    assert link(last, "next") is None and link(last, "prev") and "5 records ·" in last
    first = client.get(link(last, "prev"), headers=AUTH).get_data(as_text=True)
    assert [rid for _, rid, _ in rows(first)] == ok[:0:-1]  # back where we came from
    for query, message in (
        ("&status=abc", "status must be a code like 404 or a class like 4xx"),
        ("&page=0", "page must be an integer from 1 to 1000000"),
        ("&per_page=501", "per_page must be an integer from 1 to 500"),
        ("&before=abc", "before must be a place in the log as the page's links give it"),
        ("&before=nan_3", "before must be a place in the log as the page's links give it"),
        ("&after=1.5_%D9%A3", "after must be a place in the log as the page's links give it"),
        ("&before=1.5_3&after=1.5_3", "give before or after, not both"),
    ):
        r = client.get(f"/log?{query}", headers=AUTH)
        assert r.status_code == 400
        assert r.get_json() == expected_error(r, message, "validation_error", "OPENAI_PROXY_BAD_REQUEST")


def count_line(html: str, where: str = "Pages") -> str:
    """The text of a pager's count (`Pages`: above the records; `Pages, below the records`)."""
    nav = re.search(rf'<nav class="pager[^"]*" aria-label="{where}">(.*?)</nav>', html, re.S).group(1)
    count = re.search(r'<span class="count">(.*?)</span>', nav, re.S).group(1)
    return " ".join(re.sub(r"<[^>]+>", "", count).split())


def test_the_record_count_says_where_the_other_requests_are_and_the_pager_repeats_below(log_db, make_app):
    """Request count counts both pages' requests: each page's count says how many are on the other
    (Errors also holds retried attempts, which are records but not requests). The pager's links are
    under the records too."""
    now = time.time()

    def completion(i: int, status: int) -> tuple:
        return ("completion", {"requestId": f"r{i}", "status": status, "endpoint": "/openai", "client": "default",
                               "durationMs": 1.0, "error": {"message": "no"} if status >= 400 else None}, now + i)  # fmt: skip

    items = [*(completion(i, 200) for i in range(1203)), completion(9001, 502), completion(9002, 429),
             ("retry", {"requestId": "r9002", "endpoint": "/openai", "attempt": 2, "reason": "HTTP 429"}, now)]  # fmt: skip
    assert fill(log_db, iter(items), retention=10_000) == len(items)
    client = make_app(OPENAI_PROXY_LOG_DB=log_db).test_client()
    html = client.get("/log", headers=AUTH).get_data(as_text=True)
    assert count_line(html).startswith(
        "1,203 records (2 more requests on Errors) · page 1 of 25 · 50 shown, "
    )
    assert '(2 more requests on <a href="/log_errors">Errors</a>)' in html
    assert count_line(html, "Pages, below the records") == "50 shown · page 1 of 25"
    below = html.split('aria-label="Pages, below the records"')[1].split("</nav>")[0]
    assert '">Older →</a>' in below and link(below, "next") == link(html, "next")
    errors = client.get("/log_errors?status=5xx", headers=AUTH).get_data(as_text=True)
    assert count_line(errors).startswith("1 record · page 1 of 1 · 1 shown, ")  # 5xx: none on Requests
    errors = client.get("/log_errors", headers=AUTH).get_data(as_text=True)
    assert count_line(errors).startswith(
        "3 records: 2 requests, 1 retried attempt (1,203 more requests on Requests) · page 1 of 1"
    )
    assert '<a href="/log">Requests</a>' in errors
    # A page past the last record has no records, and no pager below them.
    empty = client.get("/log?client=nobody", headers=AUTH).get_data(as_text=True)
    assert "Pages, below the records" not in empty and count_line(empty) == "0 records · page 1 of 1"


def test_health_is_cheap_and_health2_calls_upstream(client, fake):
    r = client.get("/health", headers=AUTH)
    assert r.status_code == 200
    body = r.get_json()
    assert (body["status"], body["ready"], body["config"]["loaded"]) == ("ok", True, True)
    gate = {"inUse": 0, "limit": 32, "heldByThisWorker": 0, "backend": "local", "scope": "host"}
    assert body["gate"] == gate
    assert body["logStore"]["writable"] is True and body["uptimeS"] >= 0 and body["version"] == "1.0.0"
    assert fake.requests == []

    r = client.get("/health2", headers=AUTH)
    assert r.status_code == 200
    body = r.get_json()
    assert body["status"] == "ok" and body["model"] == "gpt-4o-mini" and body["latencyMs"] > 0
    sent = fake.last("/v1/chat/completions")
    assert sent.json == {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "ping"}],
                         "max_completion_tokens": 1}  # fmt: skip
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert body["upstreamRequestId"].startswith("req_fake_")


def test_health_stays_up_when_upstream_is_down_and_health2_reports_it(make_app, fake):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"  # nothing listens once closed
    client = make_app(OPENAI_BASE_URL=dead).test_client()
    assert client.get("/health", headers=AUTH).status_code == 200
    r = client.get("/health2", headers=AUTH)
    assert r.status_code == 503
    body = r.get_json()
    assert body["status"] == "fail" and body["baseUrl"] == dead
    assert (body["error"]["type"], body["error"]["code"]) == ("upstream_transport", "OPENAI_PROXY_TRANSPORT")
    assert body["error"]["message"].startswith("Could not reach OpenAI")


def test_every_time_on_health_is_iso_utc_with_milliseconds(make_app, fake, tmp_path):
    """One time format (openai_proxy.jsonio.iso): /health used to mix ISO strings and Unix seconds."""
    app = make_app()
    client = app.test_client()
    st = app.extensions["openai_proxy"]
    assert post_json(client, "/openai", CHAT).status_code == 200
    st.log_store.flush()
    at = 1_796_000_000.25
    write_reload_status(st.runtime_dir, [{"file": "clients", "problem": "clients.toml:3: no key"}], at=at)
    body = client.get("/health", headers=AUTH).get_json()
    times = {"startedAt": body["startedAt"], "reload.at": body["reload"]["at"],
             "logStore.lastWriteAt": body["logStore"]["lastWriteAt"]}  # fmt: skip
    assert all(re.fullmatch(ISO_MS, value) for value in times.values()), times
    assert body["reload"]["at"] == "2026-11-30T00:53:20.250Z"
    assert body["reasons"] == ["reload at 2026-11-30T00:53:20.250Z: the clients file was refused, the previous "
                               "clients stay in use: clients.toml:3: no key"]  # fmt: skip
    assert isinstance(body["uptimeS"], float)  # durations stay numbers
    assert re.fullmatch(ISO_MS, client.get("/debug/runtime", headers=AUTH).get_json()["startedAt"])


def test_the_log_pages_show_the_key_pool_and_the_files_last_reload(make_app, fake, monkeypatch):
    # Names of their own: the counts are the process's (every app of a test run shares its metrics).
    alpha, beta = f"alpha{secrets.token_hex(3)}", f"beta{secrets.token_hex(3)}"
    keys = f"{alpha}=sk-alpha-0123456789abcd,{beta}=sk-beta-0123456789wxyz"
    app = make_app(OPENAI_API_KEY=None, OPENAI_API_KEYS=keys)
    client = app.test_client()
    fake.push(
        "POST", "/v1/chat/completions", error(429, "Slow down", headers={"Retry-After": "600"}), times=1
    )
    assert post_json(client, "/openai", CHAT).status_code == 200  # alpha refused, beta answered
    assert post_json(client, "/openai", CHAT).status_code == 200  # beta (alpha rests)

    def panel(path: str = "/log") -> tuple[list[list[str]], list[str]]:
        html = client.get(path, headers=AUTH).get_data(as_text=True)
        keys = re.search(r'<table class="keys-table">(.*?)</table>', html, re.S).group(1).split("<tbody>")[1]
        files = re.search(r'<table class="reload-table">(.*?)</table>', html, re.S).group(1)
        text = lambda cell: htmllib.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", cell)).strip())  # noqa: E731
        return ([[text(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
                 for row in re.findall(r"<tr[^>]*>(.*?)</tr>", keys, re.S)],
                [text(row) for row in re.findall(r"<tr[^>]*>(.*?)</tr>", files, re.S)])  # fmt: skip

    (first, second), files = panel()
    assert (first[0], first[1], first[3], first[4]) == (f"{alpha} …abcd", "resting", "1", "1")
    assert re.fullmatch(ISO_MS, first[2])
    assert second == [f"{beta} …wxyz", "active", "—", "2", "0"]
    assert files[0].startswith("Clients — ok no file: SECURITY_KEY's client only ")
    assert files[1].startswith("Prices — ok no file: the shipped price table ")
    st = app.extensions["openai_proxy"]
    write_reload_status(st.runtime_dir, [{"file": "prices", "problem": "prices.toml, line 3: not valid TOML"}],
                        at=1_796_000_000.25)  # fmt: skip
    _, files = panel("/log_errors")
    assert files[1] == ("Prices — refused refused, the previous prices stay in use: prices.toml, line 3: "
                        "not valid TOML 2026-11-30T00:53:20.250Z")  # fmt: skip

    def broken():
        raise OSError("metrics files gone")

    monkeypatch.setattr(st.metrics, "key_calls_by_key", broken)
    keys, _ = panel()
    assert [(k[0], k[3], k[4]) for k in keys] == [(f"{alpha} …abcd", "?", "?"), (f"{beta} …wxyz", "?", "?")]


def test_health2_reports_an_upstream_error_and_a_full_gate(make_app, fake):
    app = make_app(OPENAI_PROXY_MAX_PARALLEL_REQUESTS="1")
    client = app.test_client()
    fake.push("POST", "/v1/chat/completions", error(401, "Incorrect API key provided: sk-abcdefghijkl9999"))
    body = client.get("/health2", headers=AUTH).get_json()
    assert body["error"]["message"] == "401 Incorrect API key provided: ***9999"
    assert body["error"]["upstream"]["status"] == 401
    gate = app.extensions["openai_proxy"].gate
    slot = gate.try_acquire()
    try:
        r = client.get("/health2", headers=AUTH)
        assert r.status_code == 503 and r.get_json()["error"]["code"] == "OPENAI_PROXY_OVERLOADED"
    finally:
        gate.release(slot)


def test_debug_runtime_shows_the_effective_config_and_no_secret(client):
    r = client.get("/debug/runtime", headers=AUTH)
    assert r.status_code == 200
    for secret in (UPSTREAM_KEY, SECURITY_KEY, ACCESS_TOKEN):
        assert secret not in r.get_data(as_text=True)
    body = r.get_json()
    assert body["config"]["openai_api_key"] == "set" and body["config"]["access_token"] == "set"
    assert body["timeouts"]["defaultMs"] == 600000 and body["limits"]["maxParallelRequests"] == 32
    routes = body["retries"]["routes"]
    assert routes["GET /openai2/<response_id>"] == 2 and routes["POST /openai2/input_tokens"] == 2
    assert routes["POST /openai"] == 0 and routes["POST /openai2"] == 0 and routes["POST /embeddings"] == 0
    assert set(body["versions"]) >= {"python", "flask", "gunicorn", "gevent", "openai"}


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.browser
@pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium is not installed (Debian package `chromium`; ./test.sh installs it when run as root), "
    "so /log cannot be rendered in a real browser",
)
def test_log_page_in_a_real_browser_shows_records_and_runs_no_injected_script(client, app, fake):
    sent = post_json(client, "/openai", {**CHAT, "model": XSS_MODEL}, headers={"X-Request-Id": XSS_ID})
    port = free_port()
    server = WSGIServer(("127.0.0.1", port), app, log=None)
    server.start()
    try:
        with tempfile.TemporaryDirectory() as profile:
            dom = subprocess.run(
                [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--dump-dom", f"http://127.0.0.1:{port}/log?{TOKEN}"],
                capture_output=True, text=True, timeout=60,
            ).stdout  # fmt: skip
    finally:
        server.stop()
    assert "<title>openai-proxy · Requests</title>" in dom  # an injected script would have renamed it
    assert "pwned</title>" not in dom and "<script" not in dom
    assert sent.headers["X-Proxy-Request-Id"] in dom
    assert htmllib.escape(XSS_ID, quote=False) in dom  # shown as text
    assert "Request count: 1" in dom


@pytest.mark.browser
@pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="Chromium and its WebDriver are not installed (Debian packages `chromium` and `chromium-driver`), "
    "so signing in to /log cannot be tried in a real browser",
)
def test_sign_in_page_through_filter_and_sign_out_in_a_real_browser(gunicorn_server, fake, tmp_path):
    server = gunicorn_server(workers=2)
    sent = [requests.post(f"{server.url}/openai", json=CHAT, headers=CLOSE, timeout=10) for _ in range(5)]
    assert {r.status_code for r in sent} == {200}
    denied = requests.post(
        f"{server.url}/openai", json={**CHAT, "security_key": "no"}, headers=CLOSE, timeout=10
    )
    assert denied.status_code == 403
    ok_ids = [r.headers["X-Proxy-Request-Id"] for r in sent][::-1]  # newest first
    screens = tmp_path / "screenshots"
    browser = Browser(tmp_path / "profile", screens)
    try:
        # 1. A bookmarked URL with the token: the cookie is set and the address bar loses the token.
        browser.get(f"{server.url}/log?per_page=2&{TOKEN}")
        assert browser.url == f"{server.url}/log?per_page=2"
        assert browser.title == "openai-proxy · Requests"
        (cookie,) = browser.cookies()
        assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"], cookie["path"], cookie["secure"]) == (
            SESSION_COOKIE, True, "Lax", "/", False
        )  # fmt: skip
        assert ACCESS_TOKEN not in cookie["value"]
        html = browser.source
        assert (
            "5 records (1 more request on " in html
            and "access_token" not in html
            and ACCESS_TOKEN not in html
        )
        assert ") · page 1 of 3" in html
        assert [rid for _, rid, _ in rows(html)] == ok_ids[:2]
        assert "Request count: 6" in html  # the counters, as scripts scrape them
        # Spend and the last hour's chart, drawn on the server: rendered with no script allowed.
        assert (
            '<svg class="chart"' in html
            and 'data-by="client"' in html
            and "<strong>Today</strong>: 6 requests" in html
        )
        assert browser.text("#spend") == "Spend · every host · UTC days · USD at the price table's prices"
        browser.screenshot("1-signed-in-page-1")
        # 2. Page through with the pager links (each starts after the last record shown).
        for expected in (ok_ids[2:4], ok_ids[4:]):
            older = f"{server.url}{link(browser.source, 'next')}"
            assert older.startswith(f"{server.url}/log?per_page=2&before=")
            browser.click("a[rel=next]")
            assert browser.wait_for_url(older) == older
            assert [rid for _, rid, _ in rows(browser.source)] == expected
        browser.screenshot("2-page-3")
        # 3. The errors tab, filtered with the form.
        browser.click("nav a:not([aria-current])")
        assert browser.wait_for_url(f"{server.url}/log_errors") == f"{server.url}/log_errors"
        browser.type("input[name=status]", "403")
        browser.click(".filters button[type=submit]")
        assert (
            browser.wait_for_url(f"{server.url}/log_errors?status=403&endpoint=&request_id=")
            == f"{server.url}/log_errors?status=403&endpoint=&request_id="
        )
        html = browser.source
        assert [rid for _, rid, _ in rows(html)] == [denied.headers["X-Proxy-Request-Id"]]
        assert "Invalid security_key" in html and "access_token" not in html
        browser.screenshot("3-errors-filtered")
        # 4. Sign out: back to the sign-in page, the cookie gone, the pages closed again.
        browser.click(".signout button")
        assert browser.wait_for_url(f"{server.url}/signin") == f"{server.url}/signin"
        assert browser.cookies() == []
        browser.screenshot("4-signed-out")
        browser.get(f"{server.url}/log_errors?status=4xx")
        assert browser.title == "openai-proxy · Sign in"
        assert rows(browser.source) == []
        # 5. The form: a wrong token is refused, the right one leads back to the page asked for.
        browser.type("input[name=access_token]", "not-the-token")
        browser.click("form button[type=submit]")
        assert browser.wait_for_url(f"{server.url}/signin") == f"{server.url}/signin"
        assert browser.text(".banner") == "That access token is not valid."
        assert browser.cookies() == []
        browser.screenshot("5-wrong-token")
        browser.type("input[name=access_token]", ACCESS_TOKEN)
        browser.click("form button[type=submit]")
        assert (
            browser.wait_for_url(f"{server.url}/log_errors?status=4xx")
            == f"{server.url}/log_errors?status=4xx"
        )
        assert [rid for _, rid, _ in rows(browser.source)] == [denied.headers["X-Proxy-Request-Id"]]
        assert [c["name"] for c in browser.cookies()] == [SESSION_COOKIE]
        browser.screenshot("6-signed-in-with-the-form")
    finally:
        browser.close()
    print(f"screenshots in {screens}")
