"""The outbound forward proxy (CONTRACT §10), through a real tinyproxy that demands credentials.

Corporate networks reach OpenAI through a forward proxy: HTTPS upstreams go through `CONNECT` with
`Proxy-Authorization: Basic`, plain-HTTP ones in absolute form. The proxy's credentials must never
reach OpenAI, a proxy that refuses is a 502 naming the proxy, and a proxy URL the client cannot
speak stops the server at start. tinyproxy's own log (see tests/support/forward_proxy.py) shows what went
through it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from urllib.parse import urlsplit

import openai
import pytest

from openai_proxy.config import ConfigError, build_config
from tests.conftest import ACCESS_TOKEN, ROOT, SECURITY_KEY, UPSTREAM_KEY, error_of, free_port, post_json
from tests.support.fake_upstream import chat_completion, response_events
from tests.support.forward_proxy import VIA_NAME, ForwardProxy, tinyproxy_path

NOT_INSTALLED = "tinyproxy is not installed (Debian package tinyproxy); test.sh installs it as root"

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Say hi"}]
CHAT_BODY = {"security_key": SECURITY_KEY, "model": "gpt-4o-mini", "messages": MESSAGES}
STREAM_BODY = {"security_key": SECURITY_KEY, "model": "gpt-4o", "input": "Write a poem.", "stream": True}
V1_AUTH = {"Authorization": f"Bearer {SECURITY_KEY}"}
WRONG_PASSWORD = "wrong-password-51c2"
# Every variable that can point the proxy at a forward proxy or exempt hosts from it.
PROXY_VARIABLES = ("OPENAI_PROXY_OUTBOUND_PROXY", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY",
                   "http_proxy", "NO_PROXY", "no_proxy")  # fmt: skip


@pytest.fixture(scope="module")
def tinyproxy():
    """One tinyproxy for the module: starting it costs more than most of the tests here."""
    if tinyproxy_path() is None:
        pytest.skip(NOT_INSTALLED)
    server = ForwardProxy().start()
    yield server
    server.stop()


@pytest.fixture
def proxy(tinyproxy):
    """The module's tinyproxy, its log read from this test's start on."""
    tinyproxy.rewind()
    return tinyproxy


# ---- helpers ------------------------------------------------------------------------------------------


def target(upstream) -> tuple[str, int]:
    """(host, port) the proxy must ask the forward proxy for."""
    parts = urlsplit(upstream.url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def through(proxy_url: str, fake, **env: str) -> dict[str, str]:
    """Environment for an app that reaches the HTTPS fake through `proxy_url`, trusting its test CA."""
    return {"OPENAI_PROXY_OUTBOUND_PROXY": proxy_url, "OPENAI_PROXY_CA_BUNDLE": str(fake.ca_path), **env}


def frames_of(events) -> bytes:
    """The `data:` frames /openai2 relays for upstream Responses events."""
    return b"".join(b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n" for e in events)


def gate_in_use(client) -> int:
    r = client.get("/health", headers={"Authorization": f"Bearer {ACCESS_TOKEN}"})
    assert r.status_code == 200
    return r.get_json()["gate"]["inUse"]


def chat_ok(client) -> None:
    r = post_json(client, "/openai", CHAT_BODY)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json() == chat_completion("gpt-4o-mini")


def stream_ok(client) -> None:
    r = post_json(client, "/openai2", STREAM_BODY, buffered=False)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.headers["Content-Type"] == "text/event-stream"
    body = b"".join(r.response)
    r.close()
    assert body == frames_of(response_events("gpt-4o")) + b"data: [DONE]\n\n"


def assert_no_proxy_credentials_upstream(upstream, proxy: ForwardProxy) -> None:
    """Upstream saw our upstream key on every request, and nothing of the forward proxy's login."""
    assert upstream.requests
    for sent in upstream.requests:
        assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert "proxy-authorization" not in sent.headers
        assert proxy.password not in json.dumps(sent.headers)


def assert_proxy_refusal(r, *needles: str) -> None:
    """A 502 transport error whose message names the proxy (and `needles`, e.g. its status)."""
    assert r.status_code == 502, r.get_data(as_text=True)
    err = error_of(r)
    assert (err["type"], err["code"]) == ("upstream_transport", "OPENAI_PROXY_TRANSPORT")
    assert "proxy" in err["message"].lower(), err["message"]
    for needle in needles:
        assert needle in err["message"], err["message"]
    # An operator reads this message; the forward proxy's password must not be in it.
    assert WRONG_PASSWORD not in err["message"] and "proxy-pass" not in err["message"]


# ---- 1, 2: an HTTPS upstream through CONNECT -------------------------------------------------------------


def test_https_upstream_through_the_proxy_with_credentials(make_app, fake, proxy):
    client = make_app(**through(proxy.url, fake)).test_client()
    chat_ok(client)
    r = post_json(client, CHAT, {"model": "gpt-4o-mini", "messages": MESSAGES}, headers=V1_AUTH)
    assert r.status_code == 200
    assert r.get_json() == chat_completion("gpt-4o-mini")
    stream_ok(client)

    host, port = target(fake)
    assert proxy.connects_to(host, port) >= 1, proxy.log_text()
    # Only tunnels: nothing in absolute form, which would mean the upstream was spoken to in clear.
    assert all(line.startswith("CONNECT ") for line in proxy.request_lines()), proxy.log_text()
    assert [(sent.method, sent.path) for sent in fake.requests] == [
        ("POST", CHAT),
        ("POST", CHAT),
        ("POST", "/v1/responses"),
    ]
    assert_no_proxy_credentials_upstream(fake, proxy)
    assert gate_in_use(client) == 0


def test_sequential_calls_reuse_the_tunnel(make_app, fake, proxy):
    client = make_app(**through(proxy.url, fake)).test_client()
    calls = 6
    for _ in range(calls):
        chat_ok(client)
    stream_ok(client)
    chat_ok(client)
    assert fake.count(CHAT) == calls + 1
    host, port = target(fake)
    # Keep-alive over the tunnel (CONTRACT §10): a CONNECT (and a TLS handshake) per call would add
    # a proxy round trip to every request. One tunnel, or two if a connection was retired on the way.
    connects = proxy.connects_to(host, port)
    assert 1 <= connects <= 2, proxy.log_text()


# ---- 3: a plain-HTTP upstream in absolute form ---------------------------------------------------------


def test_plain_http_upstream_goes_through_in_absolute_form(make_app, plain_fake, proxy):
    client = make_app(OPENAI_BASE_URL=plain_fake.url, OPENAI_PROXY_OUTBOUND_PROXY=proxy.url).test_client()
    # Several calls in a row: tinyproxy closes the client connection after each answer without
    # announcing it, so a client that reuses that connection blindly fails the second call.
    for _ in range(3):
        chat_ok(client)
    stream_ok(client)

    host, port = target(plain_fake)
    assert proxy.request_lines() == [f"POST http://{host}:{port}{CHAT} HTTP/1.1"] * 3 + [
        f"POST http://{host}:{port}/v1/responses HTTP/1.1"
    ], proxy.log_text()
    assert [sent.path for sent in plain_fake.requests] == [CHAT] * 3 + ["/v1/responses"]
    for sent in plain_fake.requests:
        # tinyproxy's Via header: these requests really came through it.
        assert VIA_NAME in sent.headers["via"]
    assert_no_proxy_credentials_upstream(plain_fake, proxy)
    assert gate_in_use(client) == 0


# ---- 4: a proxy that refuses ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("credentials", "status"),
    [(None, "407"), (("proxy-user", WRONG_PASSWORD), "401")],
    ids=["missing-credentials", "wrong-credentials"],
)
def test_proxy_refusing_the_tunnel_is_502_transport(make_app, fake, proxy, credentials, status):
    # tinyproxy 1.11 answers 407 without credentials but 401 to wrong ones.
    url = proxy.url_without_credentials if credentials is None else proxy.url_with(*credentials)
    client = make_app(**through(url, fake)).test_client()
    assert_proxy_refusal(post_json(client, "/openai", CHAT_BODY), status)
    # A stream is refused before it starts: the same JSON error, not an event stream.
    r = post_json(client, "/openai2", STREAM_BODY)
    assert_proxy_refusal(r, status)

    r = post_json(client, CHAT, {"model": "gpt-4o-mini", "messages": MESSAGES}, headers=V1_AUTH)
    assert r.status_code == 502
    body = r.get_json()
    assert set(body) == {"error"} and body["error"]["code"] == "OPENAI_PROXY_TRANSPORT"
    assert "proxy" in body["error"]["message"].lower()

    host, port = target(fake)
    assert proxy.connects_to(host, port) >= 3, proxy.log_text()
    assert fake.requests == []
    assert gate_in_use(client) == 0


def test_plain_http_upstream_without_credentials_is_502_transport(make_app, plain_fake, proxy):
    client = make_app(
        OPENAI_BASE_URL=plain_fake.url, OPENAI_PROXY_OUTBOUND_PROXY=proxy.url_without_credentials
    ).test_client()
    # The 407 comes as the answer to the request itself; it is the proxy's, not OpenAI's.
    assert_proxy_refusal(post_json(client, "/openai", CHAT_BODY), "407")
    host, port = target(plain_fake)
    assert proxy.request_lines() == [f"POST http://{host}:{port}{CHAT} HTTP/1.1"], proxy.log_text()
    assert plain_fake.requests == []
    assert gate_in_use(client) == 0


def test_proxy_that_cannot_reach_the_target_is_502_transport(make_app, fake, proxy):
    port = free_port()  # nobody listens there: tinyproxy answers the CONNECT with 500
    client = make_app(
        **through(proxy.url, fake, OPENAI_BASE_URL=f"https://127.0.0.1:{port}/v1")
    ).test_client()
    assert_proxy_refusal(post_json(client, "/openai", CHAT_BODY))
    assert proxy.connects_to("127.0.0.1", port) >= 1, proxy.log_text()
    assert fake.requests == []
    assert gate_in_use(client) == 0


def test_proxy_that_is_down_is_502_transport(make_app, fake):
    client = make_app(**through(f"http://proxy-user:secret@127.0.0.1:{free_port()}", fake)).test_client()
    r = post_json(client, "/openai", CHAT_BODY)
    assert r.status_code == 502
    err = error_of(r)
    assert (err["type"], err["code"]) == ("upstream_transport", "OPENAI_PROXY_TRANSPORT")
    assert "secret" not in err["message"]
    assert fake.requests == []
    assert gate_in_use(client) == 0


# ---- 5: NO_PROXY ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"), [("NO_PROXY", "127.0.0.1"), ("no_proxy", "example.org,127.0.0.1")]
)
def test_no_proxy_host_goes_direct(make_app, fake, proxy, name, value):
    client = make_app(**through(proxy.url, fake, **{name: value})).test_client()
    chat_ok(client)
    stream_ok(client)
    assert proxy.client_connections() == 0, proxy.log_text()
    assert fake.count(CHAT) == 1 and fake.count("/v1/responses") == 1


@pytest.mark.parametrize("value", [".proxy-test.invalid", "proxy-test.invalid", "example.org,.invalid"])
def test_no_proxy_domain_suffix_goes_direct(make_app, fake, proxy, value):
    # A name under the reserved .invalid TLD never resolves: going direct ends in a DNS failure of
    # our own (502), going through the proxy would show up in its log.
    base_url = f"https://upstream.proxy-test.invalid:{target(fake)[1]}/v1"
    client = make_app(**through(proxy.url, fake, OPENAI_BASE_URL=base_url, NO_PROXY=value)).test_client()
    r = post_json(client, "/openai", CHAT_BODY)
    assert r.status_code == 502
    assert error_of(r)["type"] == "upstream_transport"
    assert proxy.client_connections() == 0, proxy.log_text()

    # The same upstream without the exemption is asked of the proxy, by name.
    proxy.rewind()
    client = make_app(**through(proxy.url, fake, OPENAI_BASE_URL=base_url)).test_client()
    assert post_json(client, "/openai", CHAT_BODY).status_code == 502
    assert proxy.connects_to("upstream.proxy-test.invalid", target(fake)[1]) >= 1, proxy.log_text()


def test_no_proxy_that_does_not_match_keeps_the_proxy(make_app, fake, proxy):
    client = make_app(**through(proxy.url, fake, NO_PROXY="example.org,.invalid,127.0.0.2")).test_client()
    chat_ok(client)
    assert proxy.connects_to(*target(fake)) >= 1, proxy.log_text()


# ---- 6: HTTPS_PROXY / HTTP_PROXY ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["HTTPS_PROXY", "https_proxy"])
def test_https_proxy_variable_is_used_for_an_https_upstream(make_app, fake, proxy, name):
    client = make_app(**{"OPENAI_PROXY_CA_BUNDLE": str(fake.ca_path), name: proxy.url}).test_client()
    chat_ok(client)
    assert proxy.connects_to(*target(fake)) >= 1, proxy.log_text()
    assert_no_proxy_credentials_upstream(fake, proxy)


@pytest.mark.parametrize("name", ["HTTP_PROXY", "http_proxy"])
def test_http_proxy_variable_is_not_used_for_an_https_upstream(make_app, fake, proxy, name):
    client = make_app(**{"OPENAI_PROXY_CA_BUNDLE": str(fake.ca_path), name: proxy.url}).test_client()
    chat_ok(client)
    assert proxy.client_connections() == 0, proxy.log_text()


def test_http_proxy_variable_is_used_for_a_plain_upstream(make_app, plain_fake, proxy):
    client = make_app(OPENAI_BASE_URL=plain_fake.url, HTTP_PROXY=proxy.url).test_client()
    chat_ok(client)
    host, port = target(plain_fake)
    assert proxy.request_lines() == [f"POST http://{host}:{port}{CHAT} HTTP/1.1"], proxy.log_text()


def test_https_proxy_variable_is_not_used_for_a_plain_upstream(make_app, plain_fake, proxy):
    client = make_app(OPENAI_BASE_URL=plain_fake.url, HTTPS_PROXY=proxy.url).test_client()
    chat_ok(client)
    assert proxy.client_connections() == 0, proxy.log_text()
    assert "via" not in plain_fake.last(CHAT).headers


def test_outbound_proxy_variable_wins_over_https_proxy(make_app, fake, proxy):
    # HTTPS_PROXY carries a wrong password: were it used, the call would be refused.
    wrong = proxy.url_with(proxy.user, WRONG_PASSWORD)
    client = make_app(**through(proxy.url, fake, HTTPS_PROXY=wrong, HTTP_PROXY=wrong)).test_client()
    chat_ok(client)
    assert proxy.connects_to(*target(fake)) >= 1, proxy.log_text()


# ---- 7: proxies the client cannot speak stop the start --------------------------------------------------

HTTPS_UPSTREAM = "https://api.openai.com/v1"
HTTP_UPSTREAM = "http://127.0.0.1:9/v1"


@pytest.mark.parametrize(
    "value",
    ["https://proxy.example:3128", "socks5://127.0.0.1:1080", "socks5h://user:hunter2@proxy.example:1080",
     "ftp://proxy.example:21"],
)  # fmt: skip
@pytest.mark.parametrize(
    ("name", "base_url"),
    [("OPENAI_PROXY_OUTBOUND_PROXY", HTTPS_UPSTREAM), ("OPENAI_PROXY_OUTBOUND_PROXY", HTTP_UPSTREAM),
     ("HTTPS_PROXY", HTTPS_UPSTREAM), ("https_proxy", HTTPS_UPSTREAM),
     ("HTTP_PROXY", HTTP_UPSTREAM), ("http_proxy", HTTP_UPSTREAM)],
)  # fmt: skip
def test_unsupported_proxy_scheme_is_a_config_error(name, base_url, value):
    with pytest.raises(ConfigError) as exc:
        build_config({"OPENAI_BASE_URL": base_url, name: value})
    assert isinstance(exc.value, ValueError)
    message = str(exc.value)
    assert name in message
    assert "hunter2" not in message  # the message goes to logs


@pytest.mark.parametrize(
    "value", ["http://proxy.example:3128", "http://user:pass@proxy.example:3128", "http://10.0.0.1:8080"]
)
def test_http_proxy_urls_are_accepted(value):
    build_config({"OPENAI_BASE_URL": HTTPS_UPSTREAM, "OPENAI_PROXY_OUTBOUND_PROXY": value})


@pytest.mark.gunicorn
def test_gunicorn_refuses_to_start_with_a_socks_proxy(tmp_path):
    # Started by hand, not with the gunicorn_server fixture: that one waits for a server that runs.
    inherited = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI_", "SECURITY_KEY", "ACCESS_TOKEN")) and k not in PROXY_VARIABLES
    }
    env = {**inherited, "OPENAI_BASE_URL": "https://127.0.0.1:9/v1", "OPENAI_API_KEY": UPSTREAM_KEY,
           "SECURITY_KEY": SECURITY_KEY, "PORT": str(free_port()), "OPENAI_PROXY_WORKERS": "1",
           "OPENAI_PROXY_LOG_DB": str(tmp_path / "log.sqlite3"), "OPENAI_PROXY_RUNTIME_DIR": str(tmp_path / "run"),
           "OPENAI_PROXY_OUTBOUND_PROXY": "socks5://proxy-user:hunter2@127.0.0.1:1080"}  # fmt: skip
    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app.wsgi:app"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            returncode = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            pytest.fail(f"gunicorn kept running with a socks5:// proxy:\n{log_path.read_text()}")
    text = log_path.read_text(errors="replace")
    assert returncode != 0, text
    assert "OPENAI_PROXY_OUTBOUND_PROXY" in text and "socks5" in text, text
    assert "hunter2" not in text


# ---- 8: the official SDK, a real gunicorn, the proxy ---------------------------------------------------


@pytest.mark.gunicorn
def test_official_sdk_through_gunicorn_and_the_proxy(gunicorn_server, fake, proxy):
    # An inherited NO_PROXY (CI machines often list 127.0.0.1) would send the server around the proxy.
    server = gunicorn_server(workers=1, **through(proxy.url, fake, NO_PROXY="", no_proxy=""))
    # trust_env off: the SDK talks to our gunicorn on loopback, never through a proxy of the host.
    sdk = openai.OpenAI(
        base_url=server.url + "/v1",
        api_key=SECURITY_KEY,
        max_retries=0,
        timeout=20,
        http_client=openai.DefaultHttpx2Client(trust_env=False),
    )
    try:
        completion = sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert completion.choices[0].message.content == "Hello from the fake upstream."
        assert completion.usage is not None and completion.usage.total_tokens == 32
        chunks = list(sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "word0 word1 word2 "
        response = sdk.responses.create(model="gpt-4o", input="Write a poem.")
        assert response.output_text == "In a peaceful grove. The end."
    finally:
        sdk.close()

    assert [(sent.method, sent.path) for sent in fake.requests] == [
        ("POST", CHAT),
        ("POST", CHAT),
        ("POST", "/v1/responses"),
    ]
    assert proxy.connects_to(*target(fake)) >= 1, proxy.log_text()
    assert all(line.startswith("CONNECT ") for line in proxy.request_lines()), proxy.log_text()
    assert_no_proxy_credentials_upstream(fake, proxy)
    assert proxy.password not in server.log_text()
