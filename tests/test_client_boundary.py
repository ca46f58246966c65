"""The client boundary under real gunicorn (2 workers), probed as a hostile client would: a client
allowed only some models cannot run another one on any route, in any spelling of the path or the
body; every chat and Responses create call carries the client's own `safety_identifier`."""

from __future__ import annotations

import http.client
import json
import uuid

import pytest

from openai_proxy.gate.local import Gate
from tests.conftest import SECURITY_KEY, safety_id
from tests.support.fake_upstream import chat_completion
from tests.test_v1 import record_of, wav_bytes

pytestmark = pytest.mark.gunicorn

MINI_KEY = "mini-client-key-0123456789"
OPEN_KEY = "open-client-key-9876543210"
ALLOWED = ("gpt-4o-mini", "whisper-1", "text-embedding-3-small")
CLIENTS = f"""
[[client]]
name = "mini"
key = "{MINI_KEY}"
models = {json.dumps(list(ALLOWED))}
# Stored objects the proxy has no record of are the objects rule's business (tests/test_objects.py):
# allowed here, so these tests see the model rule alone.
unknown_objects = "allow"

[[client]]
name = "open"
key = "{OPEN_KEY}"
unknown_objects = "allow"
"""
MESSAGES = [{"role": "user", "content": "hi"}]
MAX_PARALLEL = 3


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    return tmp_path_factory.mktemp("runtime")


@pytest.fixture(scope="module")
def server(module_gunicorn, tmp_path_factory, runtime):
    clients = tmp_path_factory.mktemp("clients") / "clients.toml"
    clients.write_text(CLIENTS)
    return module_gunicorn(workers=2, OPENAI_PROXY_CLIENTS_FILE=str(clients), OPENAI_PROXY_RUNTIME_DIR=str(runtime),
                           OPENAI_PROXY_MAX_PARALLEL_REQUESTS=str(MAX_PARALLEL))  # fmt: skip


class Answer:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes, trace: str) -> None:
        self.status, self.headers, self.body, self.trace = status, headers, body, trace

    def json(self):
        return json.loads(self.body)

    def error(self) -> dict:
        body = self.json()
        assert set(body) == {"error"}, body
        return body["error"]


def send(server, method: str, target: str, body: bytes | None = None, *, key: str = MINI_KEY,
         content_type: str | None = "application/json", headers: dict | None = None) -> Answer:  # fmt: skip
    """One request with the target exactly as given (no client library re-encodes the path)."""
    trace = str(uuid.uuid4())
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    sent = {"Authorization": f"Bearer {key}", "X-Request-Id": trace, "Connection": "close", **(headers or {})}
    if content_type:
        sent["Content-Type"] = content_type
    try:
        conn.request(method, target, body=body, headers=sent)
        response = conn.getresponse()
        return Answer(response.status, response.headers, response.read(), trace)
    finally:
        conn.close()


def post(server, target: str, obj, **kwargs) -> Answer:
    return send(server, "POST", target, json.dumps(obj).encode(), **kwargs)


def assert_refused(answer: Answer, status: int, message: str) -> None:
    """The proxy's own refusal in OpenAI's shape (the /v1 family)."""
    assert answer.status == status, answer.body[:300]
    error = answer.error()
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"].startswith(message), error["message"]
    code = "OPENAI_PROXY_FORBIDDEN" if status == 403 else "OPENAI_PROXY_BAD_REQUEST"
    assert error["code"] == code


def assert_refused_legacy(answer: Answer, status: int, message: str) -> None:
    assert answer.status == status, answer.body[:300]
    error = answer.error()
    assert error["requestId"] == answer.headers["X-Proxy-Request-Id"]
    assert error["message"].startswith(message), error["message"]
    assert (error["type"], error["code"]) == (
        ("forbidden", "OPENAI_PROXY_FORBIDDEN") if status == 403 else ("validation_error", "OPENAI_PROXY_BAD_REQUEST")
    )  # fmt: skip


NOT_ALLOWED = "Client 'mini' may not use model"
NAMES_NONE = "Client 'mini' may only use the models it is given, and this request names no model"


# ---- the path: judged as routed, sent as judged ----------------------------------------------------

SPELLINGS = [
    ("/v1/chat/%63ompletions", "/v1/chat/completions", {"messages": MESSAGES}),
    ("/v1/chat%2Fcompletions", "/v1/chat/completions", {"messages": MESSAGES}),
    ("/v1/%72esponses", "/v1/responses", {"input": "hi"}),
    ("/v1/embedding%73", "/v1/embeddings", {"input": "hi"}),
    ("/v1/%63%6F%6D%70%6C%65%74%69%6F%6E%73", "/v1/completions", {"prompt": "hi"}),
]


@pytest.mark.parametrize(("target", "path", "body"), SPELLINGS)
def test_an_escaped_path_is_judged_and_sent_as_routed(server, fake, target, path, body):
    assert_refused(post(server, target, {"model": "gpt-4o", **body}), 403, f"{NOT_ALLOWED} 'gpt-4o'")
    assert fake.requests == []
    allowed = "text-embedding-3-small" if path.endswith("embeddings") else "gpt-4o-mini"
    answer = post(server, target, {"model": allowed, **body})
    assert answer.status in (200, 404), answer.body[:300]  # 404: the fake has no /v1/completions
    (sent,) = fake.requests
    assert sent.path == path and sent.json["model"] == allowed


def test_a_streamed_chat_on_an_escaped_path_still_asks_for_usage(server, fake):
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    answer = post(server, "/v1/chat/%63ompletions", body, key=OPEN_KEY)
    assert answer.status == 200 and answer.body.endswith(b"data: [DONE]\n\n")
    assert b'"usage"' not in answer.body  # the chunk the proxy asked for is not shown
    sent = fake.last("/v1/chat/completions")
    assert sent.json["stream_options"] == {"include_usage": True}
    entry = record_of(server, answer.trace)
    assert entry["endpoint"] == "/v1/chat/completions" and entry["usage"]["total_tokens"] == 15


# ---- every route that runs a model ---------------------------------------------------------------

ROUTES = [
    ("/v1/completions", {"prompt": "hi"}),
    ("/v1/images/generations", {"prompt": "a cat"}),
    ("/v1/audio/speech", {"input": "hi", "voice": "alloy"}),
    ("/v1/fine_tuning/jobs", {"training_file": "file-1"}),
    ("/v1/moderations", {"input": "hi"}),
    ("/v1/assistants", {"name": "a"}),
    ("/v1/realtime/sessions", {}),
    ("/v1/responses/compact", {"input": "hi"}),
    ("/v1/responses/input_tokens", {"input": "hi"}),
    ("/v1/a/route/openai/adds/tomorrow", {}),
]


@pytest.mark.parametrize(("path", "body"), ROUTES)
def test_every_json_post_naming_a_model_is_judged(server, fake, path, body):
    assert_refused(post(server, path, {"model": "gpt-4o", **body}), 403, f"{NOT_ALLOWED} 'gpt-4o'")
    fake.push("POST", path, lambda req, conn: conn.send_json(200, {"ok": True}))
    answer = post(server, path, {"model": "gpt-4o-mini", **body})
    assert answer.status == 200 and answer.json() == {"ok": True}
    (sent,) = fake.requests
    assert sent.path == path and sent.json == {"model": "gpt-4o-mini", **body}


@pytest.mark.parametrize(
    ("path", "body", "forbidden"),
    [
        ("/v1/responses", {"input": "draw", "tools": [{"type": "image_generation", "model": "gpt-image-1"}]},
         "gpt-image-1"),
        ("/v1/fine_tuning/jobs", {"training_file": "file-1", "method": {"type": "reinforcement", "reinforcement": {
            "grader": {"type": "score_model", "model": "o3", "input": []}}}}, "o3"),
        ("/v1/chat/completions", {"messages": MESSAGES, "metadata": {"model": "gpt-4o"}}, "gpt-4o"),
    ],
)  # fmt: skip
def test_a_model_named_anywhere_in_the_body_is_judged(server, fake, path, body, forbidden):
    assert_refused(post(server, path, {"model": "gpt-4o-mini", **body}), 403, f"{NOT_ALLOWED} {forbidden!r}")
    assert fake.requests == []


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/responses", {"prompt": {"id": "pmpt_1", "version": "2"}, "input": "hi"}),
        ("/v1/responses", {"previous_response_id": "resp_1", "input": "more"}),
        ("/v1/chat/completions", {"messages": MESSAGES}),
        ("/v1/images/generations", {"prompt": "a cat"}),
        ("/v1/moderations", {"input": "hi"}),
        ("/v1/batches", {"input_file_id": "file-1", "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
        ("/v1/threads/thread_1/runs", {"assistant_id": "asst_1"}),
        ("/v1/responses", {"model": "", "input": "hi"}),
        ("/v1/responses", {"model": None, "input": "hi"}),
    ],
)  # fmt: skip
def test_a_call_that_names_no_model_is_refused(server, fake, path, body):
    assert_refused(post(server, path, body), 403, NAMES_NONE)
    assert fake.requests == []


def test_a_model_in_the_query_is_judged_too(server, fake):
    """The query goes upstream as sent; an endpoint may read its model there (Realtime's WebRTC calls)."""
    answer = post(
        server, "/v1/chat/completions?mo%64el=gpt-4o", {"model": "gpt-4o-mini", "messages": MESSAGES}
    )
    assert_refused(answer, 403, f"{NOT_ALLOWED} 'gpt-4o'")
    offer = send(
        server, "POST", "/v1/realtime/calls?model=gpt-realtime", b"v=0\r\n", content_type="application/sdp"
    )
    assert_refused(offer, 400, "Invalid JSON body")  # a body it cannot judge, on a call that runs a model
    assert fake.requests == []


def test_an_empty_body_names_no_model(server, fake):
    assert_refused(send(server, "POST", "/v1/chat/completions", b""), 403, NAMES_NONE)
    assert fake.requests == []


def test_calls_that_run_no_model_need_none(server, fake):
    assert send(server, "POST", "/v1/responses/resp_1/cancel", None, content_type=None).status == 200
    assert send(server, "GET", "/v1/models", content_type=None).status == 200
    assert send(server, "DELETE", "/v1/responses/resp_1", content_type=None).status == 200
    assert post(server, "/v1/responses/input_tokens", {"input": "count me"}).status == 200
    fake.push("POST", "/v1/vector_stores", lambda req, conn: conn.send_json(200, {"id": "vs_1"}))
    assert post(server, "/v1/vector_stores", {"name": "docs"}).status == 200
    body = (b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--b\r\n'
            b'Content-Disposition: form-data; name="file"; filename="f.jsonl"\r\n\r\n{}\r\n--b--\r\n')  # fmt: skip
    assert (
        send(server, "POST", "/v1/files", body, content_type="multipart/form-data; boundary=b").status == 200
    )
    assert [r.path for r in fake.requests] == ["/v1/responses/resp_1/cancel", "/v1/models", "/v1/responses/resp_1",
                                               "/v1/responses/input_tokens", "/v1/vector_stores", "/v1/files"]  # fmt: skip


# ---- bodies the proxy cannot read ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"model": "gpt-4o-mini", "messages": [], "temperature": NaN}', "Invalid JSON body"),
        (
            b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "\\ud800"}]}',
            "Invalid JSON body",
        ),
        (b'\xef\xbb\xbf{"model": "gpt-4o", "messages": []}', "Invalid JSON body"),
        (b'{"model": "gpt-4o-mini", "messages": [}', "Invalid JSON body"),
        (b'{"model": "gpt-4o-mini"} {"model": "gpt-4o"}', "Invalid JSON body"),
        (b'[{"model": "gpt-4o-mini"}]', "Request body must be a JSON object"),
        (b'"gpt-4o-mini"', "Request body must be a JSON object"),
        (b'{"model": ["gpt-4o-mini", "gpt-4o"], "messages": []}', "model must be a string"),
        (b'{"model": {"id": "gpt-4o"}, "messages": []}', "model must be a string"),
    ],
)
def test_a_body_the_proxy_cannot_read_is_400_never_forwarded(server, fake, raw, message):
    for target in ("/v1/chat/completions", "/v1/chat/%63ompletions", "/v1/completions"):
        assert_refused(send(server, "POST", target, raw), 400, message)
    # Whatever the Content-Type says: a lenient upstream might read it as JSON all the same.
    assert_refused(send(server, "POST", "/v1/completions", raw, content_type="text/plain"), 400, message)
    assert_refused(send(server, "POST", "/v1/completions", raw, content_type=None), 400, message)
    assert fake.requests == []


def test_upstream_gets_the_body_as_the_proxy_read_it(server, fake):
    """A key given twice: the proxy judged the last, and upstream cannot read the first."""
    raw = b'{"model": "gpt-4o", "messages": [], "model": "gpt-4o-mini"}'
    assert send(server, "POST", "/v1/chat/completions", raw, content_type="text/plain").status == 200
    sent = fake.last("/v1/chat/completions")
    assert sent.body.count(b'"model"') == 1 and sent.json["model"] == "gpt-4o-mini"
    assert sent.headers["content-type"] == "application/json"


def test_unreadable_bodies_of_an_unrestricted_client_go_upstream_as_sent(server, fake):
    raw = b'{"model": "gpt-4o", "messages": [], "temperature": NaN}'
    send(server, "POST", "/v1/chat/completions", raw, key=OPEN_KEY)
    assert fake.last("/v1/chat/completions").body == raw  # upstream's own 400 is the better answer


# ---- uploads: the model field is read before the slot ----------------------------------------------


def form(*fields: tuple[str, str], audio: bytes = b"", file_first: bool = False) -> tuple[bytes, str]:
    parts = [f'--b\r\nContent-Disposition: form-data; name="{n}"\r\n\r\n{v}\r\n'.encode() for n, v in fields]
    upload = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
              b"Content-Type: audio/wav\r\n\r\n" + audio + b"\r\n")  # fmt: skip
    parts = [upload, *parts] if file_first else [*parts, upload]
    return b"".join(parts) + b"--b--\r\n", "multipart/form-data; boundary=b"


@pytest.mark.parametrize("path", ["/v1/audio/transcriptions", "/v1/audio/translations", "/v1/images/edits"])
@pytest.mark.parametrize(
    ("fields", "file_first", "message"),
    [
        ((("model", "gpt-4o-transcribe"),), False, f"{NOT_ALLOWED} 'gpt-4o-transcribe'"),
        ((("model", "gpt-4o-transcribe"),), True, f"{NOT_ALLOWED} 'gpt-4o-transcribe'"),
        ((("model", "whisper-1"), ("model", "gpt-4o-transcribe")), True, f"{NOT_ALLOWED} 'gpt-4o-transcribe'"),
        ((("model", "whisper-1"), ("model[]", "gpt-4o-transcribe")), False, f"{NOT_ALLOWED} 'gpt-4o-transcribe'"),
        ((("language", "en"),), False, NAMES_NONE),
    ],
)  # fmt: skip
def test_an_upload_is_judged_before_it_takes_a_slot(server, fake, runtime, path, fields, file_first, message):
    body, content_type = form(*fields, audio=wav_bytes(0.05), file_first=file_first)
    outsider = Gate(str(runtime / "gate.slots"), MAX_PARALLEL)
    slots = [outsider.try_acquire() for _ in range(MAX_PARALLEL)]
    try:  # every slot taken: a request judged after taking one would get 503
        answer = send(server, "POST", path, body, content_type=content_type)
    finally:
        for slot in slots:
            outsider.release(slot)
    assert_refused(answer, 403, message)
    assert fake.requests == []


def test_an_allowed_upload_goes_upstream_byte_for_byte(server, fake):
    audio = wav_bytes(0.1)
    body, content_type = form(("language", "en"), ("model", "whisper-1"), audio=audio, file_first=True)
    answer = send(server, "POST", "/v1/audio/transcriptions", body, content_type=content_type)
    assert answer.status == 200 and answer.json()["text"].startswith("transcribed a.wav")
    sent = fake.last("/v1/audio/transcriptions")
    assert sent.body == body and sent.headers["content-type"] == content_type
    assert record_of(server, answer.trace)["model"] == "whisper-1"


@pytest.mark.parametrize(
    ("body", "status"),
    [(b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--b", 400),
     (b"not multipart at all", 400)],
)  # fmt: skip
def test_a_broken_upload_is_400(server, fake, body, status):
    answer = send(
        server, "POST", "/v1/audio/transcriptions", body, content_type="multipart/form-data; boundary=b"
    )
    assert answer.status == status and answer.error()["code"] == "OPENAI_PROXY_BAD_REQUEST"
    assert fake.requests == []


# ---- the legacy routes: the same rules, in their own error shape ---------------------------------


def test_legacy_routes_refuse_what_names_no_model_or_another_one(server, fake):
    assert_refused_legacy(
        post(server, "/openai2", {"prompt": {"id": "pmpt_1"}, "input": "hi"}), 403, NAMES_NONE
    )
    assert_refused_legacy(post(server, "/openai", {"messages": MESSAGES}), 403, NAMES_NONE)
    assert_refused_legacy(post(server, "/openai2/compact", {"input": "hi"}), 403, NAMES_NONE)
    tools = [{"type": "image_generation", "model": "gpt-image-1"}]
    answer = post(server, "/openai2", {"model": "gpt-4o-mini", "input": "draw", "tools": tools})
    assert_refused_legacy(answer, 403, f"{NOT_ALLOWED} 'gpt-image-1'")
    answer = post(server, "/openai", {"model": ["gpt-4o-mini", "gpt-4o"], "messages": MESSAGES})
    assert_refused_legacy(answer, 400, "model must be a string")
    answer = post(server, "/open%61i2", {"model": "gpt-4o", "input": "hi"})
    assert_refused_legacy(answer, 403, f"{NOT_ALLOWED} 'gpt-4o'")
    body, content_type = form(("model", "gpt-4o-transcribe"), audio=wav_bytes(0.05), file_first=True)
    answer = send(server, "POST", "/openai/audio/transcriptions", body, content_type=content_type)
    assert_refused_legacy(answer, 403, f"{NOT_ALLOWED} 'gpt-4o-transcribe'")
    assert fake.requests == []
    # Reads and cancels run no model; counting tokens may leave the model to upstream.
    assert send(server, "GET", "/openai2/resp_1", content_type=None).status == 200
    assert send(server, "POST", "/openai2/resp_1/cancel", b"{}").status == 200
    assert post(server, "/openai2/input_tokens", {"input": "count me"}).status == 200
    assert post(server, "/openai", {"model": "gpt-4o-mini", "messages": MESSAGES}).status == 200


# ---- safety_identifier ---------------------------------------------------------------------------


def test_create_calls_carry_the_clients_safety_identifier(server, fake):
    mini, other = safety_id("mini", MINI_KEY), safety_id("open", OPEN_KEY)
    assert len(mini) == 64 and mini != other and mini != safety_id()
    calls = [
        ("/openai", {"model": "gpt-4o-mini", "messages": MESSAGES}, "/v1/chat/completions"),
        ("/chatgpt", {"prompt": "hi"}, "/v1/chat/completions"),
        ("/openai2", {"model": "gpt-4o-mini", "input": "hi"}, "/v1/responses"),
        ("/openai2", {"model": "gpt-4o-mini", "input": "hi", "stream": True}, "/v1/responses"),
        ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": MESSAGES}, "/v1/chat/completions"),
        ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True},
         "/v1/chat/completions"),
        ("/v1/%72esponses", {"model": "gpt-4o-mini", "input": "hi"}, "/v1/responses"),
    ]  # fmt: skip
    for key, value in ((MINI_KEY, mini), (OPEN_KEY, other)):
        for _ in range(2):  # either worker: the same value
            for target, body, path in calls:
                fake.reset()
                assert post(server, target, body, key=key).status == 200, target
                sent = fake.last(path)
                assert sent.json["safety_identifier"] == value, target
    assert MINI_KEY not in json.dumps([r.json for r in fake.requests])


def test_the_callers_own_identifier_is_kept_and_other_calls_get_none(server, fake):
    for field in ("safety_identifier", "user"):
        assert (
            post(server, "/v1/responses", {"model": "gpt-4o-mini", "input": "hi", field: "end-user-7"}).status
            == 200
        )
        sent = fake.last("/v1/responses").json
        assert sent[field] == "end-user-7" and (
            "safety_identifier" not in sent or field == "safety_identifier"
        )
        assert (
            post(server, "/openai", {"model": "gpt-4o-mini", "messages": MESSAGES, field: "u-8"}).status
            == 200
        )
        assert fake.last("/v1/chat/completions").json[field] == "u-8"
    assert post(server, "/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi"}).status == 200
    assert post(server, "/openai2/input_tokens", {"input": "hi"}).status == 200
    assert all("safety_identifier" not in r.json for r in fake.requests[-2:])


def test_the_default_client_gets_one_too(server, fake):
    answer = post(server, "/v1/chat/completions", {"model": "gpt-4o", "messages": MESSAGES}, key=SECURITY_KEY)
    assert answer.status == 200 and answer.json() == chat_completion("gpt-4o")
    assert fake.last("/v1/chat/completions").json["safety_identifier"] == safety_id()
