"""Request ids, CORS, Server-Timing, 404s, OPTIONS, body limits and the completion record."""

from __future__ import annotations

import json
import re
import socket
import uuid

import pytest

from tests.conftest import ISO_MS, SECURITY_KEY, error_of, post_json

CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "Origin, X-Requested-With, Content-Type, Accept, X-Request-Id, Authorization, X-Security-Key",
    "Access-Control-Expose-Headers": "X-Proxy-Request-Id, X-Incoming-Request-Id, Retry-After",
}
CHAT_BODY = {
    "security_key": SECURITY_KEY,
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "hi"}],
}


def assert_cors(response):
    for name, value in CORS.items():
        assert response.headers.get(name) == value, name
        assert len(response.headers.getlist(name)) == 1, name


def assert_request_id(response):
    rid = response.headers["X-Proxy-Request-Id"]
    assert uuid.UUID(rid).version == 4


@pytest.mark.parametrize(
    "call",
    [
        lambda c: post_json(c, "/openai", CHAT_BODY),
        lambda c: post_json(c, "/openai", {"security_key": "bad"}),
        lambda c: c.post("/openai", data=b"[1]"),
        lambda c: c.get("/"),
        lambda c: c.get("/nope"),
        lambda c: c.get("/openai"),
        lambda c: c.options("/anything/at/all"),
        lambda c: c.options(
            "/openai", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
        ),
        lambda c: post_json(c, "/openai", CHAT_BODY, headers={"Origin": "https://app.example"}),
        lambda c: post_json(
            c,
            "/openai",
            CHAT_BODY,
            headers={"Origin": "https://app.example", "Access-Control-Request-Private-Network": "true"},
        ),
    ],
)
def test_every_response_has_request_id_and_cors(client, call):
    r = call(client)
    assert_request_id(r)
    assert_cors(r)


def test_a_request_asking_about_private_networks_gets_flask_cors_answer(client):
    # The fixed headers are added only where flask-cors would add exactly them; this one it answers.
    ask = {"Origin": "https://app.example", "Access-Control-Request-Private-Network": "true"}
    assert post_json(client, "/openai", CHAT_BODY, headers=ask).headers.getlist(
        "Access-Control-Allow-Private-Network"
    ) == ["false"]
    assert "Access-Control-Allow-Private-Network" not in post_json(client, "/openai", CHAT_BODY).headers


def test_incoming_request_id_is_echoed(client, records):
    r = post_json(client, "/openai", CHAT_BODY, headers={"X-Request-Id": "trace-42"})
    assert r.headers["X-Incoming-Request-Id"] == "trace-42"
    assert records[-1]["incomingRequestId"] == "trace-42"
    assert records[-1]["requestId"] == r.headers["X-Proxy-Request-Id"]


def test_no_incoming_header_without_client_id(client):
    assert "X-Incoming-Request-Id" not in post_json(client, "/openai", CHAT_BODY).headers


def test_server_timing(client):
    r = post_json(client, "/openai", CHAT_BODY)
    assert re.fullmatch(r"upstream;dur=\d+\.\d, proxy;dur=\d+\.\d", r.headers["Server-Timing"])
    r = post_json(client, "/openai", {"security_key": "bad"})
    assert re.fullmatch(r"proxy;dur=\d+\.\d", r.headers["Server-Timing"])


@pytest.mark.parametrize("path", ["/", "/openai", "/openai2/x/y/z", "/nope", "/v2/chat"])
def test_options_on_any_path_is_empty_200(client, path):
    r = client.options(path)
    assert r.status_code == 200
    assert r.data == b""
    assert_cors(r)


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/nope"), ("GET", "/openai"), ("PUT", "/openai"), ("POST", "/"), ("PATCH", "/openai2/x"),
     ("POST", "/openai2/x"), ("GET", "/openai2/x/cancel"), ("POST", "/embeddings/x"), ("GET", "/openai/")],
)  # fmt: skip
def test_unknown_path_or_wrong_method_is_404(client, method, path):
    r = client.open(path, method=method)
    assert r.status_code == 404
    err = error_of(r)
    assert err["message"] == "Not Found"
    assert err["code"] == "OPENAI_PROXY_NOT_FOUND"


def test_index_page(client):
    r = client.get("/")
    assert r.status_code == 200
    assert r.mimetype == "text/html"
    assert b"The proxy is running." in r.data
    assert SECURITY_KEY.encode() not in r.data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "Request body is empty; expected a JSON object"),
        (b"   \n", "Request body is empty; expected a JSON object"),
        (b"[1, 2]", "Request body must be a JSON object"),
        (b'"text"', "Request body must be a JSON object"),
        (b"null", "Request body must be a JSON object"),
        (b"42", "Request body must be a JSON object"),
    ],
)
def test_body_shape_errors(client, fake, data, message):
    r = client.post("/openai", data=data, headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert error_of(r)["message"] == message
    assert fake.requests == []


@pytest.mark.parametrize("data", [b"{", b'{"a": }', b'{"a": NaN}', b"\xff\xfe", b'{"a": 1} trailing'])
def test_invalid_json(client, data):
    r = client.post("/openai", data=data, headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert error_of(r)["message"].startswith("Invalid JSON body: ")


def test_body_limit_uses_content_length_before_reading(make_app, fake):
    app = make_app(OPENAI_PROXY_MAX_BODY_BYTES="100")
    client = app.test_client()

    class Exploding:
        """A body stream that fails if anything reads it."""

        def read(self, *a):
            raise AssertionError("the oversized body was read")

        readline = read

    environ = {"CONTENT_LENGTH": "5000", "CONTENT_TYPE": "application/json", "wsgi.input": Exploding()}
    r = client.post("/openai", environ_overrides=environ)
    assert r.status_code == 413
    assert error_of(r)["message"] == "Request body exceeds the 100-byte limit"


def test_body_limit_applies_to_chunked_bodies(make_app, fake):
    import io

    client = make_app(OPENAI_PROXY_MAX_BODY_BYTES="100").test_client()
    payload = json.dumps({**CHAT_BODY, "pad": "x" * 500}).encode()
    environ = {
        "wsgi.input_terminated": True,
        "HTTP_TRANSFER_ENCODING": "chunked",
        "wsgi.input": io.BytesIO(payload),
    }
    r = client.post("/openai", environ_overrides=environ, headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert fake.requests == []


def test_body_at_the_limit_is_accepted(make_app, fake):
    payload = json.dumps(CHAT_BODY).encode()
    client = make_app(OPENAI_PROXY_MAX_BODY_BYTES=str(len(payload))).test_client()
    r = client.post("/openai", data=payload, headers={"Content-Type": "application/json"})
    assert r.status_code == 200


def test_completion_record_fields(client, records, capsys):
    r = post_json(client, "/openai", {**CHAT_BODY, "timeout": 5000}, headers={"X-Request-Id": "in-1"})
    assert r.status_code == 200
    entry = records[-1]
    assert set(entry) == {"event", "requestId", "incomingRequestId", "upstreamRequestId", "endpoint", "method",
                          "model", "stream", "timeoutMs", "timeoutSource", "start", "durationMs", "upstreamMs",
                          "result", "status", "retries", "overloaded", "cancelled", "usage", "error", "pid",
                          "client", "attempts", "upstreamModel", "costUsd", "host", "usageSource",
                          "serviceTier", "traceId"}  # fmt: skip
    assert entry["traceId"] is None  # tracing is off (tests/test_tracing.py)
    assert entry["event"] == "completion"
    assert entry["host"] == socket.gethostname()  # OPENAI_PROXY_HOST_NAME's default
    assert entry["requestId"] == r.headers["X-Proxy-Request-Id"]
    assert entry["incomingRequestId"] == "in-1"
    assert entry["upstreamRequestId"].startswith("req_fake_")
    assert entry["endpoint"] == "/openai" and entry["method"] == "POST"
    assert entry["model"] == "gpt-4o-mini" and entry["stream"] is False
    assert entry["timeoutMs"] == 5000 and entry["timeoutSource"] == "provided"
    assert re.fullmatch(ISO_MS, entry["start"])  # the one time format (openai_proxy.jsonio.iso)
    assert entry["durationMs"] >= entry["upstreamMs"] >= 0
    assert entry["result"] == "ok" and entry["status"] == 200
    assert entry["retries"] == 0 and entry["overloaded"] is False and entry["cancelled"] is False
    assert entry["usage"] == {
        "prompt_tokens": 25,
        "completion_tokens": 7,
        "cached_tokens": 3,
        "total_tokens": 32,
    }
    assert (entry["usageSource"], entry["serviceTier"]) == ("upstream", None)
    assert entry["error"] is None
    # The same record is one JSON line on stdout.
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [line for line in lines if line.get("requestId") == entry["requestId"]] == [entry]


def test_one_record_per_api_request_and_none_for_pages(client, records):
    post_json(client, "/openai", CHAT_BODY)
    post_json(client, "/openai", {"security_key": "bad"})
    client.get("/")
    client.get("/nope")
    assert [(e["endpoint"], e["status"]) for e in records] == [("/openai", 200), ("/openai", 403)]
    assert records[1]["result"] == "forbidden"
    assert records[1]["error"] == {
        "message": "Invalid security_key",
        "type": "forbidden",
        "code": "OPENAI_PROXY_FORBIDDEN",
    }


def test_record_endpoint_is_the_route_template(client, records):
    client.get(f"/openai2/resp_9/input_items?security_key={SECURITY_KEY}")
    assert records[-1]["endpoint"] == "/openai2/<response_id>/input_items"


def test_record_redacts_secrets(client, fake, records, capsys):
    from tests.support.fake_upstream import error

    fake.push(
        "POST", "/v1/chat/completions", error(401, "Incorrect API key provided: sk-live-abcdefghijklmnop5678")
    )
    post_json(client, "/openai", {**CHAT_BODY, "openai_api_key": "sk-live-abcdefghijklmnop5678"})
    out = capsys.readouterr()
    assert "abcdefghijklmnop" not in out.out + out.err
    assert records[-1]["error"]["message"] == "401 Incorrect API key provided: ***5678"
