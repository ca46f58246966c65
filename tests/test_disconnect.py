"""Client disconnects and unbuffered delivery, through a real gunicorn with gevent workers."""

from __future__ import annotations

import http.client
import json
import time
import uuid

import gevent
import pytest
import requests

from tests.conftest import SECURITY_KEY
from tests.support.fake_upstream import delay, response_events, sse

pytestmark = pytest.mark.gunicorn

STREAM_BODY = {"security_key": SECURITY_KEY, "model": "gpt-4o", "input": "Write a poem.", "stream": True}
CHAT_BODY = {
    "security_key": SECURITY_KEY,
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "hi"}],
}


def send(server, path, body, trace_id=None):
    """Start a request on a fresh connection; `trace_id` goes in X-Request-Id to find its record."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    headers = {"Content-Type": "application/json", "X-Request-Id": trace_id or str(uuid.uuid4())}
    conn.request("POST", path, body=json.dumps(body), headers=headers)
    return conn


def open_stream(server, body=STREAM_BODY, path="/openai2", trace_id=None):
    conn = send(server, path, body, trace_id)
    return conn, conn.getresponse()


def hang_up(conn, response):
    response.close()
    conn.close()


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        gevent.sleep(0.02)
    return False


def record_of(server, trace_id):
    """The completion record of the request sent with X-Request-Id `trace_id`, once it exists."""
    found = []

    def check():
        for line in server.log_text().splitlines():
            if line.startswith('{"event":"completion"') and trace_id in line:
                entry = json.loads(line)
                if entry["incomingRequestId"] == trace_id:
                    found.append(entry)
                    return True
        return False

    assert wait_for(check), f"no completion record for {trace_id}"
    return found[0]


@pytest.fixture(scope="module")
def server(module_gunicorn):
    return module_gunicorn(
        workers=2, OPENAI_PROXY_MAX_PARALLEL_REQUESTS="1", OPENAI_PROXY_SSE_KEEPALIVE_INTERVAL_MS="60000"
    )


def assert_slot_free(server):
    r = requests.post(server.url + "/openai", json=CHAT_BODY, timeout=10)
    assert r.status_code == 200, r.text


def test_first_event_arrives_before_the_second_is_sent(server, fake):
    fake.push("POST", "/v1/responses", sse(response_events("gpt-4o", 1), gap=1.0))
    conn, response = open_stream(server)
    start = time.monotonic()
    first = response.read1(65536)
    first_at = time.monotonic() - start
    rest = response.read()
    hang_up(conn, response)
    assert first.startswith(b"data: ") and b"response.created" in first
    assert first_at < 0.5
    assert rest.endswith(b"data: [DONE]\n\n")


def test_disconnect_mid_stream_closes_upstream_and_frees_the_slot(server, fake):
    fake.push("POST", "/v1/responses", sse(response_events("gpt-4o", 50), gap=0.2))
    trace = str(uuid.uuid4())
    conn, response = open_stream(server, trace_id=trace)
    assert response.read1(65536).startswith(b"data: ")
    upstream = fake.last("/v1/responses")
    closed_at = time.monotonic()
    hang_up(conn, response)
    assert wait_for(lambda: upstream.client_closed_at is not None, 3)
    assert upstream.client_closed_at - closed_at < 1.0
    assert upstream.events_sent < 10
    entry = record_of(server, trace)
    assert entry["status"] == 499 and entry["result"] == "client_cancelled"
    assert entry["cancelled"] is True and entry["stream"] is True
    assert_slot_free(server)


def test_disconnect_before_first_event_on_a_silent_stream(server, fake):
    fake.push("POST", "/v1/responses", sse(response_events("gpt-4o", 1), first_delay=20))
    trace = str(uuid.uuid4())
    conn, response = open_stream(server, trace_id=trace)
    assert response.status == 200
    assert wait_for(lambda: fake.count("/v1/responses") == 1)
    upstream = fake.last("/v1/responses")
    gevent.sleep(0.2)
    closed_at = time.monotonic()
    hang_up(conn, response)
    assert wait_for(lambda: upstream.client_closed_at is not None, 3)
    assert upstream.client_closed_at - closed_at < 1.0
    assert upstream.events_sent == 0
    assert record_of(server, trace)["status"] == 499
    assert_slot_free(server)


def test_disconnect_during_a_slow_non_stream_call(server, fake):
    fake.push("POST", "/v1/chat/completions", delay(20))
    trace = str(uuid.uuid4())
    conn = send(server, "/openai", CHAT_BODY, trace)
    assert wait_for(lambda: fake.count("/v1/chat/completions") == 1)
    upstream = fake.last("/v1/chat/completions")
    closed_at = time.monotonic()
    conn.close()
    assert wait_for(lambda: upstream.client_closed_at is not None, 3)
    assert upstream.client_closed_at - closed_at < 1.0
    entry = record_of(server, trace)
    assert entry["status"] == 499 and entry["result"] == "client_cancelled" and entry["stream"] is False
    assert_slot_free(server)


def test_disconnect_while_waiting_for_stream_headers(server, fake):
    fake.push("POST", "/v1/responses", delay(20))
    trace = str(uuid.uuid4())
    conn = send(server, "/openai2", STREAM_BODY, trace)
    assert wait_for(lambda: fake.count("/v1/responses") == 1)
    upstream = fake.last("/v1/responses")
    conn.close()
    assert wait_for(lambda: upstream.client_closed_at is not None, 3)
    assert record_of(server, trace)["status"] == 499
    assert_slot_free(server)


def test_worker_survives_and_keepalive_connection_is_reused_after_a_stream(server, fake):
    pids = sorted(server.worker_pids())
    conn, response = open_stream(server)
    body = response.read()
    assert body.endswith(b"data: [DONE]\n\n")
    conn.request("POST", "/openai", body=json.dumps(CHAT_BODY), headers={"Content-Type": "application/json"})
    again = conn.getresponse()
    assert again.status == 200 and json.loads(again.read())["object"] == "chat.completion"
    conn.close()
    assert sorted(server.worker_pids()) == pids
