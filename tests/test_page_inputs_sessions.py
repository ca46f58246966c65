"""The log pages' inputs and sessions: a bad filter value is a 400 with the form shown again (never a
500 or 503), sign-out ends the session on every host sharing the log, and only from the pages' origin."""

from __future__ import annotations

import sqlite3

import pytest
from markupsafe import escape

from openai_proxy.inbound.auth import SESSION_COOKIE
from tests.conftest import post_json
from tests.support.logpage import AUTH, CHAT, TOKEN, rows

BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
PAGE = "page must be an integer from 1 to 1000000"
PER_PAGE = "per_page must be an integer from 1 to 500"
STATUS = "status must be a code like 404 or a class like 4xx"

BAD_QUERIES = [
    ("per_page=%C2%B2", PER_PAGE),  # "²": str.isdigit() says yes, int() says no
    ("page=%C2%B2", PAGE),
    ("page=%D9%A3", PAGE),  # Arabic-Indic three
    ("status=%C2%B2%C2%B2%C2%B2", STATUS),
    ("status=%D9%A3xx", STATUS),
    ("page=99999999999999999999", PAGE),
    ("page=" + "9" * 5000, PAGE),  # past int()'s 4300 digits
    ("per_page=0", PER_PAGE),
    ("client=x%00y", "client must not contain control characters"),
    ("endpoint=%2Fopenai%00", "endpoint must not contain control characters"),
    ("host=a%0Ab", "host must not contain control characters"),
    ("request_id=%7F", "request_id must not contain control characters"),
    ("status=4%00xx", "status must not contain control characters"),
]


def sign_in(client) -> str:
    r = client.get(f"/log?{TOKEN}")
    assert r.status_code == 303
    return client.get_cookie(SESSION_COOKIE).value


@pytest.mark.parametrize("path", ["/log", "/log_errors"])
@pytest.mark.parametrize(("query", "message"), BAD_QUERIES)
def test_a_bad_filter_value_is_a_400_with_the_form_again(log_db, make_app, fake, path, query, message):
    client = make_app(OPENAI_PROXY_LOG_DB=log_db).test_client()
    assert post_json(client, "/openai", CHAT).status_code == 200
    sign_in(client)
    kept = "endpoint" if query.startswith("request_id") else "request_id"
    r = client.get(f"{path}?{kept}=kept-%3Cid%3E&{query}", headers=BROWSER)
    assert r.status_code == 400 and r.mimetype == "text/html"
    html = r.get_data(as_text=True)
    assert f'<div class="banner" role="alert">{message}</div>' in html
    assert '<form class="filters" method="get">' in html and "Counters" not in html and rows(html) == []
    assert 'value="kept-&lt;id&gt;"' in html  # what was typed, escaped, to correct it (input or option)
    assert "\x00" not in html
    # Scripts get the JSON error, as for any other bad value.
    r = client.get(f"{path}?{query}", headers=AUTH)
    assert r.status_code == 400 and r.get_json()["error"]["message"] == message
    # The page itself still works.
    assert client.get(path, headers=BROWSER).status_code == 200


def test_a_typed_value_is_shown_again_without_its_control_characters(make_app, fake):
    client = make_app().test_client()
    sign_in(client)
    r = client.get("/log?client=a%00%3Cb%3E&per_page=%C2%B2", headers=BROWSER)
    assert r.status_code == 400
    html = r.get_data(as_text=True)
    shown = escape("a\ufffd<b>")
    assert f'<option value="{shown}" selected>' in html
    assert 'name="per_page"' not in html  # the bad value is not carried on by the form


def test_good_filters_still_work(make_app, fake):
    client = make_app().test_client()
    ids = [post_json(client, "/openai", CHAT).headers["X-Proxy-Request-Id"] for _ in range(3)]
    sign_in(client)
    html = client.get("/log?status=2XX&page=2&per_page=1&endpoint=/openai", headers=BROWSER).get_data(
        as_text=True
    )
    assert [rid for _, rid, _ in rows(html)] == [ids[1]]
    assert [
        rid for _, rid, _ in rows(client.get("/log?status=200 ", headers=AUTH).get_data(as_text=True))
    ] == ids[::-1]


# ---- sessions ------------------------------------------------------------------------------------------


def test_sign_out_ends_the_session_on_every_host(log_db, make_app, fake):
    """Two hosts (two apps sharing the log): a cookie copied before a sign-out on one stops working on both."""
    host_a = make_app(OPENAI_PROXY_LOG_DB=log_db, OPENAI_PROXY_HOST_NAME="a").test_client()
    host_b = make_app(OPENAI_PROXY_LOG_DB=log_db, OPENAI_PROXY_HOST_NAME="b").test_client()
    cookie = sign_in(host_a)
    host_b.set_cookie(SESSION_COOKIE, cookie)  # the copy (another browser, or a stolen cookie)
    assert host_b.get("/log", headers=BROWSER).status_code == 200

    r = host_a.post("/signout", headers={"Origin": "http://localhost"})
    assert r.status_code == 303 and r.headers["Location"] == "/signin"
    assert host_a.get_cookie(SESSION_COOKIE) is None

    r = host_b.get("/log", headers=BROWSER)
    assert r.status_code == 401 and "You signed out; sign in again." in r.get_data(as_text=True)
    assert r.headers.getlist("Set-Cookie")[0].startswith(f"{SESSION_COOKIE}=; ")  # cleared there too
    for host in (host_a, host_b):
        host.set_cookie(SESSION_COOKIE, cookie)
        r = host.get("/health")
        assert r.status_code == 403 and r.get_json()["error"]["message"] == "Signed out; sign in again"
    # Signing in again at once (the same second) gives a cookie both hosts take.
    fresh = sign_in(host_b)
    assert fresh != cookie
    host_a.set_cookie(SESSION_COOKIE, fresh)
    assert host_a.get("/log", headers=BROWSER).status_code == 200
    assert host_a.get("/health").status_code == 200
    # Tokens are not sessions: a sign-out does not touch them.
    assert host_a.get("/health", headers=AUTH).status_code == 200


def test_sign_out_only_from_the_pages_own_origin(make_app, fake):
    client = make_app().test_client()
    cookie = sign_in(client)
    refused = [
        {"Origin": origin}
        for origin in ("https://evil.example", "null", "http://localhost.evil.example", "http://localhost:1")
    ]
    # Fetch metadata, where the browser sends it, is believed over Origin.
    refused += [
        {"Sec-Fetch-Site": site, "Origin": "http://localhost"} for site in ("cross-site", "same-site", "none")
    ]
    for headers in refused:
        r = client.post("/signout", headers=headers)
        assert r.status_code == 403, headers
        assert r.get_json()["error"]["message"] == "Sign-out is only accepted from the pages of this server"
        assert "Set-Cookie" not in r.headers
    assert client.get("/log", headers=BROWSER).status_code == 200  # still signed in, everywhere
    # The pages' own form (the browser names this origin), and clients that send no Origin at all.
    for headers in ({"Origin": "http://localhost"}, {"Sec-Fetch-Site": "same-origin", "Origin": "null"}, {}):
        client.set_cookie(SESSION_COOKIE, cookie)
        assert client.post("/signout", headers=headers).status_code == 303
        client.set_cookie(SESSION_COOKIE, cookie)
        assert client.get("/log", headers=BROWSER).status_code == 401
        cookie = sign_in(client)


def test_an_anonymous_sign_out_ends_no_session(make_app, fake):
    client = make_app().test_client()
    cookie = sign_in(client)
    stranger = make_app().test_client()
    assert stranger.post("/signout").status_code == 303  # clears its own (absent) cookie, nothing else
    client.set_cookie(SESSION_COOKIE, cookie)
    assert client.get("/log", headers=BROWSER).status_code == 200


def test_a_cookie_that_cannot_be_checked_is_refused_and_a_token_still_works(make_app, fake, tmp_path):
    app = make_app()
    client = app.test_client()
    cookie = sign_in(client)
    store = app.extensions["openai_proxy"].log_store
    store.close()
    path = tmp_path / "openai-proxy.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    path.write_bytes(b"this is not an SQLite file" * 100)  # the log database is gone bad
    client.set_cookie(SESSION_COOKIE, cookie)
    r = client.get("/log", headers=BROWSER)
    assert r.status_code == 503
    assert "Your sign-in cannot be checked right now: the log database does not answer." in r.get_data(
        as_text=True
    )
    assert "Set-Cookie" not in r.headers  # the cookie may be good: kept
    r = client.get("/health")
    assert r.status_code == 403 and r.get_json()["error"]["message"] == (
        "The sign-in cannot be checked now (the log database does not answer); send the access token"
    )
    assert client.get("/health", headers=AUTH).status_code == 200


def test_a_sign_out_that_cannot_be_recorded_says_so(make_app, fake):
    app = make_app()
    client = app.test_client()
    cookie = sign_in(client)
    store = app.extensions["openai_proxy"].log_store
    assert store.signed_out_at() == 0.0  # the table exists; the sign-out would write to it
    locker = sqlite3.connect(store.target, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    try:
        r = client.post("/signout")
        assert r.status_code == 503
        assert "Signed out in this browser only: the sign-out could not be recorded" in r.get_data(
            as_text=True
        )
        assert r.headers.getlist("Set-Cookie")[0].startswith(f"{SESSION_COOKIE}=; ")
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    client.set_cookie(SESSION_COOKIE, cookie)
    assert client.get("/log", headers=BROWSER).status_code == 200  # as the page said: not ended elsewhere
    assert client.post("/signout").status_code == 303
    assert client.get("/log", headers=BROWSER).status_code == 401  # ended now
