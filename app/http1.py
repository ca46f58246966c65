"""A lean HTTP/1.1 client for the proxy's hot path, on (gevent-patched) sockets.

The SDK's request machinery costs ~0.5 ms of CPU per call before any I/O, and httpcore's pool
probes every idle connection on each request, which grows with concurrency; for a proxy whose own
budget is a fraction of a millisecond per request that is the whole budget (see bench/README.md).
This client does only what the proxy needs: keep-alive connections in a LIFO pool (O(1) checkout,
one liveness peek), the per-attempt wait for response headers bounded by a `gevent.Timeout`,
request bodies sent as bytes or streamed chunked, response bodies read whole or chunk by chunk as
they arrive, TLS, and CONNECT through an outbound proxy. Failures raise httpx2's exception types,
so classification is the same as for the SDK path.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections import deque
from collections.abc import Iterable
from urllib.parse import urlsplit

import gevent
import httpx2

from app.http1_body import Headers, Response

MAX_HEAD = 64 * 1024
RECV = 65536
IDLE_EXPIRY_S = 30.0
MAX_IDLE = 256


class _Conn:
    __slots__ = ("idle_since", "raw", "rbuf", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.raw = getattr(sock, "_sock", sock)
        self.rbuf = b""
        self.idle_since = 0.0

    def alive(self) -> bool:
        """A pooled connection is reusable only if the peer has neither closed it nor sent anything."""
        if time.monotonic() - self.idle_since > IDLE_EXPIRY_S:
            return False
        if isinstance(self.sock, ssl.SSLSocket):
            return self.sock.pending() == 0 and self._peek_blocks(self.sock)
        return self._peek_blocks(self.raw)

    @staticmethod
    def _peek_blocks(sock) -> bool:
        try:
            sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, ssl.SSLWantReadError):
            return True
        except OSError:
            return False
        return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def recv(self) -> bytes:
        try:
            return self.sock.recv(RECV)
        except TimeoutError:
            raise
        except OSError as exc:
            raise httpx2.ReadError(f"reading from upstream failed: {exc}") from exc


class Pool:
    """Keep-alive connections to one upstream origin (optionally through a proxy), LIFO."""

    def __init__(
        self,
        base_url: str,
        *,
        proxy: str | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 960.0,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https"):
            raise ValueError(f"unsupported upstream URL {base_url!r}")
        self.tls = url.scheme == "https"
        self.host = url.hostname or ""
        self.port = url.port or (443 if self.tls else 80)
        self.base_path = url.path.rstrip("/")
        default_port = (self.tls and self.port == 443) or (not self.tls and self.port == 80)
        self.host_header = self.host if default_port else f"{self.host}:{self.port}"
        self.proxy = urlsplit(proxy) if proxy else None
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: deque[_Conn] = deque()
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if self.tls else None

    def target(self, path: str, query: str = "") -> str:
        target = self.base_path + path + (f"?{query}" if query else "")
        if self.proxy is not None and not self.tls:
            return f"http://{self.host_header}{target}"  # absolute form through a plain proxy
        return target

    def put(self, conn: _Conn) -> None:
        if len(self._idle) >= MAX_IDLE:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    def _checkout(self) -> _Conn:
        while self._idle:
            conn = self._idle.pop()
            if conn.alive():
                return conn
            conn.close()
        return self._connect()

    def _connect(self) -> _Conn:
        host, port = (self.proxy.hostname, self.proxy.port or 80) if self.proxy else (self.host, self.port)
        try:
            sock = socket.create_connection((host, port), timeout=self.connect_timeout)
        except TimeoutError as exc:
            raise httpx2.ConnectTimeout(f"connecting to {host}:{port} timed out") from exc
        except OSError as exc:
            raise httpx2.ConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if self.proxy is not None and self.tls:
                self._tunnel(sock)
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        return _Conn(sock)

    def _tunnel(self, sock: socket.socket) -> None:
        request = f"CONNECT {self.host}:{self.port} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n\r\n"
        sock.sendall(request.encode("ascii"))
        conn = _Conn(sock)
        status, _, _ = _read_head(conn)
        if status != 200:
            raise httpx2.ProxyError(f"the outbound proxy refused the tunnel: HTTP {status}")
        if conn.rbuf:
            raise httpx2.ProxyError("the outbound proxy sent data before the tunnel was up")

    def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | Iterable[bytes] | None,
        *,
        header_timeout: float,
        content_length: int | None = None,
    ) -> Response:
        """Send a request and return once the response headers are in.

        `header_timeout` bounds connecting, sending a bytes body and waiting for the response head.
        A streamed body (an iterable, sent with `content_length` if known, else chunked) is sent
        first, at the client's pace, and the timer starts once it is all upstream.
        """
        head = [f"{method} {target} HTTP/1.1", f"Host: {self.host_header}"]
        head += [f"{name}: {value}" for name, value in headers]
        streamed = body is not None and not isinstance(body, bytes | bytearray)
        if not streamed and body is not None:
            head.append(f"Content-Length: {len(body)}")
        elif streamed:
            head.append(
                f"Content-Length: {content_length}"
                if content_length is not None
                else "Transfer-Encoding: chunked"
            )
        elif method in ("POST", "PUT", "PATCH"):
            head.append("Content-Length: 0")
        head_bytes = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        timer = gevent.Timeout(header_timeout)
        conn = None
        try:
            if not streamed:
                timer.start()
            conn = self._checkout()
            conn.sock.settimeout(None if not streamed else self.read_timeout)
            _send(conn, head_bytes, body, chunked=streamed and content_length is None)
            if streamed:
                conn.sock.settimeout(None)
                timer.start()
            status, raw_headers, _ = _read_head(conn)
            return Response(self, conn, status, Headers(raw_headers), method, self.read_timeout)
        except gevent.Timeout as exc:
            if conn is not None:
                conn.close()
            if exc is not timer:
                raise
            raise httpx2.ReadTimeout(f"no response headers within {header_timeout * 1000:.0f} ms") from None
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        finally:
            timer.close()

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()


def _send(conn: _Conn, head: bytes, body: bytes | Iterable[bytes] | None, *, chunked: bool) -> None:
    sock = conn.sock
    try:
        if body is None:
            sock.sendall(head)
        elif isinstance(body, bytes | bytearray):
            if len(body) <= 256 * 1024:
                sock.sendall(head + body)
            else:
                sock.sendall(head)
                sock.sendall(body)
        else:
            sock.sendall(head)
            for chunk in body:
                if chunk:
                    sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
    except TimeoutError as exc:
        raise httpx2.WriteTimeout("upstream stopped taking the request body") from exc
    except OSError as exc:
        raise httpx2.WriteError(f"sending to upstream failed: {exc}") from exc


def _read_head(conn: _Conn) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, headers and reason of the next non-1xx response; the rest stays in `conn.rbuf`."""
    while True:
        while True:
            end = conn.rbuf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(conn.rbuf) > MAX_HEAD:
                raise httpx2.RemoteProtocolError("upstream response head is too large")
            data = conn.recv()
            if not data:
                raise httpx2.RemoteProtocolError("upstream closed the connection without a response")
            conn.rbuf += data
        head, conn.rbuf = conn.rbuf[:end], conn.rbuf[end + 4 :]
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise httpx2.RemoteProtocolError(f"not an HTTP/1.x response: {lines[0][:80]!r}")
        status = int(parts[1])
        if 100 <= status < 200 and status != 101:
            continue  # 100 Continue and friends: the real answer follows
        raw = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                raw.append((name.strip(), value.strip()))
        reason = parts[2] if len(parts) > 2 else ""
        return status, raw, reason.encode("latin-1")
