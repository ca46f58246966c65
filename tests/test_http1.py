"""The lean upstream HTTP/1.1 client: framing, pooling, timeouts and failures, against raw servers."""

from __future__ import annotations

import socket

import gevent
import httpx2
import pytest
from gevent.server import StreamServer

from app.http1 import Pool


class RawServer:
    """Answers each request on a connection with the next scripted list of raw byte writes."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.requests: list[bytes] = []
        self.connections = 0
        self.server = StreamServer(("127.0.0.1", 0), self._serve)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def _serve(self, sock, _addr):
        self.connections += 1
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        while self.answers:
            while b"\r\n\r\n" not in buf:
                data = sock.recv(65536)
                if not data:
                    return
                buf += data
            head, _, rest = buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if b"transfer-encoding: chunked" in head.lower():
                while b"\r\n0\r\n\r\n" not in b"\r\n" + rest:
                    rest += sock.recv(65536)
                end = (b"\r\n" + rest).index(b"\r\n0\r\n\r\n") + 5
                body, buf = rest[:end], rest[end:]
            else:
                while len(rest) < length:
                    rest += sock.recv(65536)
                body, buf = rest[:length], rest[length:]
            self.requests.append(head + b"\r\n\r\n" + body)
            for part in self.answers.pop(0):
                if part == "close":
                    sock.close()
                    return
                if isinstance(part, float):
                    gevent.sleep(part)
                    continue
                sock.sendall(part)
                gevent.sleep(0.001)

    def stop(self):
        self.server.stop()


def get(pool, body=None, method="GET", timeout=5.0):
    return pool.request(
        method, pool.target("/x"), [("Accept", "application/json")], body, header_timeout=timeout
    )


@pytest.fixture
def serve():
    servers = []

    def start(*answers):
        server = RawServer(answers)
        servers.append(server)
        return server, Pool(server.url)

    yield start
    for server in servers:
        server.stop()


CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
BODY = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n"


def test_content_length_body_and_keep_alive_reuse(serve):
    server, pool = serve(
        [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nx-request-id: r1\r\n\r\nhello"],
        [b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"],
    )
    first = get(pool)
    assert (first.status_code, first.headers.get("X-Request-Id"), first.read()) == (200, "r1", b"hello")
    second = get(pool, body=b'{"a":1}', method="POST")
    assert (second.status_code, second.content) == (201, b"ok")
    assert server.connections == 1
    assert server.requests[1].endswith(b'Content-Length: 7\r\n\r\n{"a":1}')
    assert server.requests[0].startswith(b"GET /v1/x HTTP/1.1\r\nHost: 127.0.0.1:")


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_chunked_body_split_at_every_boundary(serve, step):
    payload = CHUNKED + BODY
    _, pool = serve([payload[i : i + step] for i in range(0, len(payload), step)])
    assert get(pool).read() == b"hello, world"


def test_chunked_trailers_and_reuse(serve):
    server, pool = serve([CHUNKED + b"3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n"], [CHUNKED + b"0\r\n\r\n"])
    assert get(pool).read() == b"abc"
    assert get(pool).read() == b""
    assert server.connections == 1


def test_next_chunk_returns_data_as_it_arrives_and_none_on_silence(serve):
    _, pool = serve([CHUNKED, b"5\r\nfirst\r\n", 0.3, b"6\r\nsecond\r\n0\r\n\r\n"])
    response = get(pool)
    assert response.next_chunk(1.0) == b"first"
    assert response.next_chunk(0.1) is None
    assert response.next_chunk(1.0) == b"second"
    assert response.next_chunk(1.0) == b""


def test_body_until_close(serve):
    server, pool = serve(
        [b"HTTP/1.1 200 OK\r\n\r\nall of it", "close"], [b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"]
    )
    assert get(pool).read() == b"all of it"
    assert get(pool).status_code == 200
    assert server.connections == 2


@pytest.mark.parametrize(
    "answer",
    [
        [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf", "close"],
        [CHUNKED + b"5\r\nhel", "close"],
        [CHUNKED + b"zz\r\n"],
    ],
)
def test_truncated_or_broken_bodies_raise(serve, answer):
    _, pool = serve(answer)
    with pytest.raises(httpx2.RemoteProtocolError):
        get(pool).read()


def test_no_response_at_all(serve):
    _, pool = serve(["close"])
    with pytest.raises(httpx2.RemoteProtocolError):
        get(pool)


def test_garbage_instead_of_http(serve):
    _, pool = serve([b"SSH-2.0-OpenSSH\r\n\r\n"])
    with pytest.raises(httpx2.RemoteProtocolError):
        get(pool)


def test_informational_responses_are_skipped(serve):
    _, pool = serve([b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"])
    assert get(pool, body=b"x", method="POST").read() == b"ok"


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses(serve, status):
    server, pool = serve(
        [f"HTTP/1.1 {status} X\r\n\r\n".encode()], [b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1"]
    )
    assert get(pool).read() == b""
    assert get(pool).read() == b"1"
    assert server.connections == 1


def test_connection_close_header_is_honoured(serve):
    server, pool = serve(
        [b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\na"],
        [b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb"],
    )
    assert get(pool).read() == b"a"
    assert get(pool).read() == b"b"
    assert server.connections == 2


def test_stale_pooled_connection_is_replaced(serve):
    server, pool = serve([b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na", "close"],
                         [b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb"])  # fmt: skip
    assert get(pool).read() == b"a"
    gevent.sleep(0.05)  # the server has closed the idle connection
    assert get(pool).read() == b"b"
    assert server.connections == 2


def test_abandoned_body_is_not_reused(serve):
    server, pool = serve(
        [CHUNKED + b"5\r\nhello\r\n", 0.5], [b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb"]
    )
    response = get(pool)
    assert response.next_chunk(1.0) == b"hello"
    response.close()
    assert get(pool).read() == b"b"
    assert server.connections == 2


def test_header_timeout(serve):
    _, pool = serve([1.0, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])
    with pytest.raises(httpx2.ReadTimeout):
        get(pool, timeout=0.2)


def test_streamed_request_body_is_sent_chunked(serve):
    server, pool = serve([b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])
    get(pool, body=iter([b"ab", b"", b"cde"]), method="POST")
    assert server.requests[0].endswith(b"Transfer-Encoding: chunked\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n")


def test_connect_refused():
    from tests.conftest import free_port

    pool = Pool(f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(httpx2.ConnectError):
        get(pool)


def test_unsupported_scheme():
    with pytest.raises(ValueError):
        Pool("ftp://example.com/v1")
