"""Upstream response bodies for the lean client: framing (Content-Length, chunked, until close) and
reading them whole or piece by piece as they arrive; a fully read body gives its connection back."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import httpx2

_NO_BODY_STATUS = frozenset({204, 304})
_CHUNK_CRLF = -1  # chunk data done, its trailing CRLF not yet consumed


class Conn(Protocol):
    rbuf: bytes
    sock: Any

    def recv(self) -> bytes: ...

    def close(self) -> None: ...


class ConnectionOwner(Protocol):
    def put(self, conn: Any) -> None: ...


class Headers:
    """Response headers: the raw list in order, and case-insensitive lookup."""

    __slots__ = ("_index", "raw")

    def __init__(self, raw: list[tuple[str, str]]) -> None:
        self.raw = raw
        index: dict[str, str] = {}
        for name, value in raw:
            key = name.lower()
            index[key] = f"{index[key]}, {value}" if key in index else value
        self._index = index

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._index.get(name.lower(), default)

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._index


class Response:
    """An upstream response; the body is read on demand and the connection pooled once it is done."""

    def __init__(
        self,
        pool: ConnectionOwner,
        conn: Conn,
        status: int,
        headers: Headers,
        method: str,
        read_timeout: float,
    ) -> None:
        self._pool = pool
        self._read_timeout = read_timeout
        self._conn: Conn | None = conn
        self.status_code = status
        self.headers = headers
        self._content: bytes | None = None
        te = (headers.get("transfer-encoding") or "").lower()
        self._chunked = "chunked" in te
        length = headers.get("content-length")
        self._remaining: int | None = None
        if method == "HEAD" or status in _NO_BODY_STATUS or 100 <= status < 200:
            self._remaining = 0
        elif not self._chunked and length is not None:
            try:
                self._remaining = int(length)
            except ValueError:
                raise httpx2.RemoteProtocolError(f"bad Content-Length {length!r}") from None
        connection = (headers.get("connection") or "").lower()
        self._reusable = "close" not in connection and (self._chunked or self._remaining is not None)
        self._chunk_left = 0  # bytes left in the current chunk, or _CHUNK_CRLF
        self._done = self._remaining == 0
        if self._done:
            self._release()

    # -- reading -------------------------------------------------------------------------------
    @property
    def content(self) -> bytes:
        if self._content is None:
            self._content = self.read()
        return self._content

    def read(self) -> bytes:
        if self._content is not None:
            return self._content
        parts = []
        while True:
            piece = self.next_chunk(None)
            if not piece:
                break
            parts.append(piece)
        self._content = b"".join(parts)
        return self._content

    def iter_bytes(self) -> Iterator[bytes]:
        while True:
            piece = self.next_chunk(None)
            if not piece:
                return
            yield piece

    def next_chunk(self, timeout: float | None) -> bytes | None:
        """Body bytes as soon as some arrive; b"" at the end.

        With `timeout`, None means nothing arrived in time (the caller may wait again); without it,
        a silence longer than the read timeout is an error.
        """
        if self._done:
            return b""
        conn = self._conn
        if conn is None:
            raise httpx2.StreamClosed()
        conn.sock.settimeout(timeout if timeout is not None else self._read_timeout)
        try:
            while True:
                piece = self._take(conn)
                if piece is not None:
                    return piece
                data = conn.recv()
                if not data:
                    return self._eof()
                conn.rbuf += data
        except TimeoutError:
            if timeout is not None:
                return None
            self.close()
            raise httpx2.ReadTimeout("upstream went silent in the middle of its response") from None
        except BaseException:
            self.close()
            raise

    def _take(self, conn: Conn) -> bytes | None:
        """Body bytes available in the buffer, b"" at the end of the body, None if more must be read."""
        buf = conn.rbuf
        if not self._chunked:
            if not buf:
                return None
            if self._remaining is None:
                conn.rbuf = b""
                return buf
            piece, conn.rbuf = buf[: self._remaining], buf[self._remaining :]
            self._remaining -= len(piece)
            if self._remaining == 0:
                self._finish()
            return piece
        out = []
        while buf:
            if self._chunk_left == _CHUNK_CRLF:
                if len(buf) < 2:
                    break
                buf = buf[2:]
                self._chunk_left = 0
                continue
            if self._chunk_left > 0:
                piece, buf = buf[: self._chunk_left], buf[self._chunk_left :]
                self._chunk_left -= len(piece)
                out.append(piece)
                if self._chunk_left == 0:
                    self._chunk_left = _CHUNK_CRLF
                continue
            line_end = buf.find(b"\r\n")
            if line_end < 0:
                break
            try:
                size = int(buf[:line_end].split(b";", 1)[0], 16)
            except ValueError:
                raise httpx2.RemoteProtocolError("bad chunk size from upstream") from None
            if size == 0:
                rest = buf[line_end + 2 :]
                if rest.startswith(b"\r\n"):
                    leftover = rest[2:]
                else:
                    trailers_end = rest.find(b"\r\n\r\n")
                    if trailers_end < 0:
                        break  # the trailers are still coming; parse this last chunk again then
                    leftover = rest[trailers_end + 4 :]
                conn.rbuf = leftover
                self._finish()
                return b"".join(out)
            self._chunk_left = size
            buf = buf[line_end + 2 :]
        conn.rbuf = buf
        return b"".join(out) if out else None

    def _eof(self) -> bytes:
        if self._remaining is None and not self._chunked:
            self._reusable = False
            self._finish()
            return b""
        self.close()
        raise httpx2.RemoteProtocolError("upstream closed the connection before the response body ended")

    # -- lifecycle -------------------------------------------------------------------------------
    def _finish(self) -> None:
        self._done = True
        self._release()

    def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._reusable and not conn.rbuf:
            self._pool.put(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Abandon the rest of the body: the connection cannot be reused."""
        conn, self._conn = self._conn, None
        self._done = True
        if conn is not None:
            conn.close()
