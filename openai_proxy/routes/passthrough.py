"""The OpenAI-compatible `/v1` surface: requests relayed as sent, answers relayed as upstream sent them.

The client is an official SDK with `base_url=<proxy>/v1` and the proxy's `SECURITY_KEY` as its API
key. The proxy swaps that key for the real one, forwards everything else that is end-to-end, and
never re-encodes a body it does not have to: JSON is forwarded byte for byte (except where the proxy
adds to it, see `_inspect_json`), uploads are received whole before a gate slot is taken and then
sent as they came, downloads stream through, and error answers keep their status and body. The path
goes upstream as routing and the proxy's rules saw it (`upstream_target`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote_plus

from flask import g, request

from openai_proxy import jsonio
from openai_proxy.clients.admission import BODY_METHODS, note_models, note_query_models
from openai_proxy.clients.safety import add_safety_identifier
from openai_proxy.errors import BadRequest, Forbidden, Unauthorized
from openai_proxy.inbound.auth import bearer_token
from openai_proxy.inbound.multipart import FORM_OVERHEAD_BYTES, read_limited_form, watch_text_field
from openai_proxy.inbound.spool import SpooledBody, client_body, spool
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

# POST endpoints whose bodies the proxy always reads as JSON (size limit, model for the record);
# any other body sent as `application/json` is read too.
JSON_ENDPOINTS = frozenset(
    {"/chat/completions", "/responses", "/responses/compact", "/responses/input_tokens", "/embeddings"}
)
AUDIO_ENDPOINTS = frozenset({"/audio/transcriptions", "/audio/translations"})
# Other bodies are received (spooled) whole before they go upstream: up to OpenAI's own largest
# upload (a 512 MB file) and its multipart framing, so a client cannot fill the disk with more.
MAX_RELAYED_BODY = 512 * 1024 * 1024 + FORM_OVERHEAD_BYTES
# Create calls that get the client's `safety_identifier` (`openai_proxy.clients.safety`).
SAFETY_ENDPOINTS = frozenset({"/chat/completions", "/responses"})
# Calls with a body that run no model: a client restricted to some models may make them naming none.
# Every other call with a body counts as running one (a new endpoint too: fail closed), so such a
# client's body is read before the slot and must name an allowed model. A batch runs the models its
# input file names, which the proxy cannot see: it is not listed.
NO_MODEL = re.compile(
    r"/files|/uploads(/[^/]+/(parts|complete|cancel))?|/batches/[^/]+/cancel"
    r"|/responses/[^/]+/cancel|/responses/input_tokens|/chat/completions/[^/]+"
    r"|/fine_tuning/jobs/[^/]+/(cancel|pause|resume)|/fine_tuning/checkpoints/[^/]+/permissions"
    r"|/(vector_stores|conversations|containers)(/.+)?"
)
# The characters a path segment may hold as they are (RFC 3986 `pchar`); others go percent-encoded.
PATH_SAFE = "/:@!$&'()*+,;="


@dataclass
class PassthroughRequest:
    """What goes upstream: method, path and query as the client sent them, headers, body."""

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    credentials: Credentials
    body: bytes | SpooledBody | None
    content_length: int | None
    timeout: TimeoutDecision
    model: str | None = None
    strip_usage_chunk: bool = False

    def close(self) -> None:
        """Free a spooled body (once the upstream call has been sent, or has failed)."""
        if isinstance(self.body, SpooledBody):
            self.body.close()

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
    """The path below `/v1` and the query to send upstream.

    The path is the decoded one routing matched (`%63ompletions` is `completions`), which is also
    what the proxy's rules judge, re-encoded one canonical way: upstream gets the very path the proxy
    judged, however the client spelled it. One that is not UTF-8, holds control characters, or has
    empty or dot segments (a trailing slash included) is refused. The query goes as the client sent
    it, less a fragment and the proxy's own `security_key`.
    """
    path = request.path.removeprefix(state().url_prefix)  # mounted under a prefix: the path below it
    path = path[len("/v1") :] if path.startswith("/v1/") else "/"
    if "\ufffd" in path or any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        raise BadRequest("The path is not UTF-8 text, or holds control characters")
    if any(segment in ("", ".", "..") for segment in path.split("/")[1:]):
        raise BadRequest(f"Path {quote(path, safe=PATH_SAFE)!r} has empty or dot segments")
    raw = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI") or request.full_path
    query = raw.partition("#")[0].partition("?")[2]
    if "security_key" in query:  # the proxy's own secret, from a client of the legacy routes
        query = "&".join(p for p in query.split("&") if unquote_plus(p.partition("=")[0]) != "security_key")
    return quote(path, safe=PATH_SAFE), query


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
    """Authenticate, then prepare the upstream request with the client's whole body, all of it before
    a gate slot is taken: JSON read (size-limited), other bodies received into a spool
    (`openai_proxy.inbound.spool`). Where a client restricted to some models must have its call judged,
    every body of a call that runs a model is read and judged first (JSON, or the whole form of an
    upload), and a body the proxy cannot read is refused rather than sent unjudged. The caller closes
    the request once it has been sent."""
    authorize()
    path, query = upstream_target()
    method = request.method
    timeout = sdk_timeout(request.headers)
    req = PassthroughRequest(method, path, query, upstream_headers(), credentials(), None, None, timeout)
    rec = record()
    rec.runs_model = method in BODY_METHODS and not NO_MODEL.fullmatch(path)
    if method not in BODY_METHODS:
        return req
    judged = g.client.judged
    form = request.mimetype == "multipart/form-data"
    if judged and rec.runs_model and form:
        _read_form(req, rec)
    elif (
        (method == "POST" and path in JSON_ENDPOINTS)
        or request.mimetype == "application/json"
        or (judged and rec.runs_model)
    ):
        req.body = read_limited_body(state().config.max_body_bytes)
        req.content_length = len(req.body)
        _inspect_json(req, rec, judged)
    else:
        audio = path in AUDIO_ENDPOINTS
        pieces = client_body(state().config.max_audio_bytes if audio else MAX_RELAYED_BODY)
        if audio:  # the model, for the record and its price, read as the body passes
            pieces = watch_text_field(pieces, request.content_type or "", "model", _set_model(req))
        _set_body(req, spool(pieces))
    if path in AUDIO_ENDPOINTS and req.content_length is not None:
        rec.estimate = estimate_upload(req.content_length)
    if judged and rec.runs_model:
        note_query_models(rec, request.args)
    return req


def _inspect_json(req: PassthroughRequest, rec: RequestRecord, judged: bool) -> None:
    """The models of a JSON body go on the record; a judged client's body must be a JSON object the
    proxy can read (400), and goes upstream as the proxy read it: re-encoded, so upstream cannot
    read anything else into it (a key given twice, say)."""
    assert isinstance(req.body, bytes)
    if judged and not req.body.strip():
        return  # nothing to forward but nothing: it names no model, and `admit` judges that
    try:
        body = jsonio.loads(req.body)
    except jsonio.JSONDecodeError as exc:
        if judged:
            raise BadRequest(f"Invalid JSON body: {exc}") from None
        return  # forwarded as sent: upstream's own 400 is the better answer
    if not isinstance(body, dict):
        if judged:
            raise BadRequest("Request body must be a JSON object")
        return
    note_models(rec, body)
    req.model = rec.model
    changed = judged
    if req.method == "POST" and req.path in SAFETY_ENDPOINTS:
        changed = add_safety_identifier(body) or changed
    if req.method == "POST" and req.path == "/chat/completions" and body.get("stream") is True:
        changed = ask_for_usage(req, body) or changed
    if changed:
        req.body = jsonio.dumps(body)
        req.content_length = len(req.body)
        # The proxy wrote these bytes: they are plain JSON, whatever the client's headers said.
        req.headers = [
            (k, v) for k, v in req.headers if k.lower() not in ("content-type", "content-encoding")
        ]
        req.headers.append(("Content-Type", "application/json"))
    # Of the bytes that go upstream, as on the legacy routes (`pipeline.json_call`).
    rec.estimate = estimate_json(len(req.body), body)


def ask_for_usage(req: PassthroughRequest, body: dict[str, Any]) -> bool:
    """Streamed chat only reports usage if asked: ask on the client's behalf, and hide that chunk."""
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        return False
    body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    req.strip_usage_chunk = True
    return True


def _read_form(req: PassthroughRequest, rec: RequestRecord) -> None:
    """A judged client's upload that runs a model (a transcription, an image edit): the whole form is
    read before the slot, with the legacy upload's parser and limits, so every `model` field is
    judged; the bytes read (kept in a spool) are then sent on unchanged."""
    config = state().config
    limit = config.max_audio_bytes if req.path in AUDIO_ENDPOINTS else config.max_body_bytes
    copy = SpooledBody()
    try:
        fields, _files, parsed = read_limited_form(limit, copy)
        parsed.close()  # the parsed files are not needed: the copy is what goes upstream
        note_models(rec, fields)
    except BaseException:
        copy.close()
        raise
    req.model = rec.model
    _set_body(req, copy)


def _set_body(req: PassthroughRequest, body: SpooledBody) -> None:
    """A small body goes in one write with the head (the spool is closed); a big one from its spool."""
    small = body.small()
    if small is not None:
        body.close()
    req.body = small if small is not None else body
    req.content_length = len(body)


def _set_model(req: PassthroughRequest) -> Callable[[str], None]:
    def found(model: str) -> None:
        req.model = req.model or model

    return found


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
