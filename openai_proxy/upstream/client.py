"""The upstream HTTP/1.1 client: geventhttpclient's pool (TLS, CONNECT through an outbound proxy with
credentials, a liveness check that works for TLS) and its llhttp parser, strict on every framing
error, for every call the proxy makes.

What this module adds is only what a proxy needs on top: the wait for response *headers* bounded per
call (a `gevent.Timeout`, started once a streamed request body is all sent), request bodies streamed
as they are produced with their `Content-Length` kept, response bodies handed on as soon as bytes
arrive (`next_chunk`), a cap on the response head, transparent decoding of a gzip/deflate body, and
failures raised as httpx2's exception types, so the SDK's retry policy and our classification
(`openai_proxy.upstream.classify`) treat them alike. No byte of HTTP framing is written or parsed here.
"""

from __future__ import annotations

import errno
import select
import ssl
import zlib
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import gevent
import httpx2
from gevent.monkey import get_original
from geventhttpclient.client import HTTPClient, _iter_chunked
from geventhttpclient.response import HTTPParseError, HTTPSocketPoolResponse

from openai_proxy.upstream.settings import ClientSettings

# Response head (status line and headers) larger than this is refused: nothing legitimate is close.
MAX_HEAD = 64 * 1024
RECV = 64 * 1024
# Decoded bytes handed on per step of a compressed body, so a small gzip bomb cannot blow up one read.
DECODE_STEP = 1024 * 1024
# An upstream error answer is read whole (to relay or summarise it) up to this size.
MAX_ERROR_BODY = 1024 * 1024
# Bytes handled back to back before the worker's other requests get a turn: a fast upstream sending a
# large body would otherwise keep every recv ready and never let the greenlet yield.
YIELD_EVERY = 256 * 1024
# Writes of a request body to upstream; a bytes body this big or smaller goes in one write with its head.
ONE_WRITE = 256 * 1024


class BadUpstreamResponse(httpx2.RemoteProtocolError):
    """Upstream answered something that is not well-formed HTTP/1.1 (or not a body we can read)."""


class UpstreamClosed(httpx2.ReadError):
    """Upstream closed the connection before its response was complete."""


class ResponseTooLarge(BadUpstreamResponse):
    """A body read whole was larger than its cap."""


class Headers:
    """Response headers: `get` (case-insensitive; repeated fields joined with ", ") and `raw`, the
    (name, value) pairs as upstream sent them. A view over the parser's own multimap."""

    __slots__ = ("_drop", "_index", "_raw")

    def __init__(self, index: Any, drop: tuple[str, ...] = ()) -> None:
        self._index = index
        self._drop = drop
        self._raw: list[tuple[str, str]] | None = None

    def get(self, name: str, default: str | None = None) -> str | None:
        if name.lower() in self._drop:
            return default
        value = self._index.get(name)
        if value is None:
            return default
        return value if isinstance(value, str) else ", ".join(value)

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    @property
    def raw(self) -> list[tuple[str, str]]:
        if self._raw is None:
            self._raw = [(k, v) for k, v in self._index.items() if k.lower() not in self._drop]
        return self._raw


class AttemptTrace(Protocol):
    """The span of one attempt (`openai_proxy.observe.tracing`): its trace headers, and how it went."""

    headers: list[tuple[str, str]]

    def answered(self, status: int) -> None: ...

    def failed(self, exc: BaseException) -> None: ...

    def closed(self) -> None: ...


class CallTrace(Protocol):
    """A request's trace, which gives each of its upstream attempts a span (None: tracing is off)."""

    def start_attempt(self, method: str, target: str, settings: ClientSettings) -> AttemptTrace: ...


# Trace headers a client sent (`/v1` forwards its headers) give way to the attempt's own.
TRACE_HEADERS = frozenset({"traceparent", "tracestate"})


class UpstreamResponse(HTTPSocketPoolResponse):
    """One upstream response: llhttp parses it; the body is handed on as it arrives.

    The connection goes back to the pool when the body has been read to its end, and is closed by
    `close()` otherwise. Owners must call `close()` (it is idempotent): it also gives back the key
    pool's `lease` the call was made with, if any, since the call has then really ended.
    """

    def __init__(self, sock: Any, client: UpstreamClient, method: str) -> None:
        self.lease: Any = None
        self.attempt: AttemptTrace | None = None
        self._replay: bytes | None = None
        self._failed = False
        self._head_size = 0
        self._read_timeout = client.settings.read_timeout
        self._decoder: Any = None
        self._undecoded = b""
        self._since_yield = 0
        self._view: Headers | None = None
        # One timer per response, started around each wait for body bytes: a socket timeout would make
        # gevent build a new Timeout (and its loop watcher) on every wait, i.e. on every stream event.
        self._wait_timer: gevent.Timeout | None = None
        super().__init__(sock, client.pool, block_size=RECV, method=method)
        self._check_codings()

    def feed(self, data: str | bytes) -> None:
        try:
            super().feed(data)
            if not self.headers_complete:
                # Counted per read, not per header callback: the head's fields are held in memory
                # until it ends, so it must end within MAX_HEAD bytes.
                self._head_size += len(data)
                if self._head_size > MAX_HEAD:
                    raise HTTPParseError(f"response head larger than {MAX_HEAD} bytes")
        except BaseException:
            self._failed = True
            raise

    def should_close(self) -> bool:
        # After a parse error (llhttp only pauses on a 101 upgrade, which the library does not count as
        # a failure), what is left on the connection is unknown: never hand it to the next call.
        return self._failed or self.get_code() == 101 or super().should_close()

    # -- the head -----------------------------------------------------------------------------
    def _check_codings(self) -> None:
        """Refuse codings we cannot undo; set up decoding of the ones we can."""
        index = self._headers_index
        coding = ",".join(index.getlist("transfer-encoding")).strip().lower()
        if coding not in ("", "chunked"):
            self.close()
            raise BadUpstreamResponse(f"upstream used an unsupported transfer coding {coding!r}")
        encoding = ",".join(v.strip().lower() for v in index.getlist("content-encoding"))
        if encoding in ("", "identity"):
            return
        if encoding in ("gzip", "x-gzip"):
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._decoder = zlib.decompressobj()
        else:
            self.close()
            raise BadUpstreamResponse(f"upstream used an unsupported content coding {encoding!r}")

    @property
    def headers(self) -> Headers:  # type: ignore[override]
        view = self._view
        if view is None:
            # What we hand on is the decoded body: its coding and length no longer describe it.
            drop = ("content-encoding", "content-length") if self._decoder is not None else ()
            view = self._view = Headers(self._headers_index, drop)
        return view

    # -- the body -----------------------------------------------------------------------------
    def next_chunk(self, timeout: float | None = None) -> bytes | None:
        """Body bytes as soon as some arrive; b"" at the end.

        With `timeout`, None means nothing arrived in time (the caller may wait again); without it,
        a silence longer than the read timeout is an error.
        """
        if self._replay is not None:
            replay, self._replay = self._replay, None
            if replay:
                return replay
        try:
            while True:
                if self._undecoded:
                    out = self._decode(b"")
                    if out:
                        return out
                if self._body_buffer:
                    data = bytes(self._body_buffer)
                    del self._body_buffer[:]
                    out = self._decode(data)
                    if out:
                        return out
                    continue
                if self.message_complete:
                    return self._finish_decoding()
                if not self._receive(timeout):
                    return None
        except BaseException:
            self.close()
            raise

    def _receive(self, timeout: float | None) -> bool:
        sock = self._sock
        if sock is None:
            raise UpstreamClosed("the upstream connection is already closed")
        wanted = timeout if timeout is not None else self._read_timeout
        timer = self._wait_timer
        if timer is None or timer.seconds != wanted:  # a stream sets it once, not per event
            if timer is not None:
                timer.close()
            timer = self._wait_timer = gevent.Timeout(wanted)
        timer.start()
        try:
            data = sock.recv(RECV)
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            if timeout is not None:
                return False
            raise httpx2.ReadTimeout("upstream went silent in the middle of its response") from None
        except OSError as exc:
            raise UpstreamClosed(f"reading from upstream failed: {exc}") from exc
        finally:
            timer.cancel()
        self._since_yield += len(data)
        if self._since_yield >= YIELD_EVERY:
            self._since_yield = 0
            gevent.sleep(0)
        try:
            self.feed(data)  # b"" tells the parser the connection ended
        except HTTPParseError as exc:
            if not data:
                raise UpstreamClosed("upstream closed the connection before the response ended") from None
            raise BadUpstreamResponse(f"upstream sent a malformed response body: {_reason(exc)}") from None
        return True

    def _decode(self, data: bytes) -> bytes:
        if self._decoder is None:
            return data
        try:
            out = self._decoder.decompress(self._undecoded + data, DECODE_STEP)
        except zlib.error as exc:
            raise BadUpstreamResponse(f"upstream sent a body that does not decode: {exc}") from None
        self._undecoded = self._decoder.unconsumed_tail
        return out

    def _finish_decoding(self) -> bytes:
        if self._decoder is None:
            return b""
        decoder, self._decoder = self._decoder, None
        if not decoder.eof:
            raise BadUpstreamResponse("upstream sent a compressed body that ends early")
        return decoder.flush()

    def iter_bytes(self) -> Iterator[bytes]:
        while piece := self.next_chunk():
            yield piece

    def read_body(self, limit: int) -> bytes:
        """The whole (decoded) body, or ResponseTooLarge past `limit` bytes (the connection is dropped)."""
        parts: list[bytes] = []
        size = 0
        for piece in self.iter_bytes():
            size += len(piece)
            if size > limit:
                self.close()
                raise ResponseTooLarge(f"upstream sent a body larger than the {limit}-byte limit")
            parts.append(piece)
        return b"".join(parts)

    def read_within(self, limit: int) -> bytes | None:
        """The whole (decoded) body if it ends within `limit` bytes; else None, and what was read is
        handed out again to whoever reads next, so the rest can be relayed as it comes."""
        parts: list[bytes] = []
        size = 0
        for piece in self.iter_bytes():
            parts.append(piece)
            size += len(piece)
            if size > limit:
                self._replay = b"".join(parts)
                return None
        return b"".join(parts)

    def buffer_body(self, limit: int) -> bytes:
        """Read the whole body now (as `read_body`), and hand it out again to whoever reads it next."""
        body = self.read_body(limit)
        self._replay = body
        return body

    def release(self) -> None:
        timer, self._wait_timer = self._wait_timer, None
        if timer is not None:
            timer.close()
        super().release()

    def close(self) -> None:
        """Give the connection back if the body was read to its end, else close it; end the lease
        (and the attempt's span)."""
        try:
            self.release()
        finally:
            lease, self.lease = self.lease, None
            if lease is not None:
                lease.release()
            attempt, self.attempt = self.attempt, None
            if attempt is not None:
                attempt.closed()


def _reason(exc: HTTPParseError) -> str:
    args = exc.args
    return str(args[0]) if args else "parse error"


class _Sized:
    """An iterable request body whose length is known, so it goes with `Content-Length`."""

    def __init__(self, chunks: Iterable[bytes], length: int) -> None:
        self._chunks = chunks
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._chunks)


# The OS's poll, not gevent's: gevent's versions yield to the hub on every call, which for a liveness
# check made once per request is a greenlet round trip for nothing. poll, not select: select() cannot
# look at a descriptor numbered 1024 or more, and a worker serving 2000 connections has those, so
# every pooled connection would look dead and each call would open (and handshake) a new one.
_poll = get_original("select", "poll")
_READABLE = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP


def _idle_and_open(sock: Any) -> bool:
    """A pooled connection is reusable only if the peer has neither closed it nor sent anything
    (readable while idle means a FIN or stray bytes; over TLS, decrypted bytes may also be pending)."""
    try:
        if sock.fileno() < 0:
            return False
        pending = getattr(sock, "pending", None)
        if pending is not None and pending():
            return False
        poller = _poll()
        poller.register(sock.fileno(), _READABLE)
        return not poller.poll(0)
    except (OSError, ValueError):
        return False


class UpstreamClient(HTTPClient):
    """Keep-alive connections to one upstream origin (direct or through an outbound proxy)."""

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        proxy = settings.proxy
        super().__init__(
            settings.host,
            port=settings.port,
            ssl=settings.tls,
            ssl_context_factory=(lambda **_: settings.ssl_context) if settings.tls else None,
            connection_timeout=settings.connect_timeout,
            # No timeout on the socket itself: the wait for the head is bounded by the call's gevent.Timeout,
            # body reads and streamed uploads set their own; a socket timeout would cost a timer per wait.
            network_timeout=None,
            concurrency=settings.max_connections,
            proxy_host=proxy.host if proxy else None,
            proxy_port=proxy.port if proxy else None,
            proxy_user=proxy.user if proxy else None,
            proxy_password=proxy.password if proxy else None,
        )
        self.default_headers.clear()  # the User-Agent comes with each call's headers: one merge less
        # The pool's own check is right but costs a hub switch per call (see _poll).
        self._connection_pool._is_socket_alive = _idle_and_open

    @property
    def pool(self) -> Any:
        return self._connection_pool

    def send(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | Iterable[bytes] | None,
        *,
        header_timeout: float,
        content_length: int | None = None,
        trace: CallTrace | None = None,
    ) -> UpstreamResponse:
        """Send a request; return once the response headers are in (any status).

        `header_timeout` bounds connecting, sending a bytes body and waiting for the response head.
        A streamed body (an iterable, sent with `content_length` if known, else chunked) is sent as
        it is produced first; the timer starts once it is all upstream. With `trace`, the attempt
        has its own span, named to upstream in its `traceparent` (every attempt of every call,
        failovers and SDK retries included, comes through here).
        """
        if trace is not None:
            return self._send_traced(trace, method, target, headers, body, header_timeout, content_length)
        streamed = body is not None and not isinstance(body, bytes | bytearray)
        if streamed and content_length is not None:
            body = _Sized(body, content_length)  # type: ignore[arg-type]
        chunked = streamed and content_length is None
        try:
            head = self._build_request(
                method, target, body=body if body is not None else b"", headers=headers, chunked=chunked
            ).encode("latin-1")
        except (ValueError, UnicodeEncodeError) as exc:
            # Values from clients are checked before this; this is the last line of defence.
            raise httpx2.LocalProtocolError(f"refusing to send an invalid request head: {exc}") from None
        timer = gevent.Timeout(header_timeout)
        sock = None
        try:
            if not streamed:
                timer.start()
            sock = self._connect()
            try:
                self._send(sock, head, body, chunked)
            except OSError as exc:
                if exc.errno not in (errno.ECONNRESET, errno.EPIPE):
                    raise httpx2.WriteError(f"sending to upstream failed: {exc}") from exc
                # Upstream may have answered early (401, 413) and closed while we were still sending:
                # that answer, not the broken pipe, is what the client should get.
            if streamed:
                timer.start()
            owned, sock = sock, None
            response = self._response(owned, method)
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            raise httpx2.ReadTimeout(f"no response headers within {header_timeout * 1000:.0f} ms") from None
        finally:
            timer.close()
            if sock is not None:
                self.pool.release_socket(sock)
        if response.status_code == 407 and self.settings.proxy is not None:
            # Only the forward proxy says 407 (a plain-HTTP upstream is reached through it directly).
            response.close()
            raise httpx2.ProxyError(
                f"the outbound proxy {self.settings.proxy} refused: 407 Proxy Authentication Required"
            )
        return response

    def _send_traced(
        self,
        trace: CallTrace,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | Iterable[bytes] | None,
        header_timeout: float,
        content_length: int | None,
    ) -> UpstreamResponse:
        """`send`, as one attempt with its own span, whose context goes upstream in `traceparent`."""
        attempt = trace.start_attempt(method, target, self.settings)
        headers = [h for h in headers if h[0].lower() not in TRACE_HEADERS] + attempt.headers
        try:
            response = self.send(
                method, target, headers, body, header_timeout=header_timeout, content_length=content_length
            )
        except BaseException as exc:
            attempt.failed(exc)
            raise
        attempt.answered(response.status_code)
        response.attempt = attempt  # its span ends when the response is closed
        return response

    def _connect(self) -> Any:
        try:
            return self.pool.get_socket()
        except TimeoutError as exc:
            raise httpx2.ConnectTimeout(f"connecting to {self.settings.origin} timed out") from exc
        except ssl.SSLError as exc:
            raise httpx2.ConnectError(f"TLS with {self.settings.origin} failed: {exc}") from exc
        except RuntimeError as exc:  # the outbound proxy refused the tunnel
            raise httpx2.ProxyError(f"the outbound proxy {self.settings.proxy} refused: {exc}") from exc
        except OSError as exc:
            where = (
                f"the outbound proxy {self.settings.proxy}" if self.settings.proxy else self.settings.origin
            )
            raise httpx2.ConnectError(f"cannot connect to {where}: {exc}") from exc

    def _send(self, sock: Any, head: bytes, body: Any, chunked: bool) -> None:
        if isinstance(body, bytes | bytearray):
            if len(body) <= ONE_WRITE:
                sock.sendall(head + body)
            else:
                sock.sendall(head)
                sock.sendall(body)
        elif body is None:
            sock.sendall(head)
        else:
            # At the client's pace, but an upstream that stops taking the body is bounded.
            sock.settimeout(self.settings.read_timeout)
            sock.sendall(head)
            for block in _iter_chunked(body, RECV) if chunked else body:
                if block:
                    sock.sendall(block)
            sock.settimeout(None)

    def _response(self, sock: Any, method: str) -> UpstreamResponse:
        try:
            return UpstreamResponse(sock, self, method)
        except HTTPParseError as exc:
            if exc.args and "closed" in str(exc.args[0]):
                raise UpstreamClosed("upstream closed the connection without a response") from None
            raise BadUpstreamResponse(f"upstream sent a malformed response: {_reason(exc)}") from None
        except TimeoutError:
            raise httpx2.ReadTimeout("upstream went silent while sending its response head") from None
        except OSError as exc:
            raise UpstreamClosed(f"reading from upstream failed: {exc}") from exc
