"""The per-request record: ids, timeout decision, retries, usage and outcome of one API request."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any


def new_request_id() -> str:
    """A random (version 4) UUID string; several times cheaper than `str(uuid.uuid4())`."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass
class TimeoutDecision:
    """The effective per-attempt wait for upstream response headers, and why it is that value."""

    ms: float
    source: str  # default | provided | clamped | invalid

    @property
    def seconds(self) -> float:
        return self.ms / 1000.0


@dataclass
class RequestRecord:
    """Everything the completion record needs, filled in as the request goes through the pipeline."""

    endpoint: str
    method: str
    request_id: str = field(default_factory=new_request_id)
    incoming_request_id: str | None = None
    started_at: float = field(default_factory=time.time)
    started: float = field(default_factory=time.perf_counter)
    model: str | None = None
    stream: bool = False
    timeout: TimeoutDecision | None = None
    upstream_request_id: str | None = None
    upstream_started: float | None = None
    upstream_headers_at: float | None = None
    upstream_done_at: float | None = None
    response_started: float | None = None
    retries: int = 0
    overloaded: bool = False
    cancelled: bool = False
    usage: dict[str, int | float] | None = None
    # Who sent it: the client's configured name (`default` for SECURITY_KEY); never its key.
    client: str | None = None
    # The model upstream says it used (a dated snapshot), when its answer or final event names one.
    upstream_model: str | None = None
    # False for a request that only re-reads a stored response: its cost was recorded by the request
    # that made it (`openai_proxy.usage.note_answer` sets it back for a response that ran in the background).
    billable: bool = True
    # Each upstream attempt made through the key pool: {"key": <key name>, "outcome": ...}.
    attempts: list[dict[str, Any]] = field(default_factory=list)
    status: int | None = None
    result: str | None = None
    error: dict[str, Any] | None = None
    finished: bool = False
    # The request's spans when tracing is on: an `openai_proxy.observe.tracing.RequestTrace` (not
    # imported here, which sits below it), ended with the record.
    trace: Any = None

    def upstream_ms(self) -> float | None:
        """Time until upstream response headers (streams) or until its whole answer (JSON)."""
        if self.upstream_started is None:
            return None
        end = self.upstream_done_at or self.upstream_headers_at
        return None if end is None else (end - self.upstream_started) * 1000.0

    def server_timing(self) -> str:
        """`Server-Timing` value: upstream wait, and the proxy's own time until our headers."""
        now = self.response_started or time.perf_counter()
        total = (now - self.started) * 1000.0
        upstream = self.upstream_ms()
        if upstream is None:
            return f"proxy;dur={total:.1f}"
        return f"upstream;dur={upstream:.1f}, proxy;dur={max(total - upstream, 0.0):.1f}"
