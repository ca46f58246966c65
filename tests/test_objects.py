"""Stored objects belong to their client and key (contract §14): another client gets 404 in its route
family's shape and upstream is not called; follow-ups go to the pool key that created the object;
objects the proxy has no record of are open for `default` and closed for named clients unless allowed."""

from __future__ import annotations

import io
import json

import pytest

from openai_proxy.clients import ClientsFileError, load_clients
from tests.conftest import SECURITY_KEY, error_of, post_json, safety_id
from tests.support.fake_upstream import error, response_events, response_object, sse
from tests.support.files import write_clients
from tests.support.logpage import AUTH
from tests.support.postgres_server import wait_until
from tests.test_key_pool import KEY_A, NAMES, POOL, health_keys

A_KEY = "team-a-client-key-0123456789"
B_KEY = "team-b-client-key-9876543210"
C_KEY = "team-c-client-key-5555555555"
CLIENTS = f"""\
    [[client]]
    name = "team-a"
    key = "{A_KEY}"

    [[client]]
    name = "team-b"
    key = "{B_KEY}"

    [[client]]
    name = "team-c"
    key = "{C_KEY}"
    unknown_objects = "allow"
"""
A = {"Authorization": f"Bearer {A_KEY}"}
B = {"Authorization": f"Bearer {B_KEY}"}
C = {"Authorization": f"Bearer {C_KEY}"}
DEFAULT = {"Authorization": f"Bearer {SECURITY_KEY}"}
MODEL = "gpt-4o-mini"
CREATE = {"model": MODEL, "input": "Tell me a story."}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def clients_file(tmp_path, text: str = CLIENTS) -> str:
    return write_clients(tmp_path, text)


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    return {**POOL, "OPENAI_PROXY_CLIENTS_FILE": clients_file(tmp_path)}


@pytest.fixture
def app(make_app, env):
    return make_app(**env)


@pytest.fixture
def client(app):
    return app.test_client()


def creates_response(fake, rid: str, path: str = "/v1/responses") -> None:
    """The next create answers a Response with id `rid` (plain or streamed, as asked)."""

    def handler(req, conn):
        if req.json.get("stream"):
            events = response_events(MODEL)
            for event in events:
                if isinstance(event.get("response"), dict):
                    event["response"]["id"] = rid
            sse(events, event_names=True)(req, conn)
        else:
            conn.send_json(200, response_object(MODEL, rid=rid))

    fake.push("POST", path, handler)


def answers(fake, method: str, path: str, obj: dict, times: int | None = 1) -> None:
    fake.push(method, path, lambda req, conn: conn.send_json(200, obj), times=times)


def key_names(fake, path: str, method: str | None = None) -> list[str | None]:
    return [NAMES.get(key or "", key) for key in fake.keys(path, method)]


def openai_404(response, message: str) -> None:
    """OpenAI's error shape, with the proxy's code, for an object that is not the client's."""
    assert response.status_code == 404, response.get_data()
    body = response.get_json()
    request_id = response.headers["X-Proxy-Request-Id"]
    assert body == {"error": {"message": f"{message} (proxy request id {request_id})",
                              "type": "invalid_request_error", "param": None,
                              "code": "OPENAI_PROXY_NOT_FOUND"}}  # fmt: skip


def legacy_404(response, message: str) -> None:
    assert response.status_code == 404, response.get_data()
    error = error_of(response)
    assert error == {"message": message, "type": "not_found", "code": "OPENAI_PROXY_NOT_FOUND",
                     "requestId": response.headers["X-Proxy-Request-Id"]}  # fmt: skip


def spend_turns(client, n: int) -> None:
    """Calls that move the pool's rotation on, so a later follow-up would land on another key by turn."""
    for _ in range(n):
        assert post_json(client, "/v1/chat/completions", CHAT, headers=B).status_code == 200


# ---- /v1 ------------------------------------------------------------------------------------------


def test_v1_response_is_404_for_another_client_and_follow_ups_go_to_its_key(client, app, fake):
    creates_response(fake, "resp_a1")
    r = post_json(client, "/v1/responses", CREATE, headers=A)
    assert r.status_code == 200 and r.get_json()["id"] == "resp_a1"
    assert key_names(fake, "/v1/responses") == ["alpha"]
    path = "/v1/responses/resp_a1"
    refused = [
        client.get(path, headers=B),
        client.get(path + "?stream=true", headers=B),
        client.get(path + "/input_items", headers=B),
        client.post(path + "/cancel", headers=B),
        client.delete(path, headers=B),
        client.get("/v1/responses/resp%5Fa1", headers=B),  # upstream would decode it to resp_a1
    ]
    for r in refused:
        openai_404(r, "Response with id 'resp_a1' not found.")
    # A trailing slash is refused by the path rule (400) before the objects rule looks: closed too.
    assert client.get("/v1/responses/resp_a1/", headers=B).status_code == 400
    assert [rec["status"] for rec in app.records[-len(refused) - 1 : -1]] == [404] * len(refused)
    assert [rec["client"] for rec in app.records[-len(refused) - 1 :]] == ["team-b"] * (len(refused) + 1)
    assert [r.path for r in fake.requests if "resp_a1" in r.path or "resp%5Fa1" in r.path] == []
    spend_turns(client, 2)
    ok = [
        client.get(path, headers=A),
        client.get(path + "?stream=true", headers=A),
        client.get(path + "/input_items", headers=A),
        client.post(path + "/cancel", headers=A),
        client.delete(path, headers=A),
    ]
    assert [r.status_code for r in ok] == [200] * 5, [r.get_data()[:200] for r in ok]
    sent = [r for r in fake.requests if r.path.startswith(path)]
    assert [NAMES[r.headers["authorization"][len("Bearer ") :]] for r in sent] == ["alpha"] * 5
    assert app.records[-1]["attempts"] == [{"key": "alpha", "outcome": "ok", "status": 200}]


def test_v1_previous_response_id_and_conversation_of_another_client_are_404(client, fake):
    creates_response(fake, "resp_a2")
    assert post_json(client, "/v1/responses", CREATE, headers=A).status_code == 200
    answers(fake, "POST", "/v1/conversations", {"id": "conv_a", "object": "conversation"})
    r = post_json(client, "/v1/conversations", {}, headers=A)
    assert r.status_code == 200 and key_names(fake, "/v1/conversations") == ["beta"]
    before = len(fake.requests)
    for body, message in [
        ({**CREATE, "previous_response_id": "resp_a2"}, "Previous response with id 'resp_a2' not found."),
        ({**CREATE, "conversation": "conv_a"}, "Conversation with id 'conv_a' not found."),
        ({**CREATE, "conversation": {"id": "conv_a"}}, "Conversation with id 'conv_a' not found."),
    ]:
        for path in ("/v1/responses", "/v1/responses/input_tokens", "/v1/responses/compact"):
            openai_404(post_json(client, path, body, headers=B), message)
    openai_404(
        client.get("/v1/conversations/conv_a/items", headers=B), "Conversation with id 'conv_a' not found."
    )
    assert len(fake.requests) == before
    # The creator continues it, on the key that holds it (the rotation would have chosen gamma).
    r = post_json(client, "/v1/responses", {**CREATE, "previous_response_id": "resp_a2"}, headers=A)
    assert r.status_code == 200
    assert key_names(fake, "/v1/responses")[-1] == "alpha"
    assert fake.last("/v1/responses").json["previous_response_id"] == "resp_a2"
    r = post_json(client, "/v1/responses", {**CREATE, "conversation": {"id": "conv_a"}}, headers=A)
    assert r.status_code == 200 and key_names(fake, "/v1/responses")[-1] == "beta"


def test_a_create_answer_too_big_to_read_whole_is_recorded_from_its_first_bytes(client, fake):
    big = response_object(MODEL, rid="resp_big", text="x" * (9 * 1024 * 1024))  # relayed as it arrives
    fake.push("POST", "/v1/responses", lambda req, conn: conn.send_json(200, big))
    r = post_json(client, "/v1/responses", CREATE, headers=A)
    assert r.status_code == 200 and len(r.get_data()) > 9 * 1024 * 1024
    openai_404(client.get("/v1/responses/resp_big", headers=B), "Response with id 'resp_big' not found.")
    assert client.get("/v1/responses/resp_big", headers=A).status_code == 200
    assert key_names(fake, "/v1/responses/resp_big") == ["alpha"]


def test_a_second_or_escaped_previous_response_id_cannot_slip_past(client, fake):
    """Another JSON parser may read the first of two equal keys, or an escaped key: upstream gets
    exactly what was judged."""
    creates_response(fake, "resp_mine")
    assert post_json(client, "/v1/responses", CREATE, headers=A).status_code == 200
    creates_response(fake, "resp_theirs")
    assert post_json(client, "/v1/responses", CREATE, headers=B).status_code == 200
    escaped = b'{"model": "gpt-4o-mini", "input": "x", "previous\\u005fresponse_id": "resp_theirs"}'
    r = client.post("/v1/responses", data=escaped, headers={**A, "Content-Type": "application/json"})
    openai_404(r, "Previous response with id 'resp_theirs' not found.")
    twice = b'{"model": "gpt-4o-mini", "previous_response_id": "resp_theirs", "previous_response_id": "resp_mine"}'
    r = client.post("/v1/responses", data=twice, headers={**A, "Content-Type": "application/json"})
    assert r.status_code == 200
    sent = fake.last("/v1/responses")
    assert sent.body == (
        b'{"model":"gpt-4o-mini","previous_response_id":"resp_mine","safety_identifier":"'
        + safety_id("team-a", A_KEY).encode()
        + b'"}'
    )
    assert NAMES[fake.keys("/v1/responses")[-1]] == "alpha"


@pytest.mark.parametrize(
    "body",
    [b'{"model": "gpt-4o-mini", "temperature": NaN}', b"\xef\xbb\xbf{}", b'{"input": "\\ud800"}', b"["],
)
def test_a_responses_body_the_proxy_cannot_read_is_400_when_clients_share_the_proxy(client, fake, body):
    r = client.post("/v1/responses", data=body, headers={**A, "Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.get_json()["error"]["code"] == "OPENAI_PROXY_BAD_REQUEST"
    assert "previous_response_id and conversation" in r.get_json()["error"]["message"]
    assert fake.requests == []


def test_files_belong_to_the_client_that_uploaded_them(client, fake):
    data = b'{"custom_id": "1"}\n'
    r = client.post("/v1/files", headers=A, data={"purpose": "batch", "file": (io.BytesIO(data), "a.jsonl")})
    assert r.status_code == 200
    file_id = r.get_json()["id"]
    assert key_names(fake, "/v1/files") == ["alpha"]
    for r in (client.get(f"/v1/files/{file_id}/content", headers=B), client.get(f"/v1/files/{file_id}", headers=B),
              client.delete(f"/v1/files/{file_id}", headers=B)):  # fmt: skip
        openai_404(r, f"File with id '{file_id}' not found.")
    assert [r.path for r in fake.requests if file_id in r.path] == []
    spend_turns(client, 1)
    r = client.get(f"/v1/files/{file_id}/content", headers=A)
    assert r.status_code == 200 and r.get_data() == data
    assert key_names(fake, f"/v1/files/{file_id}/content") == ["alpha"]


@pytest.mark.parametrize(
    ("collection", "object_id", "label"),
    [
        ("batches", "batch_a", "Batch"),
        ("vector_stores", "vs_a", "Vector store"),
        ("containers", "cntr_a", "Container"),
        ("uploads", "upload_a", "Upload"),
    ],
)
def test_batches_vector_stores_containers_and_uploads_belong_to_their_client(
    client, fake, collection, object_id, label
):
    answers(fake, "POST", f"/v1/{collection}", {"id": object_id, "object": collection})
    assert post_json(client, f"/v1/{collection}", {"name": "x"}, headers=A).status_code == 200
    openai_404(
        client.get(f"/v1/{collection}/{object_id}", headers=B), f"{label} with id '{object_id}' not found."
    )
    openai_404(post_json(client, f"/v1/{collection}/{object_id}/cancel", {}, headers=B),
               f"{label} with id '{object_id}' not found.")  # fmt: skip
    assert fake.count(f"/v1/{collection}/{object_id}") == 0
    spend_turns(client, 1)
    answers(fake, "GET", f"/v1/{collection}/{object_id}", {"id": object_id})
    assert client.get(f"/v1/{collection}/{object_id}", headers=A).status_code == 200
    assert key_names(fake, f"/v1/{collection}/{object_id}") == ["alpha"]


def test_a_batch_result_and_a_completed_upload_are_the_clients_files(client, fake):
    answers(
        fake, "POST", "/v1/batches", {"id": "batch_r", "status": "validating", "input_file_id": "file-in"}
    )
    assert post_json(client, "/v1/batches", {"input_file_id": "file-in"}, headers=C).status_code == 200
    answers(fake, "GET", "/v1/batches/batch_r",
            {"id": "batch_r", "status": "completed", "output_file_id": "file-out", "error_file_id": "file-err"})  # fmt: skip
    assert client.get("/v1/batches/batch_r", headers=C).status_code == 200
    answers(fake, "POST", "/v1/uploads", {"id": "upload_r", "object": "upload", "status": "pending"})
    assert post_json(client, "/v1/uploads", {"purpose": "batch"}, headers=C).status_code == 200
    answers(fake, "POST", "/v1/uploads/upload_r/complete",
            {"id": "upload_r", "status": "completed", "file": {"id": "file-up", "object": "file"}})  # fmt: skip
    assert post_json(client, "/v1/uploads/upload_r/complete", {"part_ids": []}, headers=C).status_code == 200
    creator = key_names(fake, "/v1/batches")[0]
    for file_id in ("file-out", "file-err", "file-up"):
        openai_404(
            client.get(f"/v1/files/{file_id}/content", headers=B), f"File with id '{file_id}' not found."
        )
        answers(fake, "GET", f"/v1/files/{file_id}/content", {"ok": True})
        assert client.get(f"/v1/files/{file_id}/content", headers=C).status_code == 200
    assert key_names(fake, "/v1/files/file-out/content") == [creator]
    assert key_names(fake, "/v1/files/file-up/content") == key_names(fake, "/v1/uploads")


def test_a_stored_chat_completion_belongs_to_its_client(client, fake):
    assert post_json(client, "/v1/chat/completions", {**CHAT, "store": True}, headers=A).status_code == 200
    openai_404(client.get("/v1/chat/completions/chatcmpl-fake123", headers=B),
               "Chat completion with id 'chatcmpl-fake123' not found.")  # fmt: skip
    answers(fake, "GET", "/v1/chat/completions/chatcmpl-fake123", {"id": "chatcmpl-fake123"})
    assert client.get("/v1/chat/completions/chatcmpl-fake123", headers=A).status_code == 200
    assert key_names(fake, "/v1/chat/completions/chatcmpl-fake123") == ["alpha"]


# ---- legacy /openai2 -------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_openai2_response_is_404_for_another_client_and_follow_ups_go_to_its_key(client, app, fake, stream):
    creates_response(fake, "resp_l1")
    r = post_json(client, "/openai2", {**CREATE, "stream": stream}, headers=A)
    assert r.status_code == 200
    assert ("resp_l1" in r.get_data(as_text=True)) and key_names(fake, "/v1/responses") == ["alpha"]
    refused = [
        client.get("/openai2/resp_l1", headers=B),
        client.get("/openai2/resp_l1?stream=true", headers=B),
        client.get("/openai2/resp_l1/input_items", headers=B),
        client.post("/openai2/resp_l1/cancel", headers=B),
        client.delete("/openai2/resp_l1", headers=B),
    ]
    for r in refused:
        legacy_404(r, "Response with id 'resp_l1' not found.")
    for body, message in [
        ({**CREATE, "previous_response_id": "resp_l1"}, "Previous response with id 'resp_l1' not found."),
        ({**CREATE, "previous_response_id": "resp_l1", "stream": True}, "Previous response with id 'resp_l1' not found."),
    ]:  # fmt: skip
        for path in ("/openai2", "/openai2/input_tokens", "/openai2/compact"):
            legacy_404(post_json(client, path, body, headers=B), message)
    assert fake.count("/v1/responses") == 1 and [r for r in fake.requests if "resp_l1" in r.path] == []
    spend_turns(client, 2)
    ok = [
        client.get("/openai2/resp_l1", headers=A),
        client.get("/openai2/resp_l1?stream=true", headers=A),
        client.get("/openai2/resp_l1/input_items", headers=A),
        client.post("/openai2/resp_l1/cancel", headers=A),
        client.delete("/openai2/resp_l1", headers=A),
        post_json(client, "/openai2", {**CREATE, "previous_response_id": "resp_l1"}, headers=A),
    ]
    assert [r.status_code for r in ok] == [200] * len(ok), [r.get_data()[:200] for r in ok]
    sent = [r for r in fake.requests if "resp_l1" in r.path or (r.body and b"resp_l1" in r.body)]
    assert len(sent) == len(ok)
    assert {NAMES[r.headers["authorization"][len("Bearer ") :]] for r in sent} == {"alpha"}


def test_openai2_conversation_of_another_client_is_404(client, fake):
    answers(fake, "POST", "/v1/conversations", {"id": "conv_l", "object": "conversation"})
    assert post_json(client, "/v1/conversations", {}, headers=A).status_code == 200
    for conversation in ("conv_l", {"id": "conv_l"}):
        legacy_404(post_json(client, "/openai2", {**CREATE, "conversation": conversation}, headers=B),
                   "Conversation with id 'conv_l' not found.")  # fmt: skip
    assert fake.count("/v1/responses") == 0
    assert post_json(client, "/openai2", {**CREATE, "conversation": "conv_l"}, headers=A).status_code == 200


# ---- objects the proxy has no record of -------------------------------------------------------------


def test_unknown_objects_are_open_for_default_closed_for_named_clients_unless_allowed(client, fake):
    legacy_404(client.get("/openai2/resp_outside", headers=A), "Response with id 'resp_outside' not found.")
    openai_404(
        client.get("/v1/files/file-outside/content", headers=B), "File with id 'file-outside' not found."
    )
    openai_404(post_json(client, "/v1/responses", {**CREATE, "previous_response_id": "resp_outside"}, headers=A),
               "Previous response with id 'resp_outside' not found.")  # fmt: skip
    assert fake.requests == []
    assert client.get("/openai2/resp_outside", headers=C).status_code == 200
    assert client.get("/openai2/resp_outside", headers=DEFAULT).status_code == 200
    r = post_json(
        client, "/v1/responses", {**CREATE, "previous_response_id": "resp_outside"}, headers=DEFAULT
    )
    assert r.status_code == 200
    assert fake.count("/v1/responses/resp_outside") == 2 and fake.count("/v1/responses") == 1


def test_a_recorded_object_is_closed_even_to_clients_that_may_use_unknown_ones(client, fake):
    creates_response(fake, "resp_a3")
    assert post_json(client, "/v1/responses", CREATE, headers=A).status_code == 200
    legacy_404(client.get("/openai2/resp_a3", headers=C), "Response with id 'resp_a3' not found.")
    legacy_404(client.get("/openai2/resp_a3", headers=DEFAULT), "Response with id 'resp_a3' not found.")
    # Nor by another spelling that an upstream might normalise: ids are OpenAI's characters only.
    legacy_404(client.get("/openai2/resp_a3%20", headers=C), "Response with id 'resp_a3 ' not found.")
    # A control character in a /v1 path is refused by the path rule (400) before the objects rule.
    assert client.get("/v1/responses/resp_a3%00", headers=C).status_code == 400
    assert [r.path for r in fake.requests if "resp_a3" in r.path] == []


def test_without_a_clients_file_default_reaches_everything_and_follow_ups_keep_their_key(make_app, fake):
    client = make_app(**POOL).test_client()
    assert client.get("/openai2/resp_before", headers=DEFAULT).status_code == 200
    creates_response(fake, "resp_d")
    assert post_json(client, "/openai2", CREATE, headers=DEFAULT).status_code == 200
    for _ in range(3):
        assert client.get("/openai2/resp_d", headers=DEFAULT).status_code == 200
    assert key_names(fake, "/v1/responses/resp_d") == [key_names(fake, "/v1/responses")[0]] * 3


def test_unknown_objects_field_is_checked_with_file_and_line(tmp_path):
    path = clients_file(tmp_path, CLIENTS.replace('unknown_objects = "allow"', 'unknown_objects = "yes"'))
    with pytest.raises(ClientsFileError) as caught:
        load_clients(path, SECURITY_KEY)
    assert str(caught.value) == f'{path}:12: client \'team-c\': `unknown_objects` must be "allow" or "deny"'
    book, _ = load_clients(clients_file(tmp_path), SECURITY_KEY)
    assert [book.get(n).unknown_objects for n in ("team-a", "team-c", "default")] == [False, True, True]


# ---- the key that holds the object -----------------------------------------------------------------


def test_a_follow_up_whose_key_rests_or_is_revoked_is_answered_like_the_pool(client, fake):
    creates_response(fake, "resp_k")
    assert post_json(client, "/v1/responses", CREATE, headers=A).status_code == 200
    # A call that lands on alpha by turn meets a 429 there (and fails over): alpha rests 30 s.
    fake.push(
        "POST", "/v1/chat/completions", error(429, "Slow down", headers={"Retry-After": "30"}), key=KEY_A
    )
    spend_turns(client, 3)
    assert health_keys(client)["alpha"]["state"] == "resting"
    r = client.get("/v1/responses/resp_k", headers=A)
    assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= 30
    assert r.get_json()["error"]["code"] == "rate_limit_exceeded"
    assert r.get_json()["error"]["message"].startswith(
        "The upstream API key 'alpha', which holds this object, is resting after a 429"
    )
    r = client.get("/openai2/resp_k", headers=A)
    assert r.status_code == 429 and error_of(r)["code"] == "OPENAI_PROXY_UPSTREAM_KEYS_RESTING"
    assert fake.count("/v1/responses/resp_k") == 0


def test_a_follow_up_whose_key_was_revoked_is_503(client, fake):
    creates_response(fake, "resp_r")
    assert post_json(client, "/v1/responses", CREATE, headers=A).status_code == 200
    fake.push("POST", "/v1/chat/completions", error(401, "Incorrect API key"), key=KEY_A)
    spend_turns(client, 3)
    assert health_keys(client)["alpha"]["state"] == "revoked"
    r = client.get("/openai2/resp_r", headers=A)
    assert r.status_code == 503 and error_of(r)["code"] == "OPENAI_PROXY_NO_UPSTREAM_KEY"
    assert error_of(r)["message"].startswith(
        "The upstream API key 'alpha', which holds this object, was refused"
    )
    assert fake.count("/v1/responses/resp_r") == 0


def test_a_follow_up_is_not_failed_over_to_another_key(client, app, fake):
    creates_response(fake, "resp_f")
    assert post_json(client, "/v1/responses", CREATE, headers=A).status_code == 200
    fake.push("GET", "/v1/responses/resp_f", error(503, "Busy"), key=KEY_A)
    r = client.get("/v1/responses/resp_f", headers=A)
    assert r.status_code == 503
    assert key_names(fake, "/v1/responses/resp_f") == ["alpha"]
    assert app.records[-1]["attempts"] == [{"key": "alpha", "outcome": "unavailable", "status": 503}]


# ---- shared by workers and hosts -------------------------------------------------------------------


def test_owners_are_shared_by_apps_on_one_log(make_app, env, fake):
    """Two apps on one log database, as two workers (SQLite) or two hosts (PostgreSQL) are."""
    first, second = make_app(**env).test_client(), make_app(**env).test_client()
    creates_response(fake, "resp_s")
    assert post_json(first, "/openai2", CREATE, headers=A).status_code == 200
    legacy_404(second.get("/openai2/resp_s", headers=B), "Response with id 'resp_s' not found.")
    assert second.get("/openai2/resp_s", headers=A).status_code == 200
    assert key_names(fake, "/v1/responses/resp_s") == ["alpha"]


def test_owners_are_shared_by_hosts_on_postgresql(make_app, env, fake, postgres_db):
    env = {**env, "OPENAI_PROXY_LOG_DB": postgres_db.url, "OPENAI_PROXY_HOST_NAME": "host-1"}
    first = make_app(**env).test_client()
    second = make_app(**{**env, "OPENAI_PROXY_HOST_NAME": "host-2"}).test_client()
    creates_response(fake, "resp_pg")
    assert post_json(first, "/v1/responses", CREATE, headers=A).status_code == 200
    # Written before the create call answered: no flush of the log is waited for.
    assert postgres_db.query("SELECT id, kind, client, key_name, host FROM stored_objects") == [
        ("resp_pg", "response", "team-a", "alpha", "host-1")
    ]
    openai_404(second.get("/v1/responses/resp_pg", headers=B), "Response with id 'resp_pg' not found.")
    spend_turns(second, 1)
    assert second.get("/v1/responses/resp_pg", headers=A).status_code == 200
    assert key_names(fake, "/v1/responses/resp_pg") == ["alpha"]


def test_a_database_that_is_down_keeps_owners_in_the_worker_until_it_is_back(
    make_app, env, fake, postgres_db
):
    env = {**env, "OPENAI_PROXY_LOG_DB": postgres_db.url}
    first, second = make_app(**env), make_app(**env)
    one, two = first.test_client(), second.test_client()
    for app in (first, second):  # both have connected (and made the schema) before the database goes
        app.extensions["openai_proxy"].log_store.run(lambda db: None)  # connects, makes the schema
    postgres_db.server.stop()
    try:
        creates_response(fake, "resp_down")
        assert post_json(one, "/v1/responses", CREATE, headers=A).status_code == 200
        assert one.get("/v1/responses/resp_down", headers=A).status_code == 200  # this worker knows it
        r = two.get("/v1/responses/resp_down", headers=A)  # another cannot tell: closed, and it says why
        assert r.status_code == 503 and r.get_json()["error"]["code"] == "OPENAI_PROXY_OBJECTS_UNAVAILABLE"
        assert r.headers["Retry-After"] == "1"
        health = one.get("/health", headers=AUTH).get_json()
        assert health["status"] == "degraded"
        assert health["storedObjects"] == {"pending": 1, "cached": 0, "failing": True}
    finally:
        postgres_db.server.start()
    wait_until(lambda: postgres_db.query("SELECT client FROM stored_objects WHERE id = 'resp_down'"))
    assert two.get("/v1/responses/resp_down", headers=A).status_code == 200
    assert one.get("/health", headers=AUTH).get_json()["storedObjects"] == {
        "pending": 0,
        "cached": 1,
        "failing": False,
    }
    openai_404(two.get("/v1/responses/resp_down", headers=B), "Response with id 'resp_down' not found.")


def worker_of(server, request_id: str) -> int:
    """The pid of the worker that served a request, from its completion line in gunicorn's output."""

    def find() -> int | None:
        for line in server.log_text().splitlines():
            if request_id in line and line.startswith("{"):
                return json.loads(line).get("pid")
        return None

    return wait_until(find, timeout=10)


def test_a_follow_up_on_another_worker_right_after_the_create(gunicorn_server, env, fake):
    """Real gunicorn, 2 workers: the owner is written before the create call answers, so a follow-up
    sent at once to the other worker finds it."""
    import requests

    server = gunicorn_server(workers=2, **env)
    sessions: dict[int, requests.Session] = {}
    for _ in range(60):  # keep-alive connections, until one is served by each worker
        session = requests.Session()
        r = session.get(server.url + "/v1/models", headers=A, timeout=10)
        sessions.setdefault(worker_of(server, r.headers["X-Proxy-Request-Id"]), session)
        if len(sessions) == 2:
            break
    assert len(sessions) == 2, "every connection went to one worker"
    creator, other = sessions.values()
    for n in range(5):
        rid = f"resp_g{n}"
        creates_response(fake, rid)
        r = creator.post(server.url + "/v1/responses", json=CREATE, headers=A, timeout=10)
        assert r.status_code == 200 and r.json()["id"] == rid
        mine = other.get(f"{server.url}/v1/responses/{rid}", headers=A, timeout=10)
        assert mine.status_code == 200, mine.text
        theirs = other.get(f"{server.url}/v1/responses/{rid}", headers=B, timeout=10)
        assert theirs.status_code == 404 and theirs.json()["error"]["code"] == "OPENAI_PROXY_NOT_FOUND"
        assert key_names(fake, f"/v1/responses/{rid}") == key_names(fake, "/v1/responses")[-1:]


def test_records_are_written_with_the_create_not_with_the_log_batch(app, client, fake):
    creates_response(fake, "resp_now")
    assert post_json(client, "/v1/responses", CREATE, headers=A).status_code == 200
    store = app.extensions["openai_proxy"].log_store
    rows = store.run(lambda db: db.execute("SELECT id, client, key_name FROM stored_objects").fetchall())
    assert [tuple(row) for row in rows] == [("resp_now", "team-a", "alpha")]
    assert app.extensions["openai_proxy"].objects.stats() == {"pending": 0, "cached": 1, "failing": False}
