"""A real OTLP/HTTP trace receiver on loopback: what a collector (Tempo, Jaeger, an OpenTelemetry
Collector) is to the proxy. It accepts `POST /v1/traces` with `application/x-protobuf` bodies, decodes
them with OpenTelemetry's own protobuf classes, and keeps both the raw bytes (to look for text that
must never be exported) and the decoded spans.

    receiver = OTLPReceiver().start()
    make_app(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url)
    ...
    [server] = receiver.spans_of(kind="SERVER")
"""

from __future__ import annotations

import gzip
import time
from dataclasses import dataclass
from typing import Any

import gevent
from gevent.pywsgi import WSGIServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto
from opentelemetry.proto.trace.v1.trace_pb2 import Status

PATH = "/v1/traces"


@dataclass
class Span:
    """One exported span, flattened: ids in hex, attributes and the resource's as plain dicts."""

    name: str
    kind: str  # SERVER, CLIENT, ...
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status: str  # UNSET, OK, ERROR
    status_message: str
    resource: dict[str, Any]

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs}


class OTLPReceiver:
    def __init__(self, port: int = 0) -> None:
        self.bodies: list[bytes] = []
        self.spans: list[Span] = []
        self.refused: list[str] = []
        self._server = WSGIServer(("127.0.0.1", port), self._app, log=None)

    def start(self) -> OTLPReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(timeout=1)

    @property
    def url(self) -> str:
        """The base URL, as OTEL_EXPORTER_OTLP_ENDPOINT takes it (the exporter adds /v1/traces)."""
        return f"http://127.0.0.1:{self._server.server_port}"

    def reset(self) -> None:
        self.bodies.clear()
        self.spans.clear()
        self.refused.clear()

    def _app(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
        ctype = environ.get("CONTENT_TYPE", "")
        if method != "POST" or path != PATH or ctype != "application/x-protobuf":
            self.refused.append(f"{method} {path} {ctype}")
            start_response("415 Unsupported Media Type" if path == PATH else "404 Not Found", [])
            return [b""]
        body = environ["wsgi.input"].read()
        if environ.get("HTTP_CONTENT_ENCODING") == "gzip":
            body = gzip.decompress(body)
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        self.bodies.append(body)
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        Span(
                            name=span.name,
                            kind=SpanProto.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                            attributes=_attributes(span.attributes),
                            status=Status.StatusCode.Name(span.status.code).removeprefix("STATUS_CODE_"),
                            status_message=span.status.message,
                            resource=resource,
                        )
                    )
        answer = ExportTraceServiceResponse().SerializeToString()
        start_response(
            "200 OK", [("Content-Type", "application/x-protobuf"), ("Content-Length", str(len(answer)))]
        )
        return [answer]

    # -- what tests read -------------------------------------------------------------------------
    def spans_of(self, *, kind: str | None = None, trace_id: str | None = None) -> list[Span]:
        return [
            s
            for s in self.spans
            if (kind is None or s.kind == kind) and (trace_id is None or s.trace_id == trace_id)
        ]

    def exported_bytes(self) -> bytes:
        return b"".join(self.bodies)

    def wait_for(self, condition: Any, within: float = 20.0, what: str = "spans") -> Any:
        """For spans exported by another process (gunicorn's workers); in-process, flush instead."""
        deadline = time.monotonic() + within
        while True:
            found = condition()
            if found:
                return found
            assert time.monotonic() < deadline, f"timed out waiting for {what}: got {self.spans}"
            gevent.sleep(0.05)


def main() -> None:
    """`python -m tests.support.otlp_receiver --port 4318`: a receiver for a manual run or the bench (it keeps
    only a count, so a long run does not grow it), printing the spans received every few seconds."""
    import argparse

    from gevent import monkey

    monkey.patch_all()
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args()
    receiver = OTLPReceiver(args.port).start()
    total = 0
    while True:
        gevent.sleep(5)
        total += len(receiver.spans)
        receiver.reset()
        print(f"{total} spans received", flush=True)


if __name__ == "__main__":
    main()
