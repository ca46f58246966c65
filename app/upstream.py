"""The upstream OpenAI API: per worker, one SDK client and one lean HTTP/1.1 pool; timeouts, retries.

Two ways out, one interface (`send`):
- Calls the contract retries (idempotent reads, deletes, token counts) and multipart uploads go
  through the official SDK: its retry policy (connection errors, timeouts, 408/409/429/5xx,
  `Retry-After`) and its multipart encoding are exactly what those calls need.
- Create-style calls and streams, which are never retried, take the lean client in `app/http1.py`:
  the SDK's request machinery alone costs more CPU than the proxy's whole per-request budget.
Both bound the wait for response *headers* per attempt (a `gevent.Timeout`); once headers are in,
a slow body or stream is not cut by it. Both raise the SDK's exception types for upstream error
statuses, so classification does not care which way a call went.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import gevent
import httpx2
import openai

from app.config import Config
from app.context import RequestRecord, TimeoutDecision
from app.http1 import Pool
from app.jsonio import dumps_text
from app.redact import redact_text

log = logging.getLogger("openai_proxy.upstream")

RETRIES_IDEMPOTENT = 2
# Reads may pause for as long as a caller is allowed to wait, plus a margin.
READ_MARGIN_S = 60.0
CONNECT_TIMEOUT_S = 10.0
WRITE_TIMEOUT_S = 120.0

JSON_HEADERS = {"Content-Type": "application/json"}
MAX_ERROR_BODY = 1024 * 1024
# Tells the SDK to send `body` as form fields next to `files`; httpx2 adds the boundary.
MULTIPART_HEADERS = {"Content-Type": "multipart/form-data"}


@dataclass(frozen=True)
class Credentials:
    """Who the upstream call is made as: overrides from the request, else the configured values."""

    api_key: str | None
    project: str | None
    organization: str | None

    def headers(self) -> dict[str, Any]:
        """Explicit per-call headers: a value, or `Omit` so nothing the SDK infers leaks through."""
        return {
            "Authorization": f"Bearer {self.api_key}" if self.api_key else openai.omit,
            "OpenAI-Project": self.project or openai.omit,
            "OpenAI-Organization": self.organization or openai.omit,
        }

    def header_list(self) -> list[tuple[str, str]]:
        """The same headers for the lean client: only those that are set."""
        out = [("Authorization", f"Bearer {self.api_key}")] if self.api_key else []
        if self.project:
            out.append(("OpenAI-Project", self.project))
        if self.organization:
            out.append(("OpenAI-Organization", self.organization))
        return out


RetrySink = Callable[[dict[str, Any]], None]


@dataclass
class _Call:
    """State of one logical upstream call, visible to the transport across its attempts."""

    record: RequestRecord
    header_timeout_s: float
    attempts: int = 0
    last_failure: str | None = None
    retry_sinks: list[RetrySink] = field(default_factory=list)


_current_call: ContextVar[_Call | None] = ContextVar("openai_proxy_upstream_call", default=None)


class HeaderTimeoutTransport(httpx2.HTTPTransport):
    """Bounds each attempt's wait for response headers, and counts and logs retries."""

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        call = _current_call.get()
        if call is None:
            return super().handle_request(request)
        call.attempts += 1
        if call.attempts > 1:
            _log_retry(call, request)
        timer = gevent.Timeout(call.header_timeout_s)
        timer.start()
        try:
            response = super().handle_request(request)
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            call.last_failure = f"no response headers within {call.header_timeout_s * 1000:.0f} ms"
            raise httpx2.ReadTimeout(call.last_failure, request=request) from None
        except httpx2.TransportError as exc:
            call.last_failure = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            timer.close()
        record = call.record
        record.upstream_headers_at = time.perf_counter()
        record.upstream_request_id = response.headers.get("x-request-id") or record.upstream_request_id
        if response.status_code >= 400:
            call.last_failure = f"HTTP {response.status_code}"
        return response


def _log_retry(call: _Call, request: httpx2.Request) -> None:
    record = call.record
    record.retries += 1
    event = {
        "event": "upstream_retry",
        "requestId": record.request_id,
        "endpoint": record.endpoint,
        "attempt": call.attempts,
        "retry": record.retries,
        "upstreamPath": request.url.path,
        "reason": redact_text(call.last_failure or "unknown"),
    }
    log.warning(dumps_text(event))
    # The same event, once, to whoever else keeps retries (the log store).
    for sink in call.retry_sinks:
        try:
            sink(event)
        except Exception:
            log.exception("retry sink %r failed", sink)


class Upstream:
    """One worker's access to the OpenAI API: a shared connection pool, two retry policies."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.retry_sinks: list[RetrySink] = []
        max_wait_s = config.effective_max_timeout_ms / 1000.0
        self.http = httpx2.Client(
            transport=HeaderTimeoutTransport(proxy=config.outbound_proxy),
            timeout=httpx2.Timeout(
                connect=CONNECT_TIMEOUT_S, read=max_wait_s + READ_MARGIN_S, write=WRITE_TIMEOUT_S, pool=None
            ),
            trust_env=False,
        )
        # The constructor key is never what upstream sees: every call sends explicit credentials.
        base = openai.OpenAI(
            api_key=config.openai_api_key or "unset",
            base_url=config.openai_base_url,
            http_client=self.http,
            max_retries=0,
        )
        self._clients = {0: base, RETRIES_IDEMPOTENT: base.with_options(max_retries=RETRIES_IDEMPOTENT)}
        self.pool = Pool(
            config.openai_base_url,
            proxy=config.outbound_proxy,
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=max_wait_s + READ_MARGIN_S,
        )
        # Identity encoding: the proxy reads usage from bodies, and relays them byte for byte.
        self._static_headers = [
            ("User-Agent", base.user_agent),
            ("Accept", "application/json"),
            ("Accept-Encoding", "identity"),
        ]

    def credentials(self, api_key: str | None, project: str | None, organization: str | None) -> Credentials:
        """Request overrides win; empty means unset, which falls back to the configuration."""
        return Credentials(
            api_key=api_key or self.config.openai_api_key,
            project=project or self.config.openai_project,
            organization=organization or self.config.openai_organization,
        )

    def send(
        self,
        method: str,
        path: str,
        *,
        record: RequestRecord,
        credentials: Credentials,
        timeout: TimeoutDecision,
        retries: int = 0,
        content: bytes | None = None,
        params: Mapping[str, Any] | None = None,
        body: Mapping[str, Any] | None = None,
        files: Any = None,
        headers: Mapping[str, Any] | None = None,
        stream: bool = False,
    ) -> httpx2.Response:
        """Call upstream and return its raw response (body read unless `stream`); SDK errors propagate.

        Calls that are retried, and multipart uploads, go through the SDK; the rest take the lean path.
        """
        if not retries and files is None and body is None:
            return self._send_lean(
                method, path, record, credentials, timeout, content, params, headers, stream
            )
        return self._send_sdk(
            method, path, record, credentials, timeout, retries, content, params, body, files, headers, stream
        )

    def _send_sdk(
        self,
        method: str,
        path: str,
        record: RequestRecord,
        credentials: Credentials,
        timeout: TimeoutDecision,
        retries: int,
        content: bytes | None,
        params: Mapping[str, Any] | None,
        body: Mapping[str, Any] | None,
        files: Any,
        headers: Mapping[str, Any] | None,
        stream: bool,
    ) -> httpx2.Response:
        client = self._clients[retries]
        options: dict[str, Any] = {"headers": {**credentials.headers(), **(headers or {})}}
        if params:
            options["params"] = params
        call = _Call(record=record, header_timeout_s=timeout.seconds, retry_sinks=self.retry_sinks)
        token = _current_call.set(call)
        record.upstream_started = time.perf_counter()
        try:
            verb = method.upper()
            if verb == "GET":
                response = client.get(path, cast_to=httpx2.Response, options=options, stream=stream)
            elif verb == "POST":
                response = client.post(
                    path,
                    cast_to=httpx2.Response,
                    body=body,
                    content=content,
                    files=files,
                    options=options,
                    stream=stream,
                )
            elif verb == "DELETE":
                response = client.delete(path, cast_to=httpx2.Response, options=options)
            else:
                raise ValueError(f"unsupported upstream method {method}")
        finally:
            _current_call.reset(token)
        if not stream:
            record.upstream_done_at = time.perf_counter()
        return response

    def _send_lean(
        self,
        method: str,
        path: str,
        record: RequestRecord,
        credentials: Credentials,
        timeout: TimeoutDecision,
        content: bytes | Any | None,
        params: Mapping[str, Any] | None,
        headers: Mapping[str, str] | None,
        stream: bool,
    ) -> Any:
        query = self._clients[0].qs.stringify(params) if params else ""
        header_list = [*self._static_headers, *credentials.header_list()]
        if headers:
            header_list += headers.items()
        response = self.relay(method, path, query, header_list, content, record=record, timeout=timeout)
        if response.status_code >= 400:
            raise self._status_error(method, path, response)
        if not stream:
            response.read()
            record.upstream_done_at = time.perf_counter()
        return response

    def relay(
        self,
        method: str,
        path: str,
        query: str,
        headers: list[tuple[str, str]],
        body: bytes | Iterable[bytes] | None,
        *,
        record: RequestRecord,
        timeout: TimeoutDecision,
        content_length: int | None = None,
    ) -> Any:
        """One lean call, as given: returns once upstream headers are in, whatever the status."""
        record.upstream_started = time.perf_counter()
        response = self.pool.request(
            method.upper(),
            self.pool.target(path, query),
            headers,
            body,
            header_timeout=timeout.seconds,
            content_length=content_length,
        )
        record.upstream_headers_at = time.perf_counter()
        record.upstream_request_id = response.headers.get("x-request-id") or record.upstream_request_id
        return response

    def _status_error(self, method: str, path: str, response: Any) -> openai.APIStatusError:
        """The SDK's own exception for an error answer (RateLimitError for 429, ...)."""
        body = response.read()[:MAX_ERROR_BODY]
        url = f"{self.config.openai_base_url}{path}"
        raw = httpx2.Response(
            response.status_code,
            headers=response.headers.raw,
            content=body,
            request=httpx2.Request(method.upper(), url),
        )
        return self._clients[0]._make_status_error_from_response(raw)

    def close(self) -> None:
        self.http.close()
        self.pool.close()
