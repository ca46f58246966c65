"""A real HTTP server that behaves like the OpenAI API, with injectable faults.

It speaks HTTP/1.1 on raw gevent sockets (keep-alive, chunked bodies both ways), so a test can make
it do what a library server would refuse to: reset the connection, stop mid-body, send garbage,
stream slowly, drop a stream, and notice when the proxy hangs up on it.

It serves HTTPS by default, as the real API does, with a certificate from a throwaway CA made once
per process (`ca_path()` is that CA's PEM file, for OPENAI_PROXY_CA_BUNDLE or `verify=`);
`FakeUpstream(tls=False)` serves plain HTTP.

Usage in tests::

    fake.push("POST", "/v1/chat/completions", error(429, "Slow down", headers={"Retry-After": "3"}))
    fake.push("POST", "/v1/chat/completions", error(401, "Bad key"), times=None, key="sk-one-key")
    ...
    req = fake.last("/v1/chat/completions")
    assert req.json["model"] == "gpt-4o-mini"
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import email.parser
import email.policy
import functools
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import socket
import ssl
import struct
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import gevent
import gevent.ssl
import trustme
from gevent.server import StreamServer

Handler = Callable[["Received", "Conn"], None]

# Values that are not exactly representable as float32: a float32 round trip would change them.
EMBEDDING = [0.0023064255, -0.009327292, 0.015797347, -0.0077780345, 0.12345678901234568]

REASONS = {
    200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    408: "Request Timeout", 409: "Conflict", 413: "Payload Too Large", 422: "Unprocessable Entity",
    429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout",
}  # fmt: skip


@dataclass
class Received:
    """One request as the fake saw it."""

    method: str
    path: str
    query_string: str
    headers: dict[str, str]
    body: bytes
    received_at: float
    head_at: float = 0.0
    client_closed_at: float | None = None
    finished_at: float | None = None
    events_sent: int = 0
    connection: int = 0  # which accepted connection carried it (FakeUpstream.connections)

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(self.query_string, keep_blank_values=True)

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    def form(self) -> tuple[dict[str, list[str]], dict[str, tuple[str, bytes, str]]]:
        """Multipart fields and files: ({name: [values]}, {name: (filename, bytes, content_type)})."""
        ctype = self.headers.get("content-type", "")
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + self.body
        )
        fields: dict[str, list[str]] = {}
        files: dict[str, tuple[str, bytes, str]] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            filename = part.get_filename()
            payload = part.get_payload(decode=True) or b""
            if filename is not None:
                files[name] = (filename, payload, part.get_content_type())
            else:
                fields.setdefault(name, []).append(payload.decode())
        return fields, files


class ClientGone(Exception):
    """The proxy closed the connection while the fake was answering."""


class Conn:
    """Response helpers on the raw socket of one request."""

    def __init__(self, sock: socket.socket, req: Received, reader: io.BufferedReader) -> None:
        self.sock = sock
        self.req = req
        # The connection's request reader: wait() peeks through it on TLS (see _hung_up).
        self.reader = reader
        self.tls = isinstance(sock, (ssl.SSLSocket, gevent.ssl.SSLSocket))
        self.keep_alive = True

    # -- plain answers -------------------------------------------------------------------------
    def send(self, status: int, body: bytes, content_type: str = "application/json", headers=None) -> None:
        head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}", f"Content-Type: {content_type}"]
        head.append(f"Content-Length: {len(body)}")
        head.append(f"x-request-id: req_fake_{int(time.time() * 1e6)}")
        for name, value in (headers or {}).items():
            head.append(f"{name}: {value}")
        self._write(("\r\n".join(head) + "\r\n\r\n").encode() + body)

    def send_json(self, status: int, obj: Any, headers=None) -> None:
        self.send(status, json.dumps(obj).encode(), "application/json", headers)

    # -- streams ---------------------------------------------------------------------------------
    def start_stream(self, status: int = 200, content_type: str = "text/event-stream", headers=None) -> None:
        head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}", f"Content-Type: {content_type}"]
        head += ["Transfer-Encoding: chunked", f"x-request-id: req_fake_stream_{int(time.time() * 1e6)}"]
        for name, value in (headers or {}).items():
            head.append(f"{name}: {value}")
        self._write(("\r\n".join(head) + "\r\n\r\n").encode())

    def chunk(self, data: bytes) -> None:
        if data:
            self._write(b"%x\r\n%s\r\n" % (len(data), data))

    def event(self, data: Any, event: str | None = None) -> None:
        text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
        prefix = f"event: {event}\n" if event else ""
        self.chunk(f"{prefix}data: {text}\n\n".encode())
        self.req.events_sent += 1

    def end_stream(self) -> None:
        self._write(b"0\r\n\r\n")

    # -- faults ----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Abort the connection with a TCP RST (over TLS too: no close_notify goes out first)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.keep_alive = False
        self.sock.close()

    def close(self) -> None:
        """Hang up with a FIN; over TLS without a close_notify, as a server that dies mid-answer."""
        self.keep_alive = False
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def wait(self, seconds: float) -> None:
        """Sleep, but notice at once if the proxy hangs up meanwhile (raises ClientGone)."""
        deadline = time.monotonic() + seconds
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                gevent.socket.wait_read(self.sock.fileno(), timeout=min(remaining, 0.05))
            except TimeoutError:
                continue
            except OSError:
                self._gone()
            if self._hung_up():
                self._gone()
            gevent.sleep(min(remaining, 0.02))

    def _hung_up(self) -> bool:
        """Once the socket is readable: is that the proxy hanging up (EOF, RST, TLS close_notify)?"""
        if not self.tls:
            try:
                return not self.sock.recv(1, socket.MSG_PEEK)
            except OSError:
                return True
        # An SSL socket refuses MSG_PEEK (ValueError), and peeking at the TCP bytes would not tell a
        # close_notify from data: TLS 1.3 sends both as application-data records. So read one record
        # without blocking, into the request reader's buffer, where any bytes the proxy did send stay
        # for the next request. b"" is a close_notify or an EOF (ragged EOFs are suppressed).
        timeout = self.sock.gettimeout()
        self.sock.settimeout(0.0)
        try:
            return not self.reader.peek(1)
        except ssl.SSLWantReadError:
            return False  # a record without application data (a key update), or half a record
        except OSError:
            return True
        finally:
            self.sock.settimeout(timeout)

    def _gone(self) -> None:
        if self.req.client_closed_at is None:
            self.req.client_closed_at = time.monotonic()
        self.keep_alive = False
        raise ClientGone()

    def _write(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            self._gone()


# ---- handler factories for tests ------------------------------------------------------------------


def error(status: int, message: str = "Upstream says no", *, type: str = "invalid_request_error",
          code: str | None = None, headers: dict[str, str] | None = None) -> Handler:  # fmt: skip
    """An OpenAI-shaped error answer."""
    body = {"error": {"message": message, "type": type, "param": None, "code": code}}
    return lambda req, conn: conn.send_json(status, body, headers)


def raw(status: int, body: bytes, content_type: str = "text/html", headers=None) -> Handler:
    return lambda req, conn: conn.send(status, body, content_type, headers)


def delay(seconds: float, then: Handler | None = None) -> Handler:
    """Wait before answering (normally, unless `then` says otherwise)."""

    def handler(req: Received, conn: Conn) -> None:
        conn.wait(seconds)
        (then or default_handler)(req, conn)

    return handler


def reset() -> Handler:
    return lambda req, conn: conn.reset()


def truncated_json() -> Handler:
    """Announce a body, send half of it, then hang up."""

    def handler(req: Received, conn: Conn) -> None:
        body = b'{"id":"chatcmpl-cut","object":"chat.completion","choices":[]}'
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        conn._write(head.encode() + body[: len(body) // 2])
        conn.close()

    return handler


def chunked_json(obj: Any, piece: int = 64 * 1024) -> Handler:
    """A JSON answer of unknown length (chunked, no Content-Length), in `piece`-byte chunks."""
    body = json.dumps(obj).encode()

    def handler(req: Received, conn: Conn) -> None:
        conn.start_stream(content_type="application/json")
        for start in range(0, len(body), piece):
            conn.chunk(body[start : start + piece])
        conn.end_stream()

    return handler


def sse(events: Iterable[Any], *, gap: float = 0.0, first_delay: float = 0.0,
        end: str = "done", event_names: bool = False) -> Handler:  # fmt: skip
    """Stream events; `end` is "done" (clean), "drop" (hang up mid-stream) or "invalid" (bad data)."""
    events = list(events)

    def handler(req: Received, conn: Conn) -> None:
        conn.start_stream()
        if first_delay:
            conn.wait(first_delay)
        for i, ev in enumerate(events):
            if i and gap:
                conn.wait(gap)
            conn.event(ev, ev.get("type") if event_names and isinstance(ev, dict) else None)
        if end == "drop":
            conn.close()
            return
        if end == "invalid":
            conn.chunk(b"data: {not json\n\n")
        conn.end_stream()

    return handler


# ---- the API as the fake answers it by default ------------------------------------------------------


def chat_completion(
    model: str, content: str = "Hello from the fake upstream.", usage: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A chat completion; `usage` replaces the default one (cached, reasoning, audio details...)."""
    answer = {
        "id": "chatcmpl-fake123",
        "object": "chat.completion",
        "created": 1741476542,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 25, "completion_tokens": 7, "total_tokens": 32,
                  "prompt_tokens_details": {"cached_tokens": 3}},
        "system_fingerprint": None,
        "x_unknown_upstream_field": {"kept": True},
    }  # fmt: skip
    if usage is not None:
        answer["usage"] = usage
    return answer


def response_object(
    model: str, rid: str = "resp_fake123", text: str = "In a peaceful grove.", **extra: Any
) -> dict[str, Any]:
    """A Response; `extra` fields replace or add to the default ones (`usage`, `background`, ...)."""
    answer = {
        "id": rid,
        "object": "response",
        "created_at": 1741476542,
        "status": "completed",
        "model": model,
        "output": [
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
             "content": [{"type": "output_text", "text": text, "annotations": []},
                         {"type": "output_text", "text": " The end.", "annotations": []}]},
        ],
        "usage": {"input_tokens": 36, "input_tokens_details": {"cached_tokens": 4}, "output_tokens": 87,
                  "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 123},
        "temperature": 1.0,
        "x_unknown_upstream_field": 1.0,
    }  # fmt: skip
    answer.update(extra)
    return answer


def response_events(
    model: str, n_deltas: int = 3, *, final: str = "response.completed", **extra: Any
) -> list[dict[str, Any]]:
    """A Responses stream in the full shape the SDK's `responses.stream()` helper accumulates.

    `final` is the last event's type (`response.incomplete`, `response.failed` end a stream too);
    `extra` fields go into the response the last event carries (`usage`, `model`, `background`)."""
    deltas = [f"word{i} " for i in range(n_deltas)]
    text = "".join(deltas)
    message = {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}  # fmt: skip
    created = response_object(model)
    created.update(status="in_progress", output=[], usage=None)
    completed = response_object(model, **extra)
    completed["output"] = [message]
    if final != "response.completed":
        completed["status"] = final.rpartition(".")[2]
    at = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": created},
        {"type": "response.in_progress", "response": created},
        {"type": "response.output_item.added", "output_index": 0,
         "item": {**message, "status": "in_progress", "content": []}},
        {"type": "response.content_part.added", **at, "part": {"type": "output_text", "text": "", "annotations": []}},
        *({"type": "response.output_text.delta", **at, "delta": d, "logprobs": []} for d in deltas),
        {"type": "response.output_text.done", **at, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **at, "part": message["content"][0]},
        {"type": "response.output_item.done", "output_index": 0, "item": message},
        {"type": final, "response": completed},
    ]  # fmt: skip
    for i, event in enumerate(events):
        event["sequence_number"] = i
    return events


def chat_chunks(
    model: str, include_usage: bool, n_deltas: int = 3, usage: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """A streamed chat completion; the usage chunk (empty `choices`) only when the caller asked for it,
    with `usage` in place of the default one if given."""
    base = {
        "id": "chatcmpl-stream1",
        "object": "chat.completion.chunk",
        "created": 1741476542,
        "model": model,
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": f"word{i} "}) for i in range(n_deltas)]
    chunks.append(chunk({}, "stop"))
    if include_usage:
        chunks.append({**base, "choices": [], "usage": usage or {"prompt_tokens": 12, "completion_tokens": n_deltas,
                                                                 "total_tokens": 12 + n_deltas}})  # fmt: skip
    return chunks


def chat_stream(
    include_usage: bool, model: str = "gpt-4o-mini", *, gap: float = 0.0, end: str = "done"
) -> Handler:
    """Stream chat chunks then `data: [DONE]` (or drop the connection midway with `end="drop"`)."""

    def handler(req: Received, conn: Conn) -> None:
        conn.start_stream()
        for i, chunk in enumerate(chat_chunks(model, include_usage)):
            if i and gap:
                conn.wait(gap)
            conn.event(chunk)
            if end == "drop" and i == 1:
                conn.close()
                return
        conn.chunk(b"data: [DONE]\n\n")
        conn.end_stream()

    return handler


def transcript_events(text: str, usage: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A streamed transcription (`stream=true`): text deltas, then `transcript.text.done` with usage."""
    words = text.split(" ")
    events: list[dict[str, Any]] = [
        {"type": "transcript.text.delta", "delta": word if i == 0 else f" {word}", "logprobs": []}
        for i, word in enumerate(words)
    ]
    done: dict[str, Any] = {"type": "transcript.text.done", "text": text, "logprobs": []}
    if usage is not None:
        done["usage"] = usage
    return [*events, done]


INPUT_ITEMS = [
    {
        "id": f"msg_{i}",
        "type": "message",
        "role": "user",
        "content": [{"type": "input_text", "text": f"item {i}"}],
    }
    for i in range(3)
]


def _input_items(req: Received) -> dict[str, Any]:
    query = req.query
    items = list(INPUT_ITEMS)
    if query.get("order") == ["asc"]:
        pass
    after = (query.get("after") or [None])[0]
    if after:
        index = next((i for i, item in enumerate(items) if item["id"] == after), -1)
        items = items[index + 1 :]
    limit = int((query.get("limit") or ["20"])[0])
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}  # fmt: skip


FILES: dict[str, bytes] = {}


def _upload_file(req: Received, conn: Conn) -> None:
    fields, files = req.form()
    filename, data, _ = files["file"]
    file_id = f"file-{hashlib.sha256(data).hexdigest()[:16]}"
    FILES[file_id] = data
    conn.send_json(200, {"id": file_id, "object": "file", "bytes": len(data), "created_at": 1741476542,
                         "filename": filename, "purpose": fields["purpose"][0], "status": "processed",
                         "sha256": hashlib.sha256(data).hexdigest()})  # fmt: skip


def _download_file(file_id: str, conn: Conn) -> None:
    data = FILES.get(file_id)
    if data is None:
        conn.send_json(404, {"error": {"message": f"No such File object: {file_id}", "type": "invalid_request_error",
                                       "param": "id", "code": None}})  # fmt: skip
        return
    conn.send(
        200, data, "application/octet-stream", {"Content-Disposition": f'attachment; filename="{file_id}"'}
    )


def _embeddings(body: dict[str, Any]) -> dict[str, Any]:
    inputs = body.get("input")
    count = len(inputs) if isinstance(inputs, list) else 1
    data = []
    for i in range(count):
        if body.get("encoding_format") == "base64":
            vector: Any = base64.b64encode(struct.pack(f"<{len(EMBEDDING)}f", *EMBEDDING)).decode()
        else:
            vector = EMBEDDING
        data.append({"object": "embedding", "index": i, "embedding": vector})
    return {"object": "list", "data": data, "model": body.get("model"),
            "usage": {"prompt_tokens": 9, "total_tokens": 9}}  # fmt: skip


def _transcription(req: Received, conn: Conn) -> None:
    fields, files = req.form()
    if "file" not in files:
        conn.send_json(400, {"error": {"message": "No file", "type": "invalid_request_error"}})
        return
    filename, data, _ = files["file"]
    fmt = (fields.get("response_format") or ["json"])[0]
    text = f"transcribed {filename} size={len(data)} sha256={hashlib.sha256(data).hexdigest()}"
    if fmt in ("text", "srt", "vtt"):
        conn.send(200, (text + "\n").encode(), "text/plain; charset=utf-8")
    elif fmt == "verbose_json":
        conn.send_json(200, {"task": "transcribe", "language": "english", "duration": 1.5, "text": text,
                             "segments": [], "fields": fields})  # fmt: skip
    else:
        conn.send_json(200, {"text": text, "fields": fields, "usage": {"type": "duration", "seconds": 2}})


def default_handler(req: Received, conn: Conn) -> None:
    """Answer like the real API would for the paths the proxy uses."""
    path, method = req.path, req.method
    body = req.json if req.body and req.headers.get("content-type", "").startswith("application/json") else {}
    body = body if isinstance(body, dict) else {}
    model = body.get("model", "gpt-4o-mini")
    m = re.fullmatch(r"/v1/responses/([^/]+)(/input_items|/cancel)?", path)
    if method == "POST" and path == "/v1/chat/completions":
        if body.get("stream"):
            options = body.get("stream_options") or {}
            chat_stream(bool(options.get("include_usage")), model)(req, conn)
        else:
            conn.send_json(200, chat_completion(model))
    elif method == "POST" and path == "/v1/responses":
        if body.get("stream"):
            sse(response_events(model), event_names=True)(req, conn)
        else:
            conn.send_json(200, response_object(model))
    elif method == "POST" and path == "/v1/responses/compact":
        conn.send_json(200, {"id": "resp_compact1", "object": "response.compaction", "output": [],
                             "usage": {"input_tokens": 10, "output_tokens": 2, "total_tokens": 12}})  # fmt: skip
    elif method == "POST" and path == "/v1/responses/input_tokens":
        conn.send_json(200, {"object": "response.input_tokens", "input_tokens": 11})
    elif m and method == "GET" and m.group(2) is None:
        if req.query.get("stream") == ["true"]:
            sse(response_events(model), event_names=True)(req, conn)
        else:
            conn.send_json(200, response_object(model, rid=m.group(1)))
    elif m and method == "GET" and m.group(2) == "/input_items":
        if req.query:
            conn.send_json(200, _input_items(req))
        else:
            conn.send_json(200, {"object": "list", "data": [{"id": "msg_abc123", "type": "message", "role": "user",
                                 "content": [{"type": "input_text", "text": "Tell me a story."}]}],
                                 "first_id": "msg_abc123", "last_id": "msg_abc123", "has_more": False})  # fmt: skip
    elif m and method == "POST" and m.group(2) == "/cancel":
        obj = response_object(model, rid=m.group(1))
        obj["status"] = "cancelled"
        conn.send_json(200, obj)
    elif m and method == "DELETE" and m.group(2) is None:
        conn.send_json(200, {"id": m.group(1), "object": "response", "deleted": True})
    elif method == "POST" and path == "/v1/embeddings":
        conn.send_json(200, _embeddings(body))
    elif method == "POST" and path == "/v1/audio/transcriptions":
        _transcription(req, conn)
    elif method == "POST" and path == "/v1/files":
        _upload_file(req, conn)
    elif method == "GET" and (f := re.fullmatch(r"/v1/files/([^/]+)/content", path)):
        _download_file(f.group(1), conn)
    elif method == "GET" and (mm := re.fullmatch(r"/v1/models/([^/]+)", path)):
        conn.send_json(200, {"id": mm.group(1), "object": "model", "created": 1, "owned_by": "openai"})
    elif method == "GET" and path == "/v1/models":
        conn.send_json(200, {"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model",
                             "created": 1, "owned_by": "openai"}]})  # fmt: skip
    else:
        conn.send_json(404, {"error": {"message": f"Unknown path {method} {path}", "type": "invalid_request_error",
                                       "param": None, "code": "unknown_url"}})  # fmt: skip


# ---- TLS: a throwaway CA, made once per process (so once per test session) --------------------------


@functools.cache
def session_ca() -> trustme.CA:
    """The CA that signs every fake's certificate in this process."""
    return trustme.CA()


@functools.cache
def _server_cert() -> trustme.LeafCert:
    # Both names, so a client may use either in the base URL and still verify the host name.
    return session_ca().issue_cert("127.0.0.1", "localhost")


@functools.cache
def ca_path() -> str:
    """The session CA's certificate as a PEM file: OPENAI_PROXY_CA_BUNDLE, or `verify=` in requests."""
    directory = tempfile.mkdtemp(prefix="fake-upstream-ca-")
    owner = os.getpid()

    def remove() -> None:
        # Only the process that made it: a forked child exiting first must not take it from the parent.
        if os.getpid() == owner:
            shutil.rmtree(directory, ignore_errors=True)

    atexit.register(remove)
    path = os.path.join(directory, "ca.pem")
    session_ca().cert_pem.write_to_path(path)
    return path


def client_ssl_context() -> ssl.SSLContext:
    """A client context that trusts the session CA (and verifies host names), e.g. httpx `verify=`."""
    context = ssl.create_default_context()
    session_ca().configure_trust(context)
    return context


def _server_ssl_context() -> gevent.ssl.SSLContext:
    # gevent's context even when the process is not monkey-patched: its sockets wait cooperatively,
    # so one connection's handshake or read never blocks the others.
    context = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _server_cert().configure_cert(context)
    # The fake speaks HTTP/1.1 only; say so to a client that offers h2.
    context.set_alpn_protocols(["http/1.1"])
    return context


# ---- the server ------------------------------------------------------------------------------------


@dataclass
class _Script:
    method: str
    path: str | re.Pattern[str]
    handler: Handler
    times: int | None  # None = until cleared
    key: str | None = None  # only requests sent with `Authorization: Bearer <key>`

    def matches(self, method: str, path: str, authorization: str | None = None) -> bool:
        if self.method != method:
            return False
        if self.key is not None and authorization != f"Bearer {self.key}":
            return False
        return bool(self.path.fullmatch(path)) if isinstance(self.path, re.Pattern) else self.path == path


@dataclass
class FakeUpstream:
    """The server: start(), url, push() faults, inspect `requests`, reset() between tests.

    HTTPS with a certificate from `session_ca()` unless `tls=False`.
    """

    tls: bool = True
    host: str = "127.0.0.1"
    requests: list[Received] = field(default_factory=list)
    # TLS handshakes that failed, e.g. "127.0.0.1:51234: [SSL: TLSV1_ALERT_UNKNOWN_CA] ..." when a
    # client does not trust the session CA (the connection is then dropped).
    handshake_errors: list[str] = field(default_factory=list)
    # Connections accepted since the last reset(); each Received says which one carried it (ids are
    # never reused, so a connection kept from before a reset keeps its own).
    connections: int = 0
    # Connections reset on arrival, before TLS or any byte (`refuse_connections`), since the last reset().
    refused: int = 0
    _refuse: int = 0
    _idle: dict[int, socket.socket] = field(default_factory=dict)
    _scripts: list[_Script] = field(default_factory=list)
    _server: StreamServer | None = None

    def start(self, port: int = 0) -> FakeUpstream:
        ssl_args: dict[str, Any] = {}
        if self.tls:
            # gevent wraps each accepted socket in that connection's own greenlet; the handshake is
            # left to _serve so that a client rejecting the certificate is recorded, not printed as
            # a crashed greenlet.
            ssl_args = {"ssl_context": _server_ssl_context(), "do_handshake_on_connect": False}
        self._server = StreamServer((self.host, port), self._serve, backlog=4096, **ssl_args)
        self._server.start()
        return self

    def serve_forever(self) -> None:
        assert self._server is not None, "start() first"
        self._server.serve_forever()

    def stop(self) -> None:
        if self._server:
            self._server.stop(timeout=1)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_port

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}/v1"

    @property
    def ca_path(self) -> str:
        """The PEM file of the CA to trust, for `requests.get(fake.url + ..., verify=fake.ca_path)`.

        Pass it per call: a Session's `.verify` loses to REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE when those
        are set (requests only keeps it with `trust_env = False`). httpx takes `client_ssl_context()`.
        The same file for a plain server (it has nothing to verify), so callers need not check.
        """
        return ca_path()

    def reset(self) -> None:
        self.requests.clear()
        self.handshake_errors.clear()
        self._scripts.clear()
        self.connections = 0
        self.refused = self._refuse = 0

    def close_idle(self) -> int:
        """Close every kept-alive connection that waits for its next request, as servers do after
        their idle timeout; returns how many were closed."""
        idle = list(self._idle.values())
        self._idle.clear()
        for sock in idle:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        return len(idle)

    def push(
        self,
        method: str,
        path: str | re.Pattern[str],
        handler: Handler,
        times: int | None = 1,
        key: str | None = None,
    ) -> None:
        """Answer the next `times` matching requests with `handler` (None: every one until reset);
        with `key`, only requests made with that upstream key (`Authorization: Bearer <key>`)."""
        self._scripts.append(_Script(method, path, handler, times, key))

    def refuse_connections(self, count: int = 1) -> None:
        """Reset the next `count` new connections as they arrive (before TLS): a connect error for
        whoever makes them. Kept-alive connections are not affected (see `close_idle`)."""
        self._refuse += count

    def keys(self, path: str, method: str | None = None) -> list[str | None]:
        """The upstream key (Bearer token) of each request for `path`, in order."""
        out = []
        for req in self.matching(path, method):
            auth = req.headers.get("authorization") or ""
            out.append(auth[len("Bearer ") :] if auth.startswith("Bearer ") else None)
        return out

    def matching(self, path: str, method: str | None = None) -> list[Received]:
        return [r for r in self.requests if r.path == path and (method is None or r.method == method)]

    def last(self, path: str, method: str | None = None) -> Received:
        found = self.matching(path, method)
        assert found, f"the fake upstream received no request for {method or ''} {path}"
        return found[-1]

    def count(self, path: str, method: str | None = None) -> int:
        return len(self.matching(path, method))

    def _pick(self, method: str, path: str, authorization: str | None = None) -> Handler:
        for script in self._scripts:
            if script.matches(method, path, authorization):
                if script.times is not None:
                    script.times -= 1
                    if script.times <= 0:
                        self._scripts.remove(script)
                return script.handler
        return default_handler

    def _serve(self, sock: socket.socket, addr: tuple[str, int]) -> None:
        if self._refuse > 0:
            self._refuse -= 1
            self.refused += 1
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as real servers do for streams
        if self.tls:
            try:
                sock.do_handshake()  # type: ignore[attr-defined]
            except (OSError, ValueError) as exc:
                self.handshake_errors.append(f"{addr[0]}:{addr[1]}: {exc}")
                sock.close()
                return
        reader = sock.makefile("rb")
        self.connections += 1
        number = next(_CONNECTION_IDS)
        try:
            while True:
                self._idle[number] = sock
                try:
                    req = _read_request(reader)
                finally:
                    self._idle.pop(number, None)
                if req is None:
                    return
                req.connection = number
                self.requests.append(req)
                conn = Conn(sock, req, reader)
                try:
                    self._pick(req.method, req.path, req.headers.get("authorization"))(req, conn)
                except ClientGone:
                    return
                finally:
                    req.finished_at = time.monotonic()
                if not conn.keep_alive or req.headers.get("connection", "").lower() == "close":
                    return
        except (OSError, ValueError):
            return
        finally:
            try:
                reader.close()
                sock.close()
            except OSError:
                pass


_CONNECTION_IDS = itertools.count(1)


def _read_request(reader) -> Received | None:
    line = reader.readline(65537)
    if not line:
        return None
    method, target, _ = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    headers: dict[str, str] = {}
    head_at = time.monotonic()
    while True:
        h = reader.readline(65537).decode("latin-1").rstrip("\r\n")
        if not h:
            break
        name, _, value = h.partition(":")
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int(reader.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                reader.readline()
                break
            parts.append(reader.read(size))
            reader.readline()
        body = b"".join(parts)
    else:
        body = reader.read(int(headers.get("content-length", "0") or 0))
    split = urlsplit(target)
    return Received(method, split.path, split.query, headers, body, time.monotonic(), head_at)


def main() -> None:
    """Run the fake alone, e.g. to point a manually started proxy at it."""
    import argparse
    import signal
    import sys

    from gevent import monkey

    monkey.patch_all()
    parser = argparse.ArgumentParser(description="A fake OpenAI API on loopback")
    parser.add_argument("--port", type=int, default=8999)
    # Plain HTTP unless asked: bench/audio_memory.py runs this module and points the proxy at http://.
    parser.add_argument("--tls", action=argparse.BooleanOptionalAction, default=False,
                        help="serve HTTPS with a throwaway CA (its PEM path is printed)")  # fmt: skip
    args = parser.parse_args()
    fake = FakeUpstream(tls=args.tls).start(args.port)
    print(f"fake OpenAI API on {fake.url}", flush=True)
    if args.tls:
        print(f"OPENAI_PROXY_CA_BUNDLE={fake.ca_path}", flush=True)
        # Exit through atexit on SIGTERM too, so the CA's temporary directory is removed.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    fake.serve_forever()


if __name__ == "__main__":
    main()
