"""Server-sent events: parsing upstream streams, and the two ways we relay them.

- `EventRelay` (legacy `/openai2`): each upstream event becomes `data: <compact JSON>`, then
  `data: [DONE]`; a failure after our headers is an `event: error` with the legacy error JSON.
- `PassthroughEventRelay` (`/v1`): upstream's own bytes, event by event (Responses keep their
  `event:` lines, chat keeps `data: [DONE]`); the only change is dropping the usage chunk the proxy
  asked for on the client's behalf. A failure is an error event in OpenAI's shape, which the SDKs
  raise as `APIError`.
Both send `: keep-alive` comments during silences and record usage from the final event.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from app import jsonio
from app.errors import ProxyError, UpstreamBadResponse, UpstreamTransport
from app.relay import Relay
from app.usage import usage_of

KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
# A Responses stream that ends cleanly has said how it ended; anything else was cut short.
TERMINAL_EVENTS = frozenset({"response.completed", "response.failed", "response.incomplete", "error"})
FAILED_EVENTS = frozenset({"response.failed", "error"})
_TERMINAL_HINT = re.compile(rb'"type":\s*"(response\.(?:completed|failed|incomplete)|error)"')
_EVENT_END = re.compile(rb"\r?\n\r?\n")


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


def data_of(raw_event: bytes) -> bytes:
    """The data field of one raw event (its `data:` lines joined)."""
    lines = [line.rstrip(b"\r") for line in raw_event.split(b"\n")]
    return b"\n".join(
        line[6:] if line.startswith(b"data: ") else line[5:] for line in lines if line.startswith(b"data:")
    )


def note_terminal(record: Any, kind: str, event: dict[str, Any]) -> None:
    """Usage from a final event; a failed response is flagged in the record (the HTTP status stays 200)."""
    usage = usage_of(event)
    if usage:
        record.usage = usage
    if kind in FAILED_EVENTS:
        error = event.get("error") or (event.get("response") or {}).get("error") or {}
        record.result = "upstream_api_error"
        record.error = {"message": str(error.get("message", kind)) if isinstance(error, dict) else kind}


class EventRelay(Relay):
    """Legacy framing: `data: <compact JSON>` per upstream event, then `[DONE]`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parser = SSEParser()
        self._terminal = False

    def on_data(self, chunk: bytes) -> bytes | None:
        frames = [frame for _, data in self._parser.feed(chunk) if (frame := self._frame(data))]
        if not frames:
            return None
        return frames[0] if len(frames) == 1 else b"".join(frames)

    def on_idle(self) -> bytes:
        return KEEPALIVE

    def on_end(self) -> bytes:
        if self._parser.pending() or not self._terminal:
            raise UpstreamTransport("OpenAI closed the stream before the response finished")
        return DONE

    def on_failure(self, error: ProxyError) -> bytes:
        record = self._record
        body = error.body(record.request_id, record.incoming_request_id)
        record.error = {k: v for k, v in body["error"].items() if k not in ("requestId", "incomingRequestId")}
        return b"event: error\ndata: " + jsonio.dumps(body) + b"\n\n"

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
            note_terminal(self._record, kind, event)
        elif kind == "response.created" and self._record.model is None:
            model = (event.get("response") or {}).get("model")
            self._record.model = model if isinstance(model, str) else None
        return b"data: " + jsonio.dumps(event) + b"\n\n"


class PassthroughEventRelay(Relay):
    """Upstream's bytes, event by event; inspects only what it must (final events, usage chunks)."""

    def __init__(
        self, *args: Any, strip_usage_chunk: bool = False, needs_end_marker: bool = True, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        self._buffer = b""
        self._strip_usage_chunk = strip_usage_chunk
        self._needs_end_marker = needs_end_marker
        self._ended = False

    def on_data(self, chunk: bytes) -> bytes | None:
        self._buffer += chunk
        out = []
        start = 0
        for match in _EVENT_END.finditer(self._buffer):
            raw = self._buffer[start : match.end()]
            start = match.end()
            if self._keep(raw):
                out.append(raw)
        self._buffer = self._buffer[start:]
        return b"".join(out) if out else None

    def _keep(self, raw: bytes) -> bool:
        if b"[DONE]" in raw and data_of(raw) == b"[DONE]":
            self._ended = True
            return True
        terminal = _TERMINAL_HINT.search(raw)
        usage_chunk = b'"usage"' in raw and b'"choices":[]' in raw.replace(b" ", b"")
        if not terminal and not usage_chunk:
            return True
        try:
            event = jsonio.loads(data_of(raw))
        except jsonio.JSONDecodeError:
            return True  # relayed as upstream sent it; the client's SDK judges it
        if terminal and isinstance(event, dict) and event.get("type") in TERMINAL_EVENTS:
            self._ended = True
            note_terminal(self._record, event["type"], event)
        if usage_chunk and isinstance(event, dict) and event.get("choices") == [] and event.get("usage"):
            self._record.usage = usage_of(event)
            return not self._strip_usage_chunk
        return True

    def on_idle(self) -> bytes:
        return KEEPALIVE

    def on_end(self) -> bytes | None:
        if self._buffer.strip() or (self._needs_end_marker and not self._ended):
            raise UpstreamTransport("OpenAI closed the stream before it finished")
        return None

    def on_failure(self, error: ProxyError) -> bytes:
        return b"event: error\ndata: " + jsonio.dumps(error.openai_body(self._record.request_id)) + b"\n\n"
