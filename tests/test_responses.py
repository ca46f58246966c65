"""The Responses routes: create, compact, input tokens, retrieve, input items, cancel, delete."""

from __future__ import annotations

import pytest

from tests.conftest import SECURITY_KEY, error_of, post_json, safety_id
from tests.support.fake_upstream import response_object

KEY = f"security_key={SECURITY_KEY}"


def test_create_adds_output_text_and_keeps_upstream_fields(client, fake, records):
    body = {"security_key": SECURITY_KEY, "model": "gpt-4o", "input": "Tell me a story.",
            "tools": [{"type": "web_search_preview"}], "stream": False, "timeout": 1000, "unknown_field": [1, 2]}  # fmt: skip
    r = post_json(client, "/openai2", body)
    assert r.status_code == 200
    answer = r.get_json()
    expected = response_object("gpt-4o")
    assert answer == {**expected, "output_text": "In a peaceful grove. The end."}
    assert r.data.startswith(b'{"id":"resp_fake123","object":"response"')
    sent = fake.last("/v1/responses", "POST").json
    assert sent == {"model": "gpt-4o", "input": "Tell me a story.", "tools": [{"type": "web_search_preview"}],
                    "unknown_field": [1, 2], "safety_identifier": safety_id()}  # fmt: skip
    assert records[-1]["usage"] == {"prompt_tokens": 36, "completion_tokens": 87, "cached_tokens": 4,
                                    "total_tokens": 123}  # fmt: skip
    assert records[-1]["endpoint"] == "/openai2" and records[-1]["model"] == "gpt-4o"


def test_create_output_text_is_empty_without_message_output(client, fake):
    fake.push("POST", "/v1/responses", lambda req, conn: conn.send_json(200, {"id": "resp_2", "output": []}))
    r = post_json(client, "/openai2", {"security_key": SECURITY_KEY, "model": "gpt-4o", "input": "x"})
    assert r.get_json() == {"id": "resp_2", "output": [], "output_text": ""}


def test_compact_forwards_and_relays(client, fake):
    r = post_json(
        client, "/openai2/compact", {"security_key": SECURITY_KEY, "model": "gpt-5", "input": "Summarize."}
    )
    assert r.status_code == 200
    assert r.get_json()["object"] == "response.compaction"
    assert fake.last("/v1/responses/compact").json == {"model": "gpt-5", "input": "Summarize."}


def test_input_tokens_counts(client, fake):
    r = post_json(
        client,
        "/openai2/input_tokens",
        {"security_key": SECURITY_KEY, "model": "gpt-4o", "input": "Count me"},
    )
    assert r.status_code == 200
    assert r.get_json() == {"object": "response.input_tokens", "input_tokens": 11}
    assert fake.last("/v1/responses/input_tokens").json == {"model": "gpt-4o", "input": "Count me"}


def test_input_tokens_empty_body_is_empty_object(client, fake):
    r = client.post("/openai2/input_tokens", headers={"Authorization": f"Bearer {SECURITY_KEY}"})
    assert r.status_code == 200
    assert fake.last("/v1/responses/input_tokens").body == b"{}"


def test_retrieve_with_query_parameters(client, fake):
    r = client.get(f"/openai2/resp_abc123?{KEY}&include=file_search_call.results"
                   "&include=reasoning.encrypted_content&include_obfuscation=false&starting_after=3&timeout=2000")  # fmt: skip
    assert r.status_code == 200
    answer = r.get_json()
    assert answer["id"] == "resp_abc123"
    assert answer["output_text"] == "In a peaceful grove. The end."
    sent = fake.last("/v1/responses/resp_abc123", "GET")
    assert sent.query == {"include[]": ["file_search_call.results", "reasoning.encrypted_content"],
                          "include_obfuscation": ["false"], "starting_after": ["3"]}  # fmt: skip


def test_retrieve_accepts_bracket_include(client, fake):
    r = client.get(f"/openai2/resp_1?{KEY}&include[]=message.output_text.logprobs")
    assert r.status_code == 200
    assert fake.last("/v1/responses/resp_1").query == {"include[]": ["message.output_text.logprobs"]}


def test_retrieve_invalid_include_lists_each_bad_value(client, fake):
    r = client.get(f"/openai2/resp_1?{KEY}&include=a&include=file_search_call.results&include=b")
    assert r.status_code == 400
    assert error_of(r)["message"] == "Invalid include value(s): a, b"
    assert fake.requests == []


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("include_obfuscation=yes", "include_obfuscation must be one of: true, false"),
        ("starting_after=abc", "starting_after must be an integer"),
        ("starting_after=1.5", "starting_after must be an integer"),
        ("starting_after=-1", "starting_after must be an integer >= 0"),
        ("stream=maybe", "stream must be true or false"),
    ],
)
def test_retrieve_query_validation(client, fake, query, message):
    r = client.get(f"/openai2/resp_1?{KEY}&{query}")
    assert r.status_code == 400
    assert error_of(r)["message"] == message
    assert fake.requests == []


@pytest.mark.parametrize("rid", ["resp a", "resp?x=1", "resp#frag", "..", "résp"])
def test_retrieve_percent_encodes_ids(client, fake, rid):
    from urllib.parse import quote

    r = client.get(f"/openai2/{quote(rid, safe='')}?{KEY}")
    assert r.status_code == 200
    sent = fake.requests[-1]
    assert sent.path == "/v1/responses/" + quote(rid, safe="").replace(".", "%2E")
    assert sent.query_string == ""


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/openai2/"), ("GET", "/openai2"), ("DELETE", "/openai2/"), ("DELETE", "/openai2"),
     ("GET", "/openai2/%20"), ("GET", "/openai2//input_items"), ("POST", "/openai2//cancel")],
)  # fmt: skip
def test_missing_response_id(client, fake, method, path):
    r = client.open(path, method=method, headers={"X-Security-Key": SECURITY_KEY})
    assert r.status_code == 400
    assert error_of(r)["message"] == "Missing response_id"
    assert fake.requests == []


def test_input_items_answers_the_list_not_a_page_wrapper(client, fake):
    r = client.get(
        f"/openai2/resp_abc123/input_items?{KEY}&limit=20&order=desc&after=msg_0&include=message.input_image.image_url"
    )
    assert r.status_code == 200
    from tests.support.fake_upstream import INPUT_ITEMS

    assert r.get_json() == {"object": "list", "data": INPUT_ITEMS[1:], "first_id": "msg_1", "last_id": "msg_2",
                            "has_more": False}  # fmt: skip
    sent = fake.last("/v1/responses/resp_abc123/input_items")
    assert sent.query == {"after": ["msg_0"], "include[]": ["message.input_image.image_url"],
                          "limit": ["20"], "order": ["desc"]}  # fmt: skip


@pytest.mark.parametrize(
    ("query", "message"),
    [("limit=ten", "limit must be an integer"), ("limit=0", "limit must be an integer >= 1"),
     ("order=up", "order must be one of: asc, desc"), ("include=nope", "Invalid include value(s): nope")],
)  # fmt: skip
def test_input_items_validation(client, fake, query, message):
    r = client.get(f"/openai2/resp_1/input_items?{KEY}&{query}")
    assert r.status_code == 400
    assert error_of(r)["message"] == message


def test_cancel_posts_without_body(client, fake):
    r = post_json(client, "/openai2/resp_bg1/cancel", {"security_key": SECURITY_KEY})
    assert r.status_code == 200
    assert r.get_json()["status"] == "cancelled"
    sent = fake.last("/v1/responses/resp_bg1/cancel", "POST")
    assert sent.body == b""


def test_cancel_with_empty_body_and_header_key(client, fake):
    r = client.post("/openai2/resp_bg1/cancel", headers={"X-Security-Key": SECURITY_KEY})
    assert r.status_code == 200


def test_delete_answers_upstream_json(client, fake):
    r = client.delete(f"/openai2/resp_abc123?{KEY}")
    assert r.status_code == 200
    assert r.get_json() == {"id": "resp_abc123", "object": "response", "deleted": True}
    assert fake.last("/v1/responses/resp_abc123", "DELETE")


def test_openai2_stream_strip_and_not_forwarded(client, fake):
    r = post_json(client, "/openai2", {"security_key": SECURITY_KEY, "model": "m", "input": "x", "stream": 0})
    assert r.status_code == 200
    assert "stream" not in fake.last("/v1/responses").json


def test_get_query_overrides_become_headers(client, fake):
    r = client.get(
        f"/openai2/resp_1?{KEY}&openai_api_key=sk-query-override-1234&project=proj_q&organization=org_q"
    )
    assert r.status_code == 200
    sent = fake.last("/v1/responses/resp_1")
    assert sent.headers["authorization"] == "Bearer sk-query-override-1234"
    assert sent.headers["openai-project"] == "proj_q"
    assert sent.headers["openai-organization"] == "org_q"
    assert sent.query_string == ""
