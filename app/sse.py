"""SSE: parsing upstream event streams, and the relay that feeds them to the client.

One reader greenlet per stream reads upstream and puts ready-made frames on a queue; the response
iterator waits on that queue with the keep-alive interval as timeout. Nothing is buffered beyond
what one upstream read delivered. The relay owns the stream's resources (upstream response, gate
slot, disconnect watch) and frees them exactly once in `close()`, which the WSGI server calls
whether the stream finished, failed, or the client went away, even if iteration never started.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gevent
import httpx2
from gevent.queue import Empty, Queue

from app import jsonio
from app.context import RequestRecord
from app.disconnect import DisconnectWatch
from app.errors import ProxyError, UpstreamBadResponse, UpstreamTransport, classify
from app.gate import SlotGuard
from app.usage import usage_of

KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
# A Responses stream that ends cleanly has said how it ended; anything else was cut short.
TERMINAL_EVENTS = frozenset({"response.completed", "response.failed", "response.incomplete", "error"})
FAILED_EVENTS = frozenset({"response.failed", "error"})

_END = object()
_GONE = object()


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
        response: httpx2.Response,
        *,
        record: RequestRecord,
        slot: SlotGuard,
        watch: DisconnectWatch,
        keepalive_s: float,
    ) -> None:
        self._response = response
        self._record = record
        self._slot = slot
        self._watch = watch
        self._keepalive_s = keepalive_s
        self._queue: Queue = Queue()
        self._started = False
        self._done = False
        self._closed = False
        self._terminal = False
        watch.start(lambda: self._queue.put(_GONE))
        self._reader = gevent.spawn(self._read)

    # -- reading upstream (reader greenlet) ------------------------------------------------------
    def _read(self) -> None:
        parser = SSEParser()
        put = self._queue.put
        try:
            for chunk in self._response.iter_bytes():
                frames = [self._frame(data) for _, data in parser.feed(chunk)]
                frames = [f for f in frames if f]
                if frames:
                    put(frames[0] if len(frames) == 1 else b"".join(frames))
            if parser.pending() or not self._terminal:
                put(UpstreamTransport("OpenAI closed the stream before the response finished"))
            else:
                put(_END)
        except ProxyError as exc:
            put(exc)
        except Exception as exc:  # transport failures mid-stream, decoding errors
            put(classify(exc))

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

    # -- the client side (response iterator) -----------------------------------------------------
    def __iter__(self) -> EventRelay:
        return self

    def __next__(self) -> bytes:
        if self._done:
            raise StopIteration
        if not self._started:
            self._started = True
            return b""  # the WSGI server sends our headers now, before the first event
        try:
            item = self._queue.get(timeout=self._keepalive_s)
        except Empty:
            return KEEPALIVE
        if isinstance(item, bytes):
            return item
        self._done = True
        if item is _END:
            if self._record.result is None:
                self._record.result = "ok"
            return DONE
        if item is _GONE:
            self._mark_cancelled()
            raise StopIteration
        return self._error_frame(item)

    def _error_frame(self, error: ProxyError) -> bytes:
        record = self._record
        body = error.body(record.request_id, record.incoming_request_id)
        record.result = error.result
        record.error = {k: v for k, v in body["error"].items() if k not in ("requestId", "incomingRequestId")}
        return b"event: error\ndata: " + jsonio.dumps(body) + b"\n\n"

    def _mark_cancelled(self) -> None:
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
            self._done = True
            self._mark_cancelled()
        self._watch.stop()
        self._reader.kill(block=True, timeout=1)
        self._response.close()
        self._slot.release()
