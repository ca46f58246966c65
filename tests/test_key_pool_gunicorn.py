"""The upstream key pool under real gunicorn with 2 workers: the pool's state is one per host, exact
across workers, and survives neither a reload (revoked keys come back) nor a worker's death (its calls
in flight are dropped)."""

from __future__ import annotations

import html
import json
import os
import re
import signal
import subprocess
import sys
import time

import gevent
import pytest
import requests
from gevent.event import Event

from tests.conftest import ROOT
from tests.support.fake_upstream import default_handler, delay, error, response_events
from tests.support.logpage import AUTH, CHAT, CLOSE, rows
from tests.test_key_pool import CHAT_PATH, KEY_A, KEY_B, KEY_C, PAGES, POOL, V1, used
from tests.test_metrics import samples, value

pytestmark = pytest.mark.gunicorn

SERVER_ENV = {**POOL, **PAGES, "OPENAI_PROXY_MAX_PARALLEL_REQUESTS": "64"}
_PRE = re.compile(r'<pre class="mono">(.*?)</pre>', re.S)


def until(condition, within: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + within
    while True:
        found = condition()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        gevent.sleep(0.05)


def health(server) -> dict:
    return requests.get(server.url + "/health", headers={**AUTH, **CLOSE}, timeout=10).json()


def keys_of(body: dict) -> dict[str, dict]:
    return {k["name"]: k for k in body["upstreamKeys"]["keys"]}


def from_every_worker(server) -> dict[int, dict]:
    """`/health` as each of the two workers answers it."""
    seen: dict[int, dict] = {}

    def both() -> bool:
        body = health(server)
        seen[body["pid"]] = body
        return len(seen) == 2

    until(both, what="both workers to answer /health")
    return seen


def post(server, path: str = "/openai", body=CHAT, headers=None) -> requests.Response:
    return requests.post(server.url + path, data=json.dumps(body), timeout=30,
                         headers={"Content-Type": "application/json", **CLOSE, **(headers or {})})  # fmt: skip


def fire(server, n: int, path: str = "/openai", body=CHAT, headers=None) -> list[requests.Response]:
    jobs = [gevent.spawn(post, server, path, body, headers) for _ in range(n)]
    gevent.joinall(jobs, raise_error=True)
    return [job.value for job in jobs]


def record(server, request_id: str) -> dict:
    """The completion record of one request, as the log pages show it (either page, either worker)."""

    def find() -> dict | None:
        for page in ("/log", "/log_errors"):
            text = requests.get(f"{server.url}{page}?request_id={request_id}", headers={**AUTH, **CLOSE},
                                timeout=10).text  # fmt: skip
            for kind, _rid, _pid in rows(text):
                if kind == "completion":
                    return json.loads(html.unescape(_PRE.findall(text)[0]))
        return None

    return until(find, what=f"the record of {request_id}")


def held(release: Event):
    def handler(req, conn):
        while not release.is_set():
            conn.wait(0.02)
        default_handler(req, conn)

    return handler


@pytest.fixture(scope="module")
def pool_server(module_gunicorn):
    return module_gunicorn(workers=2, **SERVER_ENV)


@pytest.fixture
def server(pool_server, fake):
    """The module's server, every key active and idle again (a test may have rested one)."""
    until(lambda: all(k["state"] == "active" and k["inFlight"] == 0 for k in keys_of(health(pool_server)).values()),
          what="every key active and idle")  # fmt: skip
    fake.reset()
    return pool_server


# ---- spreading ----------------------------------------------------------------------------------


def test_concurrent_calls_spread_exactly_over_the_keys_of_both_workers(server, fake):
    for _ in range(5):  # until the held calls were served by both workers
        release = Event()
        fake.push("POST", CHAT_PATH, held(release), times=6)
        jobs = [gevent.spawn(post, server) for _ in range(6)]
        until(lambda: len(fake.requests) == 6, what="six calls upstream")
        assert sorted(used(fake)) == ["alpha", "alpha", "beta", "beta", "gamma", "gamma"]
        for body in from_every_worker(server).values():
            assert {n: k["inFlight"] for n, k in keys_of(body).items()} == {"alpha": 2, "beta": 2, "gamma": 2}
        release.set()
        gevent.joinall(jobs, raise_error=True)
        assert [job.value.status_code for job in jobs] == [200] * 6
        pids = {record(server, job.value.headers["X-Proxy-Request-Id"])["pid"] for job in jobs}
        fake.reset()
        if len(pids) == 2:
            break
    assert len(pids) == 2, "one worker served every call"
    assert {k["inFlight"] for k in keys_of(health(server)).values()} == {0}


def test_sequential_calls_on_either_worker_take_turns(server, fake):
    pids: set[int] = set()
    for _ in range(5):
        responses = [post(server) for _ in range(6)]
        assert [r.status_code for r in responses] == [200] * 6
        pids |= {record(server, r.headers["X-Proxy-Request-Id"])["pid"] for r in responses}
        if len(pids) == 2:
            break
    assert len(pids) == 2, "one worker served every call"
    names = used(fake)
    assert sorted(names[:3]) == ["alpha", "beta", "gamma"]
    assert names == [names[i % 3] for i in range(len(names))]


# ---- rests, failover ------------------------------------------------------------------------------


def test_a_rested_key_is_not_used_before_its_retry_after_then_comes_back(server, fake):
    fake.push("POST", CHAT_PATH, error(429, "Rate limit reached", headers={"Retry-After": "2"}), key=KEY_A)
    until(lambda: post(server).status_code == 200 and KEY_A in fake.keys(CHAT_PATH), what="alpha to be tried")
    refused = next(r for r in fake.requests if r.headers["authorization"] == f"Bearer {KEY_A}")
    for body in from_every_worker(server).values():
        alpha = keys_of(body)["alpha"]
        assert alpha["state"] == "resting" and 0 < alpha["restingForS"] <= 2

    def alpha_again() -> bool:
        assert post(server).status_code == 200
        return fake.keys(CHAT_PATH).count(KEY_A) == 2

    until(alpha_again, what="alpha to come back")
    later = [r for r in fake.requests if r.headers["authorization"] == f"Bearer {KEY_A}"][1]
    assert later.received_at >= refused.received_at + 2  # one clock (CLOCK_MONOTONIC) for the whole host


def test_429_and_connect_errors_fail_over(server, fake):
    fake.push("POST", CHAT_PATH, error(429, "Slow down", headers={"Retry-After": "1"}), times=1)
    r = post(server)
    assert r.status_code == 200
    first, second = used(fake)
    assert first != second
    assert record(server, r.headers["X-Proxy-Request-Id"])["attempts"] == [
        {"key": first, "outcome": "rate_limited", "status": 429}, {"key": second, "outcome": "ok", "status": 200}]  # fmt: skip
    fake.reset()
    fake.close_idle()
    fake.refuse_connections(1)
    r = post(server)
    assert r.status_code == 200 and fake.refused == 1
    attempts = record(server, r.headers["X-Proxy-Request-Id"])["attempts"]
    assert [a["outcome"] for a in attempts] == ["connect_error", "ok"]
    assert attempts[0]["key"] != attempts[1]["key"] and used(fake) == [attempts[1]["key"]]


def test_a_create_call_is_failed_over_at_most_once_and_never_on_other_statuses(server, fake):
    fake.push("POST", CHAT_PATH, error(503, "Overloaded", type="server_error"), times=None)
    assert [r.status_code for r in fire(server, 4)] == [503] * 4
    assert len(fake.requests) == 8
    fake.reset()
    for status in (400, 404, 422):
        fake.push("POST", CHAT_PATH, error(status, "No"), times=4)
        assert [r.status_code for r in fire(server, 4)] == [status] * 4
    assert len(fake.requests) == 12
    assert {k["state"] for k in keys_of(health(server)).values()} == {"active"}


def test_a_started_stream_is_never_sent_again(server, fake):
    def broken(req, conn):
        conn.start_stream()
        conn.event(response_events("gpt-4o-mini")[0], "response.created")
        conn.close()

    fake.push("POST", "/v1/responses", broken, times=None)
    for _ in range(3):
        r = post(server, "/openai2", {**CHAT, "input": "hi", "stream": True})
        assert r.status_code == 200 and "event: error" in r.text and "[DONE]" not in r.text
    assert len(fake.requests) == 3


def test_a_call_counts_until_its_stream_ends_or_its_client_leaves(server, fake):
    release = Event()

    def slow_stream(req, conn):
        events = response_events("gpt-4o-mini")
        conn.start_stream()
        conn.event(events[0], "response.created")
        while not release.is_set():
            conn.wait(0.02)
        for event in events[1:]:
            conn.event(event, event["type"])
        conn.end_stream()

    def in_flight() -> int:
        return sum(k["inFlight"] for k in keys_of(health(server)).values())

    fake.push("POST", "/v1/responses", slow_stream)
    with requests.post(server.url + "/openai2", json={**CHAT, "input": "hi", "stream": True}, headers=CLOSE,
                       stream=True, timeout=30) as r:  # fmt: skip
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith(b"data: {")
        assert in_flight() == 1  # headers and the first event are out: the stream still holds its key
        release.set()
        assert list(lines)[-2:] == [b"data: [DONE]", b""]
    until(lambda: in_flight() == 0, what="the key given back after the stream")

    fake.push("POST", CHAT_PATH, delay(30))
    with pytest.raises(requests.ReadTimeout):
        requests.post(server.url + "/openai", json=CHAT, headers=CLOSE, timeout=1.0)
    until(lambda: in_flight() == 0, what="the key given back after the client left")
    until(lambda: fake.requests[-1].client_closed_at is not None, what="the upstream call to be dropped")


def test_a_request_key_bypasses_the_pool(server, fake):
    responses = fire(server, 4, body={**CHAT, "openai_api_key": "sk-own-key-9999999999"})
    assert [r.status_code for r in responses] == [200] * 4
    assert fake.keys(CHAT_PATH) == ["sk-own-key-9999999999"] * 4
    assert record(server, responses[0].headers["X-Proxy-Request-Id"])["attempts"] is None


def test_health_metrics_and_log_errors_across_workers(server, fake):
    before = samples(requests.get(server.url + "/metrics", headers={**AUTH, **CLOSE}, timeout=10).text)
    # Only alpha refuses, twice, so a failover always lands on a key that answers.
    fake.push("POST", CHAT_PATH, error(429, "Slow down", headers={"Retry-After": "0.2"}), times=2, key=KEY_A)
    responses: list[requests.Response] = []

    def refused_twice() -> bool:
        responses.append(post(server))
        return fake.keys(CHAT_PATH).count(KEY_A) >= 2 and len(responses) >= 6

    until(refused_twice, what="alpha to refuse twice")
    assert [r.status_code for r in responses] == [200] * len(responses)
    assert len(fake.requests) == len(responses) + 2
    after = samples(requests.get(server.url + "/metrics", headers={**AUTH, **CLOSE}, timeout=10).text)

    def delta(key: str, outcome: str) -> float:
        name = "openai_proxy_upstream_key_calls_total"
        return value(after, name, key=key, outcome=outcome) - value(before, name, key=key, outcome=outcome)

    assert delta("alpha", "rate_limited") == 2
    assert delta("beta", "rate_limited") == delta("gamma", "rate_limited") == 0
    assert sum(delta(k, "ok") for k in ("alpha", "beta", "gamma")) == len(responses)
    keys = ("alpha", "beta", "gamma")
    assert sum(value(after, "openai_proxy_upstream_key_in_flight", key=k) for k in keys) == 0

    records = [record(server, r.headers["X-Proxy-Request-Id"]) for r in responses]
    failed = {rec["requestId"] for rec in records if rec["retries"] == 1}
    assert len(failed) == 2 and len({rec["pid"] for rec in records}) in (1, 2)

    def shown() -> bool:
        page = requests.get(server.url + "/log_errors", headers={**AUTH, **CLOSE}, timeout=10).text
        retries = {rid for kind, rid, _ in rows(page) if kind == "retry"}
        return retries >= failed and "key alpha: rate_limited (HTTP 429); sent again with key" in page

    until(shown, what="the failovers on /log_errors")
    for body in from_every_worker(server).values():
        assert [(k["name"], k["last4"]) for k in body["upstreamKeys"]["keys"]] == [
            ("alpha", "AAAA"), ("beta", "BBBB"), ("gamma", "CCCC")]  # fmt: skip


# ---- servers of their own: revocation and reload, all keys resting, a worker killed ----------------


def test_a_revoked_key_stays_out_on_both_workers_until_a_reload(gunicorn_server, fake):
    server = gunicorn_server(workers=2, **SERVER_ENV)
    fake.push("POST", CHAT_PATH, error(401, "Incorrect API key provided"), times=None, key=KEY_B)
    until(lambda: post(server).status_code == 200 and KEY_B in fake.keys(CHAT_PATH), what="beta to be tried")
    assert [r.status_code for r in fire(server, 12)] == [200] * 12
    assert [post(server).status_code for _ in range(6)] == [200] * 6
    assert fake.keys(CHAT_PATH).count(KEY_B) == 1
    for body in from_every_worker(server).values():
        beta = keys_of(body)["beta"]
        assert (beta["state"], beta["reason"]) == ("revoked", "unauthorized")

    old = set(server.worker_pids())
    server.proc.send_signal(signal.SIGHUP)
    until(lambda: not old & set(server.worker_pids()) and len(server.worker_pids()) == 2, within=30,
          what="the reload's new workers")  # fmt: skip
    for body in from_every_worker(server).values():
        assert {k["state"] for k in keys_of(body).values()} == {"active"}
    fake.reset()
    assert [post(server).status_code for _ in range(3)] == [200] * 3
    assert sorted(used(fake)) == ["alpha", "beta", "gamma"]


def test_every_key_resting_is_429_with_the_shortest_retry_after_on_both_workers(gunicorn_server, fake):
    server = gunicorn_server(workers=2, **SERVER_ENV)
    for key, seconds in ((KEY_A, "40"), (KEY_B, "25"), (KEY_C, "50")):
        fake.push(
            "POST", CHAT_PATH, error(429, "Rate limit reached", headers={"Retry-After": seconds}), key=key
        )
    until(lambda: post(server).status_code == 429 and len(fake.requests) == 3 and
          not any(k["state"] == "active" for k in keys_of(health(server)).values()), what="every key resting")  # fmt: skip
    responses = fire(server, 6) + fire(server, 2, path="/v1/chat/completions", headers=V1) + [
        requests.get(server.url + "/openai2/resp_1", headers={**V1, **CLOSE}, timeout=10)]  # fmt: skip
    assert [r.status_code for r in responses] == [429] * 9
    assert {r.json()["error"]["code"] for r in responses} == {
        "OPENAI_PROXY_UPSTREAM_KEYS_RESTING",
        "rate_limit_exceeded",
    }
    assert all(20 <= int(r.headers["Retry-After"]) <= 25 for r in responses)
    assert len(fake.requests) == 3
    assert len({record(server, r.headers["X-Proxy-Request-Id"])["pid"] for r in responses}) in (1, 2)
    for body in from_every_worker(server).values():
        assert {n: k["state"] for n, k in keys_of(body).items()} == dict.fromkeys(
            ("alpha", "beta", "gamma"), "resting"
        )


def test_calls_of_a_killed_worker_stop_counting(gunicorn_server, fake):
    server = gunicorn_server(workers=2, **SERVER_ENV)
    release = Event()
    fake.push("POST", CHAT_PATH, held(release), times=6)
    jobs = [gevent.spawn(requests.post, server.url + "/openai", json=CHAT, headers=CLOSE, timeout=60)
            for _ in range(6)]  # fmt: skip
    until(lambda: len(fake.requests) == 6, what="six calls upstream")
    assert {k["inFlight"] for k in keys_of(health(server)).values()} == {2}
    pids = server.worker_pids()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    gevent.joinall(jobs, timeout=20)
    release.set()
    until(lambda: len(set(server.worker_pids()) - set(pids)) == 2, within=30, what="new workers")
    until(
        lambda: {k["inFlight"] for k in keys_of(health(server)).values()} == {0},
        what="the dead calls dropped",
    )
    for body in from_every_worker(server).values():
        assert {k["inFlight"] for k in keys_of(body).values()} == {0}
    # The spread is exact again: three calls held at once go to three keys.
    fake.reset()
    release = Event()
    fake.push("POST", CHAT_PATH, held(release), times=3)
    jobs = [gevent.spawn(post, server) for _ in range(3)]
    until(lambda: len(fake.requests) == 3, what="three calls upstream")
    assert sorted(used(fake)) == ["alpha", "beta", "gamma"]
    release.set()
    gevent.joinall(jobs, raise_error=True)
    assert [job.value.status_code for job in jobs] == [200] * 3


_OUTSIDER = """
import sys, time
from openai_proxy.config import build_config
from openai_proxy.keys.pool import KeyPool

pool = KeyPool(build_config({"OPENAI_API_KEYS": sys.argv[1]}).upstream_keys, sys.argv[2])
leases = [pool.choose() for _ in range(3)]
print(" ".join(sorted(lease.name for lease in leases)), flush=True)
time.sleep(120)
"""


def test_any_process_of_the_host_counts_and_a_killed_one_is_swept(gunicorn_server, fake, tmp_path):
    """Rows nobody claims again (a process gone for good) are dropped by the sweep."""
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    server = gunicorn_server(workers=2, OPENAI_PROXY_RUNTIME_DIR=str(runtime), **SERVER_ENV)
    from_every_worker(server)  # both workers have their rows before the outsider takes one
    outsider = subprocess.Popen([sys.executable, "-c", _OUTSIDER, POOL["OPENAI_API_KEYS"], str(runtime)],
                                cwd=ROOT, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert outsider.stdout.readline().split() == ["alpha", "beta", "gamma"]
        for body in from_every_worker(server).values():
            assert {k["inFlight"] for k in keys_of(body).values()} == {1}
        # Its calls count for the workers' choices: three more held calls go one to each key.
        release = Event()
        fake.push("POST", CHAT_PATH, held(release), times=3)
        jobs = [gevent.spawn(post, server) for _ in range(3)]
        until(lambda: len(fake.requests) == 3, what="three calls upstream")
        assert sorted(used(fake)) == ["alpha", "beta", "gamma"]
        assert {k["inFlight"] for k in keys_of(health(server)).values()} == {2}
        release.set()
        gevent.joinall(jobs, raise_error=True)
    finally:
        outsider.kill()
        outsider.wait()
    until(lambda: {k["inFlight"] for k in keys_of(health(server)).values()} == {0}, what="the sweep")
