"""The OpenAI-compatible /v1 surface, driven by the official `openai` SDK against a real gunicorn."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import struct
import time
import uuid
import wave

import httpx2
import openai
import pytest

from openai_proxy.gate.local import Gate
from tests.conftest import SECURITY_KEY, UPSTREAM_KEY, safety_id
from tests.support.fake_upstream import (
    EMBEDDING,
    INPUT_ITEMS,
    chat_stream,
    delay,
    error,
    raw,
    reset,
    response_events,
    sse,
)

pytestmark = pytest.mark.gunicorn


@pytest.fixture(scope="module")
def server(module_gunicorn):
    return module_gunicorn(
        workers=2, OPENAI_PROXY_MAX_BODY_BYTES=str(2 * 1024 * 1024), OPENAI_PROXY_MAX_AUDIO_BYTES="300000"
    )


@pytest.fixture
def sdk(server, fake):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=SECURITY_KEY, max_retries=0, timeout=20)
    yield client
    client.close()


def record_of(server, trace_id: str, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in server.log_text().splitlines():
            if line.startswith('{"event":"completion"') and trace_id in line:
                entry = json.loads(line)
                if entry["incomingRequestId"] == trace_id:
                    return entry
        time.sleep(0.02)
    raise AssertionError(f"no completion record for {trace_id}")


def traced() -> tuple[str, dict]:
    trace = str(uuid.uuid4())
    return trace, {"X-Request-Id": trace}


MESSAGES = [{"role": "user", "content": "Say hi"}]


# ---- the calls the SDK makes ------------------------------------------------------------------------


def test_chat_completion(sdk, fake, server):
    trace, headers = traced()
    completion = sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, extra_headers=headers)
    assert completion.choices[0].message.content == "Hello from the fake upstream."
    assert completion.usage.prompt_tokens == 25
    sent = fake.last("/v1/chat/completions")
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert sent.json == {"messages": MESSAGES, "model": "gpt-4o-mini", "safety_identifier": safety_id()}
    entry = record_of(server, trace)
    assert entry["endpoint"] == "/v1/chat/completions" and entry["model"] == "gpt-4o-mini"
    assert entry["status"] == 200 and entry["result"] == "ok" and entry["retries"] == 0
    assert entry["usage"]["total_tokens"] == 32


def test_client_project_and_organization_are_forwarded(server, fake):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=SECURITY_KEY, max_retries=0,
                           project="proj_client", organization="org_client")  # fmt: skip
    client.models.list()
    sent = fake.last("/v1/models")
    assert sent.headers["openai-project"] == "proj_client"
    assert sent.headers["openai-organization"] == "org_client"
    assert SECURITY_KEY not in json.dumps(sent.headers)


def test_chat_stream_usage_is_asked_for_and_hidden(sdk, fake, server):
    trace, headers = traced()
    chunks = list(
        sdk.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers=headers
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "word0 word1 word2 "
    assert all(c.choices for c in chunks)  # the usage chunk the proxy asked for is not shown
    assert fake.last("/v1/chat/completions").json["stream_options"] == {"include_usage": True}
    entry = record_of(server, trace)
    assert entry["stream"] is True and entry["usage"] == {
        "prompt_tokens": 12,
        "completion_tokens": 3,
        "total_tokens": 15,
    }


def test_chat_stream_usage_the_client_asked_for_is_kept(sdk, fake):
    chunks = list(sdk.chat.completions.create(model="m", messages=MESSAGES, stream=True,
                                              stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 15
    assert fake.last("/v1/chat/completions").json["stream_options"] == {"include_usage": True}


def test_chat_stream_bytes_are_upstream_framing(server, fake):
    body = {"model": "m", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    r = httpx2.post(
        server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {SECURITY_KEY}"}
    )
    assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
    expected = b"".join(b"data: " + json.dumps(c, separators=(",", ":")).encode() + b"\n\n"
                        for c in __import__("tests.support.fake_upstream").support.fake_upstream.chat_chunks("m", True))  # fmt: skip
    assert r.content == expected + b"data: [DONE]\n\n"


def test_responses_create_and_output_text(sdk, fake):
    response = sdk.responses.create(model="gpt-4o", input="Tell me a story")
    assert response.output_text == "In a peaceful grove. The end."
    assert fake.last("/v1/responses").json == {"input": "Tell me a story", "model": "gpt-4o",
                                                "safety_identifier": safety_id()}  # fmt: skip


def test_responses_stream_typed_events(sdk, fake, server):
    trace, headers = traced()
    events = list(sdk.responses.create(model="gpt-4o", input="x", stream=True, extra_headers=headers))
    assert [e.type for e in events] == [e["type"] for e in response_events("gpt-4o")]
    assert events[-1].response.usage.total_tokens == 123
    entry = record_of(server, trace)
    assert entry["stream"] is True and entry["usage"]["total_tokens"] == 123


def test_responses_stream_helper(sdk, fake):
    with sdk.responses.stream(model="gpt-4o", input="x") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert deltas == ["word0 ", "word1 ", "word2 "]
    assert final.output_text == "word0 word1 word2 "


def test_responses_retrieve_plain_and_streamed(sdk, fake):
    assert sdk.responses.retrieve("resp_42").id == "resp_42"
    events = list(sdk.responses.retrieve("resp_42", stream=True))
    assert events[-1].type == "response.completed"
    assert fake.last("/v1/responses/resp_42").query["stream"] == ["true"]


def test_input_items_pagination(sdk, fake):
    items = list(sdk.responses.input_items.list("resp_1", limit=1))
    assert [item.id for item in items] == [item["id"] for item in INPUT_ITEMS]
    assert [r.query.get("after") for r in fake.matching("/v1/responses/resp_1/input_items")] == [
        None,
        ["msg_0"],
        ["msg_1"],
    ]


def test_cancel_delete_count_compact(sdk, fake):
    assert sdk.responses.cancel("resp_bg").status == "cancelled"
    assert sdk.responses.delete("resp_bg") is None
    assert fake.last("/v1/responses/resp_bg", "DELETE")
    assert sdk.responses.input_tokens.count(model="gpt-4o", input="count me").input_tokens == 11
    compacted = sdk.responses.compact(model="gpt-5", input="long conversation")
    assert compacted.id == "resp_compact1"


def test_embeddings_base64_is_decoded_by_the_sdk(sdk, fake):
    result = sdk.embeddings.create(model="text-embedding-3-small", input="The quick brown fox")
    assert fake.last("/v1/embeddings").json["encoding_format"] == "base64"
    float32 = list(struct.unpack(f"<{len(EMBEDDING)}f", struct.pack(f"<{len(EMBEDDING)}f", *EMBEDDING)))
    assert result.data[0].embedding == pytest.approx(float32)


def wav_bytes(seconds: float = 0.2) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes(b"\x00\x01" * int(8000 * seconds))
    return out.getvalue()


def test_audio_transcription(sdk, fake):
    audio = wav_bytes()
    result = sdk.audio.transcriptions.create(
        model="whisper-1", file=("speech.wav", audio, "audio/wav"), language="en"
    )
    assert (
        result.text == f"transcribed speech.wav size={len(audio)} sha256={hashlib.sha256(audio).hexdigest()}"
    )
    fields, _ = fake.last("/v1/audio/transcriptions").form()
    assert fields["model"] == ["whisper-1"] and fields["language"] == ["en"]


def test_audio_over_the_limit_is_413(sdk, fake):
    with pytest.raises(openai.APIStatusError) as exc:
        sdk.audio.transcriptions.create(model="whisper-1", file=("big.wav", b"\x00" * 400_000, "audio/wav"))
    assert exc.value.status_code == 413
    assert exc.value.code == "OPENAI_PROXY_PAYLOAD_TOO_LARGE"
    assert fake.count("/v1/audio/transcriptions") == 0


def test_models(sdk, fake):
    assert [m.id for m in sdk.models.list()] == ["gpt-4o-mini"]
    assert sdk.models.retrieve("gpt-4o").id == "gpt-4o"


# ---- the generic relay ---------------------------------------------------------------------------------


def test_file_upload_and_download_through_the_generic_relay(sdk, fake, server):
    data = bytes(range(256)) * (8 * 1024)  # 2 MiB; the memory bound is measured on 100 MiB below
    uploaded = sdk.files.create(file=("data.jsonl", data), purpose="batch")
    assert uploaded.bytes == len(data)
    assert fake.last("/v1/files").headers["content-type"].startswith("multipart/form-data; boundary=")
    assert sdk.files.content(uploaded.id).content == data


def test_uploads_are_received_whole_before_they_go_upstream(server, fake):
    """CONTRACT §17: no slot waits for a body, so upstream sees the request only once it has all of it
    (sent with its length, though the client sent it chunked)."""
    sent = {}

    def body():
        for _ in range(9):
            yield b"x" * 1000
            time.sleep(0.1)
        sent["last_piece_at"] = time.monotonic()
        yield b"x" * 1000

    r = httpx2.post(server.url + "/v1/uploads/up_1/parts", content=body(),
                    headers={"Authorization": f"Bearer {SECURITY_KEY}", "Content-Type": "application/octet-stream"})  # fmt: skip
    assert r.status_code == 404  # the fake has no such endpoint
    upstream = fake.last("/v1/uploads/up_1/parts")
    assert upstream.body == b"x" * 10_000
    assert upstream.headers["content-length"] == "10000" and "transfer-encoding" not in upstream.headers
    assert upstream.head_at > sent["last_piece_at"]


def test_100_mib_upload_goes_through_without_growing_the_worker(server, fake):
    import gevent

    pids = server.worker_pids()

    def rss() -> int:
        total = 0
        for pid in pids:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024
        return total

    baseline, peak = rss(), [0]

    def sample():
        while True:
            peak[0] = max(peak[0], rss())
            gevent.sleep(0.01)

    sampler = gevent.spawn(sample)
    size = 100 * 1024 * 1024
    block = b"\xab" * (1024 * 1024)
    try:
        r = httpx2.post(server.url + "/v1/uploads/up_big/parts", content=(block for _ in range(100)),
                        headers={"Authorization": f"Bearer {SECURITY_KEY}", "Content-Length": str(size),
                                 "Content-Type": "application/octet-stream"}, timeout=60)  # fmt: skip
    finally:
        sampler.kill()
    assert r.status_code == 404
    upstream = fake.last("/v1/uploads/up_big/parts")
    assert len(upstream.body) == size and upstream.headers["content-length"] == str(size)
    print(f"100 MiB upload: workers' RSS grew by {(peak[0] - baseline) / 2**20:.1f} MiB")
    assert peak[0] - baseline < 30 * 1024 * 1024, f"workers grew by {(peak[0] - baseline) / 2**20:.1f} MiB"


def test_generic_relay_keeps_method_path_query_and_headers(server, fake):
    fake.push("GET", "/v1/vector_stores/vs_1/files", raw(200, b'{"object":"list","data":[],"extra":1.50}',
              "application/json; charset=utf-8", {"x-ratelimit-remaining-requests": "99", "openai-processing-ms": "12",
                                                  "Set-Cookie": "__cf_bm=secret", "x-should-retry": "false"}))  # fmt: skip
    r = httpx2.get(server.url + "/v1/vector_stores/vs_1/files?limit=2&filter=in_progress&after=a%2Fb",
                   headers={"Authorization": f"Bearer {SECURITY_KEY}", "OpenAI-Beta": "assistants=v2",
                            "Cookie": "c=1", "X-Request-Id": "mine"})  # fmt: skip
    assert r.status_code == 200
    assert r.content == b'{"object":"list","data":[],"extra":1.50}'
    assert r.headers["content-type"] == "application/json; charset=utf-8"
    assert r.headers["x-ratelimit-remaining-requests"] == "99" and r.headers["openai-processing-ms"] == "12"
    assert r.headers["x-should-retry"] == "false"
    assert "set-cookie" not in r.headers
    assert r.headers["x-proxy-request-id"] and r.headers["server-timing"].startswith("upstream;dur=")
    sent = fake.last("/v1/vector_stores/vs_1/files")
    assert sent.query_string == "limit=2&filter=in_progress&after=a%2Fb"
    assert sent.headers["openai-beta"] == "assistants=v2"
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert "cookie" not in sent.headers and "x-request-id" not in sent.headers


@pytest.mark.parametrize("path", ["/v1/files/../admin", "/v1/a//b", "/v1/./files"])
def test_dot_and_empty_segments_are_refused(server, fake, path):
    import socket

    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {SECURITY_KEY}\r\nConnection: close\r\n\r\n".encode()
        )
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert fake.requests == []


# ---- auth and errors --------------------------------------------------------------------------------------


def test_wrong_key_is_authentication_error(server, fake):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        client.models.list()
    assert exc.value.code == "OPENAI_PROXY_UNAUTHORIZED"
    assert exc.value.response.headers["x-proxy-request-id"] in exc.value.message
    assert "use the SECURITY_KEY of the proxy as the API key" in exc.value.message
    assert fake.requests == []


@pytest.mark.parametrize(
    ("status", "cls"),
    [(400, openai.BadRequestError), (401, openai.AuthenticationError), (403, openai.PermissionDeniedError),
     (404, openai.NotFoundError), (409, openai.ConflictError), (422, openai.UnprocessableEntityError),
     (429, openai.RateLimitError), (500, openai.InternalServerError), (503, openai.InternalServerError)],
)  # fmt: skip
def test_upstream_errors_keep_status_body_and_class(sdk, fake, status, cls):
    fake.push("POST", "/v1/chat/completions", error(status, "Upstream said no", code="upstream_code",
                                                    headers={"Retry-After": "5"}))  # fmt: skip
    with pytest.raises(cls) as exc:
        sdk.chat.completions.create(model="m", messages=MESSAGES)
    assert exc.value.status_code == status
    assert exc.value.code == "upstream_code" and exc.value.message.endswith("Upstream said no")
    assert exc.value.response.headers["retry-after"] == "5"
    assert fake.count("/v1/chat/completions") == 1  # no proxy-side retries


def test_upstream_error_secrets_are_redacted(sdk, fake):
    fake.push(
        "POST", "/v1/embeddings", error(401, "Incorrect API key provided: sk-proj-abcdefghijklmnop9999")
    )
    with pytest.raises(openai.AuthenticationError) as exc:
        sdk.embeddings.create(model="m", input="x")
    assert "abcdefghijklmnop" not in exc.value.response.text
    assert exc.value.message.endswith("Incorrect API key provided: ***9999")


def test_upstream_unreachable_or_reset_is_502(sdk, fake):
    fake.push("POST", "/v1/chat/completions", reset())
    with pytest.raises(openai.InternalServerError) as exc:
        sdk.chat.completions.create(model="m", messages=MESSAGES)
    assert exc.value.status_code == 502 and exc.value.code == "OPENAI_PROXY_TRANSPORT"


def test_sdk_timeout_header_bounds_the_wait_for_headers(sdk, fake, server):
    fake.push("POST", "/v1/chat/completions", delay(3))
    trace, headers = traced()
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as exc:
        sdk.chat.completions.create(
            model="m", messages=MESSAGES, extra_headers={**headers, "X-Stainless-Timeout": "0.3"}
        )
    assert time.monotonic() - started < 2
    assert exc.value.status_code == 504 and exc.value.code == "OPENAI_PROXY_TIMEOUT"
    entry = record_of(server, trace)
    assert (entry["timeoutMs"], entry["timeoutSource"]) == (300, "provided")


def test_python_sdk_read_timeout_is_recorded_and_clamped(server, fake):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=SECURITY_KEY, max_retries=0, timeout=10_000)
    trace, headers = traced()
    client.models.list(extra_headers=headers)
    assert (record_of(server, trace)["timeoutMs"], record_of(server, trace)["timeoutSource"]) == (
        900000,
        "clamped",
    )


def test_json_body_over_the_limit_is_413(sdk, fake):
    with pytest.raises(openai.APIStatusError) as exc:
        sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "x" * 3_000_000}])
    assert exc.value.status_code == 413
    assert fake.count("/v1/chat/completions") == 0


def test_overload_is_503_with_retry_after(gunicorn_server, fake, tmp_path):
    runtime = tmp_path / "rt"
    runtime.mkdir()
    server = gunicorn_server(
        workers=1, OPENAI_PROXY_MAX_PARALLEL_REQUESTS="1", OPENAI_PROXY_RUNTIME_DIR=str(runtime)
    )
    outsider = Gate(str(runtime / "gate.slots"), 1)
    slot = outsider.try_acquire()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=SECURITY_KEY, max_retries=0)
        with pytest.raises(openai.InternalServerError) as exc:
            client.models.list()
    finally:
        outsider.release(slot)
    assert exc.value.status_code == 503 and exc.value.code == "OPENAI_PROXY_OVERLOADED"
    assert exc.value.response.headers["retry-after"] == "1"


# ---- streams that go wrong ----------------------------------------------------------------------------------


def test_chat_stream_dropped_midway_raises_in_the_sdk(sdk, fake):
    fake.push("POST", "/v1/chat/completions", chat_stream(True, end="drop"))
    with pytest.raises(openai.APIError) as exc:
        list(sdk.chat.completions.create(model="m", messages=MESSAGES, stream=True))
    assert exc.value.code == "OPENAI_PROXY_TRANSPORT"


def test_responses_stream_dropped_midway_raises_in_the_sdk(sdk, fake):
    fake.push("POST", "/v1/responses", sse(response_events("m")[:4], end="drop", event_names=True))
    with pytest.raises(openai.APIError):
        list(sdk.responses.create(model="m", input="x", stream=True))


def test_stream_keepalive_comments_during_silence(gunicorn_server, fake):
    server = gunicorn_server(workers=1, OPENAI_PROXY_SSE_KEEPALIVE_INTERVAL_MS="100")
    fake.push("POST", "/v1/responses", sse(response_events("m", 1), first_delay=0.35, event_names=True))
    r = httpx2.post(server.url + "/v1/responses", json={"model": "m", "input": "x", "stream": True},
                    headers={"Authorization": f"Bearer {SECURITY_KEY}"})  # fmt: skip
    assert r.content.startswith(b": keep-alive\n\n: keep-alive\n\n")
    assert r.content.count(b"event: response.") == len(response_events("m", 1))


def test_disconnect_mid_stream_closes_upstream(server, fake):
    import http.client

    fake.push("POST", "/v1/responses", sse(response_events("m", 40), gap=0.1, event_names=True))
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    trace = str(uuid.uuid4())
    conn.request("POST", "/v1/responses", body=json.dumps({"model": "m", "input": "x", "stream": True}),
                 headers={"Authorization": f"Bearer {SECURITY_KEY}", "Content-Type": "application/json",
                          "X-Request-Id": trace})  # fmt: skip
    response = conn.getresponse()
    assert response.read1(65536).startswith(b"event: response.created")
    upstream = fake.last("/v1/responses")
    closed_at = time.monotonic()
    response.close()
    conn.close()
    deadline = time.monotonic() + 3
    while upstream.client_closed_at is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert upstream.client_closed_at is not None and upstream.client_closed_at - closed_at < 1.0
    entry = record_of(server, trace)
    assert entry["status"] == 499 and entry["result"] == "client_cancelled" and entry["stream"] is True


def test_embeddings_raw_base64_is_relayed_untouched(server, fake):
    r = httpx2.post(server.url + "/v1/embeddings", json={"model": "m", "input": "x", "encoding_format": "base64"},
                    headers={"Authorization": f"Bearer {SECURITY_KEY}"})  # fmt: skip
    vector = r.json()["data"][0]["embedding"]
    assert isinstance(vector, str) and len(base64.b64decode(vector)) == 4 * len(EMBEDDING)
