"""The official SDK, for the two jobs it does better than a plain call: retries and multipart.

The SDK's retry policy (connection errors, timeouts, 408/409/429/5xx, `Retry-After`, back-off with
jitter) serves the calls the contract retries, and its multipart encoding serves the legacy audio
upload. Its HTTP goes through `WireTransport`, i.e. through the same `UpstreamClient` as every other
call: one pool, one TLS trust, one outbound proxy, one set of caps. The transport also bounds each
attempt's wait for response headers and logs each retry with the request id.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx2

from openai_proxy.record import RequestRecord
from openai_proxy.upstream.call import RetrySink, authorization, report_retry
from openai_proxy.upstream.client import MAX_ERROR_BODY, UpstreamClient, UpstreamResponse

if TYPE_CHECKING:
    from openai_proxy.keys.pool import Lease
    from openai_proxy.upstream.failover import PoolCall

log = logging.getLogger("openai_proxy.upstream")

# Asks the SDK for the response unread (its streaming-response mechanism); not for upstream.
RAW_RESPONSE_HEADER = "X-Stainless-Raw-Response"
# Set by the client per request (content length, coding), or meant for the SDK: not forwarded.
_NOT_SENT = frozenset(
    {
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"accept-encoding",
        b"connection",
        b"x-stainless-raw-response",
    }
)


@dataclass
class Attempts:
    """One logical call across its attempts: what the transport needs to time and log each one."""

    record: RequestRecord
    header_timeout_s: float
    retry_sinks: list[RetrySink]
    count: int = 0
    last_failure: str | None = None
    # With the key pool: the call's use of it, and the key chosen for the first attempt (taken by it).
    pool: PoolCall | None = None
    lease: Lease | None = None


current_attempts: ContextVar[Attempts | None] = ContextVar("openai_proxy_attempts", default=None)


# Where an httpx2 response keeps the `UpstreamResponse` it stands for (httpx2 wraps `stream`).
WIRE = "openai_proxy.wire"


class WireStream(httpx2.SyncByteStream):
    """An httpx2 body backed by an `UpstreamResponse`; an error body is read only up to its cap."""

    def __init__(self, wire: UpstreamResponse) -> None:
        self.wire = wire

    def __iter__(self) -> Iterator[bytes]:
        # The SDK reads a body only to build its error for an error status (it gets the others
        # unread), so this is the upstream error body, capped like every other.
        yield self.wire.read_body(MAX_ERROR_BODY)

    def close(self) -> None:
        self.wire.close()


class WireTransport(httpx2.BaseTransport):
    """httpx2 transport over `UpstreamClient`: the SDK's calls take the same road as all others."""

    def __init__(self, client: UpstreamClient | None = None) -> None:
        self.client = client  # set by `Upstream` before any call

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        attempts = current_attempts.get()
        if attempts is None:
            raise RuntimeError("SDK calls go through Upstream.send, which sets the attempt context")
        attempts.count += 1
        if attempts.count > 1:
            _log_retry(attempts, request)
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in request.headers.raw
            if k.lower() not in _NOT_SENT
        ]
        headers.append(("Accept-Encoding", "identity"))
        length = request.headers.get("content-length")
        if isinstance(request.stream, httpx2.ByteStream):
            body: Any = request.read()
            length = None
        else:
            body = request.stream
        target = request.url.raw_path.decode("ascii")
        size = int(length) if length is not None else None

        def send(key: str | None) -> UpstreamResponse:
            sent = headers if key is None else [*headers, authorization(key)]
            return self.client.send(
                request.method,
                target,
                sent,
                body,
                header_timeout=attempts.header_timeout_s,
                content_length=size,
                trace=attempts.record.trace,
            )

        try:
            if attempts.pool is None:
                wire = send(None)
            else:
                headers = [(k, v) for k, v in headers if k.lower() != "authorization"]
                # A key per SDK attempt. The body is bytes, or a multipart stream that reads its
                # files again from the start (httpx2 seeks them), so it can be sent again.
                lease, attempts.lease = attempts.lease, None
                wire = attempts.pool.send(send, replayable=True, lease=lease)
        except httpx2.TransportError as exc:
            attempts.last_failure = f"{type(exc).__name__}: {exc}"
            raise
        attempts.record.note_upstream_answer(wire.headers)
        if wire.status_code >= 400:
            attempts.last_failure = f"HTTP {wire.status_code}"
        return httpx2.Response(
            wire.status_code,
            headers=wire.headers.raw,
            stream=WireStream(wire),
            request=request,
            extensions={WIRE: wire},
        )


def _log_retry(attempts: Attempts, request: httpx2.Request) -> None:
    report_retry(attempts.record, attempts.retry_sinks, "upstream_retry", attempts.count, request.url.path,
                 attempts.last_failure or "unknown")  # fmt: skip
