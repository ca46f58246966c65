"""/metrics: Prometheus text, summed over every gunicorn worker, fed by the completion records."""

from __future__ import annotations

import json
import re

import gevent
import pytest
import requests

from openai_proxy.observe.metrics import LATENCY_BUCKETS
from tests.conftest import SECURITY_KEY, post_json
from tests.support.fake_upstream import delay, error
from tests.support.logpage import AUTH, CHAT, CLOSE

_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """`{(name, {label: value}): value}` from the Prometheus text format."""
    out = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            name, labels, value = match.groups()
            out[(name, frozenset(_LABEL.findall(labels or "")))] = float(value)
    return out


def value(found: dict, name: str, **labels: str) -> float:
    """The sum of the samples of `name` that have these labels (whatever their other labels)."""
    wanted = frozenset(labels.items())
    return sum(v for (n, have), v in found.items() if n == name and wanted <= have)


def test_metrics_count_requests_from_the_completion_records(client, fake):
    before = samples(client.get("/metrics", headers=AUTH).get_data(as_text=True))
    post_json(client, "/openai", CHAT)
    post_json(client, "/openai", {**CHAT, "security_key": "bad"})
    r = client.get("/metrics", headers=AUTH)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=")
    after = samples(r.get_data(as_text=True))

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    ok = {"route": "/openai", "method": "POST", "status": "200", "result": "ok"}
    assert delta("openai_proxy_requests_total", **ok) == 1
    assert delta("openai_proxy_requests_total", **{**ok, "status": "403", "result": "forbidden"}) == 1
    assert delta("openai_proxy_request_duration_seconds_count", route="/openai") == 2
    assert delta("openai_proxy_upstream_duration_seconds_count", route="/openai") == 1
    assert delta("openai_proxy_tokens_total", model="gpt-4o-mini", kind="prompt") == 25
    # The gauge is the process's (every app a test builds adds to it): these requests left none in flight.
    assert delta("openai_proxy_requests_in_flight") == 0
    assert value(after, "openai_proxy_gate_slots_limit") == 32


def _entry(**changes) -> dict:
    entry = {"endpoint": "/openai", "method": "POST", "status": 200, "result": "ok", "client": "c",
             "durationMs": 120.0, "upstreamMs": 100.0, "usage": None, "model": "gpt-4o-mini"}  # fmt: skip
    return {**entry, **changes}


def test_a_loop_turns_requests_are_written_once_per_value(client):
    metrics = client.application.extensions["openai_proxy"].metrics
    metrics.observe(_entry())
    gevent.sleep(0)  # the turn ends: the children exist and are written
    counter = metrics._child(metrics.requests, ("/openai", "POST", "200", "ok", "c"))._value
    bucket = metrics._child(metrics.duration, ("/openai",))._buckets[LATENCY_BUCKETS.index(0.25)]
    writes: list[tuple[str, float]] = []
    for name, target in (("requests", counter), ("bucket", bucket)):
        real = target.inc
        target.inc = lambda amount, name=name, real=real: (writes.append((name, amount)), real(amount))
    for _ in range(3):
        metrics.request_started()
        metrics.observe(_entry())
    assert writes == []  # held while the turn lasts
    gevent.sleep(0)
    assert sorted(writes) == [("bucket", 3.0), ("requests", 3.0)]


def test_a_change_from_another_thread_is_written_at_once(client):
    metrics = client.application.extensions["openai_proxy"].metrics
    metrics.log_record_dropped()
    gevent.sleep(0)
    dropped = metrics.log_dropped._value
    before = dropped.get()
    thread = gevent.get_hub().threadpool.spawn(metrics.log_record_dropped)
    thread.get()
    assert dropped.get() == before + 1  # no loop turn of that thread would ever write it


def test_a_scrape_writes_what_its_worker_holds_first(client):
    metrics = client.application.extensions["openai_proxy"].metrics
    before = samples(metrics.exposition()[0].decode())
    for _ in range(2):
        metrics.request_started()
        metrics.observe(_entry(client="scraped"))
    metrics.request_started()  # one still in flight
    after = samples(metrics.exposition()[0].decode())  # no turn of the loop ended meanwhile
    assert value(after, "openai_proxy_requests_total", client="scraped") == 2
    in_flight = "openai_proxy_requests_in_flight"
    assert value(after, in_flight) - value(before, in_flight) == 1
    metrics.observe(_entry(client="scraped"))


@pytest.mark.gunicorn
def test_metrics_are_exact_across_gunicorn_workers(gunicorn_server, fake):
    server = gunicorn_server(workers=2, OPENAI_PROXY_MAX_PARALLEL_REQUESTS="2")

    def fire(n: int, path: str = "/openai", body=CHAT) -> list[int]:
        jobs = [
            gevent.spawn(requests.post, server.url + path, json=body, headers=CLOSE, timeout=10)
            for _ in range(n)
        ]
        gevent.joinall(jobs, raise_error=True)
        return sorted(job.value.status_code for job in jobs)

    # Two slow calls hold both slots: two more are refused (503) meanwhile.
    fake.push("POST", "/v1/chat/completions", delay(1.0), times=2)
    assert fire(4) == [200, 200, 503, 503]
    rounds = 0
    while len(_worker_pids(server)) < 2 and rounds < 10:  # until both workers have served requests
        assert fire(2) == [200, 200]
        rounds += 1
    assert len(_worker_pids(server)) == 2, "one worker served every request"
    assert fire(2, body={**CHAT, "security_key": "wrong"}) == [403, 403]
    fake.push("POST", "/v1/chat/completions", error(500, "boom"), times=1)
    assert fire(1) == [500]
    assert fire(1, "/embeddings", {"security_key": SECURITY_KEY, "input": "x"}) == [200]

    found = samples(requests.get(server.url + "/metrics", headers={**AUTH, **CLOSE}, timeout=10).text)
    ok = 2 + 2 * rounds
    req = "openai_proxy_requests_total"
    assert value(found, req, route="/openai", method="POST", status="200", result="ok") == ok
    assert value(found, req, route="/openai", method="POST", status="503", result="overloaded") == 2
    assert value(found, req, route="/openai", method="POST", status="403", result="forbidden") == 2
    assert value(found, req, route="/openai", method="POST", status="500", result="upstream_api_error") == 1
    assert value(found, req, route="/embeddings", method="POST", status="200", result="ok") == 1
    assert value(found, "openai_proxy_overloads_total", route="/openai") == 2
    assert value(found, "openai_proxy_request_duration_seconds_count", route="/openai") == ok + 5
    assert value(found, "openai_proxy_upstream_duration_seconds_count", route="/openai") == ok + 1
    assert value(found, "openai_proxy_request_duration_seconds_bucket", route="/openai", le="0.5") == ok + 3
    assert value(found, "openai_proxy_tokens_total", model="gpt-4o-mini", kind="prompt") == 25 * ok
    assert value(found, "openai_proxy_tokens_total", model="gpt-4o-mini", kind="completion") == 7 * ok
    assert value(found, "openai_proxy_tokens_total", model="gpt-4o-mini", kind="cached") == 3 * ok
    assert value(found, "openai_proxy_tokens_total", model="text-embedding-3-large", kind="prompt") == 9
    assert value(found, "openai_proxy_requests_in_flight") == 0
    assert value(found, "openai_proxy_gate_slots_in_use") == 0
    assert value(found, "openai_proxy_gate_slots_limit") == 2


def _worker_pids(server) -> set[int]:
    lines = (line for line in server.log_text().splitlines() if line.startswith('{"event":"completion"'))
    return {json.loads(line)["pid"] for line in lines}
