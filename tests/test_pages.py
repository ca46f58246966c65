"""The operator pages: access token, rate limits, escaping, redaction, filters, health, runtime info."""

from __future__ import annotations

import html as htmllib
import shutil
import socket
import subprocess
import tempfile

import pytest
from gevent.pywsgi import WSGIServer
from markupsafe import escape

from tests.conftest import ACCESS_TOKEN, SECURITY_KEY, UPSTREAM_KEY, free_port, post_json
from tests.fake_upstream import error
from tests.logpage import AUTH, CHAT, TOKEN, counters, rows

GUARDED = ("/health", "/health2", "/log", "/log_errors", "/debug/runtime", "/metrics")
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
    assert client.get(f"{path}?{TOKEN}").status_code in (200, 503)
    assert client.get(path, headers=AUTH).status_code in (200, 503)


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


def test_pages_are_rate_limited_with_the_json_error(make_app, fake):
    client = make_app(
        OPENAI_PROXY_PAGES_RATE_LIMIT="2/minute", OPENAI_PROXY_HEALTH2_RATE_LIMIT="1/minute"
    ).test_client()
    assert [client.get("/health", headers=AUTH).status_code for _ in range(2)] == [200, 200]
    r = client.get("/health", headers=AUTH)
    assert r.status_code == 429
    assert r.get_json() == expected_error(
        r, "Too many requests: 2 per 1 minute; try again later", "rate_limited", "OPENAI_PROXY_RATE_LIMITED"
    )
    assert 0 < int(r.headers["Retry-After"]) <= 60
    # Each page counts on its own; /health2 (which spends tokens) has its own lower limit.
    assert [client.get(f"/log?{TOKEN}").status_code for _ in range(3)] == [200, 200, 429]
    assert [client.get("/health2", headers=AUTH).status_code for _ in range(2)] == [200, 429]
    assert client.get("/health2", headers=AUTH).get_json()["error"]["message"] == (
        "Too many requests: 1 per 1 minute; try again later"
    )
    # Guessing the token is throttled too.
    assert [client.get("/debug/runtime?access_token=guess").status_code for _ in range(3)] == [403, 403, 429]
    # `/` and the API routes are never throttled here.
    assert {client.get("/").status_code for _ in range(5)} == {200}
    assert {post_json(client, "/openai", CHAT).status_code for _ in range(5)} == {200}


def test_values_are_escaped_and_counters_keep_the_original_labels(client, fake):
    r = post_json(client, "/openai", {**CHAT, "model": XSS_MODEL}, headers={"X-Request-Id": XSS_ID})
    assert r.status_code == 200
    page = client.get(f"/log?{TOKEN}")
    text = page.get_data(as_text=True)
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "<script>document.title" not in text and "<img src=x" not in text
    assert escape(XSS_ID) in text and escape(XSS_MODEL) in text
    assert "script-src" not in page.headers["Content-Security-Policy"]  # default-src 'none': no script at all
    assert page.headers["Cache-Control"] == "no-store" and page.headers["Referrer-Policy"] == "no-referrer"
    assert counters(text)["Request count"] == "1"


def test_secrets_are_redacted_on_the_pages(client, fake):
    secret = "sk-live-abcdefghijklmnop5678"
    fake.push("POST", "/v1/chat/completions", error(401, f"Incorrect API key provided: {secret}"))
    post_json(
        client, "/openai", {**CHAT, "openai_api_key": secret}, headers={"X-Request-Id": f"Bearer {secret}"}
    )
    text = client.get(f"/log_errors?{TOKEN}").get_data(as_text=True)
    assert "401 Incorrect API key provided: ***5678" in text
    assert "abcdefghijklmnop" not in text
    assert "client: Bearer ***5678" in text


def test_filters_and_pagination(client, fake):
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
        r = client.get(f"{path}?{TOKEN}{query}")
        assert r.status_code == 200
        return [rid for _, rid, _ in rows(r.get_data(as_text=True))]

    assert ids("/log", "&endpoint=/embeddings") == [emb]
    assert ids("/log", "&status=2xx") == [tagged, emb, *ok[::-1]]
    assert ids("/log", "&status=201") == []
    assert ids("/log", "&request_id=client-42") == [tagged]
    assert ids("/log", f"&request_id={ok[0]}") == [ok[0]]
    assert ids("/log_errors", "&status=403") == [denied]
    assert len(ids("/log_errors", "&status=4xx")) == 2
    page2 = client.get(f"/log?{TOKEN}&per_page=2&page=2&status=2xx").get_data(as_text=True)
    assert [rid for _, rid, _ in rows(page2)] == ok[:0:-1] and "page 2 of 3" in page2
    assert f'href="/log?status=2xx&amp;per_page=2&amp;{TOKEN}&amp;page=3"' in page2  # links keep filters
    for query, message in (
        ("&status=abc", "status must be a code like 404 or a class like 4xx"),
        ("&page=0", "page must be an integer from 1 to 1000000"),
        ("&per_page=501", "per_page must be an integer from 1 to 500"),
    ):
        r = client.get(f"/log?{TOKEN}{query}")
        assert r.status_code == 400
        assert r.get_json() == expected_error(r, message, "validation_error", "OPENAI_PROXY_BAD_REQUEST")


def test_health_is_cheap_and_health2_calls_upstream(client, fake):
    r = client.get("/health", headers=AUTH)
    assert r.status_code == 200
    body = r.get_json()
    assert (body["status"], body["ready"], body["config"]["loaded"]) == ("ok", True, True)
    assert body["gate"] == {"inUse": 0, "limit": 32, "heldByThisWorker": 0}
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
