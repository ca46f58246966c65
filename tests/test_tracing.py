"""Tracing (contract §16) against a real OTLP/HTTP receiver (`tests/support/otlp_receiver.py`): a SERVER span
per API request continuing the caller's trace, a CLIENT span per upstream attempt named to upstream in
its `traceparent`, span ends that wait for a stream's end, errors, no content, `traceId` on records;
off means no OpenTelemetry at all; under gunicorn every worker exports, and a fork starts anew."""

from __future__ import annotations

import functools
import json
import os
import time

import gevent
import pytest
import requests
from flask import Flask

from openai_proxy import OpenAIProxy
from openai_proxy.config import ConfigError, build_config, read_environment
from openai_proxy.redact import redact_text
from tests.conftest import SECURITY_KEY, UPSTREAM_KEY, ClosingClient, base_env, post_json
from tests.support.fake_upstream import chat_completion, error, reset, response_events, sse
from tests.support.otlp_receiver import OTLPReceiver, Span
from tests.test_key_pool import CHAT_PATH, KEY_A, KEY_B, POOL, used
from tests.test_layout import LOADED, _fresh

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
CALLER = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01", "tracestate": "vendor=abc"}
PROMPT = "Tell me about the purple giraffe of Zanzibar"
ANSWER = "The purple giraffe sleeps under the baobab"
CHAT = {
    "security_key": SECURITY_KEY,
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": PROMPT}],
}
V1 = {"Authorization": f"Bearer {SECURITY_KEY}"}


@pytest.fixture(scope="module")
def receiver_server():
    server = OTLPReceiver().start()
    yield server
    server.stop()


@pytest.fixture
def receiver(receiver_server):
    receiver_server.reset()
    yield receiver_server
    receiver_server.reset()


@pytest.fixture
def traced(make_app, receiver):
    """An app exporting to the receiver; `flush(app)` exports what has ended (no sleeping)."""

    def factory(**env: str):
        return make_app(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url, OTEL_BSP_SCHEDULE_DELAY="50", **env)

    return factory


def flush(app) -> None:
    assert app.extensions["openai_proxy"].tracing.force_flush()


def one(spans: list[Span]) -> Span:
    assert len(spans) == 1, spans
    return spans[0]


def traceparent_of(span: Span) -> str:
    """The `traceparent` naming `span`, sampled (a new trace also says its id is random: 03)."""
    return f"00-{span.trace_id}-{span.span_id}-{'01' if span.trace_id == CALLER_TRACE else '03'}"


# ---- parentage -----------------------------------------------------------------------------------


def test_the_request_continues_the_callers_trace_and_each_attempt_is_named_upstream(traced, receiver, fake):
    app = traced()
    r = post_json(app.test_client(), "/openai", CHAT, headers=CALLER)
    assert r.status_code == 200
    flush(app)
    server = one(receiver.spans_of(kind="SERVER"))
    client = one(receiver.spans_of(kind="CLIENT"))
    assert (server.trace_id, server.parent_span_id) == (CALLER_TRACE, CALLER_SPAN)
    assert (client.trace_id, client.parent_span_id) == (CALLER_TRACE, server.span_id)
    assert server.name == "POST /openai"
    assert server.attributes == {
        "http.request.method": "POST",
        "http.route": "/openai",
        "url.scheme": "http",
        "openai_proxy.request_id": r.headers["X-Proxy-Request-Id"],
        "http.response.status_code": 200,
        "openai_proxy.client": "default",
        "openai_proxy.result": "ok",
    }
    assert server.status == "UNSET"
    assert client.name == "chat gpt-4o-mini"
    assert client.attributes == {
        "gen_ai.provider.name": "openai",
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": "gpt-4o-mini",
        "gen_ai.usage.input_tokens": 25,
        "gen_ai.usage.output_tokens": 7,
        "server.address": "127.0.0.1",
        "server.port": fake.port,
        "http.response.status_code": 200,
        "openai_proxy.client": "default",
    }
    assert client.status == "UNSET"
    assert server.start_ns <= client.start_ns <= client.end_ns <= server.end_ns
    # Upstream got the attempt's own context (the caller's tracestate travels on with it).
    sent = fake.last(CHAT_PATH).headers
    assert sent["traceparent"] == traceparent_of(client)
    assert sent["tracestate"] == "vendor=abc"
    assert app.records[-1]["traceId"] == CALLER_TRACE
    assert server.resource["service.name"] == "openai-proxy"
    assert server.resource["process.pid"] == os.getpid()


def test_a_request_without_traceparent_starts_a_trace_the_record_names(traced, receiver):
    app = traced()
    assert post_json(app.test_client(), "/openai", CHAT).status_code == 200
    flush(app)
    server = one(receiver.spans_of(kind="SERVER"))
    assert server.parent_span_id == ""
    assert app.records[-1]["traceId"] == server.trace_id
    line = app.records[-1]
    assert json.loads(json.dumps(line))["traceId"] == server.trace_id


def test_a_clients_own_traceparent_on_v1_gives_way_to_the_attempts(traced, receiver, fake):
    app = traced()
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}]}
    r = post_json(app.test_client(), "/v1/chat/completions", body, headers={**V1, **CALLER})
    assert r.status_code == 200
    flush(app)
    client = one(receiver.spans_of(kind="CLIENT"))
    server = one(receiver.spans_of(kind="SERVER"))
    assert server.name == "POST /v1/chat/completions" and client.parent_span_id == server.span_id
    # Exactly one traceparent (the fake joins repeated fields with ", "): the attempt's.
    assert fake.last(CHAT_PATH).headers["traceparent"] == traceparent_of(client)


def test_pages_and_ready_have_no_spans(traced, receiver):
    app = traced()
    client = app.test_client()
    assert client.get("/ready").status_code == 200
    assert client.get("/").status_code == 200
    assert post_json(client, "/openai", CHAT).status_code == 200
    flush(app)
    assert [s.name for s in receiver.spans_of(kind="SERVER")] == ["POST /openai"]


# ---- streams -------------------------------------------------------------------------------------


STREAM = {"security_key": SECURITY_KEY, "model": "gpt-4o", "input": PROMPT, "stream": True}
GAP_S = 0.1


def test_a_streams_spans_last_until_its_last_byte(traced, receiver, fake):
    app = traced()
    events = response_events("gpt-4o", 1)
    fake.push("POST", "/v1/responses", sse(events, gap=GAP_S, event_names=True))
    r = post_json(app.test_client(), "/openai2", STREAM, buffered=False)
    assert r.status_code == 200  # the view has returned: the stream has not started
    body = b"".join(r.response)
    last_byte_ns = time.time_ns()
    r.close()
    assert body.endswith(b"data: [DONE]\n\n")
    flush(app)
    server = one(receiver.spans_of(kind="SERVER"))
    client = one(receiver.spans_of(kind="CLIENT"))
    assert server.end_ns >= last_byte_ns and client.end_ns >= last_byte_ns
    # At least the upstream's pauses between its events (a lower bound, not a speed check).
    assert server.duration_s >= (len(events) - 1) * GAP_S
    assert client.name == "chat gpt-4o"
    assert client.attributes["gen_ai.usage.input_tokens"] == 36
    assert client.attributes["gen_ai.usage.output_tokens"] == 87
    assert client.attributes["gen_ai.response.model"] == "gpt-4o"
    assert server.status == client.status == "UNSET"


def test_a_client_leaving_a_stream_ends_its_spans_then(traced, receiver, fake):
    app = traced()
    fake.push("POST", "/v1/responses", sse(response_events("gpt-4o", 1), gap=GAP_S, event_names=True))
    r = post_json(app.test_client(), "/openai2", STREAM, buffered=False)
    chunks = iter(r.response)
    while not next(chunks):  # the first event
        pass
    left_ns = time.time_ns()
    r.close()
    flush(app)
    server = one(receiver.spans_of(kind="SERVER"))
    client = one(receiver.spans_of(kind="CLIENT"))
    assert app.records[-1]["status"] == 499
    assert server.attributes["http.response.status_code"] == 499
    assert server.attributes["openai_proxy.result"] == "client_cancelled"
    assert server.status == "UNSET" and "error.type" not in server.attributes  # the caller's doing
    assert client.status == "ERROR" and client.attributes["error.type"] == "client_cancelled"
    assert left_ns <= server.end_ns < left_ns + 5 * GAP_S * 1e9


# ---- attempts ------------------------------------------------------------------------------------


def test_a_key_failover_is_two_sibling_attempts(traced, receiver, fake):
    app = traced(**POOL)
    fake.push("POST", CHAT_PATH, error(429, "Rate limit reached", headers={"Retry-After": "30"}), key=KEY_A)
    r = post_json(app.test_client(), "/openai", CHAT)
    assert r.status_code == 200
    assert used(fake) == ["alpha", "beta"]
    flush(app)
    server = one(receiver.spans_of(kind="SERVER"))
    refused, answered = sorted(receiver.spans_of(kind="CLIENT"), key=lambda s: s.start_ns)
    assert refused.parent_span_id == answered.parent_span_id == server.span_id
    assert refused.name == answered.name == "chat gpt-4o-mini"
    assert refused.attributes["http.response.status_code"] == 429
    assert refused.attributes["error.type"] == "429" and refused.status == "ERROR"
    assert "gen_ai.usage.input_tokens" not in refused.attributes
    assert refused.end_ns <= answered.start_ns
    assert answered.status == "UNSET" and answered.attributes["gen_ai.usage.input_tokens"] == 25
    # Each attempt named its own span upstream.
    assert [req.headers["traceparent"] for req in fake.matching(CHAT_PATH)] == [
        traceparent_of(refused),
        traceparent_of(answered),
    ]
    assert [req.headers["authorization"] for req in fake.matching(CHAT_PATH)] == [
        f"Bearer {KEY_A}",
        f"Bearer {KEY_B}",
    ]
    assert server.status == "UNSET"


@pytest.mark.slow
def test_sdk_retries_are_sibling_attempts(traced, receiver, fake):
    app = traced()
    fake.push("GET", "/v1/responses/resp_1", error(503, "busy"), times=1)
    fake.push("GET", "/v1/responses/resp_1", reset(), times=1)
    r = app.test_client().get("/openai2/resp_1", headers={"X-Security-Key": SECURITY_KEY})
    assert r.status_code == 200
    flush(app)
    server = one(receiver.spans_of(kind="SERVER"))
    attempts = sorted(receiver.spans_of(kind="CLIENT"), key=lambda s: s.start_ns)
    assert [s.parent_span_id for s in attempts] == [server.span_id] * 3
    assert [s.name for s in attempts] == ["/openai2/<response_id>"] * 3
    assert [s.attributes.get("error.type") for s in attempts] == ["503", "upstream_transport", None]
    assert [s.status for s in attempts] == ["ERROR", "ERROR", "UNSET"]
    assert [req.headers["traceparent"] for req in fake.matching("/v1/responses/resp_1")] == [
        traceparent_of(s) for s in attempts
    ]
    assert server.name == "GET /openai2/<response_id>"


# ---- errors --------------------------------------------------------------------------------------


def test_an_upstream_that_cannot_be_read_fails_both_spans(traced, receiver, fake):
    app = traced()
    fake.push("POST", CHAT_PATH, reset())
    r = post_json(app.test_client(), "/openai", CHAT)
    assert r.status_code == 502
    flush(app)
    server = one(receiver.spans_of(kind="SERVER"))
    client = one(receiver.spans_of(kind="CLIENT"))
    assert server.status == "ERROR" and server.attributes["error.type"] == "upstream_transport"
    assert server.attributes["http.response.status_code"] == 502
    assert client.status == "ERROR" and client.attributes["error.type"] == "upstream_transport"
    assert "http.response.status_code" not in client.attributes


def test_an_upstream_error_status_fails_the_attempt_and_a_5xx_the_request(traced, receiver, fake):
    app = traced()
    fake.push("POST", CHAT_PATH, error(400, "Bad model"))
    fake.push("POST", CHAT_PATH, error(500, "Upstream broke", type="server_error"))
    client = app.test_client()
    assert post_json(client, "/openai", CHAT).status_code == 400
    assert post_json(client, "/openai", CHAT).status_code == 500
    flush(app)
    bad, broke = sorted(receiver.spans_of(kind="SERVER"), key=lambda s: s.start_ns)
    assert bad.status == "UNSET" and "error.type" not in bad.attributes  # a 4xx is the caller's
    assert broke.status == "ERROR" and broke.attributes["error.type"] == "upstream_api_error"
    attempts = sorted(receiver.spans_of(kind="CLIENT"), key=lambda s: s.start_ns)
    assert [(s.attributes["error.type"], s.status) for s in attempts] == [("400", "ERROR"), ("500", "ERROR")]


def test_a_request_refused_before_upstream_has_only_its_server_span(traced, receiver, fake):
    app = traced()
    r = post_json(app.test_client(), "/openai", {**CHAT, "security_key": "wrong"})
    assert r.status_code == 403
    flush(app)
    server = one(receiver.spans_of(kind="SERVER"))
    assert receiver.spans_of(kind="CLIENT") == []
    assert server.attributes["http.response.status_code"] == 403 and server.status == "UNSET"
    assert app.records[-1]["traceId"] == server.trace_id


# ---- no content ----------------------------------------------------------------------------------


def test_no_prompt_answer_or_key_is_exported(traced, receiver, fake):
    app = traced(OTEL_EXPORTER_OTLP_HEADERS="x-api-key=otel-vendor-secret-0123456789")
    fake.push(
        "POST", CHAT_PATH, lambda req, conn: conn.send_json(200, chat_completion("gpt-4o-mini", ANSWER))
    )
    words = [f"word{i} " for i in range(3)]
    fake.push("POST", "/v1/responses", sse(response_events("gpt-4o", 3), event_names=True))
    client = app.test_client()
    r = post_json(client, "/openai", CHAT)
    assert ANSWER in r.get_data(as_text=True)
    r = post_json(client, "/openai2", STREAM, buffered=False)
    streamed = b"".join(r.response)
    r.close()
    assert all(w.encode() in streamed for w in words)
    flush(app)
    exported = receiver.exported_bytes()
    assert len(receiver.spans_of(kind="SERVER")) == 2
    for text in (
        PROMPT,
        ANSWER,
        *words,
        SECURITY_KEY,
        UPSTREAM_KEY,
        "otel-vendor-secret-0123456789",
        "purple",
    ):
        assert text.encode() not in exported, text


# ---- configuration -------------------------------------------------------------------------------


def test_tracing_is_on_only_with_an_endpoint():
    assert build_config({}).tracing is False
    assert build_config({"OTEL_SERVICE_NAME": "x"}).tracing is False
    assert build_config({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}).tracing is True
    assert build_config({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://c/v1/traces"}).tracing is True
    assert build_config({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}).tracing is False
    off = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "TRUE"}
    assert build_config(off).tracing is False


@pytest.mark.parametrize("endpoint", ["collector:4318", "grpc://c:4317", "http://c:port", "http://"])
def test_an_endpoint_that_is_not_a_url_stops_the_server(endpoint):
    with pytest.raises(ConfigError) as raised:
        build_config({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
    assert str(raised.value) == (
        f"OTEL_EXPORTER_OTLP_ENDPOINT={endpoint!r} is not an http:// or https:// URL like http://collector:4318"
    )


def test_another_protocol_is_named_in_a_warning():
    config = build_config(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    )
    assert (
        "OTEL_EXPORTER_OTLP_PROTOCOL='grpc': spans are only sent as OTLP over HTTP (http/protobuf)"
        in config.warnings
    )
    ok = build_config(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    )
    assert not [w for w in ok.warnings if "OTEL" in w]


def test_otel_settings_work_from_dotenv_and_leave_the_environment_as_it_was(traced, receiver, tmp_path):
    (tmp_path / ".env").write_text("OTEL_SERVICE_NAME=billing-gateway\nOTEL_RESOURCE_ATTRIBUTES=team=ml\n")
    values = read_environment(environ={}, directory=tmp_path)
    assert values == {"OTEL_SERVICE_NAME": "billing-gateway", "OTEL_RESOURCE_ATTRIBUTES": "team=ml"}
    app = traced(**values)
    assert post_json(app.test_client(), "/openai", CHAT).status_code == 200
    flush(app)
    resource = one(receiver.spans_of(kind="SERVER")).resource
    assert resource["service.name"] == "billing-gateway" and resource["team"] == "ml"
    assert "OTEL_SERVICE_NAME" not in os.environ and "OTEL_EXPORTER_OTLP_ENDPOINT" not in os.environ


def test_exporter_headers_are_secrets(make_app, receiver):
    app = make_app(
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://user:collector-password-77@127.0.0.1:{receiver.url.rsplit(':', 1)[1]}",
        OTEL_EXPORTER_OTLP_HEADERS="x-api-key=otel-vendor-secret-0123456789,x-team=ml",
    )
    view = app.extensions["openai_proxy"].config.public_view()["otel"]
    assert view["OTEL_EXPORTER_OTLP_HEADERS"] == "set"
    assert view["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://127.0.0.1:{receiver.url.rsplit(':', 1)[1]}"
    masked = redact_text("sent otel-vendor-secret-0123456789 to collector-password-77")
    assert "otel-vendor-secret" not in masked and "collector-password" not in masked


def test_mounted_the_settings_come_from_app_config(tmp_path, fake, receiver):
    host = Flask("host")
    host.config.update(base_env(fake))
    host.config.update(
        OPENAI_PROXY_LOG_DB=str(tmp_path / "log.sqlite3"),
        OPENAI_PROXY_RUNTIME_DIR=str(tmp_path / "run"),
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
        OTEL_SERVICE_NAME="host-app",
    )
    OpenAIProxy(host, url_prefix="/ai")
    host.test_client_class = ClosingClient
    st = host.extensions["openai_proxy"]
    try:
        assert post_json(host.test_client(), "/ai/openai", CHAT).status_code == 200
        st.tracing.force_flush()
        server = one(receiver.spans_of(kind="SERVER"))
        assert server.name == "POST /ai/openai" and server.attributes["http.route"] == "/ai/openai"
        assert server.resource["service.name"] == "host-app"
    finally:
        st.upstream.close()
        st.log_store.close()
        st.gate.close()
        st.tracing.close()


# ---- off -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_off_no_opentelemetry_module_is_loaded_and_records_say_null(tmp_path, fake):
    values = base_env(fake, OPENAI_PROXY_LOG_DB=str(tmp_path / "log.sqlite3"))
    code = f"""
from gevent import monkey; monkey.patch_all()
import json, sys
from openai_proxy import create_app
from openai_proxy.config import build_config
app = create_app(build_config({values!r}))
records = []
app.extensions["openai_proxy"].completion_log.sinks.append(records.append)
client = app.test_client()
statuses = [client.post("/openai", json={CHAT!r}, buffered=True).status_code,
            client.post("/openai", json={{"messages": []}}, buffered=True).status_code]
print(json.dumps({{"statuses": statuses, "traceIds": [r["traceId"] for r in records],
                  "tracing": app.extensions["openai_proxy"].tracing,
                  "otel": sorted(m for m in sys.modules if m.startswith("opentelemetry"))}}))
"""
    out = _fresh(code, tmp_path)
    assert out == {"statuses": [200, 403], "traceIds": [None, None], "tracing": None, "otel": []}


def test_the_gunicorn_master_loads_no_opentelemetry_even_with_tracing_on(tmp_path):
    loaded = _fresh(
        "import os; os.environ['OTEL_EXPORTER_OTLP_ENDPOINT'] = 'http://127.0.0.1:4318'; "
        f"import runpy; runpy.run_path('gunicorn.conf.py'); {LOADED}",
        tmp_path,
    )
    assert "opentelemetry" not in loaded


# ---- processes -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_process_forked_after_tracing_started_exports_its_own_spans(tmp_path, fake, receiver):
    values = base_env(
        fake, OPENAI_PROXY_LOG_DB=str(tmp_path / "log.sqlite3"), OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url
    )
    code = f"""
from gevent import monkey; monkey.patch_all()
import json, os
from openai_proxy import create_app
from openai_proxy.config import build_config
app = create_app(build_config({values!r}))
tracing = app.extensions["openai_proxy"].tracing
def call():
    assert app.test_client().post("/openai", json={CHAT!r}, buffered=True).status_code == 200
call()  # the parent's SDK starts here
child = os.fork()
if child == 0:
    call()
    tracing.force_flush()
    os._exit(0)
_, status = os.waitpid(child, 0)
tracing.close()
print(json.dumps({{"parent": os.getpid(), "child": child, "status": status}}))
"""
    out = _fresh(code, tmp_path)
    assert out["status"] == 0
    servers = receiver.wait_for(
        lambda: len(receiver.spans_of(kind="SERVER")) == 2 and receiver.spans_of(kind="SERVER")
    )
    assert sorted(s.resource["process.pid"] for s in servers) == sorted([out["parent"], out["child"]])
    # Each span was exported once, by the process that made it.
    assert len(receiver.spans_of(kind="CLIENT")) == 2


@pytest.mark.gunicorn
def test_every_gunicorn_worker_exports_and_flushes_when_it_exits(gunicorn_server, fake, receiver):
    # Spans wait in each worker (no export for a minute): only the exit hook can send them.
    server = gunicorn_server(
        workers=2, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url, OTEL_BSP_SCHEDULE_DELAY="60000"
    )

    def post() -> requests.Response:
        return requests.post(
            server.url + "/openai", json=CHAT, headers={"Connection": "close", **CALLER}, timeout=30
        )

    def records(at_least: int) -> list[dict] | None:
        lines = (line for line in server.log_text().splitlines() if line.startswith('{"event":"completion"'))
        found = [json.loads(line) for line in lines]
        return found if len(found) >= at_least else None

    sent = 0
    for _ in range(20):  # until both workers have served a request
        jobs = [gevent.spawn(post) for _ in range(6)]
        gevent.joinall(jobs, raise_error=True)
        assert {job.value.status_code for job in jobs} == {200}
        sent += len(jobs)
        # A record is written when its response has been sent: a moment after the client has it.
        served = receiver.wait_for(functools.partial(records, sent), what="the records")
        if len({r["pid"] for r in served}) == 2:
            break
    pids = {r["pid"] for r in served}
    assert len(pids) == 2, "one worker served every request"
    assert receiver.spans == []
    server.stop()
    spans = receiver.wait_for(lambda: len(receiver.spans) == 2 * len(served) and receiver.spans)
    assert {s.resource["process.pid"] for s in spans if s.kind == "SERVER"} == pids
    assert {r["traceId"] for r in served} == {CALLER_TRACE}
    assert sorted(
        s.attributes["openai_proxy.request_id"] for s in receiver.spans_of(kind="SERVER")
    ) == sorted(r["requestId"] for r in served)
    assert len(receiver.spans_of(kind="CLIENT")) == len(served)
    assert all(s.parent_span_id == CALLER_SPAN for s in receiver.spans_of(kind="SERVER"))
