"""Authentication in all its forms (README "Routes"), and the never-open rule."""

from __future__ import annotations

import pytest

from openai_proxy.inbound.auth import constant_time_equal
from tests.conftest import SECURITY_KEY, error_of, post_json

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def test_body_key(client):
    assert post_json(client, "/openai", {"security_key": SECURITY_KEY, **BODY}).status_code == 200


def test_bearer_header(client):
    r = post_json(client, "/openai", BODY, headers={"Authorization": f"Bearer {SECURITY_KEY}"})
    assert r.status_code == 200


def test_x_security_key_header(client):
    assert post_json(client, "/openai", BODY, headers={"X-Security-Key": SECURITY_KEY}).status_code == 200


def test_query_key_on_get_and_delete(client):
    assert client.get(f"/openai2/resp_1?security_key={SECURITY_KEY}").status_code == 200
    assert client.delete(f"/openai2/resp_1?security_key={SECURITY_KEY}").status_code == 200


def test_header_key_on_get(client):
    assert (
        client.get("/openai2/resp_1", headers={"Authorization": f"Bearer {SECURITY_KEY}"}).status_code == 200
    )


def test_query_key_on_json_route(client):
    assert post_json(client, f"/openai?security_key={SECURITY_KEY}", BODY).status_code == 200


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        (BODY, {}, "Missing security_key"),
        ({"security_key": "", **BODY}, {}, "Missing security_key"),
        ({"security_key": 12345, **BODY}, {}, "Missing security_key"),
        ({"security_key": SECURITY_KEY + "x", **BODY}, {}, "Invalid security_key"),
        ({"security_key": SECURITY_KEY[:-1], **BODY}, {}, "Invalid security_key"),
        (BODY, {"Authorization": "Basic " + SECURITY_KEY}, "Missing security_key"),
        (BODY, {"Authorization": "Bearer nope"}, "Invalid security_key"),
        (BODY, {"X-Security-Key": "nope"}, "Invalid security_key"),
    ],
)
def test_rejections(client, fake, body, headers, message):
    r = post_json(client, "/openai", body, headers=headers)
    assert r.status_code == 403
    assert error_of(r)["message"] == message
    assert fake.requests == []


@pytest.mark.parametrize("value", [None, ""])
def test_no_security_key_configured_means_every_api_route_is_403(make_app, fake, value):
    app = make_app(SECURITY_KEY=value) if value is not None else make_app(SECURITY_KEY=None)
    client = app.test_client()
    calls = [
        lambda: post_json(client, "/openai", {"security_key": "", **BODY}),
        lambda: post_json(client, "/openai", BODY, headers={"Authorization": "Bearer "}),
        lambda: post_json(client, "/chatgpt", {"prompt": "x"}),
        lambda: post_json(client, "/embeddings", {"input": "x"}),
        lambda: post_json(client, "/openai2", {"input": "x"}),
        lambda: post_json(client, "/openai2/compact", {"input": "x"}),
        lambda: client.post("/openai2/input_tokens"),
        lambda: client.get("/openai2/resp_1?security_key="),
        lambda: client.get("/openai2/resp_1/input_items"),
        lambda: client.post("/openai2/resp_1/cancel"),
        lambda: client.delete("/openai2/resp_1"),
    ]
    for call in calls:
        r = call()
        assert r.status_code == 403
        assert error_of(r)["message"] == "The proxy has no SECURITY_KEY configured; API routes are disabled"
    assert fake.requests == []


def test_malformed_body_is_400_before_auth(client):
    r = client.post("/openai", data=b"{oops", headers={"Content-Type": "application/json"})
    assert r.status_code == 400


def test_constant_time_equal():
    assert constant_time_equal("abc", "abc")
    assert not constant_time_equal("abc", "abd")
    assert not constant_time_equal("abc", "abcd")
    assert not constant_time_equal("", "abc")
    assert constant_time_equal("ключ", "ключ")
