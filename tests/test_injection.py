"""Nothing a client sends can add to, end or split the proxy's upstream requests (contract §3, §9, §10).

Every value that becomes an upstream header (the overrides `openai_api_key`, `project`,
`organization`; the headers `/v1` forwards) is checked: control characters or text that is not
latin-1 are a 400 before anything goes upstream. Headers the client names in `Connection` stay here,
the proxy's own `security_key` never goes upstream in a query, and a fragment never leaves.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from urllib.parse import urlencode

import gevent
import gevent.event
import gevent.pool
import pytest
import requests

from tests.conftest import SECURITY_KEY, UPSTREAM_KEY, error_of, post_json
from tests.support.fake_upstream import chat_completion, default_handler
from tests.support.hostile_upstream import HostileUpstream

OVERRIDES = ("openai_api_key", "project", "organization")
# Each would end or split a header line, or is refused by servers (controls), or cannot be sent at
# all (text outside latin-1: the header would have to be re-encoded into something else).
BAD_VALUES = {
    "cr": "sk-a\rb",
    "lf": "sk-a\nb",
    "crlf": "sk-a\r\nX-Injected: 1",
    "nul": "sk-a\x00b",
    "vertical_tab": "sk-a\x0bb",
    "del": "sk-a\x7fb",
    "not_latin1": "ключ",
}
# A WSGI header value is latin-1 by definition, so "not latin-1" cannot arrive in a /v1 header.
BAD_HEADER_VALUES = {k: v for k, v in BAD_VALUES.items() if k != "not_latin1"}
CHAT = {"security_key": SECURITY_KEY, "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
V1_AUTH = {"Authorization": f"Bearer {SECURITY_KEY}"}
AUDIO = "/openai/audio/transcriptions"
BOUNDARY = "injection-test-boundary"
WAV = (
    b"RIFF$\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00@\x1f\x00\x00\x80>\x00\x00\x02\x00\x10\x00"
    b"data\x00\x00\x00\x00"
)


def assert_refused(response) -> dict:
    """A legacy 400 `validation_error`."""
    assert response.status_code == 400, response.data[:300]
    err = error_of(response)
    assert (err["type"], err["code"]) == ("validation_error", "OPENAI_PROXY_BAD_REQUEST"), err
    return err


def assert_refused_v1(response) -> dict:
    """A 400 in OpenAI's shape, `invalid_request_error` (what the SDKs raise as BadRequestError)."""
    assert response.status_code == 400, response.data[:300]
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"].startswith("OPENAI_PROXY_")
    assert response.headers["X-Proxy-Request-Id"]
    return body["error"]


def form(fields: list[tuple[str, str]]) -> bytes:
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        + value.encode()
        + b"\r\n"
        for name, value in fields
    ]
    parts.append(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n".encode()
        + WAV
        + b"\r\n"
    )
    parts.append(f"--{BOUNDARY}--\r\n".encode())
    return b"".join(parts)


# ---- legacy routes: the overrides --------------------------------------------------------------------------


@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("field", OVERRIDES)
def test_bad_override_in_a_json_body_is_400(client, fake, field, value):
    assert_refused(post_json(client, "/openai", {**CHAT, field: BAD_VALUES[value]}))
    assert fake.requests == []


@pytest.mark.parametrize("field", OVERRIDES)
@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/openai2", {"model": "gpt-4o", "input": "x", "stream": True}),
        ("/openai2", {"model": "gpt-4o", "input": "x"}),
        ("/openai2/input_tokens", {"model": "gpt-4o", "input": "x"}),  # retried: the SDK's way out
        ("/openai2/resp_1/cancel", {}),
        ("/openai2/compact", {"model": "gpt-4o", "input": "x"}),
        ("/embeddings", {"input": "x"}),
        ("/chatgpt", {"prompt": "x"}),
    ],
)
def test_bad_override_on_every_json_route_is_400(client, fake, route, body, field):
    assert_refused(
        post_json(client, route, {"security_key": SECURITY_KEY, **body, field: BAD_VALUES["crlf"]})
    )
    assert fake.requests == []


@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("field", OVERRIDES)
def test_bad_override_in_a_query_is_400(client, fake, field, value):
    query = urlencode({"security_key": SECURITY_KEY, field: BAD_VALUES[value]})
    assert_refused(client.get(f"/openai2/resp_1?{query}"))
    assert fake.requests == []


@pytest.mark.parametrize("field", OVERRIDES)
@pytest.mark.parametrize(
    ("method", "path", "extra"),
    [
        ("DELETE", "/openai2/resp_1", {}),
        ("GET", "/openai2/resp_1/input_items", {}),
        ("GET", "/openai2/resp_1", {"stream": "true"}),
    ],
)
def test_bad_override_in_the_query_of_every_query_route_is_400(client, fake, method, path, extra, field):
    query = urlencode({"security_key": SECURITY_KEY, **extra, field: BAD_VALUES["crlf"]})
    assert_refused(client.open(f"{path}?{query}", method=method))
    assert fake.requests == []


@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("field", OVERRIDES)
def test_bad_override_in_a_form_field_is_400(client, fake, field, value):
    body = form([("security_key", SECURITY_KEY), (field, BAD_VALUES[value])])
    assert_refused(client.post(AUDIO, data=body, content_type=f"multipart/form-data; boundary={BOUNDARY}"))
    assert fake.requests == []


def test_the_form_builder_makes_an_upload_upstream_accepts(client, fake):
    """The control for the test above: the same form with good values goes through."""
    body = form([("security_key", SECURITY_KEY), ("project", "proj_ok")])
    r = client.post(AUDIO, data=body, content_type=f"multipart/form-data; boundary={BOUNDARY}")
    assert r.status_code == 200, r.data[:300]
    assert fake.last("/v1/audio/transcriptions").headers["openai-project"] == "proj_ok"


def test_bad_override_is_refused_before_a_slot_is_taken(make_app, fake):
    """With the only slot busy, a bad override is still a 400 (judged first), not a 503."""
    app = make_app(OPENAI_PROXY_MAX_PARALLEL_REQUESTS="1")
    release = gevent.event.Event()

    def held(req, conn):
        release.wait(30)  # a safety bound; the test sets it as soon as it is done
        default_handler(req, conn)

    fake.push("POST", "/v1/chat/completions", held)
    holder = gevent.spawn(post_json, app.test_client(), "/openai", CHAT)
    try:
        with gevent.Timeout(10):
            while not fake.requests:
                gevent.sleep(0.01)
        client = app.test_client()
        assert post_json(client, "/openai", CHAT).status_code == 503  # the gate is full
        assert_refused(post_json(client, "/openai", {**CHAT, "openai_api_key": BAD_VALUES["crlf"]}))
    finally:
        release.set()
    assert holder.get(timeout=10).status_code == 200
    assert len(fake.requests) == 1


# ---- /v1: forwarded headers --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", BAD_HEADER_VALUES)
@pytest.mark.parametrize(
    "header", ["OpenAI-Project", "OpenAI-Organization", "OpenAI-Beta", "X-Stainless-Lang"]
)
def test_bad_forwarded_header_on_v1_is_400(client, fake, header, value):
    # Straight into the WSGI environ: werkzeug's test client would refuse CR/LF in `headers=`, and
    # gunicorn refuses most of these bytes itself (see the gunicorn test below). The proxy must not
    # count on either.
    environ = {"HTTP_" + header.upper().replace("-", "_"): BAD_HEADER_VALUES[value]}
    assert_refused_v1(client.get("/v1/models", headers=V1_AUTH, environ_overrides=environ))
    r = client.post(
        "/v1/chat/completions",
        data=json.dumps({"model": "m", "messages": []}),
        headers={**V1_AUTH, "Content-Type": "application/json"},
        environ_overrides=environ,
    )
    assert_refused_v1(r)
    assert fake.requests == []


# ---- real gunicorn -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(module_gunicorn):
    """One worker: every request, smuggled or not, goes through the same process and its upstream pool."""
    return module_gunicorn(workers=1)


@pytest.fixture(scope="module")
def recorder_server() -> Iterator[HostileUpstream]:
    """An upstream that records raw request heads (the fake parses the target, hiding a fragment)."""
    recorder = HostileUpstream().start()
    yield recorder
    recorder.stop()


@pytest.fixture
def recorder(recorder_server: HostileUpstream) -> Iterator[HostileUpstream]:
    recorder_server.reset()
    yield recorder_server
    recorder_server.reset()


@pytest.fixture(scope="module")
def recorded_server(module_gunicorn, recorder_server):
    return module_gunicorn(workers=1, OPENAI_BASE_URL=recorder_server.url)


def raw_exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes (the request must say `Connection: close`), return all that comes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


@pytest.mark.gunicorn
@pytest.mark.parametrize("value", ["a\rb", "a\x00b", "a\x0bb", "a\x7fb"])
def test_bad_header_bytes_through_gunicorn_never_reach_upstream(server, fake, value):
    """Whoever refuses them (gunicorn's parser, or the proxy), it is a 400 and upstream sees nothing."""
    request = (
        f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {SECURITY_KEY}\r\n"
        f"OpenAI-Beta: {value}\r\nConnection: close\r\n\r\n"
    ).encode("latin-1")
    answer = raw_exchange(server.port, request)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
    assert fake.requests == []


SMUGGLED = (
    "sk-x\r\nContent-Length: 2\r\n\r\n{}POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
    "Content-Length: 99999\r\n\r\n"
)


@pytest.mark.gunicorn
def test_smuggling_through_an_override_is_refused_and_other_clients_are_unaffected(server, fake):
    def attacker(field: str) -> requests.Response:
        return requests.post(server.url + "/openai", json={**CHAT, field: SMUGGLED}, timeout=60)

    def victim(i: int) -> requests.Response:
        # `timeout`: should a smuggled request swallow this one upstream, it fails in 5 s, not 10 min.
        body = {**CHAT, "model": f"victim-{i}", "timeout": 5000}
        return requests.post(server.url + "/openai", json=body, timeout=60)

    assert_refused(attacker("openai_api_key"))
    first = victim(0)
    assert first.status_code == 200 and first.json() == chat_completion("victim-0")

    # Interleaved and concurrent, on the one worker (and so on its pool of upstream connections).
    pool = gevent.pool.Pool(8)
    calls = [(attacker, field) for field in OVERRIDES * 3] + [(victim, i) for i in range(1, 17)]
    calls = [c for pair in zip(calls[:9], calls[9:18], strict=True) for c in pair] + calls[18:]
    results = pool.map(lambda c: (c, c[0](c[1])), calls)
    for (fn, arg), response in results:
        if fn is attacker:
            assert_refused(response)
        else:
            assert response.status_code == 200, response.text[:300]
            assert response.json() == chat_completion(f"victim-{arg}")

    assert len(fake.requests) == 17  # the victims' calls, and nothing else
    assert sorted(r.json["model"] for r in fake.requests) == sorted(f"victim-{i}" for i in range(17))
    for sent in fake.requests:
        assert sent.method == "POST" and sent.path == "/v1/chat/completions"
        assert sent.headers.get("host") != "x"
        # The fake joins repeated headers with ", ": one value means one Authorization header.
        assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert b"Authorization" not in sent.body and UPSTREAM_KEY.encode() not in sent.body
        assert b"HTTP/1.1" not in sent.body and b"sk-x" not in sent.body


@pytest.mark.gunicorn
@pytest.mark.parametrize(
    "connection", ["keep-alive, X-Secret-Hop", "X-SECRET-HOP", "keep-alive,x-secret-hop ,te"]
)
def test_headers_named_in_connection_are_not_forwarded(server, fake, connection):
    headers = {**V1_AUTH, "Connection": connection, "X-Secret-Hop": "s3cret", "X-Kept": "yes"}
    r = requests.get(server.url + "/v1/models", headers=headers, timeout=30)
    assert r.status_code == 200
    sent = fake.last("/v1/models")
    assert "x-secret-hop" not in sent.headers and "s3cret" not in json.dumps(sent.headers)
    assert sent.headers["x-kept"] == "yes"  # the control: an end-to-end header does go through


@pytest.mark.gunicorn
@pytest.mark.parametrize(
    ("query", "forwarded"),
    [
        ("security_key=abc&limit=2", "limit=2"),
        ("limit=2&security_key=abc&order=asc", "limit=2&order=asc"),
        ("after=a%2Fb&security_key=abc&limit=2", "after=a%2Fb&limit=2"),
        ("security%5Fkey=abc&limit=2", "limit=2"),
        ("security_key=abc", ""),
    ],
)
def test_security_key_in_a_v1_query_is_not_forwarded(server, fake, query, forwarded):
    r = requests.get(f"{server.url}/v1/models?{query}", headers=V1_AUTH, timeout=30)
    assert r.status_code == 200
    assert fake.last("/v1/models").query_string == forwarded


@pytest.mark.gunicorn
@pytest.mark.parametrize(
    ("target", "upstream_target"),
    [
        ("/v1/models#frag", "/v1/models"),
        ("/v1/models?limit=2#frag", "/v1/models?limit=2"),
        ("/v1/models?limit=2#frag?security_key=x", "/v1/models?limit=2"),
        # The path goes as routing decoded it, re-encoded one way; the query as it came.
        ("/v1/models/ft%3Agpt-4o%2dmini%3a%7E1", "/v1/models/ft:gpt-4o-mini:~1"),
        ("/v1/models/a%3Fb%23c%20d%25e%C3%A9", "/v1/models/a%3Fb%23c%20d%25e%C3%A9"),
        # Percent-encoded CR LF in the query stays encoded: it can never become a header line upstream.
        ("/v1/models?x=%0D%0AX-Evil:%201", "/v1/models?x=%0D%0AX-Evil:%201"),
    ],
)
def test_raw_request_target_reaches_upstream_without_fragment(
    recorded_server, recorder, target, upstream_target
):
    request = (
        f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {SECURITY_KEY}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    answer = raw_exchange(recorded_server.port, request)
    assert answer.startswith((b"HTTP/1.1 200", b"HTTP/1.1 404")), answer[:300]
    (sent,) = recorder.requests
    assert sent.target == upstream_target
    assert sent.header("x-evil") is None


@pytest.mark.gunicorn
@pytest.mark.parametrize(
    "target",
    ["/v1/models/a%0D%0AX-Evil:%201", "/v1/models/a%00b", "/v1/models/%FF", "/v1/files/%2e%2e/x",
     "/v1/files/a%2F%2Fb", "/v1/chat/completions/"],
)  # fmt: skip
def test_a_v1_path_that_decodes_to_control_bytes_or_dot_segments_is_refused(
    recorded_server, recorder, target
):
    request = (
        f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {SECURITY_KEY}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    answer = raw_exchange(recorded_server.port, request)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
    assert recorder.requests == []
