"""Open N concurrent SSE streams and time them: first event, gaps between events, completeness.

Raw asyncio sockets, so the client costs little next to what it measures. Works against the
proxy (`/openai2`, ends with `data: [DONE]`) and directly against an upstream (`/v1/responses`,
ends with the last chunk of the chunked body).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field


@dataclass
class StreamResult:
    ok: bool = False
    status: int = 0
    events: int = 0
    first_event_s: float | None = None
    arrivals: list[float] = field(default_factory=list)
    error: str | None = None

    def worst_gap_s(self) -> float | None:
        gaps = [b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)]
        return max(gaps) if gaps else None


async def one_stream(
    host: str, port: int, request: bytes, done_marker: bytes, timeout: float
) -> StreamResult:
    result = StreamResult()
    start = time.perf_counter()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError) as exc:
        result.error = f"connect: {exc}"
        return result
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        result.status = int(head.split(b" ", 2)[1])
        tail = b""
        deadline = start + timeout
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), max(deadline - time.perf_counter(), 0.001))
            now = time.perf_counter() - start
            if not chunk:
                result.error = "closed before the end"
                break
            data = tail + chunk
            new = data.count(b"data: ") - tail.count(b"data: ")
            if done_marker == b"data: [DONE]" and b"data: [DONE]" in data and b"data: [DONE]" not in tail:
                new -= 1
            for _ in range(max(new, 0)):
                result.events += 1
                result.arrivals.append(now)
                if result.first_event_s is None:
                    result.first_event_s = now
            if done_marker in data:
                result.ok = result.status == 200
                break
            tail = data[-32:]
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        writer.close()
    return result


def stream_request(host: str, port: int, path: str, body: dict) -> bytes:
    payload = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload


async def run_streams(
    host: str, port: int, path: str, body: dict, n: int, done_marker: bytes, timeout: float = 60.0
) -> list[StreamResult]:
    request = stream_request(host, port, path, body)
    return await asyncio.gather(*(one_stream(host, port, request, done_marker, timeout) for _ in range(n)))
