"""Every row of the error table (README "Errors"), classification, and redaction of upstream messages."""

from __future__ import annotations

import httpx2
import openai
import pytest

from openai_proxy import errors
from openai_proxy.upstream.classify import classify
from tests.conftest import SECURITY_KEY, error_of, post_json
from tests.support.fake_upstream import delay, error, raw, reset, truncated_json

CHAT = "/v1/chat/completions"


def chat(client, **extra):
    body = {
        "security_key": SECURITY_KEY,
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
    }
    return post_json(client, "/openai", {**body, **extra})


def test_bad_input_400(client):
    r = client.post("/openai", data=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    err = error_of(r)
    assert err["type"] == "validation_error" and err["code"] == "OPENAI_PROXY_BAD_REQUEST"
    assert err["message"].startswith("Invalid JSON body: ")


def test_auth_403(client):
    r = post_json(client, "/openai", {"security_key": "wrong", "model": "m", "messages": []})
    assert r.status_code == 403
    assert error_of(r) == {"message": "Invalid security_key", "type": "forbidden", "code": "OPENAI_PROXY_FORBIDDEN",
                           "requestId": r.headers["X-Proxy-Request-Id"]}  # fmt: skip


def test_body_too_large_413(make_app, fake):
    client = make_app(OPENAI_PROXY_MAX_BODY_BYTES="1000").test_client()
    r = post_json(client, "/openai", {"security_key": SECURITY_KEY, "pad": "x" * 2000})
    assert r.status_code == 413
    err = error_of(r)
    assert err["type"] == "payload_too_large" and err["code"] == "OPENAI_PROXY_PAYLOAD_TOO_LARGE"
    assert err["message"] == "Request body exceeds the 1000-byte limit"
    assert fake.requests == []


@pytest.mark.parametrize("status", [400, 401, 404, 409, 422, 429, 500, 503])
def test_upstream_error_keeps_status_and_shape(client, fake, status):
    fake.push("POST", CHAT, error(status, "Something upstream", type="server_error", code="boom"))
    r = chat(client)
    assert r.status_code == status
    err = error_of(r)
    assert err["message"] == f"{status} Something upstream"
    assert err["type"] == "upstream_api_error" and err["code"] == "OPENAI_PROXY_UPSTREAM_API_ERROR"
    assert err["upstream"]["status"] == status
    assert err["upstream"]["type"] == "server_error" and err["upstream"]["code"] == "boom"
    assert err["upstream"]["requestId"].startswith("req_fake_")


def test_upstream_retry_after_is_passed_on(client, fake):
    fake.push("POST", CHAT, error(429, "Rate limit reached", type="requests", headers={"Retry-After": "7"}))
    r = chat(client)
    assert r.status_code == 429
    assert r.headers["Retry-After"] == "7"


def test_upstream_error_message_secrets_are_redacted(client, fake):
    leaked = (
        "Incorrect API key provided: sk-proj-abcdefghijklmnopqrstuvwxyz1234. Also Bearer sk-zzzzzzzzzzzz9876"
    )
    fake.push("POST", CHAT, error(401, leaked, code="invalid_api_key"))
    r = chat(client)
    assert r.status_code == 401
    message = error_of(r)["message"]
    assert "sk-proj-abcdefghijklmnopqrstuvwxyz1234" not in message
    assert "sk-zzzzzzzzzzzz9876" not in message
    assert message == "401 Incorrect API key provided: ***1234. Also Bearer ***9876"
    assert b"abcdefghijklmnop" not in r.data


def test_upstream_non_json_error_body(client, fake):
    fake.push("POST", CHAT, raw(502, b"<html>Bad gateway</html>"))
    r = chat(client)
    assert r.status_code == 502
    err = error_of(r)
    assert err["type"] == "upstream_api_error"
    assert err["message"] == "502 <html>Bad gateway</html>"


def test_upstream_garbage_200_is_502_bad_response(client, fake):
    fake.push("POST", CHAT, raw(200, b"<html>not json</html>"))
    r = chat(client)
    assert r.status_code == 502
    err = error_of(r)
    assert err["type"] == "upstream_bad_response" and err["code"] == "OPENAI_PROXY_UPSTREAM_BAD_RESPONSE"


def test_upstream_reset_is_502_transport(client, fake, records):
    fake.push("POST", CHAT, reset())
    r = chat(client)
    assert r.status_code == 502
    err = error_of(r)
    assert err["type"] == "upstream_transport" and err["code"] == "OPENAI_PROXY_TRANSPORT"
    assert records[-1]["result"] == "upstream_transport" and records[-1]["status"] == 502


def test_upstream_truncated_body_is_502_transport(client, fake):
    fake.push("POST", CHAT, truncated_json())
    r = chat(client)
    assert r.status_code == 502
    assert error_of(r)["type"] == "upstream_transport"


def test_upstream_unreachable_is_502_transport(make_app):
    from tests.conftest import free_port

    client = make_app(OPENAI_BASE_URL=f"http://127.0.0.1:{free_port()}/v1").test_client()
    r = chat(client)
    assert r.status_code == 502
    err = error_of(r)
    assert err["type"] == "upstream_transport"
    assert err["message"].startswith("Could not reach OpenAI: ")


def test_no_headers_within_timeout_is_504(client, fake, records):
    fake.push("POST", CHAT, delay(2))
    r = chat(client, timeout=200)
    assert r.status_code == 504
    err = error_of(r)
    assert err == {"message": "Timeout while waiting for OpenAI response", "type": "upstream_timeout",
                   "code": "OPENAI_PROXY_TIMEOUT", "requestId": r.headers["X-Proxy-Request-Id"]}  # fmt: skip
    assert records[-1]["durationMs"] < 1500
    assert records[-1]["result"] == "upstream_timeout"


def test_overload_503_with_retry_after(make_app, fake, records):
    app = make_app(OPENAI_PROXY_MAX_PARALLEL_REQUESTS="1")
    gate = app.extensions["openai_proxy"].gate
    slot = gate.try_acquire()
    try:
        r = chat(app.test_client())
    finally:
        gate.release(slot)
    assert r.status_code == 503
    assert r.headers["Retry-After"] == "1"
    err = error_of(r)
    assert err["type"] == "proxy_overloaded" and err["code"] == "OPENAI_PROXY_OVERLOADED"
    assert app.records[-1]["overloaded"] is True and app.records[-1]["result"] == "overloaded"
    assert fake.requests == []
    assert chat(app.test_client()).status_code == 200


def test_bug_is_500_internal(client, fake, monkeypatch):
    from openai_proxy.routes import chat as chat_routes

    def broken(body):
        raise RuntimeError("sk-secret-in-a-bug-message-1234")

    monkeypatch.setattr(chat_routes, "build_chat_body", broken)
    r = chat(client)
    assert r.status_code == 500
    assert error_of(r) == {"message": "Internal proxy error", "type": "internal_error",
                           "code": "OPENAI_PROXY_INTERNAL", "requestId": r.headers["X-Proxy-Request-Id"]}  # fmt: skip


def test_incoming_request_id_is_echoed_in_error(client):
    r = post_json(client, "/openai", {"security_key": "bad"}, headers={"X-Request-Id": "abc-123"})
    assert error_of(r)["incomingRequestId"] == "abc-123"
    assert r.headers["X-Incoming-Request-Id"] == "abc-123"


# ---- classification by type before text --------------------------------------------------------------


def _status_error(status: int, message: str) -> openai.APIStatusError:
    request = httpx2.Request("POST", "https://api.openai.com/v1/chat/completions")
    response = httpx2.Response(status, json={"error": {"message": message}}, request=request)
    return openai.APIStatusError(message, response=response, body={"error": {"message": message}})


def test_status_error_mentioning_timeout_keeps_its_status():
    err = classify(_status_error(400, "Request timed out waiting for tool; timeout exceeded"))
    assert isinstance(err, errors.UpstreamAPIError)
    assert err.status == 400


def test_classify_types():
    request = httpx2.Request("GET", "https://api.openai.com/v1/x")
    assert isinstance(classify(openai.APITimeoutError(request=request)), errors.UpstreamTimeout)
    assert isinstance(classify(openai.APIConnectionError(request=request)), errors.UpstreamTransport)
    assert isinstance(classify(httpx2.RemoteProtocolError("peer closed")), errors.UpstreamTransport)
    assert isinstance(classify(httpx2.ReadTimeout("slow")), errors.UpstreamTimeout)
    assert isinstance(classify(KeyError("x")), errors.Internal)


def test_classify_text_is_the_last_resort():
    assert isinstance(classify(openai.OpenAIError("socket timed out")), errors.UpstreamTimeout)
    assert isinstance(classify(openai.OpenAIError("read ECONNRESET")), errors.UpstreamTransport)
    assert isinstance(classify(openai.OpenAIError("something else")), errors.Internal)
