"""A raw-socket "upstream" that answers the proxy with exactly the bytes a test scripts.

The regular fake (`tests/support/fake_upstream.py`) speaks correct HTTP; this one is for what a correct
server never sends: broken status lines and framing, oversized heads, endless events, answers given
before the request body was read. It reads each request head (and, unless told not to, the body),
takes the next scripted `Answer`, writes its bytes and then keeps the connection, closes it, or holds
it open until the proxy hangs up. With no script left it answers like the OpenAI API would, so the
same server also proves that the proxy still serves normally after a hostile answer.

Usage::

    hostile.push(raw_answer(b"HTTQ/1.1 200 OK\\r\\n\\r\\n"))
    r = post_json(client, "/openai", body)      # the proxy, pointed at hostile.url
    assert hostile.requests[-1].path == "/v1/chat/completions"
"""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import gevent
from gevent.server import StreamServer

from tests.support.fake_upstream import chat_completion, response_events, response_object

# How long a held connection waits for the proxy to hang up. A proxy that rejects a malformed answer
# closes at once; one that waits for more bytes gets EOF after this and then fails the test.
HOLD_S = 2.0
# No connection greenlet outlives this, whatever the proxy does (a safety bound, not a timing check).
CONNECTION_SAFETY_S = 120.0
MAX_REQUEST_HEAD = 1024 * 1024
RECV = 65536


@dataclass
class RawRequest:
    """One request as it arrived, head bytes included (so tests can see exactly what was sent)."""

    head: bytes
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    body_read: bool = True
    # Bytes the answer wrote before it finished or the proxy hung up; whether the proxy hung up.
    sent: int = 0
    peer_closed: bool = False

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query_string(self) -> str:
        return urlsplit(self.target).query

    def header_values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def header(self, name: str) -> str | None:
        values = self.header_values(name)
        return ", ".join(values) if values else None

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class PeerGone(Exception):
    """The proxy closed the connection while the answer was being written."""


class Wire:
    """The socket of one answer: writes that notice when the proxy hangs up, and holding it open."""

    def __init__(self, sock: socket.socket, req: RawRequest) -> None:
        self.sock = sock
        self.req = req

    def write(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            self.req.peer_closed = True
            raise PeerGone() from None
        self.req.sent += len(data)

    def hold(self, seconds: float = HOLD_S) -> None:
        """Keep the connection open, reading and discarding, until the proxy closes it or time is up."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                gevent.socket.wait_read(self.sock.fileno(), timeout=remaining)
                data = self.sock.recv(RECV)
            except TimeoutError:
                return
            except OSError:
                data = b""
            if not data:
                self.req.peer_closed = True
                return


@dataclass(frozen=True)
class Answer:
    """What the server does with one request.

    `write` puts the response on the wire. `read_body=False` answers right after the request head
    (an upstream that refuses a request early). `after` is "keep" (a complete answer: wait for the
    next request on the connection), "close", or "hold" (stay open until the proxy hangs up, bounded
    by HOLD_S, so that a proxy which waits for more bytes is not rescued by an EOF).
    """

    write: Callable[[Wire], None]
    read_body: bool = True
    after: str = "keep"


def raw_answer(*parts: bytes | float, after: str = "hold", read_body: bool = True) -> Answer:
    """Write these bytes (a float is a pause in seconds between writes)."""

    def write(wire: Wire) -> None:
        for part in parts:
            if isinstance(part, float):
                gevent.sleep(part)
            else:
                wire.write(part)

    return Answer(write, read_body=read_body, after=after)


def response_bytes(
    status: int,
    body: bytes,
    *,
    reason: str = "Status",
    headers: list[tuple[str, str]] | None = None,
    content_type: str = "application/json",
) -> bytes:
    """A well-formed response with a Content-Length (headers may add to or repeat what is set here)."""
    lines = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers or []]
    lines.append(f"x-request-id: req_hostile_{time.monotonic_ns()}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def complete(status: int, body: bytes, **kwargs: Any) -> Answer:
    """A correct answer; the connection stays open for the next request."""
    return raw_answer(response_bytes(status, body, **kwargs), after="keep")


def json_answer(status: int, obj: Any, headers: list[tuple[str, str]] | None = None) -> Answer:
    return complete(status, json.dumps(obj).encode(), headers=headers)


def openai_error(status: int, message: str, *, code: str | None = None) -> bytes:
    """An error body in OpenAI's shape, as bytes."""
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    return json.dumps({"error": error}).encode()


def early(status: int, body: bytes) -> Answer:
    """Answer as soon as the request head is in, without reading the body, then close (as an API does
    when it refuses a request it will not read, e.g. a bad key on a big upload)."""
    return Answer(
        lambda wire: wire.write(response_bytes(status, body, headers=[("Connection", "close")])),
        read_body=False,
        after="close",
    )


def flood(head: bytes, first: bytes, unit: bytes, total: int, *, chunked: bool) -> Answer:
    """`head`, then `first` and copies of `unit` until `total` body bytes are out, then close.

    Stops early when the proxy hangs up (as it should once a cap is reached); `chunked` wraps each
    write in a chunk of the chunked coding (no final chunk: the flood ends with a close).
    """

    def write(wire: Wire) -> None:
        wire.write(head)
        sent = 0
        piece = first
        while sent < total:
            piece = piece[: total - sent]
            wire.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            sent += len(piece)
            piece = unit

    return Answer(write, after="close")


def gzipped(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def stream_head(content_type: str = "text/event-stream") -> bytes:
    """The head of a valid chunked event stream."""
    return (
        f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n"
        f"x-request-id: req_hostile_stream\r\n\r\n"
    ).encode()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def default_answer(req: RawRequest) -> Answer:
    """What the OpenAI API would answer, for the few paths these tests call normally."""
    try:
        body = req.json if req.body[:1] == b"{" else {}
    except ValueError:
        body = {}
    model = body.get("model", "gpt-4o-mini") if isinstance(body, dict) else "gpt-4o-mini"
    streamed = isinstance(body, dict) and body.get("stream") is True
    if req.method == "POST" and req.path == "/v1/chat/completions" and not streamed:
        return json_answer(200, chat_completion(model))
    retrieved = req.method == "GET" and req.path.startswith("/v1/responses/")
    if (req.method == "POST" and req.path == "/v1/responses" and streamed) or (
        retrieved and "stream=true" in req.query_string
    ):
        frames = b"".join(
            chunk(f"event: {e['type']}\ndata: {json.dumps(e, separators=(',', ':'))}\n\n".encode())
            for e in response_events(model, 1)
        )
        return raw_answer(stream_head() + frames + b"0\r\n\r\n", after="keep")
    if req.method == "POST" and req.path == "/v1/responses":
        return json_answer(200, response_object(model))
    if retrieved:
        return json_answer(200, response_object(model, rid=req.path.rsplit("/", 1)[1]))
    if req.method == "GET" and req.path == "/v1/models":
        listing = {"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model", "created": 1,
                                               "owned_by": "openai"}]}  # fmt: skip
        return json_answer(200, listing)
    return complete(404, openai_error(404, f"Unknown path {req.method} {req.path}", code="unknown_url"))


@dataclass
class HostileUpstream:
    """The server: start(), `url`, push() answers, inspect `requests`, reset() between tests."""

    requests: list[RawRequest] = field(default_factory=list)
    connections: int = 0
    _answers: list[Answer] = field(default_factory=list)
    _server: StreamServer | None = None

    def start(self) -> HostileUpstream:
        self._server = StreamServer(("127.0.0.1", 0), self._serve, backlog=1024)
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(timeout=1)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def push(self, *answers: Answer) -> None:
        """Answer the next requests (whatever their path) with these, in order."""
        self._answers.extend(answers)

    def reset(self) -> None:
        self.requests.clear()
        self._answers.clear()

    def drop_answers(self) -> None:
        """Forget the scripted answers not used yet (a call that was not retried leaves some)."""
        self._answers.clear()

    def pending(self) -> int:
        """Scripted answers not used yet."""
        return len(self._answers)

    def _serve(self, sock: socket.socket, _addr: Any) -> None:
        self.connections += 1
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            with gevent.Timeout(CONNECTION_SAFETY_S, False):
                self._converse(sock)
        except (OSError, PeerGone, ValueError):
            pass
        finally:
            with contextlib.suppress(OSError):
                sock.close()

    def _converse(self, sock: socket.socket) -> None:
        buf = b""
        while True:
            head, buf = _read_head(sock, buf)
            if head is None:
                return
            req = _parse_head(head)
            answer = self._answers.pop(0) if self._answers else None
            if answer is None or answer.read_body:
                req.body, buf = _read_body(sock, req, buf)
            else:
                req.body_read = False
            self.requests.append(req)
            answer = answer or default_answer(req)
            wire = Wire(sock, req)
            answer.write(wire)
            if answer.after == "hold":
                wire.hold()
                return
            if answer.after == "close":
                return


def _read_head(sock: socket.socket, buf: bytes) -> tuple[bytes | None, bytes]:
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_REQUEST_HEAD:
            raise ValueError("request head too large")
        data = sock.recv(RECV)
        if not data:
            return None, b""
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def _parse_head(head: bytes) -> RawRequest:
    lines = head.decode("latin-1").split("\r\n")
    method, target, _version = lines[0].split(" ", 2)
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return RawRequest(head=head, method=method, target=target, headers=headers)


def _recv_more(sock: socket.socket, buf: bytes) -> bytes:
    data = sock.recv(RECV)
    if not data:
        raise ValueError("the proxy closed the connection mid-request")
    return buf + data


def _read_body(sock: socket.socket, req: RawRequest, buf: bytes) -> tuple[bytes, bytes]:
    if (req.header("transfer-encoding") or "").lower() == "chunked":
        parts = []
        while True:
            while b"\r\n" not in buf:
                buf = _recv_more(sock, buf)
            line, _, buf = buf.partition(b"\r\n")
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while not (buf.startswith(b"\r\n") or b"\r\n\r\n" in buf):
                    buf = _recv_more(sock, buf)
                buf = buf[2:] if buf.startswith(b"\r\n") else buf.partition(b"\r\n\r\n")[2]
                return b"".join(parts), buf
            while len(buf) < size + 2:
                buf = _recv_more(sock, buf)
            parts.append(buf[:size])
            buf = buf[size + 2 :]
    length = int(req.header("content-length") or 0)
    while len(buf) < length:
        buf = _recv_more(sock, buf)
    return buf[:length], buf[length:]
