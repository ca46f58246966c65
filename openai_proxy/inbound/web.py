"""The inbound half of every API request: ids, size-limited bodies, auth, overrides, timeout.

parse (size-limited) -> authenticate -> (the route validates and builds its call: `openai_proxy.pipeline`).
Everything here happens before a gate slot is taken, so a bad request never costs one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flask import g, request
from werkzeug.datastructures import FileStorage, MultiDict

from openai_proxy import jsonio
from openai_proxy.clients import Client
from openai_proxy.errors import BadRequest, PayloadTooLarge, ProxyError
from openai_proxy.inbound.auth import provided_security_key
from openai_proxy.inbound.multipart import Spool, read_limited_form
from openai_proxy.inbound.validation import header_value
from openai_proxy.record import RequestRecord, TimeoutDecision
from openai_proxy.redact import mask_in_this_request
from openai_proxy.state import app_context, state
from openai_proxy.upstream import Credentials

# Never forwarded upstream, whatever the route.
CONTROL_FIELDS = ("security_key", "openai_api_key", "project", "organization", "timeout")
OVERRIDE_FIELDS = ("openai_api_key", "project", "organization")


@dataclass
class ApiRequest:
    """A parsed, authenticated API request: what to forward, as whom, and how long to wait."""

    body: dict[str, Any]
    credentials: Credentials
    timeout: TimeoutDecision
    record: RequestRecord


def record() -> RequestRecord:
    """The completion record of the current API request."""
    return app_context().g.record


def decide_timeout(raw: Any, default_ms: int, max_ms: int) -> TimeoutDecision:
    """README "Timeouts": absent -> default; not a number, or < 1 -> default (invalid); above max -> max."""
    if raw is None or (isinstance(raw, str) and raw.strip() == ""):
        return TimeoutDecision(float(default_ms), "default")
    value: float | None
    if isinstance(raw, bool):
        value = None
    elif isinstance(raw, int | float):
        value = float(raw)
    else:
        try:
            value = float(str(raw).strip())
        except ValueError:
            value = None
    if value is None or not math.isfinite(value) or value < 1:
        return TimeoutDecision(float(default_ms), "invalid")
    if value > max_ms:
        return TimeoutDecision(float(max_ms), "clamped")
    return TimeoutDecision(value, "provided")


def read_limited_body(limit: int) -> bytes:
    """The whole request body, or 413: before reading when Content-Length says so, else while reading."""
    g.body_limit = limit
    # One byte of slack tells a body exactly at the limit from one that goes on past it: werkzeug
    # stops a chunked body at the limit without saying whether more was coming.
    request.max_content_length = limit + 1
    raw = request.get_data(cache=False)
    if len(raw) > limit:
        raise PayloadTooLarge(f"Request body exceeds the {limit}-byte limit")
    return raw


def read_json_body(*, allow_empty: bool = False) -> dict[str, Any]:
    """The request body as a JSON object, whatever Content-Type says; 413 before reading if too big."""
    raw = read_limited_body(state().config.max_body_bytes)
    if not raw.strip():
        if allow_empty:
            return {}
        raise BadRequest("Request body is empty; expected a JSON object")
    try:
        body = jsonio.loads(raw)
    except jsonio.JSONDecodeError as exc:
        raise BadRequest(f"Invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("Request body must be a JSON object")
    return body


def _override(sources: tuple[Mapping[str, Any], ...], name: str) -> str | None:
    for source in sources:
        value = source.get(name)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise BadRequest(f"{name} must be a string")
        return header_value(name, value)
    return None


def authenticate(provided: str | None) -> Client:
    """The client whose key the request presents (403 otherwise); its name goes on the record."""
    client = state().clients.authenticate(provided)
    g.client = client
    record().client = client.name
    return client


def authorize(*sources: Mapping[str, Any]) -> Credentials:
    """Check the security key and resolve the per-request upstream credentials."""
    st = state()
    client = authenticate(provided_security_key(request.headers, *sources))
    api_key, project, organization = (_override(sources, name) for name in OVERRIDE_FIELDS)
    # Upstream may echo the key back ("Incorrect API key provided: ..."), whatever it looks like.
    mask_in_this_request(api_key)
    return st.upstream.credentials(api_key, project, organization, client.keys)


def _timeout_from(*sources: Mapping[str, Any]) -> TimeoutDecision:
    config = state().config
    raw = next((s.get("timeout") for s in sources if s.get("timeout") is not None), None)
    decision = decide_timeout(raw, config.upstream_timeout_ms, config.effective_max_timeout_ms)
    record().timeout = decision
    return decision


def json_request(*, allow_empty: bool = False, strip: tuple[str, ...] = ()) -> ApiRequest:
    """A JSON-body request: parsed, authenticated, control fields taken out of the forwarded body."""
    body = read_json_body(allow_empty=allow_empty)
    query = request.args
    credentials = authorize(body, query)
    timeout = _timeout_from(body, query)
    for name in (*CONTROL_FIELDS, *strip):
        body.pop(name, None)
    return ApiRequest(body=body, credentials=credentials, timeout=timeout, record=record())


def query_request() -> ApiRequest:
    """A GET/DELETE request: key, overrides and timeout from the query string (or headers)."""
    query = request.args
    credentials = authorize(query)
    timeout = _timeout_from(query)
    return ApiRequest(body={}, credentials=credentials, timeout=timeout, record=record())


@dataclass
class FormRequest(ApiRequest):
    """A multipart API request: `body` is a MultiDict of its text fields, `files` its file parts.

    The spooled files stay open until `close()`, or the end of a `with` block.
    """

    files: MultiDict[str, FileStorage]
    spool: Spool

    def close(self) -> None:
        self.spool.close()

    def __enter__(self) -> FormRequest:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def form_request(limit: int) -> FormRequest:
    """A multipart request: parsed (files on disk, `limit` bytes each at most), authenticated, control
    fields taken out. Use it in a `with` block so the files are closed when the call is done."""
    fields, files, spool = read_limited_form(limit)
    query = request.args
    try:
        credentials = authorize(fields, query)
        timeout = _timeout_from(fields, query)
    except ProxyError:
        spool.close()
        raise
    for name in CONTROL_FIELDS:
        fields.pop(name, None)
    return FormRequest(
        body=fields, credentials=credentials, timeout=timeout, record=record(), files=files, spool=spool
    )
