"""Server-sent events: parsing upstream streams, and the two ways we relay them.

- `EventRelay` (legacy `/openai2`): each upstream event becomes `data: <compact JSON>`, then
  `data: [DONE]`; a failure after our headers is an `event: error` with the legacy error JSON. It
  must parse each event whole, so one is capped at OPENAI_PROXY_MAX_SSE_EVENT_BYTES.
- `PassthroughEventRelay` (`/v1`): upstream's own bytes as they arrive (Responses keep their
  `event:` lines, chat keeps `data: [DONE]`); the only change is dropping the usage chunk the proxy
  asked for on the client's behalf. Only small events are held whole, so no event size needs a cap.
  A failure is an error event in OpenAI's shape, which the SDKs raise as `APIError` (or a cut
  connection, in the middle of an event already partly relayed).
Both send `: keep-alive` comments during silences and record usage from the final event.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from openai_proxy import jsonio
from openai_proxy.errors import ProxyError, UpstreamBadResponse, UpstreamTransport
from openai_proxy.stream.relay import Relay
from openai_proxy.usage import HEAD_BYTES, note_answer, summary_of_big

KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
# A Responses stream that ends cleanly has said how it ended; anything else was cut short.
TERMINAL_EVENTS = frozenset({"response.completed", "response.failed", "response.incomplete", "error"})
FAILED_EVENTS = frozenset({"response.failed", "error"})
_TERMINAL_HINT = re.compile(rb'"type":\s*"(response\.(?:completed|failed|incomplete)|error)"')
_TRANSCRIPT_DONE = re.compile(rb'"type":\s*"transcript\.text\.done"')
# `/v1` streams hold an event until its end up to this size; bigger ones are relayed as they arrive,
# and their usage is read from their last TAIL_BYTES.
HOLD_EVENT = 256 * 1024
TAIL_BYTES = 64 * 1024


class SSEParser:
    """Incremental parser of the `text/event-stream` format; yields (event name, data) pairs.

    Linear in the bytes fed: a line that arrives in many reads is kept in pieces (each read is
    searched for a line end once) and joined once, when its end arrives. An event larger than `max_event_bytes` is refused (502), so one endless
    event cannot grow the worker without bound.
    """

    __slots__ = ("_data", "_event", "_held", "_max", "_partial", "_partial_len")

    def __init__(self, max_event_bytes: int | None = None) -> None:
        self._partial: list[bytes] = []  # the current line, not yet ended
        self._partial_len = 0
        self._event: bytes | None = None
        self._data: list[bytes] = []
        self._held = 0  # bytes of the current event's complete data lines
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> Iterator[tuple[bytes | None, bytes]]:
        if self._partial:  # the common case (whole lines per read) skips all of this
            if chunk.find(b"\n") < 0:
                self._partial.append(chunk)
                self._partial_len += len(chunk)
                check_event_size(self._held + self._partial_len, self._max)
                return
            chunk = b"".join((*self._partial, chunk))
            self._partial.clear()
            self._partial_len = 0
        *lines, rest = chunk.split(b"\n")
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    yield self._event, b"\n".join(self._data)
                self._event, self._data, self._held = None, [], 0
            elif line.startswith(b"data:"):
                self._data.append(line[6:] if line.startswith(b"data: ") else line[5:])
                self._held += len(line)
            elif line.startswith(b"event:"):
                self._event = line[6:].strip()
            # comments (":") and other fields (id, retry) carry nothing we relay
        if rest:
            self._partial.append(rest)
            self._partial_len = len(rest)
        check_event_size(self._held + self._partial_len, self._max)

    def pending(self) -> bool:
        """Whether a partial event is waiting for its blank line."""
        return bool(self._data or any(piece.strip() for piece in self._partial))


def check_event_size(size: int, limit: int | None) -> None:
    if limit is not None and size > limit:
        raise UpstreamBadResponse(
            f"OpenAI sent a stream event larger than {limit} bytes (OPENAI_PROXY_MAX_SSE_EVENT_BYTES)"
        )


def data_of(raw_event: bytes) -> bytes:
    """The data field of one raw event (its `data:` lines joined)."""
    lines = [line.rstrip(b"\r") for line in raw_event.split(b"\n")]
    return b"\n".join(
        line[6:] if line.startswith(b"data: ") else line[5:] for line in lines if line.startswith(b"data:")
    )


def event_end(buffer: bytes | bytearray, pos: int) -> int:
    """The offset just past the first blank line (`\n`, optional `\r`, `\n`) at or after `pos`, or -1.

    `find` from `pos` (not a regex: `re` with a start position still walks the buffer from its
    start, which made a large event quadratic)."""
    size = len(buffer)
    while (newline := buffer.find(b"\n", pos)) >= 0:
        after = newline + 1
        if after < size and buffer[after] == 0x0D:
            after += 1
        if after < size and buffer[after] == 0x0A:
            return after + 1
        pos = newline + 1
    return -1


def _parsed(raw: bytes) -> Any:
    try:
        return jsonio.loads(data_of(raw))
    except jsonio.JSONDecodeError:
        return None  # relayed as upstream sent it; the client's SDK judges it


def note_terminal(record: Any, kind: str, event: dict[str, Any]) -> None:
    """Usage and model from a final event (`response.completed`, `.incomplete` or `.failed`); a failed
    response is flagged in the record (the HTTP status stays 200)."""
    note_answer(record, event)
    if kind in FAILED_EVENTS:
        error = event.get("error") or (event.get("response") or {}).get("error") or {}
        record.fail(
            "upstream_api_error", str(error.get("message", kind)) if isinstance(error, dict) else kind
        )


class EventRelay(Relay):
    """Legacy framing: `data: <compact JSON>` per upstream event, then `[DONE]`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parser = SSEParser(self._max_event_bytes)
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
        error.note_on(record)
        return (
            b"event: error\ndata: "
            + jsonio.dumps(error.body(record.request_id, record.incoming_request_id))
            + b"\n\n"
        )

    def _frame(self, data: bytes) -> bytes | None:
        if data == b"[DONE]":
            return None
        try:
            event = jsonio.loads(data)
        except jsonio.JSONDecodeError:
            raise UpstreamBadResponse("OpenAI sent stream data that is not JSON") from None
        watch = self._record.object_watch
        if watch is not None and watch.waiting:
            watch(event)  # `response.created`: its id is recorded before the client sees it
        kind = event.get("type") if isinstance(event, dict) else None
        if kind in TERMINAL_EVENTS:
            self._terminal = True
            note_terminal(self._record, kind, event)
        elif kind == "response.created" and self._record.model is None:
            model = (event.get("response") or {}).get("model")
            self._record.model = model if isinstance(model, str) else None
        return b"data: " + jsonio.dumps(event) + b"\n\n"


class PassthroughEventRelay(Relay):
    """Upstream's bytes as they arrive; inspects only what it must (final events, usage chunks).

    An event is held until its end only while it is small (HOLD_EVENT): the usage chunk the proxy asked
    for must be dropped whole, and a small final event is parsed whole. A bigger one (base64 images,
    or an event that never ends) is relayed as it arrives, keeping only its first and last bytes, where
    OpenAI puts `type` and `usage`: memory per stream stays bounded whatever upstream sends.
    """

    def __init__(
        self, *args: Any, strip_usage_chunk: bool = False, needs_end_marker: bool = True, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        self._buffer = bytearray()  # held events (complete ones, then the start of the next)
        self._scanned = 0  # the buffer before this offset holds no event end
        self._passing: _PassingEvent | None = None  # a big event, part of it relayed already
        self._strip_usage_chunk = strip_usage_chunk
        self._needs_end_marker = needs_end_marker
        self._ended = False

    def on_data(self, chunk: bytes) -> bytes | None:
        out: list[bytes] = []
        if self._passing is not None:
            end = self._passing.feed(chunk)
            if end < 0:
                return chunk
            self._note_big(self._passing)
            self._passing = None
            out.append(chunk[:end])
            chunk = chunk[end:]
        buffer = self._buffer
        buffer += chunk
        start = 0
        # An event end is at most 4 bytes (\r\n\r\n): only its tail can straddle the old and new data.
        pos = max(self._scanned - 3, 0)
        while (end := event_end(buffer, pos)) > 0:
            raw = bytes(memoryview(buffer)[start:end])  # one copy (a bytearray slice would be two)
            start = pos = end
            if self._keep(raw):
                out.append(raw)
        if start:
            del buffer[:start]
        self._scanned = len(buffer)
        if len(buffer) > HOLD_EVENT:  # too big to hold: relay it as it comes
            self._passing = _PassingEvent(buffer)
            out.append(bytes(buffer))
            buffer.clear()
            self._scanned = 0
        return b"".join(out) if out else None

    def _keep(self, raw: bytes) -> bool:
        """Whether to relay this (small) raw event; notes usage and the end."""
        if len(raw) < 64 and b"[DONE]" in raw and data_of(raw) == b"[DONE]":
            self._ended = True
            return True
        watch = self._record.object_watch
        if watch is not None and watch.waiting:
            watch(_parsed(raw))  # the first event names the new object: recorded before the client sees it
        if _TERMINAL_HINT.search(raw):
            event = _parsed(raw)
            if isinstance(event, dict) and event.get("type") in TERMINAL_EVENTS:
                self._ended = True
                note_terminal(self._record, event["type"], event)
            return True
        if b'"usage"' in raw:
            compact = raw.replace(b" ", b"")
            if b'"choices":[]' in compact:  # chat's usage chunk, the last before `[DONE]`
                event = _parsed(raw)
                if isinstance(event, dict) and event.get("choices") == [] and event.get("usage"):
                    note_answer(self._record, event)
                    return not self._strip_usage_chunk
            elif b'"type":"transcript.text.done"' in compact:  # a streamed transcription's end
                note_answer(self._record, _parsed(raw))
        return True

    def _note_big(self, event: _PassingEvent) -> None:
        """Usage and the end from a big event's ends (`openai_proxy.usage.usage_in_tail` says why
        its tail is enough): `type` is where OpenAI puts it, first, unless it is nowhere there."""
        head, tail = event.head, event.tail
        terminal = _TERMINAL_HINT.search(head, 0, 512)
        if terminal is None and b'"type":' not in head[:512]:
            terminal = _TERMINAL_HINT.search(head) or _TERMINAL_HINT.search(tail)
        if terminal is not None:
            kind = terminal.group(1).decode()
            self._ended = True
            note_terminal(self._record, kind, {"type": kind, "response": summary_of_big(head, tail)})
        elif _TRANSCRIPT_DONE.search(head, 0, 512):
            note_answer(self._record, summary_of_big(head, tail))

    def on_idle(self) -> bytes:
        return KEEPALIVE

    def on_end(self) -> bytes | None:
        if self._passing is not None or self._buffer.strip() or (self._needs_end_marker and not self._ended):
            raise UpstreamTransport("OpenAI closed the stream before it finished")
        return None

    def on_failure(self, error: ProxyError) -> bytes | None:
        if self._passing is not None:
            # Part of an event is out: an error event now would read as its continuation. Cut the
            # connection instead, so the client sees an incomplete response, never a clean end.
            self.abort_client()
            return None
        return b"event: error\ndata: " + jsonio.dumps(error.openai_body(self._record.request_id)) + b"\n\n"


class _PassingEvent:
    """A big event relayed as it arrives: its first HEAD_BYTES and last TAIL_BYTES, and where it ends."""

    __slots__ = ("head", "tail")

    def __init__(self, start: bytes | bytearray) -> None:
        self.head = bytes(start[:HEAD_BYTES])
        self.tail = bytes(start[-TAIL_BYTES:])

    def feed(self, chunk: bytes) -> int:
        """Take the next bytes; the offset in `chunk` just past the event's end, or -1 if it goes on."""
        carry = self.tail[-3:]  # an end that starts in what came before
        end = event_end(carry + chunk[:3], 0)
        end = end - len(carry) if end > 0 else event_end(chunk, 0)
        piece = chunk if end < 0 else chunk[:end]
        keep = TAIL_BYTES - len(piece)
        self.tail = (self.tail[-keep:] + piece) if keep > 0 else piece[-TAIL_BYTES:]
        return end
