"""POST /openai/audio/transcriptions: fields, answers, bad uploads, limits, and a worker that stays up."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import tempfile
import time
import wave

import pytest
import requests

from openai_proxy.inbound import multipart
from openai_proxy.inbound.multipart import FORM_OVERHEAD_BYTES
from tests.conftest import SECURITY_KEY, UPSTREAM_KEY, error_of
from tests.support.fake_upstream import delay, error, raw

URL = "/openai/audio/transcriptions"
UPSTREAM = "/v1/audio/transcriptions"
BOUNDARY = "audio-test-boundary-7e3f"
FORM_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
KEY_HEADER = {"X-Security-Key": SECURITY_KEY}


def make_wav(frames: int = 1600) -> bytes:
    """A valid mono 16-bit 8 kHz WAV: `frames` samples of a little sawtooth."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"".join((i % 200 * 100).to_bytes(2, "little", signed=True) for i in range(frames)))
    return buf.getvalue()


WAV = make_wav()


def form_body(fields=(), file=("speech.wav", WAV, "audio/wav"), *, boundary=BOUNDARY, end=True) -> bytes:
    """A multipart body written out by hand, so tests control order, framing and truncation."""
    parts = []
    for name, value in fields:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        )
    if file is not None:
        filename, data, content_type = file
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        if content_type:
            head += f"Content-Type: {content_type}\r\n"
        parts.append(head.encode() + b"\r\n" + data + b"\r\n")
    if end:
        parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts)


def transcribe(client, fields=(), headers=KEY_HEADER, **form):
    return client.post(URL, data=form_body(fields, **form), content_type=FORM_TYPE, headers=headers)


def post_raw(client, body: bytes, content_type: str = FORM_TYPE, **kw):
    """Exactly these bytes (the test client would replace an empty body with a form of its own)."""
    environ = {"wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body)), "CONTENT_TYPE": content_type}
    return client.post(URL, environ_overrides=environ, **kw)


def described(filename: str, data: bytes) -> str:
    """The text the fake upstream answers for a file it received intact."""
    return f"transcribed {filename} size={len(data)} sha256={hashlib.sha256(data).hexdigest()}"


# ---- what reaches upstream, and what comes back -------------------------------------------------------


def test_every_field_reaches_upstream(client, fake):
    fields = [
        ("security_key", SECURITY_KEY), ("model", "gpt-4o-transcribe"), ("language", "en"),
        ("prompt", "Names: Ada, Grace."), ("temperature", "0.2"), ("response_format", "verbose_json"),
        ("timestamp_granularities[]", "word"), ("timestamp_granularities[]", "segment"),
        ("openai_api_key", "sk-override-0123456789abcdef"), ("project", "proj_override"),
        ("organization", "org_override"), ("timeout", "30000"), ("x_new_option", "kept"),
    ]  # fmt: skip
    r = transcribe(client, fields, headers={}, file=("talk.wav", WAV, "audio/wav"))
    assert r.status_code == 200, r.data
    sent = fake.last(UPSTREAM, "POST")
    form, files = sent.form()
    assert form == {
        "model": ["gpt-4o-transcribe"], "language": ["en"], "prompt": ["Names: Ada, Grace."],
        "temperature": ["0.2"], "response_format": ["verbose_json"],
        "timestamp_granularities[]": ["word", "segment"], "x_new_option": ["kept"],
    }  # fmt: skip
    assert files == {"file": ("talk.wav", WAV, "audio/wav")}
    assert sent.headers["authorization"] == "Bearer sk-override-0123456789abcdef"
    assert sent.headers["openai-project"] == "proj_override"
    assert sent.headers["openai-organization"] == "org_override"
    # In the client's order (defaults would come last); secrets never in the forwarded form.
    assert list(form) == ["model", "language", "prompt", "temperature", "response_format",
                          "timestamp_granularities[]", "x_new_option"]  # fmt: skip
    for secret in (SECURITY_KEY, "sk-override", "proj_override", "org_override", "30000"):
        assert secret.encode() not in sent.body
    # verbose_json: upstream's bytes as they are (Python's separators, not re-serialised).
    expected = {"task": "transcribe", "language": "english", "duration": 1.5,
                "text": described("talk.wav", WAV), "segments": [], "fields": form}  # fmt: skip
    assert r.data == json.dumps(expected).encode()
    assert r.content_type == "application/json"


def test_defaults(client, fake):
    r = transcribe(client)
    assert r.status_code == 200
    sent = fake.last(UPSTREAM, "POST")
    form, files = sent.form()
    assert form == {"model": ["whisper-1"], "temperature": ["0"], "response_format": ["json"]}
    assert files["file"][:2] == ("speech.wav", WAV)
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert "openai-project" not in sent.headers and "openai-organization" not in sent.headers
    # json: upstream's bytes as they are.
    usage = {"type": "duration", "seconds": 2}
    assert (
        r.data == json.dumps({"text": described("speech.wav", WAV), "fields": form, "usage": usage}).encode()
    )


def test_empty_fields_count_as_absent(client, fake):
    r = transcribe(client, [("model", ""), ("language", ""), ("temperature", ""), ("response_format", "")])
    assert r.status_code == 200
    assert fake.last(UPSTREAM).form()[0] == {
        "model": ["whisper-1"], "temperature": ["0"], "response_format": ["json"],
    }  # fmt: skip


def test_only_the_file_part_goes_upstream_and_never_stream(client, fake):
    extra = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="cover"; filename="cover.png"\r\n'
        f"Content-Type: image/png\r\n\r\nPNG...\r\n--{BOUNDARY}--\r\n"
    ).encode()
    body = form_body([("stream", "true"), ("language", "de")], end=False) + extra
    r = post_raw(client, body, headers=KEY_HEADER)
    assert r.status_code == 200
    form, files = fake.last(UPSTREAM).form()
    assert list(files) == ["file"]
    assert "stream" not in form and form["language"] == ["de"]


@pytest.mark.parametrize("fmt", ["text", "srt", "vtt"])
def test_text_formats_answer_a_json_string(client, fake, fmt):
    r = transcribe(client, [("response_format", fmt)])
    assert r.status_code == 200
    assert r.content_type == "application/json"
    assert r.data == json.dumps(described("speech.wav", WAV) + "\n").encode()


@pytest.mark.parametrize(
    ("raw_value", "sent"), [("0", "0"), ("1", "1"), ("0.35", "0.35"), ("2e-1", "0.2"), (" .5 ", "0.5")]
)
def test_temperature_is_forwarded_as_a_plain_number(client, fake, raw_value, sent):
    assert transcribe(client, [("temperature", raw_value)]).status_code == 200
    assert fake.last(UPSTREAM).form()[0]["temperature"] == [sent]


def test_security_key_from_field_bearer_or_header(client, fake):
    assert transcribe(client, [("security_key", SECURITY_KEY)], headers={}).status_code == 200
    assert transcribe(client, headers={"Authorization": f"Bearer {SECURITY_KEY}"}).status_code == 200
    assert transcribe(client, headers=KEY_HEADER).status_code == 200
    # As on the JSON routes, the query string is a last resort.
    r = client.post(f"{URL}?security_key={SECURITY_KEY}", data=form_body(), content_type=FORM_TYPE)
    assert r.status_code == 200
    assert fake.count(UPSTREAM) == 4
    for sent in fake.matching(UPSTREAM):
        assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


@pytest.mark.parametrize(
    ("fields", "headers", "message"),
    [
        ([("security_key", "wrong")], {}, "Invalid security_key"),
        ([], {"X-Security-Key": "wrong"}, "Invalid security_key"),
        ([], {}, "Missing security_key"),
    ],
)
def test_wrong_key_403(client, fake, fields, headers, message):
    r = transcribe(client, fields, headers=headers)
    assert r.status_code == 403
    assert error_of(r)["message"] == message
    assert fake.requests == []


# ---- bad input --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "message"),
    [
        ("application/json", "Content-Type must be multipart/form-data"),
        ("application/x-www-form-urlencoded", "Content-Type must be multipart/form-data"),
        ("multipart/mixed; boundary=x", "Content-Type must be multipart/form-data"),
        ("multipart/form-data", "Content-Type multipart/form-data needs a boundary parameter"),
        ("multipart/form-data; boundary=", "Content-Type multipart/form-data needs a boundary parameter"),
        (f"multipart/form-data; boundary={BOUNDARY}x", "Malformed multipart body: no part starts with the "
                                                      "boundary given in Content-Type"),
    ],
)  # fmt: skip
def test_not_a_usable_multipart_body_is_400_before_auth(client, fake, content_type, message):
    # No key at all: a malformed body is judged first (README "Routes": a malformed body gets its 400 before the key is judged).
    r = post_raw(client, form_body(), content_type)
    assert r.status_code == 400
    assert error_of(r)["message"] == message
    assert fake.requests == []


def test_missing_content_type_is_400(client, fake):
    r = post_raw(client, form_body(), "", headers=KEY_HEADER)
    assert r.status_code == 400
    assert error_of(r)["message"] == "Content-Type must be multipart/form-data"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (form_body(end=False), "Malformed multipart body: it ends in the middle of a part"),
        (form_body()[:40], "Malformed multipart body: it ends inside the headers of a part"),
        (
            b"just some bytes",
            "Malformed multipart body: no part starts with the boundary given in Content-Type",
        ),
        (b"", "Malformed multipart body: no part starts with the boundary given in Content-Type"),
    ],
)
def test_malformed_bodies_are_400_before_auth(client, fake, body, message):
    r = post_raw(client, body)
    assert r.status_code == 400
    assert error_of(r)["message"] == message
    assert fake.requests == []


def test_truncated_body_is_400(client, fake):
    body = form_body()
    environ = {
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body[:300]),
        "CONTENT_TYPE": FORM_TYPE,
    }
    r = client.post(URL, environ_overrides=environ)
    assert r.status_code == 400
    assert error_of(r)["message"] == (
        f"Truncated upload: the request body ended after 300 of the {len(body)} announced bytes"
    )
    assert fake.requests == []


@pytest.mark.parametrize(
    ("fields", "file"),
    [
        ([], None),
        ([("file", "not a file part")], None),
        ([], ("", b"", "application/octet-stream")),  # a browser form with no file chosen
    ],
)
def test_no_file_is_400(client, fake, fields, file):
    r = transcribe(client, fields, file=file)
    assert r.status_code == 400
    assert error_of(r)["message"] == "No audio file uploaded"
    assert fake.requests == []


@pytest.mark.parametrize(
    "value", ["abc", "nan", "NaN", "inf", "-inf", "1e999", "-0.1", "1.01", "2", "0x1", " "]
)
def test_invalid_temperature_is_400(client, fake, value):
    r = transcribe(client, [("temperature", value)])
    assert r.status_code == 400
    assert error_of(r)["message"] == "temperature must be a number between 0 and 1"
    assert fake.requests == []


@pytest.mark.parametrize("value", ["mp3", "JSON", "json "])
def test_unknown_response_format_is_400(client, fake, value):
    r = transcribe(client, [("response_format", value)])
    assert r.status_code == 400
    assert error_of(r)["message"] == "response_format must be one of: json, text, srt, verbose_json, vtt"
    assert fake.requests == []


# ---- limits -----------------------------------------------------------------------------------------------


def test_file_at_the_limit_is_accepted_and_one_byte_more_is_413(make_app, fake):
    client = make_app(OPENAI_PROXY_MAX_AUDIO_BYTES=str(len(WAV))).test_client()
    assert transcribe(client).status_code == 200
    r = transcribe(client, file=("big.wav", WAV + b"\0", "audio/wav"))
    assert r.status_code == 413
    err = error_of(r)
    assert err["type"] == "payload_too_large" and err["code"] == "OPENAI_PROXY_PAYLOAD_TOO_LARGE"
    assert err["message"] == f"Uploaded file exceeds the {len(WAV)}-byte limit"
    assert fake.count(UPSTREAM) == 1


def test_oversized_content_length_is_413_before_reading_and_before_auth(make_app, fake):
    client = make_app(OPENAI_PROXY_MAX_AUDIO_BYTES="1000").test_client()

    class Exploding:
        def read(self, *a):
            raise AssertionError("the oversized body was read")

        readline = readinto = read

    environ = {
        "CONTENT_LENGTH": str(1000 + FORM_OVERHEAD_BYTES + 1),
        "wsgi.input": Exploding(),
        "CONTENT_TYPE": FORM_TYPE,
    }
    r = client.post(URL, environ_overrides=environ)
    assert r.status_code == 413
    assert error_of(r)["message"] == "Request body exceeds the 1000-byte limit"


def test_chunked_upload_is_not_read_past_the_limit(make_app, fake):
    client = make_app(OPENAI_PROXY_MAX_AUDIO_BYTES="1000").test_client()
    body = form_body(file=("long.wav", b"\0" * (FORM_OVERHEAD_BYTES + 500_000), "audio/wav"))

    class Counting(io.BytesIO):
        consumed = 0

        def readinto(self, b):
            n = super().readinto(b)
            Counting.consumed += n
            return n

    environ = {"wsgi.input_terminated": True, "HTTP_TRANSFER_ENCODING": "chunked", "wsgi.input": Counting(body),
               "CONTENT_TYPE": FORM_TYPE}  # fmt: skip
    r = client.post(URL, environ_overrides=environ)
    assert r.status_code == 413
    assert error_of(r)["message"] == "Request body exceeds the 1000-byte limit"
    assert Counting.consumed <= 1000 + FORM_OVERHEAD_BYTES
    assert fake.requests == []


def test_oversized_text_field_is_413_with_its_own_message(client, fake):
    r = transcribe(client, [("prompt", "x" * 600_000)])
    assert r.status_code == 413
    assert error_of(r)["message"] == (
        "A form text field (or text before the first boundary) exceeds 500000 bytes, or the form has over 1000 parts"
    )
    assert fake.requests == []


# ---- temp files: on disk, handed to the SDK as a file object, always closed ---------------------------


@pytest.fixture
def spooled(monkeypatch):
    """Every temp file the form parser opens, in order."""
    opened: list = []
    real = tempfile.TemporaryFile

    def recording(*args, **kwargs):
        f = real(*args, **kwargs)
        opened.append(f)
        return f

    monkeypatch.setattr(multipart.tempfile, "TemporaryFile", recording)
    return opened


def test_the_sdk_gets_the_spooled_file_not_bytes(app, fake, spooled, monkeypatch):
    upstream = app.extensions["openai_proxy"].upstream
    real_send = upstream.send
    handed = []

    def send(call):
        handed.append(call.files[0][1][1])
        return real_send(call)

    monkeypatch.setattr(upstream, "send", send)
    assert transcribe(app.test_client()).status_code == 200
    # The very temp file the part was written to (a real descriptor, which httpx2 reads in 64 KiB
    # pieces), closed once the call is over.
    assert handed == spooled and len(spooled) == 1
    assert spooled[0].closed


@pytest.mark.parametrize(
    ("setup", "call", "status"),
    [
        (None, lambda c: transcribe(c), 200),
        (lambda fake: fake.push("POST", UPSTREAM, error(500)), lambda c: transcribe(c), 500),
        (None, lambda c: transcribe(c, headers={"X-Security-Key": "wrong"}), 403),
        (None, lambda c: transcribe(c, [("temperature", "hot")]), 400),
        (None, lambda c: transcribe(c, end=False), 400),
        (None, lambda c: transcribe(c, file=("big.wav", WAV * 2, "audio/wav")), 413),
    ],
)
def test_spooled_files_are_closed_whatever_the_outcome(make_app, fake, spooled, setup, call, status):
    client = make_app(OPENAI_PROXY_MAX_AUDIO_BYTES=str(len(WAV) + 10)).test_client()
    if setup:
        setup(fake)
    assert call(client).status_code == status
    assert spooled and all(f.closed for f in spooled)


# ---- the pipeline: upstream errors, timeout, gate, record ------------------------------------------------


def test_upstream_error_keeps_status_and_retry_after(client, fake):
    fake.push("POST", UPSTREAM, error(429, "Slow down", type="requests", headers={"Retry-After": "7"}))
    r = transcribe(client)
    assert r.status_code == 429
    assert r.headers["Retry-After"] == "7"
    err = error_of(r)
    assert err["message"] == "429 Slow down" and err["code"] == "OPENAI_PROXY_UPSTREAM_API_ERROR"
    assert err["upstream"]["status"] == 429
    assert fake.count(UPSTREAM) == 1  # a create call: never retried


def test_upstream_non_json_answer_is_502(client, fake):
    fake.push("POST", UPSTREAM, raw(200, b"<html>oops</html>"))
    r = transcribe(client)
    assert r.status_code == 502
    assert error_of(r)["code"] == "OPENAI_PROXY_UPSTREAM_BAD_RESPONSE"


def test_timeout_field_is_504_without_retry(client, fake, records):
    fake.push("POST", UPSTREAM, delay(2), times=3)
    started = time.monotonic()
    r = transcribe(client, [("timeout", "200")])
    assert r.status_code == 504
    assert time.monotonic() - started < 1.5
    assert error_of(r)["code"] == "OPENAI_PROXY_TIMEOUT"
    assert fake.count(UPSTREAM) == 1
    assert (records[-1]["timeoutMs"], records[-1]["timeoutSource"]) == (200, "provided")


def test_overload_503_only_after_the_form_is_valid(make_app, fake):
    app = make_app(OPENAI_PROXY_MAX_PARALLEL_REQUESTS="1")
    gate = app.extensions["openai_proxy"].gate
    slot = gate.try_acquire()
    try:
        client = app.test_client()
        assert transcribe(client, [("temperature", "hot")]).status_code == 400
        r = transcribe(client)
    finally:
        gate.release(slot)
    assert r.status_code == 503
    assert r.headers["Retry-After"] == "1"
    assert error_of(r)["code"] == "OPENAI_PROXY_OVERLOADED"
    assert app.records[-1]["overloaded"] is True
    assert fake.requests == []


def test_completion_record(client, fake, records):
    usage = {"type": "tokens", "input_tokens": 14, "output_tokens": 45, "total_tokens": 59}
    fake.push("POST", UPSTREAM, lambda req, conn: conn.send_json(200, {"text": "Hi.", "usage": usage}))
    r = transcribe(client, [("model", "gpt-4o-transcribe"), ("timeout", "9000")],
                   headers={**KEY_HEADER, "X-Request-Id": "client-7"})  # fmt: skip
    assert r.status_code == 200
    assert r.headers["X-Incoming-Request-Id"] == "client-7"
    assert "upstream;dur=" in r.headers["Server-Timing"]
    entry = records[-1]
    assert entry["requestId"] == r.headers["X-Proxy-Request-Id"]
    assert entry["incomingRequestId"] == "client-7"
    assert entry["upstreamRequestId"].startswith("req_fake_")
    assert (entry["endpoint"], entry["method"], entry["model"]) == ("/openai/audio/transcriptions", "POST",
                                                                     "gpt-4o-transcribe")  # fmt: skip
    assert (entry["timeoutMs"], entry["timeoutSource"]) == (9000, "provided")
    assert (entry["result"], entry["status"], entry["retries"]) == ("ok", 200, 0)
    assert entry["stream"] is False and entry["overloaded"] is False and entry["cancelled"] is False
    assert entry["usage"] == {"prompt_tokens": 14, "completion_tokens": 45, "total_tokens": 59}
    assert entry["error"] is None


def test_failed_upload_is_recorded_as_validation_error(client, records):
    r = transcribe(client, end=False)
    assert r.status_code == 400
    assert (records[-1]["status"], records[-1]["result"]) == (400, "validation_error")
    assert records[-1]["endpoint"] == URL


# ---- a real gunicorn: broken uploads never take the worker down -------------------------------------------


def head(length: int | None = None, *, chunked: bool = False, boundary: str = BOUNDARY) -> bytes:
    lines = [f"POST {URL} HTTP/1.1", "Host: 127.0.0.1", f"X-Security-Key: {SECURITY_KEY}",
             f"Content-Type: multipart/form-data; boundary={boundary}"]  # fmt: skip
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def read_response(sock: socket.socket) -> tuple[int, dict]:
    """Status and JSON body of one response with a Content-Length (the connection may stay open)."""
    sock.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        assert more, f"connection closed before a response: {data!r}"
        data += more
    header, _, rest = data.partition(b"\r\n\r\n")
    lines = header.decode().split("\r\n")
    length = next(
        int(v) for k, _, v in (line.partition(": ") for line in lines[1:]) if k.lower() == "content-length"
    )
    while len(rest) < length:
        more = sock.recv(65536)
        assert more, "connection closed mid-response"
        rest += more
    return int(lines[0].split()[1]), json.loads(rest[:length])


def open_socket(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=5)


def spool_fds(pid: int, spool_dir: str) -> list[str]:
    """Open descriptors of `pid` that point into the spool directory (live or deleted temp files)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        # gunicorn's own heartbeat file lives in TMPDIR too.
        if target.startswith(spool_dir) and not os.path.basename(target).startswith("wgunicorn-"):
            out.append(target)
    return out


@pytest.fixture
def audio_server(gunicorn_server, tmp_path):
    """One gunicorn worker whose temp files go to a directory of their own."""
    spool = tmp_path / "spool"
    spool.mkdir()
    runtime = tmp_path / "runtime"
    runtime.mkdir()

    def start(**env):
        server = gunicorn_server(workers=1, TMPDIR=str(spool), OPENAI_PROXY_RUNTIME_DIR=str(runtime), **env)
        server.spool_dir = str(spool)
        return server

    return start


def assert_still_serving(server, pids):
    files = {"file": ("ok.wav", WAV, "audio/wav")}
    r = requests.post(server.url + URL, files=files, headers=KEY_HEADER, timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["text"] == described("ok.wav", WAV)
    assert server.worker_pids() == pids
    assert spool_fds(pids[0], server.spool_dir) == []


@pytest.mark.gunicorn
def test_broken_uploads_get_400_and_the_worker_keeps_serving(audio_server, fake):
    server = audio_server(OPENAI_PROXY_MAX_PARALLEL_REQUESTS="1")
    pids = server.worker_pids()
    body = form_body(file=("cut.wav", make_wav(200_000), "audio/wav"))
    half = len(body) // 2

    # Stalled halfway: the file part is being spooled to disk, and no gate slot (the only one) is held.
    with open_socket(server) as stalled:
        stalled.sendall(head(len(body)) + body[:half])
        deadline = time.monotonic() + 5
        while not spool_fds(pids[0], server.spool_dir) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert spool_fds(pids[0], server.spool_dir), "the upload is not spooled to the temp directory"
        r = requests.post(server.url + URL, files={"file": ("ok.wav", WAV)}, headers=KEY_HEADER, timeout=10)
        assert r.status_code == 200
    assert_still_serving(server, pids)

    # Content-Length promised, half sent, then the client stops sending: 400, readable.
    with open_socket(server) as s:
        s.sendall(head(len(body)) + body[:half])
        s.shutdown(socket.SHUT_WR)
        status, answer = read_response(s)
    assert status == 400
    assert answer["error"]["message"] == (
        f"Truncated upload: the request body ended after {half} of the {len(body)} announced bytes"
    )
    assert_still_serving(server, pids)

    # The client goes away for good mid-upload: nothing to answer, nothing breaks.
    with open_socket(server) as s:
        s.sendall(head(len(body)) + body[:half])
    assert_still_serving(server, pids)

    # Chunked, cut off mid-chunk.
    with open_socket(server) as s:
        s.sendall(head(chunked=True) + chunk(body[:half]) + b"%x\r\n" % 100_000 + b"only a little")
        s.shutdown(socket.SHUT_WR)
        status, answer = read_response(s)
    assert status == 400
    assert answer["error"]["message"].startswith("Truncated upload: the request body ended after ")
    assert_still_serving(server, pids)

    # Broken chunk framing.
    with open_socket(server) as s:
        s.sendall(head(chunked=True) + b"zz\r\nnot hex\r\n0\r\n\r\n")
        status, answer = read_response(s)
    assert status == 400
    assert answer["error"]["message"] == "The request body could not be read (InvalidChunkSize)"
    assert_still_serving(server, pids)

    # A complete HTTP body that ends mid-part, then a good upload on the same connection.
    cut = form_body(end=False)
    good = form_body()
    with open_socket(server) as s:
        s.sendall(head(len(cut)) + cut)
        status, answer = read_response(s)
        assert status == 400
        assert answer["error"]["message"] == "Malformed multipart body: it ends in the middle of a part"
        s.sendall(head(len(good)) + good)
        status, answer = read_response(s)
        assert status == 200 and answer["text"] == described("speech.wav", WAV)

    # Garbage.
    with open_socket(server) as s:
        s.sendall(head(20) + os.urandom(20))
        status, answer = read_response(s)
    assert status == 400
    assert answer["error"]["message"].startswith("Malformed multipart body: ")
    assert_still_serving(server, pids)
    assert "Traceback" not in server.log_text()


@pytest.mark.gunicorn
def test_limits_on_gunicorn(audio_server, fake):
    limit = 50_000
    server = audio_server(OPENAI_PROXY_MAX_AUDIO_BYTES=str(limit))
    pids = server.worker_pids()

    # Content-Length over the limit: 413 at once, though not one byte of the body was sent.
    with open_socket(server) as s:
        s.sendall(head(limit + FORM_OVERHEAD_BYTES + 1))
        status, answer = read_response(s)
    assert status == 413
    assert answer["error"]["message"] == f"Request body exceeds the {limit}-byte limit"
    assert_still_serving(server, pids)

    # Chunked and unending: 413 once the limit is read, while the client is still sending.
    with open_socket(server) as s:
        s.sendall(head(chunked=True) + chunk(form_body(end=False)[:-2]))
        for _ in range((limit + FORM_OVERHEAD_BYTES) // 65536 + 2):
            s.sendall(chunk(b"\0" * 65536))
        status, answer = read_response(s)
    assert status == 413
    assert answer["error"]["message"] == f"Request body exceeds the {limit}-byte limit"
    assert_still_serving(server, pids)

    # A file over the limit in a body within it, and one exactly at it.
    files = {"file": ("big.wav", b"\0" * (limit + 1), "audio/wav")}
    r = requests.post(server.url + URL, files=files, headers=KEY_HEADER, timeout=10)
    assert (
        r.status_code == 413
        and r.json()["error"]["message"] == f"Uploaded file exceeds the {limit}-byte limit"
    )
    files = {"file": ("edge.wav", b"\0" * limit, "audio/wav")}
    r = requests.post(server.url + URL, files=files, headers=KEY_HEADER, timeout=10)
    assert r.status_code == 200 and r.json()["text"] == described("edge.wav", b"\0" * limit)

    assert_still_serving(server, pids)
    assert "Traceback" not in server.log_text()
