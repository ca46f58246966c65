"""Response bodies fed from an upstream response, as it arrives.

A relay is the WSGI response body itself: each `next()` waits for upstream bytes (at most the idle
interval), turns them into what the client gets, and returns it, so nothing is buffered beyond one
upstream read and no extra greenlet sits between upstream and client. The relay owns the call's
resources (upstream response, gate slot, disconnect watch) and frees them exactly once in `close()`,
which the WSGI server calls whether the body finished, failed, or the client left, even if
iteration never started. Subclasses say what to send for data, silence, the end and a failure.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

import gevent

from openai_proxy.errors import ClientCancelled, ProxyError, UpstreamTimeout
from openai_proxy.gate import SlotGuard
from openai_proxy.inbound.disconnect import DisconnectWatch, cancel
from openai_proxy.record import RequestRecord
from openai_proxy.upstream.classify import classify


class ChunkSource(Protocol):
    """Upstream body bytes: `next_chunk(timeout)` gives bytes, b"" at the end, None after `timeout`."""

    def next_chunk(self, timeout: float | None) -> bytes | None: ...

    def close(self) -> None: ...


class Relay:
    """Base relay: iteration, silence, disconnects, failures and cleanup; subclasses shape the bytes."""

    def __init__(
        self,
        source: ChunkSource,
        *,
        record: RequestRecord,
        slot: SlotGuard,
        environ: dict[str, Any],
        idle_s: float | None,
        max_silence_s: float,
        max_event_bytes: int | None = None,
    ) -> None:
        self._source = source
        self._record = record
        record.relayed = True  # upstream accepted the work: a call cut from here on is charged
        self._slot = slot
        self._environ = environ
        self._idle_s = idle_s
        self._max_silence_s = max_silence_s
        self._max_event_bytes = max_event_bytes
        self._watch = DisconnectWatch(environ)
        self._greenlet: Any = None
        self._waiting = False
        self._gone = False
        self._started = False
        self._done = False
        self._closed = False
        self.on_close: Callable[[], None] | None = None

    # -- what subclasses decide ----------------------------------------------------------------------
    def on_data(self, chunk: bytes) -> bytes | None:
        return chunk

    def on_idle(self) -> bytes | None:
        return None

    def on_end(self) -> bytes | None:
        """Upstream finished cleanly; raise a ProxyError if that is not a proper end."""
        return None

    def on_failure(self, error: ProxyError) -> bytes | None:
        """What the client gets when upstream fails after our headers: a last frame, or nothing."""
        self.abort_client()
        return None

    # -- iteration -----------------------------------------------------------------------------------
    def __iter__(self) -> Relay:
        return self

    def __next__(self) -> bytes:
        if self._done:
            raise StopIteration
        if not self._started:
            self._started = True
            self._greenlet = gevent.getcurrent()
            self._watch.start(self._client_left)
            return b""  # the WSGI server sends our headers now, before any body
        try:
            out = self._next_out()
        except ClientCancelled:
            self._cancel()
            raise StopIteration from None
        except Exception as exc:
            self._done = True
            error = classify(exc)
            self._note_error(error)
            out = self.on_failure(error)
        if out is None:
            raise StopIteration
        return out

    def _next_out(self) -> bytes | None:
        silent_since = time.monotonic()
        while True:
            if self._gone:
                raise ClientCancelled("The client closed the connection")
            self._waiting = True
            try:
                chunk = self._source.next_chunk(self._idle_s)
            finally:
                self._waiting = False
            if chunk is None:
                if time.monotonic() - silent_since > self._max_silence_s:
                    raise UpstreamTimeout(
                        f"OpenAI sent nothing for {self._max_silence_s:.0f} s in the middle of a response"
                    )
                out = self.on_idle()
            elif not chunk:
                out = self.on_end()
                self._done = True
                if self._record.result is None:
                    self._record.result = "ok"
                return out
            else:
                out = self.on_data(chunk)
            if out:
                return out

    def _client_left(self) -> None:
        """From the event loop: the client hung up. Interrupt the wait on upstream, if we are in it."""
        self._gone = True
        if self._waiting and self._greenlet is not None:
            cancel(self._greenlet)

    def _note_error(self, error: ProxyError) -> None:
        error.note_on(self._record)

    def _cancel(self) -> None:
        self._done = True
        record = self._record
        record.cancelled = True
        record.status = 499
        record.result = "client_cancelled"

    def abort_client(self) -> None:
        """Cut the client connection so a body that ended early cannot pass for a complete one."""
        sock = self._environ.get("gunicorn.socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Free everything once; a body that did not reach its end was abandoned by the client."""
        if self._closed:
            return
        self._closed = True
        if not self._done:
            self._cancel()
        self._watch.stop()
        self._source.close()
        self._slot.release()
        if self.on_close is not None:
            self.on_close()
