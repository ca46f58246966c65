"""A named client's own rules, applied just before an upstream call takes a gate slot.

Order (DESIGN "Request flow"): the request is parsed, authenticated and validated first, so a bad
request costs the client nothing; then its model must be one the client may use (403), and, for a
client with a budget, one the price table can price (403 `OPENAI_PROXY_UNPRICED_MODEL`); then its
limits must admit it (429, `openai_proxy.limits`), then it may take a gate slot (503). What the limits
say is sent back on the answer as OpenAI's `x-ratelimit-*` headers, refused or not.

The model allowlist fails closed: the body that goes upstream is read before the slot
(`note_models`), and every `model` it names, at any depth (a Responses tool's, a grader's), must be
allowed; a call that runs a model but names none (a stored prompt, an upstream default, a batch) is
refused, since upstream would choose.

A budgeted client's call reserves its estimated cost when admitted (`openai_proxy.usage.Estimate` at
the model's price), so calls in flight count against the budget before their cost is known. Usage and
cost are charged when the completion record is written (`charge`), i.e. once upstream has reported
them (or, for a call that ran but whose usage never arrived, its estimate), and the reservation is
given back in the same update, whatever became of the call.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from flask import g
from werkzeug.datastructures import MultiDict

from openai_proxy.clients import Client
from openai_proxy.errors import BadRequest, ClientLimited, Forbidden, UnpricedModel
from openai_proxy.limits import Reservation
from openai_proxy.limits.rules import RESERVED_RETRY_S
from openai_proxy.record import RequestRecord
from openai_proxy.state import ProxyState, app_context, state
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
    ctx = app_context().g  # looked up once, not through the `g` proxy four times
    client: Client | None = ctx.get("client")
    if client is None or ctx.get("admitted"):
        return
    ctx.admitted = True
    judge_models(client, record)
    limits = client.limits
    if not limits.any():
        return
    st = state()
    reservation = None
    if limits.budgeted() and record.billable:
        reservation = Reservation(record.request_id, reserve_usd(st, client, record))
    decision = st.limits.admit(client.name, limits, reserve=reservation)
    ctx.ratelimit_headers = decision.headers
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
    table cannot price is refused (its cost could never be counted against the budget), and so is a
    call that runs a model but names none (upstream would choose it), unless a `[default]` price
    covers them; a call that runs no model reserves nothing."""
    if record.model is None and not record.runs_model:
        return 0.0
    estimate = record.estimate or _UNREAD
    prices = st.prices
    usd = prices.estimate_usd(record.model, estimate) if prices is not None else None
    unpriced = [m for m in record.other_models if prices is None or prices.price_of(m) is None]
    if usd is None or unpriced:
        what = (
            f"Model {(unpriced or [record.model])[0]!r} has no price"
            if record.model is not None or unpriced
            else "The call names no model (upstream would choose one)"
        )
        raise UnpricedModel(
            f"{what}, and client {client.name!r} has a budget: its cost could not be counted (the "
            "operator can price it in OPENAI_PROXY_PRICES_FILE, or give a [default] price)"
        )
    return usd


# Methods whose calls can run a model (the others read or delete what exists).
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def judge_models(client: Client, record: RequestRecord) -> None:
    """403 unless every model the request names is on the client's list, and it names one if it
    runs a model at all."""
    if client.models is None:
        return
    if record.model is None and record.runs_model and record.method in BODY_METHODS:
        raise Forbidden(
            f"Client {client.name!r} may only use the models it is given, and this request names no "
            "model (upstream would choose one)"
        )
    for model in (record.model, *record.other_models):
        if model is not None and model not in client.models:
            raise Forbidden(f"Client {client.name!r} may not use model {model!r}")


def note_models(record: RequestRecord, body: Mapping[str, Any]) -> None:
    """Put the models that `body` (what goes upstream: JSON, or a form's text fields) names on the
    record: its `model`, and for a client with a model list or a budget every other one, to be judged
    by `admit`.

    For such a client a `model` that is not a string cannot be judged: 400."""
    client: Client | None = g.get("client")
    judged = client is not None and client.judged
    model = body.get("model")
    if isinstance(model, str) and model:
        record.model = model
    if not judged:
        return
    # Form spellings too (a field sent twice, `model[]`, `model[0]`): a lenient parser may read them.
    if isinstance(body, MultiDict):
        named: list[Any] = [v for k in body if _is_model_field(k) for v in body.getlist(k)]
    else:
        named = [v for k, v in body.items() if _is_model_field(k) and v is not None]
        named += _models_within(body)
    if (model is not None and not isinstance(model, str)) or not all(isinstance(m, str) for m in named):
        raise BadRequest("model must be a string")
    record.other_models = tuple(m for m in named if m != record.model)


def note_query_models(record: RequestRecord, args: MultiDict[str, str]) -> None:
    """A `model` in the query string of a call that runs one is judged too: the query goes upstream
    as sent, and an endpoint may read it there (the Realtime API's WebRTC calls do)."""
    named = [v for k in args for v in args.getlist(k) if _is_model_field(k)]
    record.other_models += tuple(m for m in named if m != record.model)


def _is_model_field(name: str) -> bool:
    return name == "model" or name.startswith("model[")


def _models_within(body: Mapping[str, Any]) -> Iterator[Any]:
    """Every `model` string below the top level of a parsed JSON body (a `model` that is an object,
    say a JSON schema's property, is looked into instead); iterative, however deep the body nests."""
    stack: list[Any] = [v for k, v in body.items() if k != "model"]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            for key, inner in value.items():
                if key == "model" and isinstance(inner, str):
                    yield inner
                else:
                    stack.append(inner)
        elif isinstance(value, list):
            stack.extend(value)


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
