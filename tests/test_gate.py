"""The server-wide concurrency gate: limits, cross-process sharing, SIGKILL recovery, gunicorn."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import gevent
import pytest
import requests

from openai_proxy.gate.local import _FLOCK, Gate
from tests.conftest import SECURITY_KEY, error_of, post_json
from tests.support.fake_upstream import delay

CHAT = {"security_key": SECURITY_KEY, "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def holders(path: str, limit: int) -> list[int]:
    """Pids of the processes holding each slot of a gate file (as another process sees them)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        pids = []
        for slot in range(limit):
            probe = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, slot, 1, 0)
            l_type, _, _, _, pid = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_GETLK, probe))
            if l_type != fcntl.F_UNLCK:
                pids.append(pid)
        return pids
    finally:
        os.close(fd)


def test_gate_limits_and_releases(tmp_path):
    gate = Gate(str(tmp_path / "g"), 3)
    slots = [gate.try_acquire() for _ in range(3)]
    assert sorted(slots) == [0, 1, 2]
    assert gate.try_acquire() is None
    assert gate.in_use() == 3
    gate.release(slots[1])
    gate.release(slots[1])  # idempotent
    assert gate.in_use() == 2
    assert gate.try_acquire() == slots[1]
    for slot in (0, 1, 2):
        gate.release(slot)
    assert gate.in_use() == 0 and gate.held_here() == 0


def test_gate_reports_new_peaks(tmp_path):
    gate = Gate(str(tmp_path / "g"), 4)
    peaks: list[int] = []
    gate.on_new_peak = peaks.append
    slots = [gate.try_acquire() for _ in range(3)]
    assert len(set(slots)) == 3
    assert peaks == [1, 2, 3]
    gate.release(slots[1])
    gate.try_acquire()  # back to 3: not a new peak
    for slot in gate._held.copy():
        gate.release(slot)
    gate.try_acquire()
    assert peaks == [1, 2, 3] and gate.peak == 3


def test_gate_peak_counts_slots_other_processes_hold(tmp_path):
    path = str(tmp_path / "g")
    other = subprocess.Popen(
        [sys.executable, "-c", HOLDER, path, "4", "2"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert other.stdout.readline().startswith("held")
        gate = Gate(path, 4)
        assert gate.try_acquire() is not None
        assert gate.peak == 3  # its own slot and the two held elsewhere (first acquire scans exactly)
    finally:
        other.kill()
        other.wait()


HOLDER = textwrap.dedent(
    """
    import sys, time
    from openai_proxy.gate.local import Gate
    gate = Gate(sys.argv[1], int(sys.argv[2]))
    got = [gate.try_acquire() for _ in range(int(sys.argv[3]))]
    print("held", got, flush=True)
    time.sleep(60)
    """
)


SLOTS_HOLDER = textwrap.dedent(
    """
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
    for slot in sys.argv[2].split(","):
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, int(slot), os.SEEK_SET)
    print("held", flush=True)
    time.sleep(60)
    """
)


def test_in_use_counts_every_slot_of_many_holders_without_asking_slot_by_slot(tmp_path):
    # Three other processes hold runs of adjacent slots (merged into one lock each by the kernel), lone
    # slots, the first and the last slot, interleaved; this process holds some between them.
    path, limit = str(tmp_path / "gate.slots"), 2000
    held = {"0,1,2,3,500,1999": 6, "4,700,701,702,1500": 5, "10,11,12,13,14,15,16,17,18,19,1998": 11}
    children = [subprocess.Popen([sys.executable, "-c", SLOTS_HOLDER, path, slots], stdout=subprocess.PIPE,
                                 text=True) for slots in held]  # fmt: skip
    try:
        for child in children:
            assert child.stdout.readline().startswith("held")
        gate = Gate(path, limit)
        mine = [gate.try_acquire() for _ in range(30)]
        assert None not in mine and len(set(mine)) == 30
        assert gate.in_use() == sum(held.values()) + 30
        assert len(holders(path, limit)) == sum(held.values())  # what one probe per slot sees
        calls = []
        real = fcntl.fcntl
        try:
            fcntl.fcntl = lambda *args: calls.append(args) or real(*args)
            assert gate.in_use() == sum(held.values()) + 30
        finally:
            fcntl.fcntl = real
        assert len(calls) <= 2 * 8 + 1  # about two per lock held elsewhere (8 locks), not 2,000
        children[1].kill()
        children[1].wait()
        assert gate.in_use() == sum(held.values()) - 5 + 30
    finally:
        for child in children:
            child.kill()
            child.wait()


def test_another_process_holds_slots_and_sigkill_gives_them_back(tmp_path):
    path = str(tmp_path / "gate.slots")
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, path, "4", "3"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().startswith("held")
        gate = Gate(path, 4)
        assert gate.in_use() == 3
        assert holders(path, 4) == [child.pid] * 3
        mine = gate.try_acquire()
        assert mine is not None
        assert gate.try_acquire() is None
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        assert gate.in_use() == 1
        assert sorted(s for s in (gate.try_acquire() for _ in range(4)) if s is not None) == sorted(
            {0, 1, 2, 3} - {mine}
        )
    finally:
        child.kill()
        child.wait()


def test_403_and_400_never_take_a_slot(make_app, fake):
    app = make_app(OPENAI_PROXY_MAX_PARALLEL_REQUESTS="1")
    gate = app.extensions["openai_proxy"].gate
    slot = gate.try_acquire()
    try:
        client = app.test_client()
        assert post_json(client, "/openai", {**CHAT, "security_key": "x"}).status_code == 403
        assert client.post("/openai", data=b"{").status_code == 400
        assert post_json(client, "/embeddings", {"security_key": SECURITY_KEY}).status_code == 400
        assert post_json(client, "/openai", CHAT).status_code == 503
    finally:
        gate.release(slot)
    assert post_json(app.test_client(), "/openai", CHAT).status_code == 200


def test_slot_is_released_after_errors(make_app, fake):
    from tests.support.fake_upstream import error, reset

    app = make_app(OPENAI_PROXY_MAX_PARALLEL_REQUESTS="1")
    client = app.test_client()
    for handler in (error(500, "x"), reset(), delay(1)):
        fake.push("POST", "/v1/chat/completions", handler)
        post_json(client, "/openai", {**CHAT, "timeout": 100})
    assert app.extensions["openai_proxy"].gate.in_use() == 0
    assert post_json(client, "/openai", CHAT).status_code == 200


def _fire(url: str, n: int, body=CHAT) -> list[requests.Response]:
    jobs = [gevent.spawn(requests.post, url + "/openai", json=body, timeout=30) for _ in range(n)]
    gevent.joinall(jobs, raise_error=True)
    return [job.value for job in jobs]


@pytest.mark.gunicorn
def test_gate_holds_across_gunicorn_workers(gunicorn_server, fake):
    fake.push("POST", "/v1/chat/completions", delay(1.5), times=None)
    server = gunicorn_server(workers=2, OPENAI_PROXY_MAX_PARALLEL_REQUESTS="4")
    responses = _fire(server.url, 8)
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 4 + [503] * 4
    for r in responses:
        if r.status_code == 503:
            assert r.headers["Retry-After"] == "1"
            assert r.json()["error"]["code"] == "OPENAI_PROXY_OVERLOADED"
    assert fake.count("/v1/chat/completions") == 4


@pytest.mark.gunicorn
def test_gunicorn_workers_share_the_gate_file_with_any_process(gunicorn_server, fake, tmp_path):
    """Slots held by a foreign process count: the bound is per server, not per worker."""
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    fake.push("POST", "/v1/chat/completions", delay(1.0), times=None)
    server = gunicorn_server(
        workers=2, OPENAI_PROXY_MAX_PARALLEL_REQUESTS="3", OPENAI_PROXY_RUNTIME_DIR=str(runtime)
    )
    outsider = Gate(str(runtime / "gate.slots"), 3)
    held = [outsider.try_acquire(), outsider.try_acquire()]
    try:
        statuses = sorted(r.status_code for r in _fire(server.url, 4))
        assert statuses == [200, 503, 503, 503]
    finally:
        for slot in held:
            outsider.release(slot)


@pytest.mark.gunicorn
def test_sigkilled_worker_gives_its_slots_back(gunicorn_server, fake, tmp_path):
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    gate_path = str(runtime / "gate.slots")
    fake.push("POST", "/v1/chat/completions", delay(30), times=2)
    server = gunicorn_server(
        workers=2, OPENAI_PROXY_MAX_PARALLEL_REQUESTS="2", OPENAI_PROXY_RUNTIME_DIR=str(runtime)
    )
    stuck = [gevent.spawn(requests.post, server.url + "/openai", json=CHAT, timeout=60) for _ in range(2)]
    deadline = time.monotonic() + 10
    while len(holders(gate_path, 2)) < 2 and time.monotonic() < deadline:
        gevent.sleep(0.05)
    pids = set(holders(gate_path, 2))
    assert pids and pids <= set(server.worker_pids())
    r = requests.post(server.url + "/openai", json=CHAT, timeout=10)
    assert r.status_code == 503
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    gevent.joinall(stuck, timeout=10)
    assert holders(gate_path, 2) == []
    # Full capacity again, without restarting the server: two calls in flight at once both get a slot.
    fake.push("POST", "/v1/chat/completions", delay(0.5), times=2)
    deadline = time.monotonic() + 10
    while len(server.worker_pids()) < 2 and time.monotonic() < deadline:
        gevent.sleep(0.05)
    statuses = sorted(r.status_code for r in _fire(server.url, 2))
    assert statuses == [200, 200]
    assert server.proc.poll() is None


@pytest.mark.gunicorn
def test_plain_requests_like_the_readme_curl_examples(gunicorn_server, fake):
    """The original README's curl examples, sent with `requests` to a real gunicorn."""
    server = gunicorn_server(workers=1)
    r = requests.post(
        server.url + "/openai",
        data=json.dumps(
            {
                "security_key": SECURITY_KEY,
                "model": "gpt-4o-mini",
                "temperature": 0.7,
                "max_tokens": 500,
                "messages": [{"role": "user", "content": "What is TypeScript?"}],
            }
        ),
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "Hello from the fake upstream."
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    # curl -d without -H sends application/x-www-form-urlencoded
    r = requests.post(
        server.url + "/openai2",
        data=json.dumps(
            {"security_key": SECURITY_KEY, "model": "gpt-4o", "input": "Tell me a bedtime story."}
        ),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=10,
    )
    assert r.status_code == 200
    assert r.json()["output_text"] == "In a peaceful grove. The end."
    r = requests.get(server.url + f"/openai2/resp_abc123/input_items?security_key={SECURITY_KEY}", timeout=10)
    assert r.status_code == 200 and r.json()["object"] == "list"
    r = requests.delete(server.url + f"/openai2/resp_abc123?security_key={SECURITY_KEY}", timeout=10)
    assert r.json() == {"id": "resp_abc123", "object": "response", "deleted": True}
    r = requests.post(server.url + "/openai", data="{bad", timeout=10)
    assert r.status_code == 400
    assert error_of(r)["code"] == "OPENAI_PROXY_BAD_REQUEST"
    # One completion line per API request on the server's stdout.
    deadline = time.monotonic() + 5
    while server.log_text().count('"event":"completion"') < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.log_text().count('"event":"completion"') == 5
