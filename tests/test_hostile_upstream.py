"""An upstream that breaks HTTP: malformed answers, early answers, floods. None reaches a client as data.

Contract §10: an upstream answer that is not well-formed HTTP/1.1 is a 502 (`upstream_bad_response`,
or `upstream_transport` when the connection just ends early), or the error event of §6 once a stream
has started; it never costs a concurrency slot and never takes a worker down. Everything here is
driven through the proxy's HTTP surface (the Flask test client, or a real gunicorn) against
`tests.support.hostile_upstream`, a raw-socket server that writes exactly the bytes a test scripts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gevent
import pytest
import requests

from tests.conftest import ACCESS_TOKEN, SECURITY_KEY, error_of, post_json
from tests.support.fake_upstream import chat_completion, response_events
from tests.support.hostile_upstream import (
    Answer,
    HostileUpstream,
    chunk,
    complete,
    early,
    flood,
    gzipped,
    openai_error,
    raw_answer,
    stream_head,
)

MIB = 1024 * 1024
PAGE_AUTH = {"Authorization": f"Bearer {ACCESS_TOKEN}"}
V1_AUTH = {"Authorization": f"Bearer {SECURITY_KEY}", "Content-Type": "application/json"}
# `timeout` bounds the wait for upstream's head (a safety bound: a proxy that hangs fails in 20 s).
CHAT = {"security_key": SECURITY_KEY, "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
        "timeout": 20_000}  # fmt: skip
V1_CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {"security_key": SECURITY_KEY, "model": "gpt-4o", "input": "Write a poem.", "stream": True}
V1_STREAM = {"model": "gpt-4o", "input": "Write a poem.", "stream": True}
# What the hostile server's default answer (and every lenient reading of a broken one) gives back.
GOOD = json.dumps(chat_completion("gpt-4o-mini")).encode()

# A held connection (see HOLD_S) swallows whatever the proxy sends on it: a next call that never
# arrives as a request went out on the connection of the broken answer, which was pooled.
REUSED = "the next call went out on the connection of the broken answer (it was put back in the pool)"
BAD = ("upstream_bad_response", "OPENAI_PROXY_UPSTREAM_BAD_RESPONSE")
TRANSPORT = ("upstream_transport", "OPENAI_PROXY_TRANSPORT")

# The caps the gunicorn below runs with (the defaults are 16 MiB per SSE event and 128 MiB per JSON
# answer; upstream error bodies are capped at 1 MiB and response heads at 64 KiB whatever the config).
CAP = 1 * MIB
HEAD_CAP = 64 * 1024
FLOOD = 40 * MIB
# Peak RSS a worker may gain on top of a cap while refusing a flood: socket buffers, the error answer,
# allocator slack, code paths run for the first time. A normal request's peak growth is measured by
# `test_a_normal_request_grows_the_worker_little` (a few MiB at most); reading a 40 MiB flood whole
# would need 40 MiB or more, far above this.
SLACK = 15 * MIB


def head(status_line: str, *lines: str) -> bytes:
    """A response head from its lines, exactly as given (no header is added)."""
    return (status_line + "\r\n" + "".join(f"{line}\r\n" for line in lines) + "\r\n").encode("latin-1")


OK = "HTTP/1.1 200 OK"
JSON_TYPE = "Content-Type: application/json"
LENGTH = f"Content-Length: {len(GOOD)}"
CHUNKED = "Transfer-Encoding: chunked"


@dataclass(frozen=True)
class Case:
    answer: Answer
    error: tuple[str, str]


def bad(data: bytes) -> Case:
    """Malformed bytes, then the connection held open: only the malformation can fail the call."""
    return Case(raw_answer(data), BAD)


def bad_coding(body: bytes, coding: str = "gzip") -> Case:
    """Framing in order, a body that does not decode; the connection stays usable."""
    return Case(complete(200, body, headers=[("Content-Encoding", coding)]), BAD)


N = len(GOOD)
CHUNKED_HEAD = head(OK, JSON_TYPE, CHUNKED)
GZIPPED = gzipped(GOOD)

# Where a lenient reading exists (Python's `int(x, 16)` or `int(x)`, first value wins, skipping what
# follows chunk data, ignoring Content-Length next to chunked), it yields GOOD, a perfectly normal
# answer: only a strict parser turns these into 502s.
MALFORMED: dict[str, Case] = {
    "status_line_protocol": bad(head("HTTQ/1.1 200 OK", JSON_TYPE, LENGTH) + GOOD),
    "status_code_four_digits": bad(head("HTTP/1.1 2000 OK", JSON_TYPE, LENGTH) + GOOD),
    "header_without_colon": bad(head(OK, JSON_TYPE, "X-Broken header line", LENGTH) + GOOD),
    "obs_fold": bad(head(OK, JSON_TYPE, "X-Folded: a", "  continued", LENGTH) + GOOD),
    "oversized_head_many_headers": bad(
        head(OK, JSON_TYPE, *(f"X-Pad-{i}: {'a' * 1000}" for i in range(1100)), LENGTH) + GOOD
    ),
    "oversized_head_one_line": bad(head(OK, JSON_TYPE, "X-Pad: " + "a" * MIB, LENGTH) + GOOD),
    "chunk_size_0x": bad(CHUNKED_HEAD + b"0x%x\r\n%s\r\n0\r\n\r\n" % (N, GOOD)),
    "chunk_size_plus": bad(CHUNKED_HEAD + b"+%x\r\n%s\r\n0\r\n\r\n" % (N, GOOD)),
    "chunk_size_negative": bad(CHUNKED_HEAD + b"-1\r\n" + chunk(GOOD) + b"0\r\n\r\n"),
    "chunk_size_underscore": bad(CHUNKED_HEAD + b"1_0\r\n%s\r\n%s0\r\n\r\n" % (GOOD[:16], chunk(GOOD[16:]))),
    "chunk_data_without_crlf": bad(CHUNKED_HEAD + b"%x\r\n%sXX0\r\n\r\n" % (N, GOOD)),
    "content_length_underscore": bad(head(OK, JSON_TYPE, "Content-Length: 1_0") + b'{"a": 123}'),
    "content_length_negative": bad(head(OK, JSON_TYPE, "Content-Length: -5") + GOOD),
    "content_length_two_values": bad(
        head(OK, JSON_TYPE, LENGTH, f"Content-Length: {N + 5}") + GOOD + b" " * 5
    ),
    "content_length_list": bad(head(OK, JSON_TYPE, f"Content-Length: {N}, {N + 5}") + GOOD + b" " * 5),
    "chunked_and_bad_content_length": bad(
        head(OK, JSON_TYPE, CHUNKED, "Content-Length: abc") + chunk(GOOD) + b"0\r\n\r\n"
    ),
    # Never relayed as a 101, and the connection (no longer HTTP) is never used again.
    "switching_protocols": bad(
        head("HTTP/1.1 101 Switching Protocols", "Connection: Upgrade", "Upgrade: websocket")
    ),
    "gzip_garbage": bad_coding(b"this is not gzip"),
    "gzip_truncated": bad_coding(GZIPPED[: len(GZIPPED) // 2]),
    # Every byte of GOOD is there; only the CRC and length trailer are missing, so nothing vouches for it.
    "gzip_without_trailer": bad_coding(GZIPPED[:-8]),
    "unknown_content_coding": bad_coding(GOOD, "x-snappy"),
    "body_shorter_than_content_length": Case(
        raw_answer(head(OK, JSON_TYPE, LENGTH) + GOOD[:10], after="close"), TRANSPORT
    ),
    "closed_without_an_answer": Case(raw_answer(after="close"), TRANSPORT),
}  # fmt: skip

# A representative subset for /v1 and for a real gunicorn worker.
V1_CASES = ["status_line_protocol", "header_without_colon", "oversized_head_many_headers", "chunk_size_0x",
            "chunk_data_without_crlf", "content_length_underscore", "content_length_two_values",
            "chunked_and_bad_content_length", "switching_protocols", "gzip_garbage", "unknown_content_coding",
            "body_shorter_than_content_length"]  # fmt: skip
WORKER_CASES = ["status_code_four_digits", "obs_fold", "oversized_head_one_line", "chunk_size_negative",
                "content_length_negative", "switching_protocols", "gzip_truncated",
                "body_shorter_than_content_length"]  # fmt: skip


@pytest.fixture(scope="module")
def hostile_server() -> Iterator[HostileUpstream]:
    server = HostileUpstream().start()
    yield server
    server.stop()


@pytest.fixture
def hostile(hostile_server: HostileUpstream) -> Iterator[HostileUpstream]:
    hostile_server.reset()
    yield hostile_server
    hostile_server.reset()


@pytest.fixture
def client(make_app, hostile):
    """A fresh app (its own gate and connection pool) pointed at the hostile server."""
    return make_app(OPENAI_BASE_URL=hostile.url).test_client()


@pytest.fixture(scope="module")
def server(module_gunicorn, hostile_server):
    """One gunicorn worker pointed at the hostile server, with the event and JSON caps at 1 MiB."""
    return module_gunicorn(
        workers=1,
        OPENAI_BASE_URL=hostile_server.url,
        OPENAI_PROXY_MAX_SSE_EVENT_BYTES=str(CAP),
        OPENAI_PROXY_MAX_RESPONSE_BYTES=str(CAP),
        # /health is read after every case; the page rate limit is not what is tested here.
        OPENAI_PROXY_PAGES_RATE_LIMIT="100000/minute",
    )


def gate_in_use(client) -> int:
    r = client.get("/health", headers=PAGE_AUTH)
    assert r.status_code == 200
    return r.get_json()["gate"]["inUse"]


def server_gate_in_use(server) -> int:
    r = requests.get(server.url + "/health", headers=PAGE_AUTH, timeout=10)
    assert r.status_code == 200
    return r.json()["gate"]["inUse"]


def assert_openai_error(response, code: str) -> dict:
    """The proxy's own error in OpenAI's shape (what the SDKs parse), told apart by code and request id."""
    body = response.get_json() if hasattr(response, "get_json") else response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == code and code.startswith("OPENAI_PROXY_")
    assert response.headers["X-Proxy-Request-Id"]
    return body["error"]


def events_of(body: bytes) -> list[bytes]:
    """The events of an SSE body, keep-alive comments left out."""
    return [e for e in body.split(b"\n\n") if e and not all(line.startswith(b":") for line in e.split(b"\n"))]


def error_event(raw_event: bytes) -> dict:
    prefix = b"event: error\ndata: "
    assert raw_event.startswith(prefix), raw_event[:300]
    return json.loads(raw_event[len(prefix) :])


# ---- A: malformed answers, legacy route, one fresh app per case -----------------------------------------


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_answer_on_legacy_chat_is_502(client, hostile, case):
    hostile.push(MALFORMED[case].answer)
    r = post_json(client, "/openai", CHAT)
    assert r.status_code == 502, r.data[:300]
    err = error_of(r)
    assert (err["type"], err["code"]) == MALFORMED[case].error, err
    assert hostile.pending() == 0 and hostile.requests[-1].path == "/v1/chat/completions"
    assert gate_in_use(client) == 0
    # The same app serves the next call normally: a broken connection is never reused.
    seen = len(hostile.requests)
    r = post_json(client, "/openai", CHAT)
    assert len(hostile.requests) == seen + 1, REUSED
    assert r.status_code == 200, r.data[:300]
    assert r.data == GOOD


@pytest.mark.parametrize("case", V1_CASES)
def test_malformed_answer_on_v1_is_502_in_openai_shape(client, hostile, case):
    hostile.push(MALFORMED[case].answer)
    r = client.post("/v1/chat/completions", data=json.dumps(V1_CHAT), headers=V1_AUTH)
    assert r.status_code == 502, r.data[:300]
    assert_openai_error(r, MALFORMED[case].error[1])
    assert gate_in_use(client) == 0
    seen = len(hostile.requests)
    r = client.post("/v1/chat/completions", data=json.dumps(V1_CHAT), headers=V1_AUTH)
    assert len(hostile.requests) == seen + 1, REUSED
    assert r.status_code == 200 and r.data == GOOD


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_gzip_answer_is_decoded_on_legacy_chat(client, hostile, framing):
    hostile.push(gzip_answer(framing))
    r = post_json(client, "/openai", CHAT)
    assert r.status_code == 200, r.data[:300]
    assert r.data == GOOD
    assert "Content-Encoding" not in r.headers


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_gzip_answer_is_decoded_on_v1(client, hostile, framing):
    hostile.push(gzip_answer(framing))
    r = client.post("/v1/chat/completions", data=json.dumps(V1_CHAT), headers=V1_AUTH)
    assert r.status_code == 200, r.data[:300]
    assert r.data == GOOD
    assert "Content-Encoding" not in r.headers
    assert r.headers.get("Content-Length", str(len(GOOD))) == str(len(GOOD))
    assert gate_in_use(client) == 0


def gzip_answer(framing: str) -> Answer:
    body = gzipped(GOOD)
    if framing == "content-length":
        return complete(200, body, headers=[("Content-Encoding", "gzip")])
    pieces = b"".join(chunk(body[i : i + 7]) for i in range(0, len(body), 7))
    return raw_answer(
        head(OK, JSON_TYPE, "Content-Encoding: gzip", CHUNKED) + pieces + b"0\r\n\r\n", after="keep"
    )


@pytest.mark.parametrize(
    "interim", ["HTTP/1.1 100 Continue", "HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload"]
)
def test_interim_answers_are_skipped(client, hostile, interim):
    """The control for `switching_protocols`: other 1xx answers precede the real one and are not errors."""
    hostile.push(raw_answer(f"{interim}\r\n\r\n".encode() + head(OK, JSON_TYPE, LENGTH) + GOOD, after="keep"))
    r = post_json(client, "/openai", CHAT)
    assert r.status_code == 200 and r.data == GOOD


# The SDK backs off between attempts (about a second in all): a few cases only.
RETRIED_CASES = ["status_line_protocol", "chunk_size_0x", "gzip_garbage", "switching_protocols",
                 "body_shorter_than_content_length"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", RETRIED_CASES)
def test_malformed_answer_on_a_retried_route_is_502(client, hostile, case):
    """`GET /openai2/<id>` goes through the SDK and its retries: every attempt gets the broken answer
    (whether a broken answer is retried at all is the SDK's call, not pinned here)."""
    hostile.push(*[MALFORMED[case].answer] * 3)
    r = client.get(f"/openai2/resp_1?security_key={SECURITY_KEY}&timeout=20000")
    assert r.status_code == 502, r.data[:300]
    err = error_of(r)
    assert (err["type"], err["code"]) == MALFORMED[case].error, err
    hostile.drop_answers()
    assert gate_in_use(client) == 0
    seen = len(hostile.requests)
    r = client.get(f"/openai2/resp_1?security_key={SECURITY_KEY}")
    assert len(hostile.requests) == seen + 1, REUSED
    assert r.status_code == 200 and r.get_json()["id"] == "resp_1"


# ---- A: a stream that has started, then breaks -------------------------------------------------------------

FIRST_EVENT = response_events("gpt-4o", 1)[0]
LAST_EVENT = response_events("gpt-4o", 1)[-1]


def named_frame(event: dict) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


def legacy_frame(event: dict) -> bytes:
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


# After one good event: a broken chunk. Read leniently, the last three would end the stream cleanly.
LAST = named_frame(LAST_EVENT)
BROKEN_STREAM_TAILS = {
    "chunk_size_not_hex": b"zz\r\n" + chunk(LAST) + b"0\r\n\r\n",
    "chunk_size_0x": b"0x%x\r\n%s\r\n0\r\n\r\n" % (len(LAST), LAST),
    "chunk_size_negative": b"-1\r\n" + chunk(LAST) + b"0\r\n\r\n",
    "chunk_data_without_crlf": b"%x\r\n%sXX0\r\n\r\n" % (len(LAST), LAST),
}


@pytest.mark.parametrize("tail", BROKEN_STREAM_TAILS)
def test_broken_chunk_after_the_stream_started_is_an_error_event(client, hostile, tail):
    hostile.push(raw_answer(stream_head() + chunk(named_frame(FIRST_EVENT)), 0.05, BROKEN_STREAM_TAILS[tail]))
    r = post_json(client, "/openai2", STREAM, buffered=False)
    assert r.status_code == 200 and r.headers["Content-Type"] == "text/event-stream"
    body = b"".join(r.response)
    r.close()
    events = events_of(body)
    assert events[0] + b"\n\n" == legacy_frame(FIRST_EVENT), body[:300]
    assert len(events) == 2, body[:600]
    error = error_event(events[1])
    assert set(error) == {"error"}
    assert (error["error"]["type"], error["error"]["code"]) == BAD
    assert error["error"]["requestId"] == r.headers["X-Proxy-Request-Id"]
    assert b"[DONE]" not in body
    assert gate_in_use(client) == 0


@pytest.mark.parametrize("tail", ["chunk_size_not_hex", "chunk_size_0x"])
def test_broken_chunk_after_a_v1_stream_started_is_an_error_event(client, hostile, tail):
    hostile.push(raw_answer(stream_head() + chunk(named_frame(FIRST_EVENT)), 0.05, BROKEN_STREAM_TAILS[tail]))
    r = client.post("/v1/responses", data=json.dumps(V1_STREAM), headers=V1_AUTH, buffered=False)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    body = b"".join(r.response)
    r.close()
    events = events_of(body)
    assert events[0] + b"\n\n" == named_frame(FIRST_EVENT), body[:300]  # upstream's own framing
    assert len(events) == 2, body[:600]
    error = error_event(events[1])
    assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["code"] == BAD[1]
    assert gate_in_use(client) == 0


# ---- A: a real worker keeps serving ------------------------------------------------------------------------


@pytest.mark.gunicorn
@pytest.mark.parametrize("case", WORKER_CASES)
def test_worker_keeps_serving_after_a_malformed_answer(server, hostile, case):
    pids = server.worker_pids()
    hostile.push(MALFORMED[case].answer)
    r = requests.post(server.url + "/openai", json=CHAT, timeout=60)
    assert r.status_code == 502, r.text[:300]
    err = error_of(r)
    assert (err["type"], err["code"]) == MALFORMED[case].error
    assert server_gate_in_use(server) == 0
    seen = len(hostile.requests)
    r = requests.post(server.url + "/openai", json=CHAT, timeout=60)
    assert len(hostile.requests) == seen + 1, REUSED
    assert r.status_code == 200 and r.content == GOOD
    assert server.worker_pids() == pids


# ---- B: upstream answers before it has read the request body ---------------------------------------------

UNAUTHORIZED = openai_error(401, "Incorrect API key provided: check it", code="invalid_api_key")


def test_early_401_during_a_big_json_body_is_relayed(client, hostile):
    hostile.push(early(401, UNAUTHORIZED))
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * (15 * MIB)}]}
    r = post_json(client, "/openai", big)
    assert r.status_code == 401, r.data[:300]
    err = error_of(r)
    assert (err["type"], err["code"]) == ("upstream_api_error", "OPENAI_PROXY_UPSTREAM_API_ERROR")
    assert err["message"] == "401 Incorrect API key provided: check it"
    assert err["upstream"]["status"] == 401 and err["upstream"]["code"] == "invalid_api_key"
    assert not hostile.requests[-1].body_read
    assert gate_in_use(client) == 0
    assert post_json(client, "/openai", CHAT).data == GOOD


@pytest.mark.gunicorn
def test_early_401_during_a_big_upload_is_relayed(server, hostile):
    """20 MiB streamed through the generic relay; upstream refuses after the head and hangs up."""
    hostile.push(early(401, UNAUTHORIZED))
    boundary = "hostile-upload-boundary"
    size = 20 * MIB
    opening = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    closing = f"\r\n--{boundary}--\r\n".encode()
    length = len(opening) + size + len(closing)
    request_head = (
        f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {SECURITY_KEY}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()

    def body() -> Iterator[bytes]:
        yield opening
        block = b"{}\n" * (MIB // 3) + b"\n"
        for _ in range(size // len(block)):
            yield block
        yield b"\n" * (size % len(block))
        yield closing

    status, headers, answer = exchange_while_sending(server.port, request_head, body())
    assert status == 401, answer[:300]
    assert answer == UNAUTHORIZED  # upstream's own error body, not a 502 about a broken pipe
    assert headers["x-proxy-request-id"]
    assert hostile.requests[-1].path == "/v1/files" and not hostile.requests[-1].body_read
    assert server_gate_in_use(server) == 0
    r = requests.post(server.url + "/openai", json=CHAT, timeout=60)
    assert r.status_code == 200 and r.content == GOOD


def exchange_while_sending(port: int, request_head: bytes, body: Iterator[bytes]) -> tuple[int, dict, bytes]:
    """Send a request from one greenlet while reading the answer in this one, as a browser or SDK
    does: the answer may come (and the server may stop reading) long before the body is all sent."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)

    def send() -> None:
        with contextlib.suppress(OSError):
            sock.sendall(request_head)
            for piece in body:
                sock.sendall(piece)

    sender = gevent.spawn(send)
    try:
        return read_response(sock)
    finally:
        sender.kill()
        sock.close()


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """Status, headers (lower-case names) and body of one HTTP/1.1 answer with a length or chunked."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        assert more, f"the connection closed before an answer: {data!r}"
        data += more
    raw_head, _, rest = data.partition(b"\r\n\r\n")
    lines = raw_head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}

    def more_bytes() -> bytes:
        piece = sock.recv(65536)
        assert piece, "the connection closed mid-answer"
        return piece

    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            while b"\r\n" not in rest:
                rest += more_bytes()
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(rest) < size + 2:
                rest += more_bytes()
            if size == 0:
                return int(lines[0].split()[1]), headers, body
            body, rest = body + rest[:size], rest[size + 2 :]
    length = int(headers["content-length"])
    while len(rest) < length:
        rest += more_bytes()
    return int(lines[0].split()[1]), headers, rest[:length]


# ---- C: floods are capped, measured as the worker's peak memory ------------------------------------------


class PeakMemory:
    """Peak RSS growth of one process while the block runs.

    The kernel's own high-water mark (VmHWM, reset through /proc/<pid>/clear_refs) catches any peak;
    a sampler every few milliseconds is the fallback where that reset is not allowed.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = 0
        self.peak = 0
        self._hwm_reset = False
        self._sampler: gevent.Greenlet | None = None

    def _kib(self, field: str) -> int:
        text = Path(f"/proc/{self.pid}/status").read_text()
        return next(int(line.split()[1]) for line in text.splitlines() if line.startswith(field + ":")) * 1024

    def __enter__(self) -> PeakMemory:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            self._hwm_reset = True
        except OSError:
            self._hwm_reset = False
        self.baseline = self.peak = self._kib("VmRSS")
        self._sampler = gevent.spawn(self._sample)
        return self

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self._kib("VmRSS"))
            gevent.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        assert self._sampler is not None
        self._sampler.kill()
        self.peak = max(self.peak, self._kib("VmRSS"))
        if self._hwm_reset:
            self.peak = max(self.peak, self._kib("VmHWM"))

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


A_BLOCK = b"a" * (256 * 1024)
STREAM_CHUNKED = head(OK, "Content-Type: text/event-stream", CHUNKED)
JSON_CHUNKED = head(OK, JSON_TYPE, CHUNKED)


@dataclass(frozen=True)
class Flood:
    route: str
    answer: Answer
    cap: int
    # Routes with the SDK's retries may try again after a refused answer: each attempt gets a flood.
    times: int = 1


RETRIEVE = "/openai2/resp_1"
RETRIEVE_STREAM = RETRIEVE + "?stream=true"
STREAM_ROUTES = ("/openai2", RETRIEVE_STREAM)
UNENDING_EVENT = flood(STREAM_CHUNKED, b"data: " + A_BLOCK, A_BLOCK, FLOOD, chunked=True)
FLOODS: dict[str, Flood] = {
    # One SSE event that never ends: `data: aaaa...` and never a blank line.
    "sse_event_legacy": Flood("/openai2", UNENDING_EVENT, CAP),
    "sse_event_retrieve": Flood(RETRIEVE_STREAM, UNENDING_EVENT, CAP, times=3),
    "json_answer_content_length": Flood(
        "/openai",
        flood(head(OK, JSON_TYPE, f"Content-Length: {FLOOD}"), b'{"pad":"', A_BLOCK, FLOOD, chunked=False),
        CAP,
    ),
    "json_answer_chunked": Flood(
        "/openai", flood(JSON_CHUNKED, b'{"pad":"', A_BLOCK, FLOOD, chunked=True), CAP
    ),
    "json_answer_retrieve": Flood(
        RETRIEVE, flood(JSON_CHUNKED, b'{"pad":"', A_BLOCK, FLOOD, chunked=True), CAP, times=3
    ),
    "error_body": Flood(
        "/openai",
        flood(head("HTTP/1.1 400 Bad Request", JSON_TYPE, f"Content-Length: {FLOOD}"),
              b'{"error":{"message":"', A_BLOCK, FLOOD, chunked=False),
        CAP,
    ),
    # A chunk-size line whose extension never ends.
    "chunk_size_line": Flood("/openai", flood(JSON_CHUNKED, b"5;", A_BLOCK, FLOOD, chunked=False), CAP),
    # A response head that never ends.
    "endless_head": Flood(
        "/openai", flood(b"HTTP/1.1 200 OK\r\nX-Endless: ", b"", A_BLOCK, FLOOD, chunked=False), HEAD_CAP
    ),
}  # fmt: skip


# `/v1` relays what upstream sends as it comes, keeping only the ends it reads usage from: the same
# floods pass through, byte for byte, whatever the caps, and the worker grows by less than this.
V1_BOUND = 8 * MIB
V1_JSON_FLOOD = flood(JSON_CHUNKED, b'{"pad":"', A_BLOCK, FLOOD, chunked=True)
V1_FLOODS: dict[str, tuple[str, Answer, bytes]] = {
    "sse_event": ("/v1/responses", UNENDING_EVENT, b"data: " + A_BLOCK),
    "json_answer_chunked": ("/v1/chat/completions", V1_JSON_FLOOD, b'{"pad":"'),
    "json_answer_retrieve": ("/v1/responses/resp_1", V1_JSON_FLOOD, b'{"pad":"'),
}


def call(server, route: str, **kwargs) -> requests.Response:
    """A normal call of `route` (the hostile server answers it correctly unless a test scripted otherwise)."""
    url, kwargs = server.url + route, {"timeout": 120, **kwargs}
    if route.startswith(RETRIEVE):
        return requests.get(url, headers={"X-Security-Key": SECURITY_KEY}, **kwargs)
    if route == "/openai2":
        return requests.post(url, json=STREAM, **kwargs)
    if route == "/v1/responses":
        return requests.post(url, json=V1_STREAM, headers=V1_AUTH, **kwargs)
    if route == "/v1/chat/completions":
        return requests.post(url, json=V1_CHAT, headers=V1_AUTH, **kwargs)
    if route.startswith("/v1/"):
        return requests.get(url, headers=V1_AUTH, **kwargs)
    return requests.post(url, json=CHAT, **kwargs)


@pytest.mark.gunicorn
def test_a_normal_request_grows_the_worker_little(server, hostile):
    """The yardstick for SLACK: what serving ordinary calls costs a warm worker at its peak."""
    (pid,) = server.worker_pids()
    routes = ("/openai", "/openai2", "/v1/responses", RETRIEVE, RETRIEVE_STREAM)
    for route in routes:
        assert call(server, route).status_code == 200  # warm-up: first-use allocations are not growth
    with PeakMemory(pid) as memory:
        for route in routes:
            assert call(server, route).status_code == 200
    print(f"normal calls: worker peak RSS grew by {memory.growth / MIB:.1f} MiB")
    assert memory.growth < SLACK // 3, f"{memory.growth / MIB:.1f} MiB"


@pytest.mark.gunicorn
@pytest.mark.parametrize("case", FLOODS)
def test_flood_is_capped(server, hostile, case):
    spec = FLOODS[case]
    (pid,) = server.worker_pids()
    assert call(server, spec.route).status_code == 200  # warm-up on the same route
    hostile.push(*[spec.answer] * spec.times)
    with PeakMemory(pid) as memory:
        r = call(server, spec.route)
    hostile.drop_answers()
    print(f"{case}: worker peak RSS grew by {memory.growth / MIB:.1f} MiB")
    if spec.route in STREAM_ROUTES:
        # Headers went out with upstream's 200; the event that never ends becomes an error event and
        # the stream ends there. Nothing of the unfinished event is relayed.
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        events = events_of(r.content)
        assert len(events) == 1, r.content[:300]
        error = error_event(events[0])["error"]
        assert error["code"] == BAD[1]
        assert b"[DONE]" not in r.content
    else:
        assert r.status_code == 502, r.content[:300]
        err = error_of(r)
        expected = {BAD, TRANSPORT} if case == "chunk_size_line" else {BAD}
        assert (err["type"], err["code"]) in expected
    assert memory.growth < spec.cap + SLACK, f"{case}: grew by {memory.growth / MIB:.1f} MiB"
    assert hostile.requests[-1].sent < FLOOD or case == "chunk_size_line", "the proxy read all of it"
    assert server_gate_in_use(server) == 0
    assert call(server, spec.route).status_code == 200
    assert server.worker_pids() == [pid]
    assert "Traceback" not in server.log_text()


@pytest.mark.gunicorn
@pytest.mark.parametrize("case", V1_FLOODS)
def test_v1_relays_a_flood_as_it_comes_in_bounded_memory(server, hostile, case):
    """CONTRACT §9: an endless event, or a JSON answer without a length, is relayed byte for byte as it
    arrives (past the 1 MiB caps this server has); upstream then hangs up without ending its answer,
    so the client's connection is cut, never ended cleanly."""
    route, answer, first = V1_FLOODS[case]
    (pid,) = server.worker_pids()
    assert call(server, route).status_code == 200  # warm-up on the same route
    hostile.push(answer)
    expected = hashlib.sha256()
    expected.update(first)
    for _ in range((FLOOD - len(first)) // len(A_BLOCK)):
        expected.update(A_BLOCK)
    expected.update(A_BLOCK[: (FLOOD - len(first)) % len(A_BLOCK)])
    received, size = hashlib.sha256(), 0
    with PeakMemory(pid) as memory:
        r = call(server, route, stream=True)
        assert r.status_code == 200
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            for piece in r.iter_content(65536):
                received.update(piece)
                size += len(piece)
        r.close()
    print(f"v1 {case}: {size / MIB:.1f} MiB relayed, worker peak RSS grew by {memory.growth / MIB:.1f} MiB")
    assert (size, received.hexdigest()) == (FLOOD, expected.hexdigest())
    assert memory.growth < V1_BOUND, f"{case}: grew by {memory.growth / MIB:.1f} MiB"
    assert server_gate_in_use(server) == 0
    assert call(server, route).status_code == 200
    assert server.worker_pids() == [pid]
    assert "Traceback" not in server.log_text()


def test_hostile_server_serves_normally_by_default(hostile):
    """The helper itself: with nothing scripted it answers like the API (the other tests rely on it)."""
    r = requests.post(hostile.url + "/chat/completions", json=V1_CHAT, timeout=10)
    assert r.status_code == 200 and r.content == GOOD
    assert hostile.requests[-1].json == V1_CHAT
    hostile.push(raw_answer(b"HTTP/1.1 204 No Content\r\n\r\n", after="keep"))
    assert requests.get(hostile.url + "/models", timeout=10).status_code == 204
