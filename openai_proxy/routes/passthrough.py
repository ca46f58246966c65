"""The OpenAI-compatible `/v1` surface: requests relayed as sent, answers relayed as upstream sent them.

The client is an official SDK with `base_url=<proxy>/v1` and the proxy's `SECURITY_KEY` as its API
key. The proxy swaps that key for the real one, forwards everything else that is end-to-end, and
never re-encodes a body it does not have to: JSON is forwarded byte for byte (chat streams excepted,
see `chat_body`), uploads and downloads stream through, and error answers keep their status and body.
"""

from __future__ import annotations

import posixpath
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

import gevent
from flask import g, request
from werkzeug.exceptions import ClientDisconnected

from openai_proxy import jsonio
from openai_proxy.errors import (
    BadRequest,
    ClientCancelled,
    Forbidden,
    PayloadTooLarge,
    RequestTimeout,
    Unauthorized,
)
from openai_proxy.inbound.auth import bearer_token
from openai_proxy.inbound.multipart import watch_text_field
from openai_proxy.inbound.validation import header_value
from openai_proxy.inbound.web import authenticate, decide_timeout, read_limited_body, record
from openai_proxy.record import RequestRecord, TimeoutDecision
from openai_proxy.redact import redact_text
from openai_proxy.state import state
from openai_proxy.upstream import Credentials, UpstreamCall
from openai_proxy.usage import estimate_json, estimate_upload

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
     "transfer-encoding", "upgrade"}
)  # fmt: skip
# Client headers that stop here: hop-by-hop ones, the proxy's own credentials and ids, and those the
# proxy sets itself (length, encoding: bodies go upstream as identity so usage can be read).
NOT_FORWARDED = HOP_BY_HOP | {
    "host", "authorization", "cookie", "x-security-key", "x-request-id", "accept-encoding", "content-length",
    "expect", "openai-organization", "openai-project", "proxy-connection",
}  # fmt: skip
RELAYED_BACK = frozenset(
    {"content-type", "content-disposition", "x-request-id", "retry-after", "retry-after-ms", "x-should-retry",
     "openai-processing-ms", "openai-version", "openai-model"}
)  # fmt: skip
RELAYED_BACK_PREFIXES = ("x-ratelimit-",)

# POST endpoints whose JSON bodies the proxy reads (size limit, model for the record).
JSON_ENDPOINTS = frozenset(
    {"/chat/completions", "/responses", "/responses/compact", "/responses/input_tokens", "/embeddings"}
)
AUDIO_ENDPOINTS = frozenset({"/audio/transcriptions", "/audio/translations"})
CHUNK = 64 * 1024


@dataclass
class PassthroughRequest:
    """What goes upstream: method, path and query as the client sent them, headers, body."""

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    credentials: Credentials
    body: bytes | Iterator[bytes] | None
    content_length: int | None
    timeout: TimeoutDecision
    model: str | None = None
    strip_usage_chunk: bool = False

    def call(self, record: RequestRecord) -> UpstreamCall:
        return UpstreamCall(
            self.method,
            self.path,
            record=record,
            timeout=self.timeout,
            credentials=self.credentials,
            query=self.query,
            headers=self.headers,
            body=self.body,
            content_length=self.content_length,
        )


def authorize() -> None:
    """The client's Bearer token must be a client key: SECURITY_KEY or a named client's (never forwarded)."""
    try:
        authenticate(bearer_token(request.headers))
    except Forbidden as exc:
        if not len(state().clients):
            raise
        raise Unauthorized(
            "Incorrect API key for this proxy: use the SECURITY_KEY of the proxy as the API key, or a client key"
        ) from exc


def sdk_timeout(headers: Mapping[str, str]) -> TimeoutDecision:
    """The SDKs' own timeout headers act as the `timeout` field: Node's whole seconds, Python's float."""
    config = state().config
    raw = headers.get("X-Stainless-Timeout") or headers.get("X-Stainless-Read-Timeout")
    ms: Any = None
    if raw is not None:
        try:
            ms = float(raw) * 1000.0
        except ValueError:
            ms = raw  # judged (and recorded) as invalid
    return decide_timeout(ms, config.upstream_timeout_ms, config.effective_max_timeout_ms)


def upstream_target() -> tuple[str, str]:
    """Path (below `/v1`) and query as the client sent them, less a fragment and the proxy's own
    `security_key`; dot segments are refused."""
    raw = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI") or request.full_path
    raw = raw.partition("#")[0]
    path, _, query = raw.partition("?")
    if "security_key" in query:  # the proxy's own secret, from a client of the legacy routes
        query = "&".join(p for p in query.split("&") if unquote_plus(p.partition("=")[0]) != "security_key")
    if "://" in path:  # absolute-form request target
        path = "/" + path.split("://", 1)[1].partition("/")[2]
    path = path[len("/v1") :] if path.startswith("/v1/") else "/"
    if posixpath.normpath(path) != path.rstrip("/") and path != "/":
        raise BadRequest(f"Path {path!r} has empty or dot segments")
    return path, query


def upstream_headers() -> list[tuple[str, str]]:
    """End-to-end client headers (RFC 9110 §7.6.1: not hop-by-hop, not named in `Connection`), each
    checked as a header value."""
    named = {token.strip().lower() for token in request.headers.get("Connection", "").split(",")}
    return [
        (name, header_value(f"Header {name}", value))
        for name, value in request.headers.items()
        if (key := name.lower()) not in NOT_FORWARDED and key not in named
    ]


def credentials() -> Credentials:
    """The configured key; the client's project and organization, else the configured ones."""
    headers = request.headers
    project = headers.get("OpenAI-Project")
    organization = headers.get("OpenAI-Organization")
    return state().upstream.credentials(
        None,
        header_value("OpenAI-Project", project) if project else None,
        header_value("OpenAI-Organization", organization) if organization else None,
        g.client.keys,
    )


def build_request() -> PassthroughRequest:
    """Authenticate, then prepare the upstream request; JSON endpoints are read (size-limited)."""
    authorize()
    path, query = upstream_target()
    method = request.method
    timeout = sdk_timeout(request.headers)
    req = PassthroughRequest(method, path, query, upstream_headers(), credentials(), None, None, timeout)
    if method == "POST" and path in JSON_ENDPOINTS:
        req.body = read_limited_body(state().config.max_body_bytes)
        req.content_length = len(req.body)
        _inspect_json(req)
    elif method in ("POST", "PUT", "PATCH"):
        limit = state().config.max_audio_bytes if path in AUDIO_ENDPOINTS else None
        req.body, req.content_length = streamed_body(limit)
        if path in AUDIO_ENDPOINTS:  # the model, for the record and its price, read as the body passes
            req.body = watch_text_field(req.body, request.content_type or "", "model", _set_model(record()))
            record().estimate = estimate_upload(req.content_length)
    return req


def _inspect_json(req: PassthroughRequest) -> None:
    try:
        body = jsonio.loads(req.body)
    except jsonio.JSONDecodeError:
        return  # forwarded as sent: upstream's own 400 is the better answer
    if not isinstance(body, dict):
        return
    model = body.get("model")
    req.model = model if isinstance(model, str) else None
    record().estimate = estimate_json(len(req.body), body)  # type: ignore[arg-type]
    if req.path == "/chat/completions" and body.get("stream") is True:
        chat_body(req, body)


def chat_body(req: PassthroughRequest, body: dict[str, Any]) -> None:
    """Streamed chat only reports usage if asked: ask on the client's behalf, and hide that chunk."""
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        return
    body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    req.body = jsonio.dumps(body)
    req.content_length = len(req.body)
    req.strip_usage_chunk = True


def _set_model(rec: RequestRecord) -> Callable[[str], None]:
    def found(model: str) -> None:
        rec.model = rec.model or model

    return found


def streamed_body(limit: int | None) -> tuple[Iterator[bytes], int | None]:
    """The client's body as it arrives (never whole in memory); `limit` bytes at most, else 413.

    It is read while a gate slot is held, so a client that stalls longer than the upload idle timeout
    between two pieces gets 408 (the upstream call is dropped, the slot comes back). A client that
    goes away mid-body is ClientCancelled, never mistaken for upstream failing to take the body.
    """
    length = request.content_length
    if limit is not None and length is not None and length > limit:
        raise PayloadTooLarge(f"Request body exceeds the {limit}-byte limit")
    # The relay has no size limit of its own (None would mean "the app default" to Flask).
    request.max_content_length = limit if limit is not None else sys.maxsize
    stream = request.stream
    idle_s = state().config.upload_idle_timeout_s

    def read() -> bytes:
        timer = gevent.Timeout.start_new(idle_s)
        try:
            return stream.read(CHUNK)
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            raise RequestTimeout(f"The request body stalled: nothing arrived for {idle_s} s") from None
        except (OSError, ClientDisconnected):
            # Raised as an OSError (a reset, gunicorn's NoMoreData), the client's failure would reach the
            # upstream client's send, which takes a reset for upstream answering early and waits for it.
            raise ClientCancelled("The client went away while sending the request body") from None
        finally:
            timer.close()

    def chunks() -> Iterator[bytes]:
        sent = 0
        while True:
            chunk = read()
            if not chunk:
                # gunicorn ends `wsgi.input` quietly when the client closes early: upstream would
                # wait for the missing bytes, and the call for its response, while the slot is held.
                if length is not None and sent < length:
                    raise ClientCancelled("The client went away while sending the request body")
                return
            sent += len(chunk)
            if limit is not None and sent > limit:
                raise PayloadTooLarge(f"Request body exceeds the {limit}-byte limit")
            yield chunk

    return chunks(), length


def response_headers(upstream: Any) -> list[tuple[str, str]]:
    """The upstream headers a client of the API needs, exactly as upstream sent them."""
    return [
        (name, value)
        for name, value in upstream.headers.raw
        if (key := name.lower()) in RELAYED_BACK or key.startswith(RELAYED_BACK_PREFIXES)
    ]


def redacted_error_body(body: bytes) -> tuple[bytes, dict[str, Any]]:
    """An upstream error body with secrets masked, and a summary of it for the completion record."""
    text = body.decode("utf-8", "replace")
    masked = redact_text(text) or ""
    summary: dict[str, Any] = {"message": masked[:500]}
    try:
        parsed = jsonio.loads(masked)
        detail = parsed.get("error") if isinstance(parsed, dict) else None
        if isinstance(detail, dict):
            summary = {k: detail.get(k) for k in ("message", "type", "code") if detail.get(k) is not None}
    except jsonio.JSONDecodeError:
        pass
    return (masked.encode() if masked != text else body), summary
