"""Request bodies received whole before any upstream work, so no gate slot waits for a client.

A `/v1` body the proxy relays without parsing (uploads to `/v1/files`, `/v1/audio/...`, any other
relayed body) is read to its end first: into memory while it is small, then into an unlinked
temporary file (in TMPDIR), with werkzeug reading the HTTP framing. Only then is the slot taken and
the body sent upstream, from the spool, with its `Content-Length`. A client that trickles its body
costs a connection and disk, never a slot. Each wait for the next piece is bounded by
OPENAI_PROXY_UPLOAD_IDLE_TIMEOUT_S (408), a client that goes away is ClientCancelled (499), a body
past its limit is 413; the spool is closed whatever happens, and as it has no name, closing it (or
the worker dying) frees its disk space.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from typing import IO

import gevent
from flask import g, request
from werkzeug.exceptions import ClientDisconnected

from openai_proxy.errors import ClientCancelled, Overloaded, PayloadTooLarge, RequestTimeout
from openai_proxy.state import state

PIECE = 64 * 1024
SEND_PIECE = 256 * 1024
# Bodies up to this stay in memory (one write upstream, no file); bigger ones go to disk.
IN_MEMORY_BYTES = 256 * 1024


class SpooledBody:
    """A request body received whole. Iterating gives it in 64 KiB pieces from its start, again on
    each iteration (so a failover can send it once more); `len()` is its size. Use it in a `with`
    block, or call `close()`."""

    replayable = True  # read by `openai_proxy.upstream.Upstream.send`

    def __init__(self) -> None:
        self._file: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=IN_MEMORY_BYTES)  # noqa: SIM115
        self.size = 0

    def write(self, data: bytes) -> None:
        try:
            self._file.write(data)
        except OSError as exc:  # a full disk: the client may try again later, or another host
            raise Overloaded(f"No room to receive the request body ({exc.strerror})") from None
        self.size += len(data)

    def small(self) -> bytes | None:
        """The body as bytes while it is small enough to have stayed in memory, else None."""
        if self.size > IN_MEMORY_BYTES:
            return None
        self._file.seek(0)
        return self._file.read()

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[bytes]:
        file = self._file
        file.seek(0)
        while piece := file.read(SEND_PIECE):
            yield piece

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SpooledBody:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def client_body(limit: int) -> Iterator[bytes]:
    """The client's body in pieces as it arrives; `limit` bytes at most, else 413 (before reading
    when Content-Length says so)."""
    length = request.content_length
    g.body_limit = limit
    if length is not None and length > limit:
        raise PayloadTooLarge(f"Request body exceeds the {limit}-byte limit")
    # Ours is the check that counts; Flask's (None would mean "the app default") must not get in first.
    request.max_content_length = sys.maxsize
    stream = request.stream
    idle_s = state().config.upload_idle_timeout_s

    def read() -> bytes:
        timer = gevent.Timeout.start_new(idle_s)
        try:
            return stream.read(PIECE)
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            raise RequestTimeout(f"The request body stalled: nothing arrived for {idle_s} s") from None
        except (OSError, ClientDisconnected):
            raise ClientCancelled("The client went away while sending the request body") from None
        finally:
            timer.close()

    received = 0
    while True:
        piece = read()
        if not piece:
            # gunicorn ends `wsgi.input` quietly when the client closes early.
            if length is not None and received < length:
                raise ClientCancelled("The client went away while sending the request body")
            return
        received += len(piece)
        if received > limit:
            raise PayloadTooLarge(f"Request body exceeds the {limit}-byte limit")
        yield piece


def spool(pieces: Iterator[bytes]) -> SpooledBody:
    """Receive `pieces` to their end; the spool is closed if that fails."""
    body = SpooledBody()
    try:
        for piece in pieces:
            body.write(piece)
    except BaseException:
        body.close()
        raise
    return body
