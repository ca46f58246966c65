"""The per-request record: ids, timeout decision, retries, usage and outcome of one API request."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from openai_proxy.objects import AnswerWatch


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
    # For a client's model allowlist (`openai_proxy.clients.admission`): every other model the body
    # names (a tool's, a grader's), and whether the call runs a model at all (False for reads,
    # deletes, cancels and uploads, which a client restricted to some models may make naming none).
    other_models: tuple[str, ...] = ()
    runs_model: bool = True
    # Each upstream attempt made through the key pool: {"key": <key name>, "outcome": ...}.
    attempts: list[dict[str, Any]] = field(default_factory=list)
    # Set for a call whose answer names stored objects to record (a create call): the relays show it the
    # answer, or stream events while it is waiting, before the client gets them (`openai_proxy.objects`).
    object_watch: AnswerWatch | None = None
    # What the call may use, judged from its request (`openai_proxy.usage.Estimate`): the budget
    # reservation, and the charge of a call whose usage never arrived.
    estimate: Any = None
    # Upstream sent usage, but not usable numbers (`openai_proxy.usage.read_usage`).
    usage_invalid: bool = False
    # A background Response's create call: its usage shows (and is priced) where it is read later.
    usage_deferred: bool = False
    # The service tier upstream says it ran the call on (`flex`, `priority`, `default`, ...).
    service_tier: str | None = None
    # A relay started passing upstream's 2xx answer to the client: the call ran, whatever comes next.
    relayed: bool = False
    status: int | None = None
    result: str | None = None
    error: dict[str, Any] | None = None
    finished: bool = False
    # The request's spans when tracing is on: an `openai_proxy.observe.tracing.RequestTrace` (not
    # imported here, which sits below it), ended with the record.
    trace: Any = None

    def note_upstream_answer(self, headers: Any) -> None:
        """Upstream's response head arrived: when, and its request id (kept from an earlier attempt
        when this one names none)."""
        self.upstream_headers_at = time.perf_counter()
        self.upstream_request_id = headers.get("x-request-id") or self.upstream_request_id

    def fail(
        self,
        result: str,
        message: str | None = None,
        type: str | None = None,
        code: str | None = None,
        **details: Any,
    ) -> None:
        """How the request failed, in the one shape records and the log store keep: `result`, and an
        `error` of `message`, `type` and `code` where known, plus details (`upstream`, `param`, ...)."""
        self.result = result
        error = {"message": message, "type": type, "code": code, **details}
        self.error = {k: v for k, v in error.items() if v is not None}

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
