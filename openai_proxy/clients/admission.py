"""A named client's own rules, applied just before an upstream call takes a gate slot.

Order (DESIGN "Request flow"): the request is parsed, authenticated and validated first, so a bad
request costs the client nothing; then its model must be one the client may use (403), then its
limits must admit it (429, `openai_proxy.limits`), then it may take a gate slot (503). What the limits say is
sent back on the answer as OpenAI's `x-ratelimit-*` headers, refused or not. Usage and cost are
charged when the completion record is written (`charge`), i.e. once upstream has reported them.
"""

from __future__ import annotations

from typing import Any

from flask import g

from openai_proxy.clients import Client
from openai_proxy.errors import ClientLimited, Forbidden
from openai_proxy.record import RequestRecord
from openai_proxy.state import ProxyState, state

_WHAT = {
    "requests": "requests per minute",
    "tokens": "tokens per minute",
    "daily_usd": "USD budget for today (UTC)",
    "monthly_usd": "USD budget for this month (UTC)",
}


def admit(record: RequestRecord) -> None:
    """Check the client's model allowlist and limits once per request; raise Forbidden/ClientLimited."""
    client: Client | None = g.get("client")
    if client is None or g.get("admitted"):
        return
    g.admitted = True
    if not client.allows_model(record.model):
        raise Forbidden(f"Client {client.name!r} may not use model {record.model!r}")
    limits = client.limits
    if not limits.any():
        return
    st = state()
    decision = st.limits.admit(client.name, limits)
    g.ratelimit_headers = decision.headers
    if not decision.allowed:
        limit = decision.limit or "requests"
        st.metrics.limit_rejected(client.name, limit)
        value = {"requests": limits.rpm, "tokens": limits.tpm}.get(limit) or getattr(limits, limit, None)
        raise ClientLimited(
            limit,
            f"Client {client.name!r} is past its limit of {value:g} {_WHAT[limit]}; "
            f"retry in {decision.retry_after_s} s",
            {"Retry-After": str(decision.retry_after_s)},
        )


def charge(st: ProxyState, entry: dict[str, Any]) -> None:
    """Completion sink (bound to a worker's state): the tokens and cost upstream reported count
    against the client's limits. Runs after the response is closed, outside any request context."""
    name = entry.get("client")
    client = st.clients.get(name) if name else None
    if client is None or not client.limits.any():
        return
    usage = entry.get("usage") or {}
    tokens = usage.get("total_tokens")
    if tokens is None:
        tokens = (usage.get("prompt_tokens") or 0) + (usage.get("completion_tokens") or 0)
    cost = entry.get("costUsd")
    if tokens or cost:
        st.limits.charge(name, client.limits, int(tokens), cost)
