"""The per-call timeout (time to upstream headers, per attempt) and the retry policy per route."""

from __future__ import annotations

import logging

import pytest

from openai_proxy.inbound.web import decide_timeout
from tests.conftest import SECURITY_KEY, error_of, post_json
from tests.support.fake_upstream import delay, error, reset, sse

KEY = f"security_key={SECURITY_KEY}"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, (600000, "default")),
        ("", (600000, "default")),
        (5000, (5000, "provided")),
        (1, (1, "provided")),
        (2500.5, (2500.5, "provided")),
        ("7000", (7000, "provided")),
        (" 7000 ", (7000, "provided")),
        ("abc", (600000, "invalid")),
        (0, (600000, "invalid")),
        (-5, (600000, "invalid")),
        (0.5, (600000, "invalid")),
        (True, (600000, "invalid")),
        ([100], (600000, "invalid")),
        ({"ms": 1}, (600000, "invalid")),
        ("Infinity", (600000, "invalid")),
        ("NaN", (600000, "invalid")),
        (900000, (900000, "provided")),
        (900001, (900000, "clamped")),
        (10**12, (900000, "clamped")),
    ],
)
def test_decide_timeout(raw, expected):
    decision = decide_timeout(raw, 600000, 900000)
    assert (decision.ms, decision.source) == expected


def test_max_below_default_makes_default_the_max(make_app, fake):
    app = make_app(OPENAI_PROXY_UPSTREAM_TIMEOUT_MS="3000", OPENAI_PROXY_UPSTREAM_MAX_TIMEOUT_MS="1000")
    body = {"security_key": SECURITY_KEY, "model": "m", "messages": [], "timeout": 999999}
    post_json(app.test_client(), "/openai", body)
    assert (app.records[-1]["timeoutMs"], app.records[-1]["timeoutSource"]) == (3000, "clamped")


@pytest.mark.parametrize(
    ("timeout", "source"), [(None, "default"), (1234, "provided"), ("x", "invalid"), (10**9, "clamped")]
)
def test_timeout_decision_is_recorded(client, records, timeout, source):
    body = {"security_key": SECURITY_KEY, "model": "m", "messages": []}
    if timeout is not None:
        body["timeout"] = timeout
    assert post_json(client, "/openai", body).status_code == 200
    assert records[-1]["timeoutSource"] == source


@pytest.mark.slow
def test_query_timeout_on_get(client, fake, records):
    fake.push("GET", "/v1/responses/resp_1", delay(2), times=3)
    r = client.get(f"/openai2/resp_1?{KEY}&timeout=150")
    assert r.status_code == 504
    assert records[-1]["timeoutMs"] == 150
    # Retried twice (idempotent route), each attempt bounded by the same timeout.
    assert fake.count("/v1/responses/resp_1") == 3


def test_timeout_bounds_headers_not_the_body_of_a_stream(make_app, fake):
    """Once upstream answered, slow delivery is not cut by the per-call timeout."""
    events = [{"type": "response.output_text.delta", "delta": str(i)} for i in range(3)]
    fake.push("POST", "/v1/chat/completions", sse(events, gap=0.3))
    app = make_app()
    upstream = app.extensions["openai_proxy"].upstream
    from openai_proxy.record import RequestRecord, TimeoutDecision
    from openai_proxy.upstream import UpstreamCall

    call = UpstreamCall(
        "POST", "/chat/completions", record=RequestRecord(endpoint="/t", method="POST"),
        timeout=TimeoutDecision(200, "provided"), credentials=upstream.credentials(None, None, None), body=b"{}",
    )  # fmt: skip
    response = upstream.send(call)
    body = response.read_body(1 << 20)
    assert body.count(b"data: ") == 3


def test_create_calls_are_never_retried(client, fake, records):
    fake.push("POST", "/v1/chat/completions", error(503, "overloaded"), times=3)
    r = post_json(client, "/openai", {"security_key": SECURITY_KEY, "model": "m", "messages": []})
    assert r.status_code == 503
    assert fake.count("/v1/chat/completions") == 1
    assert records[-1]["retries"] == 0


@pytest.mark.parametrize(
    ("method", "path", "upstream_method", "upstream_path"),
    [
        ("GET", "/openai2/resp_1", "GET", "/v1/responses/resp_1"),
        ("GET", "/openai2/resp_1/input_items", "GET", "/v1/responses/resp_1/input_items"),
        ("DELETE", "/openai2/resp_1", "DELETE", "/v1/responses/resp_1"),
        ("POST", "/openai2/input_tokens", "POST", "/v1/responses/input_tokens"),
    ],
)
@pytest.mark.slow
def test_idempotent_calls_retry_twice_and_log_each_retry(client, fake, records, caplog, method, path,
                                                         upstream_method, upstream_path):  # fmt: skip
    fake.push(upstream_method, upstream_path, error(503, "busy"), times=1)
    fake.push(upstream_method, upstream_path, reset(), times=1)
    caplog.set_level(logging.WARNING, logger="openai_proxy.upstream")
    r = client.open(path, method=method, headers={"X-Security-Key": SECURITY_KEY})
    assert r.status_code == 200
    assert fake.count(upstream_path, upstream_method) == 3
    assert [req.headers["x-stainless-retry-count"] for req in fake.matching(upstream_path)] == ["0", "1", "2"]
    assert records[-1]["retries"] == 2
    retry_lines = [rec.getMessage() for rec in caplog.records if "upstream_retry" in rec.getMessage()]
    assert len(retry_lines) == 2
    rid = r.headers["X-Proxy-Request-Id"]
    assert f'"requestId":"{rid}"' in retry_lines[0] and '"attempt":2' in retry_lines[0]
    assert '"reason":"HTTP 503"' in retry_lines[0]
    assert '"attempt":3' in retry_lines[1]


@pytest.mark.slow
def test_retries_give_up_after_two(client, fake, records):
    fake.push("GET", "/v1/responses/resp_1", error(500, "down"), times=5)
    r = client.get(f"/openai2/resp_1?{KEY}")
    assert r.status_code == 500
    assert error_of(r)["message"] == "500 down"
    assert fake.count("/v1/responses/resp_1") == 3
    assert records[-1]["retries"] == 2


def test_non_retryable_status_is_not_retried(client, fake):
    fake.push("GET", "/v1/responses/resp_1", error(404, "No response found"), times=5)
    assert client.get(f"/openai2/resp_1?{KEY}").status_code == 404
    assert fake.count("/v1/responses/resp_1") == 1


def test_each_attempt_gets_the_full_timeout(client, fake, records):
    fake.push("GET", "/v1/responses/resp_1", delay(1.0), times=1)
    r = client.get(f"/openai2/resp_1?{KEY}&timeout=300")
    assert r.status_code == 200
    assert fake.count("/v1/responses/resp_1") == 2
    assert records[-1]["retries"] == 1
