"""POST /openai and POST /chatgpt: forwarding, stripping, the image merge, validation, answers."""

from __future__ import annotations

import json

import pytest

from tests.conftest import SECURITY_KEY, UPSTREAM_KEY, error_of, post_json, safety_id
from tests.support.fake_upstream import chat_completion

CHAT = "/v1/chat/completions"


def chat_body(**extra):
    body = {"security_key": SECURITY_KEY, "model": "gpt-4o-mini",
            "messages": [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "What is TypeScript?"}]}  # fmt: skip
    body.update(extra)
    return body


def test_chat_forwards_body_in_client_order_and_answers_upstream_bytes(client, fake):
    body = {"temperature": 0.7, **chat_body(), "max_tokens": 500, "x_custom": {"b": 1, "a": [1.5, 2]}}
    r = post_json(client, "/openai", body)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/json"
    assert r.get_json() == chat_completion("gpt-4o-mini")
    sent = fake.last(CHAT, "POST")
    assert list(sent.json) == [
        "temperature",
        "model",
        "messages",
        "max_tokens",
        "x_custom",
        "safety_identifier",
    ]
    assert sent.json["x_custom"] == {"b": 1, "a": [1.5, 2]}
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert "openai-project" not in sent.headers and "openai-organization" not in sent.headers
    assert sent.headers["content-type"] == "application/json"


def test_chat_answer_is_upstream_bytes_unchanged(client, fake):
    raw = b'{"id":"chatcmpl-1","object":"chat.completion","choices":[],"weird":1.10,"usage":{"prompt_tokens":1}}'
    fake.push("POST", CHAT, lambda req, conn: conn.send(200, raw))
    r = post_json(client, "/openai", chat_body())
    assert r.status_code == 200
    assert r.data == raw


def test_chat_strips_control_fields_and_sends_overrides_as_headers(client, fake):
    body = chat_body(
        openai_api_key="sk-override-key-999999", project="proj_123", organization="org_456", timeout=5000
    )
    r = post_json(client, "/openai", body)
    assert r.status_code == 200
    sent = fake.last(CHAT)
    for name in ("security_key", "openai_api_key", "project", "organization", "timeout", "image"):
        assert name not in sent.json
    assert sent.headers["authorization"] == "Bearer sk-override-key-999999"
    assert sent.headers["openai-project"] == "proj_123"
    assert sent.headers["openai-organization"] == "org_456"


def test_chat_configured_project_and_org_are_sent_and_empty_override_means_unset(make_app, fake):
    client = make_app(OPENAI_PROJECT_KEY="proj_cfg", OPENAI_ORG_ID="org_cfg").test_client()
    r = post_json(client, "/openai", chat_body(project="", organization="", openai_api_key=""))
    assert r.status_code == 200
    sent = fake.last(CHAT)
    assert sent.headers["openai-project"] == "proj_cfg"
    assert sent.headers["openai-organization"] == "org_cfg"
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


def test_chat_does_not_forward_client_auth_cookie_or_request_id(client, fake):
    r = post_json(client, "/openai", chat_body(),
                  headers={"Cookie": "session=abc", "X-Request-Id": "client-req-1", "X-Security-Key": SECURITY_KEY})  # fmt: skip
    assert r.status_code == 200
    sent = fake.last(CHAT)
    assert "cookie" not in sent.headers
    assert "x-request-id" not in sent.headers
    assert "x-security-key" not in sent.headers
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


@pytest.mark.parametrize("stream", [True, 1, "yes", "false", [], {}])
def test_chat_refuses_truthy_stream(client, fake, stream):
    r = post_json(client, "/openai", chat_body(stream=stream))
    assert r.status_code == 400
    assert error_of(r)["message"] == "Streaming is not supported on this endpoint"
    assert fake.count(CHAT) == 0


@pytest.mark.parametrize("stream", [False, 0, "", None])
def test_chat_accepts_falsy_stream(client, fake, stream):
    r = post_json(client, "/openai", chat_body(stream=stream))
    assert r.status_code == 200
    assert fake.last(CHAT).json["stream"] == stream


IMG_URL = {"type": "image_url", "image_url": {"url": "https://example.com/ant.jpg"}}


@pytest.mark.parametrize(
    ("messages", "image", "expected_messages"),
    [
        ([{"role": "user", "content": "What is this?"}], {"url": "https://example.com/ant.jpg"},
         [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, IMG_URL]}]),
        ([{"role": "user", "content": [{"type": "text", "text": "Look"}]}], {"url": "https://example.com/ant.jpg"},
         [{"role": "user", "content": [{"type": "text", "text": "Look"}, IMG_URL]}]),
        ([{"role": "user"}], {"url": "https://example.com/ant.jpg"}, [{"role": "user", "content": [IMG_URL]}]),
        ([{"role": "system", "content": "Be brief"}], {"url": "https://example.com/ant.jpg"},
         [{"role": "system", "content": "Be brief"}, {"role": "user", "content": [IMG_URL]}]),
        ([], {"url": "https://example.com/ant.jpg", "base64": "AAAA"}, [{"role": "user", "content": [IMG_URL]}]),
        ([{"role": "user", "content": "b64"}], {"base64": "iVBORw0KGgo="},
         [{"role": "user", "content": [{"type": "text", "text": "b64"},
                                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]),
        ([{"role": "user", "content": "jpeg"}], {"base64": "data:image/jpeg;base64,/9j/4AAQ"},
         [{"role": "user", "content": [{"type": "text", "text": "jpeg"},
                                        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}}]}]),
    ],
)  # fmt: skip
def test_chat_image_merge(client, fake, messages, image, expected_messages):
    r = post_json(client, "/openai", chat_body(messages=messages, image=image))
    assert r.status_code == 200
    sent = fake.last(CHAT).json
    assert sent["messages"] == expected_messages
    assert "image" not in sent


def test_chat_image_without_messages_creates_user_message(client, fake):
    body = chat_body(image={"url": "https://example.com/ant.jpg"})
    del body["messages"]
    r = post_json(client, "/openai", body)
    assert r.status_code == 200
    assert fake.last(CHAT).json["messages"] == [{"role": "user", "content": [IMG_URL]}]


@pytest.mark.parametrize("image", ["https://x/y.png", 42, [], {}, {"url": ""}, {"base64": ""}, {"url": 5},
                                   {"path": "/etc/passwd"}, True])  # fmt: skip
def test_chat_invalid_image_is_400_before_any_slot(make_app, fake, image):
    app = make_app(OPENAI_PROXY_MAX_PARALLEL_REQUESTS="1")
    gate = app.extensions["openai_proxy"].gate
    slot = gate.try_acquire()  # the only slot is taken: a slot-taking path would answer 503
    try:
        r = post_json(app.test_client(), "/openai", chat_body(image=image))
    finally:
        gate.release(slot)
    assert r.status_code == 400
    assert error_of(r)["message"] == "Invalid image payload"
    assert fake.count(CHAT) == 0


def test_chat_image_with_non_list_messages_is_400(client, fake):
    r = post_json(client, "/openai", chat_body(messages="hi", image={"url": "https://x/y.png"}))
    assert r.status_code == 400
    assert error_of(r)["message"] == "messages must be an array"


def test_chat_null_image_is_ignored(client, fake):
    r = post_json(client, "/openai", chat_body(image=None))
    assert r.status_code == 200
    assert "image" not in fake.last(CHAT).json


def test_chat_curl_style_form_content_type_is_parsed_as_json(client, fake):
    r = client.post("/openai", data=json.dumps(chat_body()),
                    headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert r.status_code == 200
    assert fake.last(CHAT).json["model"] == "gpt-4o-mini"


# ---- /chatgpt --------------------------------------------------------------------------------------


def test_chatgpt_sends_system_and_prompt_with_default_model(client, fake):
    r = post_json(client, "/chatgpt", {"security_key": SECURITY_KEY, "prompt": "Explain quantum computing"})
    assert r.status_code == 200
    sent = fake.last(CHAT).json
    assert sent == {
        "model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": "You are an AI assistant."},
                     {"role": "user", "content": "Explain quantum computing"}],
        "safety_identifier": safety_id(),
    }  # fmt: skip
    answer = r.get_json()
    assert list(answer) == ["role", "id", "parentMessageId", "text", "detail"]
    assert answer["role"] == "assistant"
    assert answer["id"] == "chatcmpl-fake123"
    assert answer["text"] == "Hello from the fake upstream."
    assert answer["detail"] == chat_completion("gpt-4o-mini")
    assert len(answer["parentMessageId"]) == 36


def test_chatgpt_uses_configured_default_model_and_passes_options(make_app, fake):
    client = make_app(DEFAULT_MODEL="gpt-4.1-nano").test_client()
    body = {"security_key": SECURITY_KEY, "prompt": "hi", "temperature": 0.8, "top_p": 1,
            "max_tokens": 10, "max_completion_tokens": 20, "openai_api_key": "sk-override-abcdefgh"}  # fmt: skip
    assert post_json(client, "/chatgpt", body).status_code == 200
    sent = fake.last(CHAT)
    assert sent.json["model"] == "gpt-4.1-nano"
    assert sent.json["temperature"] == 0.8 and sent.json["top_p"] == 1
    assert sent.json["max_tokens"] == 10 and sent.json["max_completion_tokens"] == 20
    assert sent.headers["authorization"] == "Bearer sk-override-abcdefgh"


def test_chatgpt_model_override(client, fake):
    assert (
        post_json(
            client, "/chatgpt", {"security_key": SECURITY_KEY, "prompt": "x", "model": "gpt-4o"}
        ).status_code
        == 200
    )
    assert fake.last(CHAT).json["model"] == "gpt-4o"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({}, "Missing prompt"),
        ({"prompt": ""}, "Missing prompt"),
        ({"prompt": 12}, "prompt must be a string"),
        ({"prompt": "x", "temperature": 2.5}, "temperature must be a number between 0 and 2"),
        ({"prompt": "x", "temperature": "0.5"}, "temperature must be a number between 0 and 2"),
        ({"prompt": "x", "top_p": -0.1}, "top_p must be a number between 0 and 1"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens must be a positive integer"),
        ({"prompt": "x", "max_tokens": 1.5}, "max_tokens must be a positive integer"),
        ({"prompt": "x", "max_completion_tokens": True}, "max_completion_tokens must be a positive integer"),
        ({"prompt": "x", "model": 4}, "model must be a string"),
    ],
)
def test_chatgpt_validation(client, fake, extra, message):
    r = post_json(client, "/chatgpt", {"security_key": SECURITY_KEY, **extra})
    assert r.status_code == 400
    assert error_of(r) == {"message": message, "type": "validation_error", "code": "OPENAI_PROXY_BAD_REQUEST",
                           "requestId": r.headers["X-Proxy-Request-Id"]}  # fmt: skip
    assert fake.count(CHAT) == 0


def test_chatgpt_uses_the_json_error_shape_for_upstream_errors(client, fake):
    from tests.support.fake_upstream import error

    fake.push("POST", CHAT, error(400, "Invalid model", code="model_not_found"))
    r = post_json(client, "/chatgpt", {"security_key": SECURITY_KEY, "prompt": "x"})
    assert r.status_code == 400
    err = error_of(r)
    assert err["message"] == "400 Invalid model"
    assert err["type"] == "upstream_api_error"
    assert err["upstream"]["code"] == "model_not_found"
