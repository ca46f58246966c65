"""The completion record: one redacted JSON line per API request, on stdout and to every sink."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from openai_proxy.jsonio import dumps_text, iso
from openai_proxy.observe.prices import PriceTable
from openai_proxy.record import RequestRecord
from openai_proxy.redact import end_of_request, redact, redact_text

log = logging.getLogger("openai_proxy.completion")

Sink = Callable[[dict[str, Any]], None]


def build_entry(
    record: RequestRecord, prices: PriceTable | None = None, host: str | None = None
) -> dict[str, Any]:
    """The record as a flat, redacted dict (the shape stored and printed).

    Only the fields that carry text from outside (the client, upstream) can hold a secret, so only
    they go through redaction; the rest are our own ids, numbers and route templates. Redaction masks
    the configured secrets and the request's own override key by value (`openai_proxy.redact`). `host` names
    the server (OPENAI_PROXY_HOST_NAME), for logs several servers share.
    """
    timeout = record.timeout
    upstream_ms = record.upstream_ms()
    usage, usage_source, cost = settled_usage(record, prices)
    entry: dict[str, Any] = {
        "event": "completion",
        "requestId": record.request_id,
        "incomingRequestId": redact_text(record.incoming_request_id),
        "upstreamRequestId": redact_text(record.upstream_request_id),
        "client": record.client,
        "endpoint": record.endpoint,
        "method": record.method,
        "model": redact_text(record.model),
        "upstreamModel": redact_text(record.upstream_model),
        "stream": record.stream,
        "timeoutMs": timeout.ms if timeout else None,
        "timeoutSource": timeout.source if timeout else None,
        "start": iso(record.started_at),
        "durationMs": round((time.perf_counter() - record.started) * 1000.0, 1),
        "upstreamMs": round(upstream_ms, 1) if upstream_ms is not None else None,
        "result": record.result,
        "status": record.status,
        "retries": record.retries,
        "overloaded": record.overloaded,
        "cancelled": record.cancelled,
        "usage": usage,
        "usageSource": usage_source,
        "serviceTier": redact_text(record.service_tier),
        "costUsd": cost,
        "attempts": record.attempts or None,
        "error": redact(record.error) if record.error else None,
        "host": host,
        "pid": os.getpid(),
    }
    return entry


def cost_usd(record: RequestRecord, prices: PriceTable | None) -> float | None:
    """What the request cost at the model upstream says it used (else the one asked for), on the
    service tier upstream says it ran on; None when that model has no price or upstream reported no
    usage. A re-read costs nothing (`billable`)."""
    if prices is None or not record.usage:
        return None
    if not record.billable:
        return 0.0
    return prices.cost_usd(record.upstream_model or record.model, record.usage, record.service_tier)


def settled_usage(
    record: RequestRecord, prices: PriceTable | None
) -> tuple[dict[str, int | float] | None, str, float | None]:
    """(usage, where it came from, cost) as the record says and the client's budget is charged.

    - `upstream`: upstream reported usable usage; priced as `cost_usd` says.
    - `estimated`: the call ran (upstream answered 2xx, or a relay of its answer started) but its usage
      never arrived (a stream the client or upstream cut short, an answer that reports none, such as a
      transcript in a text format): the request's estimate (`openai_proxy.usage.Estimate`) stands in
      for it, never 0.
    - `unknown`: anything else: upstream's usage was not usable numbers, the call failed (before
      upstream worked, or upstream said so: `response.failed`), or nothing could be estimated (no
      model, no price, a re-read).
    """
    if record.usage:
        return record.usage, "upstream", cost_usd(record, prices)
    estimate = record.estimate
    ran = record.relayed or (record.status is not None and 200 <= record.status < 300)
    if (
        record.result == "upstream_api_error"
        or record.usage_invalid
        or record.usage_deferred
        or estimate is None
        or prices is None
        or not record.billable
        or not ran
    ):
        return None, "unknown", None
    cost = prices.estimate_usd(record.upstream_model or record.model, estimate)
    if cost is None:
        return None, "unknown", None
    usage = {
        "prompt_tokens": estimate.input_tokens,
        "completion_tokens": estimate.output_tokens,
        "total_tokens": estimate.input_tokens + estimate.output_tokens,
    }
    return usage, "estimated", cost


class CompletionLog:
    """Emits each finished request once: a stdout line, then the registered sinks (store, metrics)."""

    def __init__(
        self, stream: TextIO | None = None, prices: PriceTable | None = None, host: str | None = None
    ) -> None:
        self._stream = stream
        self._prices = prices
        self.host = host
        self.sinks: list[Sink] = []

    def emit(self, record: RequestRecord) -> dict[str, Any] | None:
        if record.finished:
            return None
        record.finished = True
        try:
            entry = build_entry(record, self._prices, self.host)
        finally:
            end_of_request()  # the request's own secrets were needed up to here, and not after
        out = self._stream or sys.stdout
        try:
            out.write(dumps_text(entry) + "\n")
            out.flush()
        except (OSError, ValueError):  # a closed stdout must not fail the request
            pass
        for sink in self.sinks:
            try:
                sink(entry)
            except Exception:
                log.exception("completion sink %r failed", sink)
        return entry
