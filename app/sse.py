"""SSE: parsing upstream event streams, and the relay that feeds them to the client.

The relay is the response body itself: each `next()` waits for upstream bytes (at most one
keep-alive interval), reframes the complete events among them and returns them, so nothing is
buffered beyond one upstream read and no extra greenlet sits between upstream and client. It owns
the stream's resources (upstream response, gate slot, disconnect watch) and frees them exactly once
in `close()`, which the WSGI server calls whether the stream finished, failed, or the client left,
even if iteration never started.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import gevent
from gevent.queue import Empty, Queue

from app import jsonio
from app.context import RequestRecord
from app.disconnect import DisconnectWatch, cancel
from app.errors import (
    ClientCancelled,
    ProxyError,
    UpstreamBadResponse,
    UpstreamTimeout,
    UpstreamTransport,
    classify,
)
from app.gate import SlotGuard
from app.usage import usage_of

KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
# A Responses stream that ends cleanly has said how it ended; anything else was cut short.
TERMINAL_EVENTS = frozenset({"response.completed", "response.failed", "response.incomplete", "error"})
FAILED_EVENTS = frozenset({"response.failed", "error"})


class ChunkSource(Protocol):
    """Upstream body bytes: `next_chunk(timeout)` gives bytes, b"" at the end, None after `timeout`."""

    def next_chunk(self, timeout: float | None) -> bytes | None: ...

    def close(self) -> None: ...


class QueuedSource:
    """Adapts a blocking byte iterator (an SDK/httpx2 response) to `ChunkSource` with a reader greenlet."""

    def __init__(self, response: Any) -> None:
        self._response = response
        self._queue: Queue = Queue()
        self._reader = gevent.spawn(self._pump)

    def _pump(self) -> None:
        try:
            for chunk in self._response.iter_bytes():
                self._queue.put(chunk)
            self._queue.put(b"")
        except Exception as exc:
            self._queue.put(exc)

    def next_chunk(self, timeout: float | None) -> bytes | None:
        try:
            item = self._queue.get(timeout=timeout)
        except Empty:
            return None
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        self._reader.kill(block=True, timeout=1)
        self._response.close()


class SSEParser:
    """Incremental parser of the `text/event-stream` format; yields (event name, data) pairs."""

    __slots__ = ("_buffer", "_data", "_event")

    def __init__(self) -> None:
        self._buffer = b""
        self._event: bytes | None = None
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> Iterator[tuple[bytes | None, bytes]]:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    yield self._event, b"\n".join(self._data)
                self._event, self._data = None, []
            elif line.startswith(b"data:"):
                self._data.append(line[6:] if line.startswith(b"data: ") else line[5:])
            elif line.startswith(b"event:"):
                self._event = line[6:].strip()
            # comments (":") and other fields (id, retry) carry nothing we relay

    def pending(self) -> bool:
        """Whether a partial event is waiting for its blank line."""
        return bool(self._data or self._buffer.strip())


class EventRelay:
    """The client-facing SSE body: `data: <compact JSON>` per upstream event, then `[DONE]`."""

    def __init__(
        self,
        source: ChunkSource,
        *,
        record: RequestRecord,
        slot: SlotGuard,
        environ: dict[str, Any],
        keepalive_s: float,
        max_silence_s: float,
    ) -> None:
        self._source = source
        self._record = record
        self._slot = slot
        self._keepalive_s = keepalive_s
        self._max_silence_s = max_silence_s
        self._parser = SSEParser()
        self._watch = DisconnectWatch(environ)
        self._greenlet: gevent.Greenlet | None = None
        self._waiting = False
        self._gone = False
        self._started = False
        self._done = False
        self._closed = False
        self._terminal = False
        self.on_close: Callable[[], None] | None = None

    # -- the client side (response iterator) -------------------------------------------------------
    def __iter__(self) -> EventRelay:
        return self

    def __next__(self) -> bytes:
        if self._done:
            raise StopIteration
        if not self._started:
            self._started = True
            self._greenlet = gevent.getcurrent()
            self._watch.start(self._client_left)
            return b""  # the WSGI server sends our headers now, before the first event
        try:
            return self._next_frames()
        except ClientCancelled:
            self._cancel()
            raise StopIteration from None
        except ProxyError as exc:
            return self._error_frame(exc)
        except Exception as exc:  # transport failures mid-stream
            return self._error_frame(classify(exc))

    def _next_frames(self) -> bytes:
        silent_since = time.monotonic()
        while True:
            if self._gone:
                raise ClientCancelled("The client closed the connection")
            self._waiting = True
            try:
                chunk = self._source.next_chunk(self._keepalive_s)
            finally:
                self._waiting = False
            if chunk is None:
                if time.monotonic() - silent_since > self._max_silence_s:
                    raise UpstreamTimeout(
                        f"OpenAI sent nothing for {self._max_silence_s:.0f} s in the middle of a stream"
                    )
                return KEEPALIVE
            if not chunk:
                return self._end()
            frames = [frame for _, data in self._parser.feed(chunk) if (frame := self._frame(data))]
            if frames:
                return frames[0] if len(frames) == 1 else b"".join(frames)

    def _client_left(self) -> None:
        """From the event loop: the client hung up. Interrupt the wait on upstream, if we are in it."""
        self._gone = True
        if self._waiting and self._greenlet is not None:
            cancel(self._greenlet)

    def _end(self) -> bytes:
        if self._parser.pending() or not self._terminal:
            raise UpstreamTransport("OpenAI closed the stream before the response finished")
        self._done = True
        if self._record.result is None:
            self._record.result = "ok"
        return DONE

    def _frame(self, data: bytes) -> bytes | None:
        if data == b"[DONE]":
            return None
        try:
            event = jsonio.loads(data)
        except jsonio.JSONDecodeError:
            raise UpstreamBadResponse("OpenAI sent stream data that is not JSON") from None
        kind = event.get("type") if isinstance(event, dict) else None
        if kind in TERMINAL_EVENTS:
            self._terminal = True
            self._note_terminal(kind, event)
        elif kind == "response.created" and self._record.model is None:
            model = (event.get("response") or {}).get("model")
            self._record.model = model if isinstance(model, str) else None
        return b"data: " + jsonio.dumps(event) + b"\n\n"

    def _note_terminal(self, kind: str, event: dict[str, Any]) -> None:
        record = self._record
        usage = usage_of(event)
        if usage:
            record.usage = usage
        if kind in FAILED_EVENTS:
            error = event.get("error") or (event.get("response") or {}).get("error") or {}
            record.result = "upstream_api_error"
            record.error = {"message": str(error.get("message", kind)) if isinstance(error, dict) else kind}

    def _error_frame(self, error: ProxyError) -> bytes:
        self._done = True
        record = self._record
        body = error.body(record.request_id, record.incoming_request_id)
        record.result = error.result
        record.error = {k: v for k, v in body["error"].items() if k not in ("requestId", "incomingRequestId")}
        return b"event: error\ndata: " + jsonio.dumps(body) + b"\n\n"

    def _cancel(self) -> None:
        self._done = True
        record = self._record
        record.cancelled = True
        record.status = 499
        record.result = "client_cancelled"

    def close(self) -> None:
        """Free everything once; a stream that did not reach its end was abandoned by the client."""
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
