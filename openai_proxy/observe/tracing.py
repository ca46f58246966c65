"""Tracing with OpenTelemetry (contract §16): one SERVER span per API request, one CLIENT span per
upstream attempt, exported in batches over OTLP/HTTP (protobuf) as the standard `OTEL_*` variables say.

Imported only when tracing is on (`Config.tracing`, i.e. `OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set): with it off no OpenTelemetry module is loaded, and a
request costs one `if` (its `RequestRecord.trace` stays None).

The spans hang off hooks the proxy already has, not off the instrumentation packages:
- opentelemetry-instrumentation-flask (and -wsgi) end the request span when the WSGI app returns its
  body iterable, before a stream has sent its first event (opentelemetry-python-contrib #3401). The
  SERVER span here ends with the request's completion record (`CompletionLog.emit`), which goes out
  when the response is closed: its last byte sent, or the client gone.
- opentelemetry-instrumentation-openai sees only calls made through the SDK, and most of ours go
  through the proxy's own client. A CLIENT span starts in `UpstreamClient.send`, which every attempt
  passes (a key failover, an SDK retry: sibling spans), and that attempt's `traceparent` carries it.
Parents are explicit (the record holds its trace), never OpenTelemetry's ambient context, so nothing
is attached or detached per greenlet. Prompt and answer text never reach a span: its attributes are
ids, route templates, model names, statuses, token counts and the client's name.

Each process starts its own SDK (tracer provider, batch span processor, exporter) when it first
traces: a gunicorn worker after the fork, never the master; a process forked after that starts anew.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import weakref
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from openai_proxy.redact import redact_text
from openai_proxy.upstream.classify import classify
from openai_proxy.version import __version__

if TYPE_CHECKING:
    from openai_proxy.config import Config
    from openai_proxy.record import RequestRecord
    from openai_proxy.upstream.settings import ClientSettings

log = logging.getLogger("openai_proxy.tracing")

SERVICE_NAME = "openai-proxy"
PROVIDER = "openai"
# gen_ai.operation.name by upstream call (OpenTelemetry's GenAI conventions: Responses is `chat` too);
# any other call is named after the proxy's route, as records and metrics name it.
OPERATIONS = {
    ("POST", "/chat/completions"): "chat",
    ("POST", "/responses"): "chat",
    ("POST", "/embeddings"): "embeddings",
    ("POST", "/completions"): "text_completion",
}
# W3C trace context only (the caller's and upstream's `traceparent`), whatever OTEL_PROPAGATORS says.
_PROPAGATOR = TraceContextTextMapPropagator()
_SERVER = trace.SpanKind.SERVER
_CLIENT = trace.SpanKind.CLIENT
_ERROR = trace.StatusCode.ERROR
FLUSH_TIMEOUT_MS = 5_000


@contextlib.contextmanager
def _environment(settings: Mapping[str, str]) -> Iterator[None]:
    """The SDK reads its `OTEL_*` variables from the process environment when its objects are made;
    settings from the dotenv files or a host's `app.config` are put there for that moment only (the
    real environment already won when they were merged, and an app built later may have others)."""
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class Tracing:
    """One app's tracing: the SDK of the current process (started on first use), and a RequestTrace
    per API request."""

    def __init__(self, config: Config) -> None:
        self._settings = dict(config.otel)
        self._pid = 0
        self._provider: TracerProvider | None = None
        self._tracer: trace.Tracer = trace.NoOpTracer()

    def _start(self) -> None:
        with _environment(self._settings):
            # Ours unless OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES say otherwise.
            resource = Resource.create({"service.name": SERVICE_NAME, "service.version": __version__})
            resource = resource.merge(OTELResourceDetector().detect())
            resource = resource.merge(Resource({"process.pid": os.getpid()}))
            # The sampler comes from OTEL_TRACES_SAMPLER(_ARG) (default: the caller's decision, else
            # every trace), the batching from OTEL_BSP_*, the exporter from OTEL_EXPORTER_OTLP_*.
            provider = TracerProvider(resource=resource)
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self._provider = provider
        self._tracer = provider.get_tracer("openai_proxy", __version__)
        self._pid = os.getpid()

    def start_request(self, record: RequestRecord, environ: Mapping[str, Any], route: str) -> RequestTrace:
        """The SERVER span of an API request, child of the caller's `traceparent` if it sent one."""
        if self._pid != os.getpid():
            # First use in this process, or a fork since: an SDK started before the fork is the
            # parent's (its export thread, its queue, its process.pid), so this process starts its own.
            self._start()
        parent = None
        traceparent = environ.get("HTTP_TRACEPARENT")
        if traceparent:
            carrier = {"traceparent": traceparent}
            tracestate = environ.get("HTTP_TRACESTATE")
            if tracestate:
                carrier["tracestate"] = tracestate
            parent = _PROPAGATOR.extract(carrier)
        span = self._tracer.start_span(
            f"{record.method} {route}",
            context=parent,
            kind=_SERVER,
            attributes={
                "http.request.method": record.method,
                "http.route": route,
                "url.scheme": environ.get("wsgi.url_scheme", "http"),
                "openai_proxy.request_id": record.request_id,
            },
        )
        return RequestTrace(self._tracer, span, record)

    def force_flush(self, timeout_ms: int = FLUSH_TIMEOUT_MS) -> bool:
        """Export the ended spans now (tests; a process about to stop)."""
        if self._provider is None or self._pid != os.getpid():
            return True
        return self._provider.force_flush(timeout_ms)

    def close(self) -> None:
        """Export what is queued and stop this process's SDK (a worker's exit)."""
        provider, self._provider = self._provider, None
        self._tracer = trace.NoOpTracer()
        if provider is not None and self._pid == os.getpid():
            # Each export waits at most OTEL_EXPORTER_OTLP_TIMEOUT (10 s) for the collector, and a
            # stopping worker as a whole at most gunicorn's graceful timeout.
            provider.shutdown()
        self._pid = 0


class RequestTrace:
    """One API request's spans: its SERVER span, and the CLIENT span of each upstream attempt."""

    __slots__ = ("_attempts", "_context", "_record", "_tracer", "span", "trace_id")

    def __init__(self, tracer: trace.Tracer, span: trace.Span, record: RequestRecord) -> None:
        self._tracer = tracer
        self.span = span
        self.trace_id = format(span.get_span_context().trace_id, "032x")
        self._context = trace.set_span_in_context(span)
        # Not the record itself: it holds this trace, and a cycle would wait for the garbage collector.
        self._record = weakref.ref(record)
        self._attempts: list[AttemptTrace] = []

    def start_attempt(self, method: str, target: str, settings: ClientSettings) -> AttemptTrace:
        """A CLIENT span for one upstream attempt (`UpstreamClient.send`) and its `traceparent`."""
        record = self._record()
        path = target.partition("?")[0].removeprefix(settings.base_path)
        operation = OPERATIONS.get((method, path)) or (record.endpoint if record else path)
        model = redact_text(record.model) if record and record.model else None
        attributes: dict[str, Any] = {
            "gen_ai.provider.name": PROVIDER,
            "gen_ai.operation.name": operation,
            "server.address": settings.host,
            "server.port": settings.port,
        }
        if model:
            attributes["gen_ai.request.model"] = model
        if record and record.client:
            attributes["openai_proxy.client"] = record.client
        span = self._tracer.start_span(
            f"{operation} {model}" if model else operation,
            context=self._context,
            kind=_CLIENT,
            attributes=attributes,
        )
        attempt = AttemptTrace(span)
        self._attempts.append(attempt)
        return attempt

    def finish(self, entry: Mapping[str, Any]) -> None:
        """The request has ended (its completion record, already redacted, is `entry`): end its spans."""
        for attempt in self._attempts:
            attempt.finish(entry)
        span = self.span
        status = entry.get("status")
        result = entry.get("result")
        attributes: dict[str, Any] = {}  # set at once: each call takes the span's lock
        if isinstance(status, int):
            attributes["http.response.status_code"] = status
        if entry.get("client"):
            attributes["openai_proxy.client"] = entry["client"]
        if result:
            attributes["openai_proxy.result"] = result
        span.set_attributes(attributes)
        # A server span fails on a 5xx only: a 4xx is the caller's error, a 499 the caller leaving.
        if isinstance(status, int) and status >= 500:
            _fail(span, result or str(status))
        span.end()


class AttemptTrace:
    """The CLIENT span of one upstream attempt.

    An attempt that failed, or that upstream refused (status >= 400), ends when it did. One that
    upstream accepted ends when its response is closed (the body read, or the stream over), but the
    span is ended only with the request, when its usage and the model upstream used are known.
    """

    __slots__ = ("closed_ns", "ended", "headers", "span", "status")

    def __init__(self, span: trace.Span) -> None:
        self.span = span
        self.status: int | None = None
        self.closed_ns: int | None = None
        self.ended = False
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        self.headers = list(carrier.items())

    def answered(self, status: int) -> None:
        self.status = status
        self.span.set_attribute("http.response.status_code", status)
        if status >= 400:
            _fail(self.span, str(status))

    def failed(self, exc: BaseException) -> None:
        """No answer: it could not connect, timed out, broke, or the client left meanwhile."""
        _fail(self.span, classify(exc).result)
        self._end(None)

    def closed(self) -> None:
        if self.ended:
            return
        if self.status is None or self.status >= 400:
            self._end(None)
        else:
            self.closed_ns = time.time_ns()

    def finish(self, entry: Mapping[str, Any]) -> None:
        if self.ended:
            return
        span = self.span
        if self.status is not None and self.status < 400:
            attributes: dict[str, Any] = {}
            if entry.get("upstreamModel"):
                attributes["gen_ai.response.model"] = entry["upstreamModel"]
            usage = entry.get("usage") or {}
            if isinstance(usage.get("prompt_tokens"), int):
                attributes["gen_ai.usage.input_tokens"] = usage["prompt_tokens"]
            if isinstance(usage.get("completion_tokens"), int):
                attributes["gen_ai.usage.output_tokens"] = usage["completion_tokens"]
            span.set_attributes(attributes)
            result = entry.get("result")
            if result and result != "ok":  # the stream broke, or the client left during it
                _fail(span, result)
        self._end(self.closed_ns)

    def _end(self, end_ns: int | None) -> None:
        self.ended = True
        self.span.end(end_time=end_ns)


def _fail(span: trace.Span, error_type: str) -> None:
    span.set_attribute("error.type", error_type)
    span.set_status(_ERROR, error_type)
