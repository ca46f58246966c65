"""The fleet-wide gate in Redis (OPENAI_PROXY_GATE_URI): leases, renewal, expiry, the fallback to the
host's own gate while Redis does not answer, and two real gunicorn "hosts" sharing one limit."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import gevent
import pytest
import redis
import requests
from gevent.event import Event

from openai_proxy.config import ConfigError, build_config
from openai_proxy.extension import configured_secrets
from openai_proxy.gate.local import Gate
from openai_proxy.gate.shared import KEY, RedisGate
from tests.conftest import ROOT, error_of, post_json
from tests.support.fake_upstream import default_handler
from tests.support.logpage import AUTH, CHAT, CLOSE, counters
from tests.test_metrics import samples, value

LEASE_ID = re.compile(rf"^{re.escape(socket.gethostname())}:(\d+):[0-9a-f]{{4}}:\d+$")


@pytest.fixture
def rdb(redis_server):
    """A plain redis-py client on the test Redis, to look at the leases as `redis-cli` would."""
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    yield client
    client.close()


@pytest.fixture
def gates(redis_server, tmp_path):
    """Make RedisGates on the test Redis (each one a worker of its own host); closed after the test."""
    made: list[RedisGate] = []

    def make(limit: int, lease_s: int = 10, **kwargs) -> RedisGate:
        fallback = Gate(str(tmp_path / f"host{len(made)}.slots"), limit)
        gate = RedisGate(redis_server.url, limit, lease_s, fallback=fallback, **kwargs)
        made.append(gate)
        return gate

    yield make
    for gate in made:
        gate.close()


def live(rdb) -> int:
    """Leases not yet expired, on Redis's clock (expired ones stay in the set until the next acquire)."""
    seconds, micros = rdb.time()
    return rdb.zcount(KEY, f"({seconds * 1000 + micros // 1000}", "+inf")


def wait_until(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        gevent.sleep(0.05)


def completes(call, deadline_s: float = 10.0):
    """Run `call`; it must finish within a generous deadline (it must not hang on a dead Redis)."""
    with gevent.Timeout(deadline_s, AssertionError(f"no answer within {deadline_s} s")):
        return call()


# ---- the gate itself, against the real Redis -----------------------------------------------------------


def test_limit_is_exact_under_concurrency_from_many_greenlets(gates, rdb):
    workers = [gates(7) for _ in range(3)]  # three workers (or hosts) of one fleet
    jobs = [gevent.spawn(workers[i % 3].try_acquire) for i in range(60)]
    gevent.joinall(jobs, raise_error=True)
    granted = [job.value for job in jobs if job.value is not None]
    assert len(granted) == 7 and len(set(granted)) == 7
    assert all(isinstance(lease, str) and LEASE_ID.match(lease) for lease in granted)
    assert {int(LEASE_ID.match(lease).group(1)) for lease in granted} == {os.getpid()}
    assert sorted(m.decode() for m in rdb.zrange(KEY, 0, -1)) == sorted(granted)
    # Scored by their expiry on Redis's clock: now + the lease (10 s).
    seconds, micros = rdb.time()
    now_ms = seconds * 1000 + micros // 1000
    assert all(now_ms < score <= now_ms + 10_000 for _, score in rdb.zrange(KEY, 0, -1, withscores=True))
    assert [w.in_use() for w in workers] == [7, 7, 7]
    assert sum(w.held_here() for w in workers) == 7
    assert workers[0].try_acquire() is None
    for i, lease in enumerate(granted):
        for w in workers:  # each worker gives back only what it holds
            w.release(lease)
        assert workers[i % 3].in_use() == 6 - i
    assert rdb.zcard(KEY) == 0


CHILD = textwrap.dedent(
    """
    import os, sys, tempfile, threading
    from openai_proxy.gate.local import Gate
    from openai_proxy.gate.shared import RedisGate
    url, limit, lease_s, tries = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    fallback = Gate(os.path.join(tempfile.mkdtemp(), "slots"), limit)
    gate = RedisGate(url, limit, lease_s, fallback=fallback)
    print("ready", flush=True)
    sys.stdin.readline()
    got = []
    def take():
        slot = gate.try_acquire()
        if slot is not None:
            got.append(slot)
    threads = [threading.Thread(target=take) for _ in range(tries)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("held", *got, flush=True)
    sys.stdin.readline()
    for slot in got:
        gate.release(slot)
    print("released", flush=True)
    sys.stdin.readline()
    """
)


def start_child(url: str, limit: int, lease_s: int, tries: int) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, url, str(limit), str(lease_s), str(tries)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline() == "ready\n"
    return child


def tell(child: subprocess.Popen) -> None:
    child.stdin.write("\n")
    child.stdin.flush()


def held_by(child: subprocess.Popen) -> list[str]:
    words = child.stdout.readline().split()
    assert words[:1] == ["held"], words
    return words[1:]


def stop_children(*children: subprocess.Popen) -> None:
    for child in children:
        if child.poll() is None:
            child.kill()
        child.communicate(timeout=10)


def test_limit_is_exact_across_two_processes(redis_server, gates, rdb):
    children = [start_child(redis_server.url, 6, 10, 20) for _ in range(2)]
    try:
        for child in children:
            tell(child)  # both start taking at once, 20 threads each
        held = [held_by(child) for child in children]
        assert len(held[0]) + len(held[1]) == 6
        assert all(LEASE_ID.match(lease) for lease in held[0] + held[1])  # leases, no fallback slot
        for child, leases in zip(children, held, strict=True):
            assert {int(LEASE_ID.match(lease).group(1)) for lease in leases} <= {child.pid}
        me = gates(6)
        assert me.in_use() == 6 and me.try_acquire() is None
        first = 0 if held[0] else 1  # the one that got some (the other may have got none)
        tell(children[first])
        assert children[first].stdout.readline() == "released\n"
        assert me.in_use() == len(held[1 - first])
        assert me.try_acquire() is not None
    finally:
        stop_children(*children)


def test_release_gives_the_slot_back_and_twice_is_harmless(gates, rdb):
    gate, other = gates(2), gates(2)
    a, b = gate.try_acquire(), other.try_acquire()
    assert a and b and gate.try_acquire() is None and other.try_acquire() is None
    gate.release(a)
    gate.release(a)
    gate.release(b)  # not this worker's lease: nothing happens
    gate.release("elsewhere:1:abcd:1")
    assert gate.in_use() == 1 and gate.held_here() == 0 and other.held_here() == 1
    assert [m.decode() for m in rdb.zrange(KEY, 0, -1)] == [b]
    c = gate.try_acquire()
    assert c not in (a, b, None)
    other.release(b)
    gate.release(c)
    assert rdb.zcard(KEY) == 0


def test_renewal_keeps_a_slow_calls_slot(gates, rdb):
    gate, other = gates(1, lease_s=2), gates(1, lease_s=2)
    lease = gate.try_acquire()
    first = rdb.zscore(KEY, lease)
    # Over twice the lease later the slot is still held: the renewer extended it every 2/3 s.
    stop = time.monotonic() + 4.5
    while time.monotonic() < stop:
        assert other.try_acquire() is None
        gevent.sleep(0.2)
    assert rdb.zscore(KEY, lease) > first + 2000
    gate.release(lease)
    assert other.try_acquire() is not None


def test_a_holder_that_stops_renewing_loses_its_slots_within_the_lease(redis_server, gates, rdb):
    child = start_child(redis_server.url, 2, 1, 2)
    try:
        tell(child)
        held = held_by(child)
        assert len(held) == 2
        me = gates(2, lease_s=1)
        assert me.try_acquire() is None
        os.kill(child.pid, signal.SIGSTOP)  # alive, but no longer renewing
        wait_until(lambda: me.in_use() == 0, what="the stopped holder's leases to expire")
        mine = me.try_acquire()
        assert mine is not None and me.try_acquire() is not None
        os.kill(child.pid, signal.SIGCONT)
        tell(child)  # the calls of the woken holder end: releasing expired leases frees nothing else
        assert child.stdout.readline() == "released\n"
        assert me.in_use() == 2 and me.held_here() == 2
    finally:
        os.kill(child.pid, signal.SIGCONT)
        stop_children(child)


def test_a_lost_lease_is_logged_and_its_release_is_harmless(gates, rdb, redis_server, caplog):
    gate, other = gates(1, lease_s=1), gates(1, lease_s=1)
    lease = gate.try_acquire()
    redis_server.flush()  # Redis forgot every lease (a restart without persistence does the same)
    wait_until(lambda: gate.held_here() == 0, what="the renewer to notice")
    assert "1 lease(s) of this worker were gone from Redis" in caplog.text
    theirs = other.try_acquire()
    assert theirs is not None
    gate.release(lease)
    assert [m.decode() for m in rdb.zrange(KEY, 0, -1)] == [theirs]


def test_the_peak_is_the_fleets(gates):
    host_a, host_b = gates(5), gates(5)
    peaks: list[int] = []
    host_b.on_new_peak = peaks.append
    held = [host_a.try_acquire(), host_a.try_acquire()]
    assert host_b.try_acquire() is not None
    assert peaks == [3] and host_b.peak == 3
    for lease in held:
        host_a.release(lease)
    host_b.try_acquire()
    assert peaks == [3]


def test_redis_down_the_hosts_gate_stands_in_and_redis_is_used_again(gates, redis_server, caplog):
    gate = gates(2)
    lease = gate.try_acquire()
    redis_server.stop()
    slot = completes(gate.try_acquire)
    assert isinstance(slot, int)  # a slot of the host's own gate, same limit
    status = gate.status()
    assert status["backend"] == "redis" and status["fallback"] is True and status["scope"] == "host"
    assert status["redis"]["reachable"] is False and status["redis"]["unreachableSince"]
    assert "ConnectionError" in status["redis"]["lastError"]
    assert caplog.text.count("does not answer") == 1
    assert isinstance(completes(gate.try_acquire), int)
    assert completes(gate.try_acquire) is None  # the host's gate holds the limit
    assert completes(gate.in_use) == 2
    gate.release(slot)
    gate.release(lease)  # its lease died with Redis; nothing waits for it
    assert completes(gate.in_use) == 1
    assert caplog.text.count("does not answer") == 1  # once per outage, not per call
    redis_server.start()
    wait_until(lambda: gate.status()["redis"]["reachable"], what="Redis to be used again")
    assert "answers again" in caplog.text
    assert isinstance(gate.try_acquire(), str)
    assert gate.in_use() == 1 and gate.status()["scope"] == "fleet"


def test_a_redis_restarted_between_two_calls_costs_nothing(gates, redis_server, caplog):
    gate = gates(2)
    gate.release(gate.try_acquire())  # a connection is kept, and Redis knows the scripts
    redis_server.stop()
    redis_server.start()  # same port; it has forgotten the kept connection and every script
    lease = gate.try_acquire()
    assert isinstance(lease, str) and gate.in_use() == 1  # still the fleet's gate: no breaker opened
    assert gate.status()["redis"]["lastError"] is None and "does not answer" not in caplog.text
    gate.release(lease)
    assert gate.in_use() == 0


def test_a_redis_that_never_answers_costs_one_short_timeout(tmp_path, caplog):
    hung = socket.socket()  # the kernel completes connections; nobody ever reads or answers
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)
    try:
        url = f"redis://127.0.0.1:{hung.getsockname()[1]}/0"
        gate = RedisGate(url, 2, 10, fallback=Gate(str(tmp_path / "slots"), 2))
        try:
            slots = [completes(gate.try_acquire, deadline_s=5) for _ in range(3)]
            assert isinstance(slots[0], int) and isinstance(slots[1], int) and slots[2] is None
            assert completes(gate.in_use, deadline_s=5) == 2
            status = gate.status()
            assert status["fallback"] is True and status["redis"]["lastError"].startswith("TimeoutError")
            assert caplog.text.count("does not answer") == 1
        finally:
            gate.close()
    finally:
        hung.close()


def test_leases_released_while_redis_is_slow_are_dropped_when_it_answers(gates, rdb):
    gate = gates(3, lease_s=60)  # left to expire, they would outlast the wait below
    held = gate.try_acquire()
    rdb.client_pause(1500)  # Redis answers nobody for 1.5 s, and keeps its data
    slot = gate.try_acquire()  # times out: Redis runs the call later, and the lease it grants is stale
    assert isinstance(slot, int)
    assert gate.status()["redis"]["lastError"].startswith("TimeoutError")
    gate.release(slot)
    gate.release(held)  # Redis does not answer: remembered, dropped once it does
    wait_until(lambda: gate.status()["redis"]["reachable"], what="Redis to be used again")
    # The lease of the call that timed out (Redis ran it once the pause ended) and the one released
    # meanwhile are both dropped, not left to expire.
    wait_until(lambda: rdb.zcard(KEY) == 0, what="the stale leases to be dropped")


# ---- configuration -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri",
    [
        "http://cache:6379/0",
        "memory://",
        "unix:///run/redis.sock",
        "redis-cluster://cache:6379",
        "cache:6379",
        "redis://",
        "redis://:secret-pw@",
        "redis://cache:port/0",
        "redis://cache:6379/zero",
    ],
)
def test_a_gate_uri_that_is_not_redis_stops_the_server(uri):
    with pytest.raises(ConfigError) as info:
        build_config({"OPENAI_PROXY_GATE_URI": uri})
    assert "OPENAI_PROXY_GATE_URI" in str(info.value)
    assert "secret-pw" not in str(info.value)


@pytest.mark.parametrize("uri", ["redis://cache:6379/0", "rediss://:pw@cache:6380/2", "REDIS://cache"])
def test_redis_uris_are_accepted(uri):
    config = build_config({"OPENAI_PROXY_GATE_URI": uri, "OPENAI_PROXY_GATE_LEASE_S": "4"})
    assert (config.gate_uri, config.gate_lease_s) == (uri, 4)


@pytest.mark.parametrize("raw", ["0", "-2", "ten", "2.5", " "])
def test_a_bad_lease_falls_back_to_10_s_with_a_warning(raw):
    config = build_config({"OPENAI_PROXY_GATE_LEASE_S": raw})
    assert config.gate_lease_s == 10
    assert any("OPENAI_PROXY_GATE_LEASE_S" in w for w in config.warnings) == bool(raw.strip())


def test_the_gate_uri_password_is_a_secret():
    config = build_config({"OPENAI_PROXY_GATE_URI": "redis://user:gate-pass-7781@cache:6379/1"})
    assert config.public_view()["gate_uri"] == "redis://cache:6379/1"
    assert configured_secrets(config)["the password in OPENAI_PROXY_GATE_URI"] == "gate-pass-7781"
    assert build_config({}).gate_uri is None


@pytest.mark.gunicorn
def test_gunicorn_refuses_to_start_with_a_gate_uri_that_is_not_redis(gunicorn_server):
    with pytest.raises(RuntimeError) as info:
        gunicorn_server(workers=1, OPENAI_PROXY_GATE_URI="memcached://:pw-123456@cache:11211")
    assert "openai-proxy cannot start: OPENAI_PROXY_GATE_URI='memcached://cache:11211'" in str(info.value)
    assert "pw-123456" not in str(info.value)


# ---- the app: API, /health, /metrics, /debug/runtime, the log page -----------------------------------


def test_the_api_answers_503_when_the_fleet_is_full(make_app, fake, gates, redis_server, rdb):
    app = make_app(OPENAI_PROXY_GATE_URI=redis_server.url, OPENAI_PROXY_MAX_PARALLEL_REQUESTS="2")
    client = app.test_client()
    elsewhere = gates(2)  # another host of the fleet holds both slots
    held = [elsewhere.try_acquire(), elsewhere.try_acquire()]
    r = post_json(client, "/openai", CHAT)
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    assert error_of(r)["code"] == "OPENAI_PROXY_OVERLOADED"
    assert fake.count("/v1/chat/completions") == 0
    assert app.records[-1]["overloaded"] is True
    elsewhere.release(held[0])
    r = post_json(client, "/openai", CHAT)
    assert r.status_code == 200 and fake.count("/v1/chat/completions") == 1
    assert [m.decode() for m in rdb.zrange(KEY, 0, -1)] == [held[1]]  # its own lease is given back
    page = counters(client.get("/log", headers=AUTH).get_data(as_text=True))
    assert (page["Current parallel requests"], page["Max parallel requests"]) == ("1", "2")


def test_health_metrics_and_runtime_show_the_redis_gate(make_app, fake, gates, redis_server):
    app = make_app(OPENAI_PROXY_GATE_URI=redis_server.url, OPENAI_PROXY_GATE_LEASE_S="7")
    client = app.test_client()
    elsewhere = gates(32)
    held = [elsewhere.try_acquire() for _ in range(3)]
    health = client.get("/health", headers=AUTH).get_json()
    assert health["status"] == "ok"
    assert health["gate"] == {
        "inUse": 3, "limit": 32, "heldByThisWorker": 0, "backend": "redis", "scope": "fleet",
        "fallback": False, "leaseS": 7,
        "redis": {"uri": redis_server.url, "reachable": True, "unreachableSince": None, "lastError": None},
    }  # fmt: skip
    found = samples(client.get("/metrics", headers=AUTH).get_data(as_text=True))
    assert value(found, "openai_proxy_gate_slots_in_use") == 3
    assert ("openai_proxy_gate_fallback", frozenset()) in found
    assert value(found, "openai_proxy_gate_fallback") == 0
    runtime = client.get("/debug/runtime", headers=AUTH).get_json()["config"]
    assert (runtime["gate_uri"], runtime["gate_lease_s"]) == (redis_server.url, 7)
    for lease in held:
        elsewhere.release(lease)

    redis_server.stop()
    health = completes(lambda: client.get("/health", headers=AUTH).get_json())
    assert health["status"] == "degraded" and health["ready"] is True
    since = health["gate"]["redis"]["unreachableSince"]
    assert health["reasons"] == [
        f"gate: Redis does not answer (since {since}); this host's own gate stands in for the fleet's"
    ]
    assert health["gate"]["fallback"] is True and health["gate"]["scope"] == "host"
    assert health["gate"]["redis"]["reachable"] is False
    assert health["gate"]["inUse"] == 0  # the host's own count
    found = samples(client.get("/metrics", headers=AUTH).get_data(as_text=True))
    assert value(found, "openai_proxy_gate_fallback") == 1
    assert post_json(client, "/openai", CHAT).status_code == 200


def test_the_local_gate_stays_the_default(client):
    gate = client.get("/health", headers=AUTH).get_json()["gate"]
    assert gate == {"inUse": 0, "limit": 32, "heldByThisWorker": 0, "backend": "local", "scope": "host"}
    found = samples(client.get("/metrics", headers=AUTH).get_data(as_text=True))
    assert ("openai_proxy_gate_fallback", frozenset()) not in found
    assert type(client.application.extensions["openai_proxy"].gate) is Gate


def test_a_redis_that_refuses_the_password_leaves_the_api_up(make_app, fake, redis_server):
    uri = redis_server.url.replace("redis://", "redis://:gate-secret-4471@")
    app = make_app(OPENAI_PROXY_GATE_URI=uri)
    client = app.test_client()
    assert post_json(client, "/openai", CHAT).status_code == 200
    r = client.get("/health", headers=AUTH)
    health = r.get_json()
    assert health["status"] == "degraded" and health["gate"]["fallback"] is True
    assert health["gate"]["redis"]["uri"] == redis_server.url
    assert health["gate"]["redis"]["lastError"].startswith("AuthenticationError")
    for page in ("/health", "/debug/runtime", "/metrics"):
        assert "gate-secret-4471" not in client.get(page, headers=AUTH).get_data(as_text=True)


# ---- two gunicorn servers ("hosts") sharing one gate -----------------------------------------------


def holding(event: Event):
    """A fake upstream answer that waits until the test lets it go."""

    def handler(req, conn) -> None:
        event.wait(60)
        default_handler(req, conn)

    return handler


def two_hosts(gunicorn_server, tmp_path, redis_server, workers: int = 2, lease_s: int = 10):
    hosts = []
    for name in ("a", "b"):
        runtime = tmp_path / f"runtime-{name}"
        runtime.mkdir()
        hosts.append(
            gunicorn_server(
                workers=workers,
                OPENAI_PROXY_RUNTIME_DIR=str(runtime),
                OPENAI_PROXY_LOG_DB=str(tmp_path / f"log-{name}.sqlite3"),
                OPENAI_PROXY_GATE_URI=redis_server.url,
                OPENAI_PROXY_GATE_LEASE_S=str(lease_s),
                OPENAI_PROXY_MAX_PARALLEL_REQUESTS="4",
            )
        )
    return hosts


def send(server, body=CHAT) -> requests.Response:
    return requests.post(server.url + "/openai", json=body, headers=CLOSE, timeout=60)


def spawn_calls(*servers) -> list[gevent.Greenlet]:
    return [gevent.spawn(send, server) for server in servers]


def health(server) -> dict:
    return requests.get(server.url + "/health", headers={**AUTH, **CLOSE}, timeout=10).json()


def assert_overloaded(r: requests.Response) -> None:
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    assert r.json()["error"]["code"] == "OPENAI_PROXY_OVERLOADED"


@pytest.mark.gunicorn
def test_two_servers_share_a_gate_of_four(gunicorn_server, fake, tmp_path, redis_server, rdb):
    a, b = two_hosts(gunicorn_server, tmp_path, redis_server)
    release = Event()
    fake.push("POST", "/v1/chat/completions", holding(release), times=4)
    calls = spawn_calls(a, b, a, b)
    wait_until(lambda: live(rdb) == 4, what="four leases")
    assert health(a)["gate"]["inUse"] == 4 and health(b)["gate"]["inUse"] == 4
    assert_overloaded(send(a))
    assert_overloaded(send(b))
    holders = {int(LEASE_ID.match(m.decode()).group(1)) for m in rdb.zrange(KEY, 0, -1)}
    assert holders <= set(a.worker_pids()) | set(b.worker_pids())
    assert holders & set(a.worker_pids()) and holders & set(b.worker_pids())
    release.set()
    gevent.joinall(calls, raise_error=True)
    assert [c.value.status_code for c in calls] == [200] * 4
    assert fake.count("/v1/chat/completions") == 4
    wait_until(lambda: rdb.zcard(KEY) == 0, what="every lease given back")


@pytest.mark.gunicorn
def test_kill_9_of_a_whole_server_gives_its_slots_back_within_the_lease(
    gunicorn_server, fake, tmp_path, redis_server, rdb
):
    lease_s = 2
    a, b = two_hosts(gunicorn_server, tmp_path, redis_server, lease_s=lease_s)
    release = Event()
    fake.push("POST", "/v1/chat/completions", holding(release), times=None)
    stuck = spawn_calls(a, a, a, b)
    wait_until(lambda: live(rdb) == 4, what="four leases")
    assert_overloaded(send(b))
    pids = [a.proc.pid, *a.worker_pids()]
    for pid in pids:  # power off: master and workers at once, nothing runs any cleanup
        os.kill(pid, signal.SIGKILL)
    a.proc.wait(10)
    # Within the lease (2 s, and a generous margin for a busy machine) b has the three slots again.
    wait_until(lambda: health(b)["gate"]["inUse"] == 1, timeout=lease_s + 10, what="a's leases to expire")
    more = spawn_calls(b, b, b)
    wait_until(lambda: live(rdb) == 4, what="b's four leases")
    assert_overloaded(send(b))  # and the limit holds again
    release.set()
    gevent.joinall(more + stuck[3:], raise_error=True)
    assert [c.value.status_code for c in more + stuck[3:]] == [200] * 4
    gevent.joinall(stuck[:3])  # their server is gone: connection errors
    assert all(c.exception is not None for c in stuck[:3])


@pytest.mark.gunicorn
def test_redis_stopped_mid_run(gunicorn_server, fake, tmp_path, redis_server, rdb):
    # One worker each: /health then speaks for the whole server's view of Redis.
    a, b = two_hosts(gunicorn_server, tmp_path, redis_server, workers=1)
    release = Event()
    fake.push("POST", "/v1/chat/completions", holding(release), times=2)
    in_flight = spawn_calls(a, a)
    wait_until(lambda: live(rdb) == 2, what="two leases")
    redis_server.stop()
    # The API keeps answering, on each host's own gate (limit 4 per host while Redis is out).
    assert completes(lambda: send(a)).status_code == 200
    assert completes(lambda: send(b)).status_code == 200
    for server in (a, b):
        report = completes(lambda server=server: health(server))
        assert report["status"] == "degraded"
        assert report["gate"]["fallback"] is True and report["gate"]["redis"]["reachable"] is False
    release.set()
    gevent.joinall(in_flight, raise_error=True)
    assert [c.value.status_code for c in in_flight] == [200, 200]
    held = Event()
    fake.push("POST", "/v1/chat/completions", holding(held), times=4)
    local = spawn_calls(a, a, a, a)
    wait_until(lambda: health(a)["gate"]["inUse"] == 4, what="a's own gate to fill")
    assert_overloaded(completes(lambda: send(a)))
    held.set()
    gevent.joinall(local, raise_error=True)
    assert [c.value.status_code for c in local] == [200] * 4

    redis_server.start()
    wait_until(lambda: all(health(s)["gate"]["redis"]["reachable"] for s in (a, b)), what="Redis again")
    assert {health(s)["status"] for s in (a, b)} == {"ok"}
    again = Event()
    fake.push("POST", "/v1/chat/completions", holding(again), times=4)
    fleet = spawn_calls(a, a, a, b)
    wait_until(lambda: live(rdb) == 4, what="four leases in Redis again")
    assert_overloaded(send(b))
    again.set()
    gevent.joinall(fleet, raise_error=True)
    assert [c.value.status_code for c in fleet] == [200] * 4
