"""A named client's own rules, applied just before an upstream call takes a gate slot.

Order (DESIGN "Request flow"): the request is parsed, authenticated and validated first, so a bad
request costs the client nothing; then its model must be one the client may use (403), then its
limits must admit it (429, `openai_proxy.limits`), then it may take a gate slot (503). What the limits say is
sent back on the answer as OpenAI's `x-ratelimit-*` headers, refused or not. Usage and cost are
charged when the completion record is written (`charge`), i.e. once upstream has reported them.

The model allowlist fails closed: the body that goes upstream is read before the slot
(`note_models`), and every `model` it names, at any depth (a Responses tool's, a grader's), must be
allowed; a call that runs a model but names none (a stored prompt, an upstream default, a batch) is
refused, since upstream would choose.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from flask import g
from werkzeug.datastructures import MultiDict

from openai_proxy.clients import Client
from openai_proxy.errors import BadRequest, ClientLimited, Forbidden
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
    judge_models(client, record)
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
    record: its `model`, and for a client with a model list every other one, to be judged by `admit`.

    For such a client a `model` that is not a string cannot be judged: 400."""
    client: Client | None = g.get("client")
    restricted = client is not None and client.restricted
    model = body.get("model")
    if isinstance(model, str) and model:
        record.model = model
    if not restricted:
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
