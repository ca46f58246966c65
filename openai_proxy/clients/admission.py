"""A named client's own rules, applied just before an upstream call takes a gate slot.

Order (DESIGN "Request flow"): the request is parsed, authenticated and validated first, so a bad
request costs the client nothing; then its model must be one the client may use (403), and, for a
client with a budget, one the price table can price (403 `OPENAI_PROXY_UNPRICED_MODEL`); then its
limits must admit it (429, `openai_proxy.limits`), then it may take a gate slot (503). What the limits
say is sent back on the answer as OpenAI's `x-ratelimit-*` headers, refused or not.

A budgeted client's call reserves its estimated cost when admitted (`openai_proxy.usage.Estimate` at
the model's price), so calls in flight count against the budget before their cost is known. Usage and
cost are charged when the completion record is written (`charge`), i.e. once upstream has reported
them (or, for a call that ran but whose usage never arrived, its estimate), and the reservation is
given back in the same update, whatever became of the call.
"""

from __future__ import annotations

from typing import Any

from flask import g

from openai_proxy.clients import Client
from openai_proxy.errors import ClientLimited, Forbidden, UnpricedModel
from openai_proxy.limits import Reservation
from openai_proxy.limits.rules import RESERVED_RETRY_S
from openai_proxy.record import RequestRecord
from openai_proxy.state import ProxyState, state
from openai_proxy.usage import DEFAULT_MAX_OUTPUT_TOKENS, Estimate

_WHAT = {
    "requests": "requests per minute",
    "tokens": "tokens per minute",
    "daily_usd": "USD budget for today (UTC)",
    "monthly_usd": "USD budget for this month (UTC)",
}
# A call whose request the proxy did not read (an unparsed body) is assumed to produce this much.
_UNREAD = Estimate(input_tokens=0, output_tokens=DEFAULT_MAX_OUTPUT_TOKENS)


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
    reservation = None
    if limits.budgeted() and record.billable:
        reservation = Reservation(record.request_id, reserve_usd(st, client, record))
    decision = st.limits.admit(client.name, limits, reserve=reservation)
    g.ratelimit_headers = decision.headers
    if not decision.allowed:
        limit = decision.limit or "requests"
        st.metrics.limit_rejected(client.name, limit)
        value = {"requests": limits.rpm, "tokens": limits.tpm}.get(limit) or getattr(limits, limit, None)
        in_flight = limit in ("daily_usd", "monthly_usd") and decision.retry_after_s == RESERVED_RETRY_S
        raise ClientLimited(
            limit,
            f"Client {client.name!r} is past its limit of {value:g} {_WHAT[limit]}"
            f"{' with what its calls in flight may spend' if in_flight else ''}; "
            f"retry in {decision.retry_after_s} s",
            {"Retry-After": str(decision.retry_after_s)},
        )
    if reservation is not None:
        # A request that never reaches its completion record must not hold the budget forever.
        st.limits.forget_with(record, reservation.request_id)


def reserve_usd(st: ProxyState, client: Client, record: RequestRecord) -> float:
    """What a budgeted client's call reserves: its estimate at the model's price. A model the price
    table cannot price is refused (its cost could never be counted against the budget); a call that
    names no model reserves nothing (what it costs is charged when upstream reports it)."""
    if record.model is None:
        return 0.0
    estimate = record.estimate or _UNREAD
    usd = st.prices.estimate_usd(record.model, estimate) if st.prices is not None else None
    if usd is None:
        raise UnpricedModel(
            f"Model {record.model!r} has no price, and client {client.name!r} has a budget: "
            "its cost could not be counted (the operator can price it in OPENAI_PROXY_PRICES_FILE, "
            "or give a [default] price)"
        )
    return usd


def charge(st: ProxyState, entry: dict[str, Any]) -> None:
    """Completion sink (bound to a worker's state): the tokens and cost of the request count against
    the client's limits, and its reservation is given back. Runs after the response is closed, outside
    any request context."""
    name = entry.get("client")
    client = st.clients.get(name) if name else None
    request_id = entry.get("requestId")
    held = request_id is not None and st.limits.holds(request_id)
    if client is None or not client.limits.any():
        if held:  # the client lost its limits in a reload while the call ran
            st.limits.release(request_id)  # type: ignore[arg-type]
        return
    usage = entry.get("usage") or {}
    tokens = usage.get("total_tokens")
    if tokens is None:
        tokens = (usage.get("prompt_tokens") or 0) + (usage.get("completion_tokens") or 0)
    cost = entry.get("costUsd")
    if tokens or cost or held:
        st.limits.charge(name, client.limits, int(tokens), cost, release=request_id if held else None)
