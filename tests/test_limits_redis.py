"""Per-client limits shared in a real Redis (openai_proxy/limits/shared.py, contract §13), the fallback to the
host's own store when Redis is down or stalled, and the page rate limits on the same Redis."""

from __future__ import annotations

import logging
import os
import re
import signal
import time

import gevent
import pytest

from openai_proxy.config import build_config
from openai_proxy.limits import Limits, LocalLimitStore, Reservation, open_limit_store
from openai_proxy.limits.reservations import LEASE_S
from openai_proxy.limits.shared import KEY_PREFIX, RedisLimitStore
from tests.conftest import ISO_MS
from tests.support.limits_contract import NOW, StoreContract, allowed, refused, trio
from tests.support.logpage import AUTH
from tests.test_limits import SPAWN, gone, hang_with_a_reservation, run_processes

LIMITS_LOG = "openai_proxy.limits"


def open_redis(url: str, path: str, **kwargs) -> RedisLimitStore:
    return RedisLimitStore(url, url, LocalLimitStore(path), **kwargs)


class TestRedisStore(StoreContract):
    @pytest.fixture
    def open_store(self, redis_server, tmp_path):
        stores: list[RedisLimitStore] = []

        def opener() -> RedisLimitStore:
            stores.append(open_redis(redis_server.url, str(tmp_path / "fallback")))
            return stores[-1]

        yield opener
        for store in stores:
            # Every answer came from Redis: a test passing on the fallback would prove nothing here.
            assert store.status()["reachable"] is True and store.status()["lastError"] is None
            store.close()


@pytest.fixture
def store(redis_server, tmp_path):
    s = open_redis(redis_server.url, str(tmp_path / "fallback"), retry_s=0)
    yield s
    s.close()


@pytest.mark.parametrize(("processes", "rpm"), [(2, 301), (4, 1003)])
def test_rpm_is_exact_across_processes_sharing_redis(redis_server, tmp_path, processes, rpm):
    backend = {"kind": "redis", "uri": redis_server.url, "path": str(tmp_path / "fallback")}
    got = run_processes(
        "hammer", [(backend, SPAWN.Barrier(processes), "c", {"rpm": rpm}, rpm, NOW)] * processes
    )
    assert -1 not in got, "a process counted on its fallback"
    assert sum(got) == rpm, got


def test_charges_from_many_processes_add_up_in_redis(redis_server, tmp_path):
    backend = {"kind": "redis", "uri": redis_server.url, "path": str(tmp_path / "fallback")}
    limits = {"tpm": 400, "daily_usd": 100.0}  # 4 x 100 charges of 1 token and $0.25
    run_processes("spend", [(backend, SPAWN.Barrier(4), "s", limits, 100, NOW)] * 4)
    s = open_redis(redis_server.url, str(tmp_path / "fallback"))
    assert s.admit("s", Limits(**limits), NOW) == refused(
        "daily_usd", 12 * 3600, trio("tokens", 400, 0, "1m0s")
    )
    assert s.status()["reachable"] is True
    s.close()


@pytest.mark.parametrize("processes", [2, 4])
def test_reservations_are_exact_across_processes_sharing_redis(redis_server, tmp_path, processes):
    backend = {"kind": "redis", "uri": redis_server.url, "path": str(tmp_path / "fallback")}
    # As the local test: $0.125 per call, $10 budget, nothing settles: exactly 80 admitted.
    args = (backend, SPAWN.Barrier(processes), "c", {"daily_usd": 10.0}, 60, NOW, 0.125)
    got = run_processes("reserve", [args] * processes)
    assert -1 not in got, "a process counted on its fallback"
    assert sum(got) == 80, got
    s = open_redis(redis_server.url, str(tmp_path / "fallback"))
    assert s.reserved("c", NOW) == 0.0  # every process gave its reservations back on close
    s.close()


def test_a_killed_workers_reservation_lapses_with_its_lease_in_redis(redis_server, tmp_path):
    backend = {"kind": "redis", "uri": redis_server.url, "path": str(tmp_path / "fallback")}
    holder = hang_with_a_reservation(backend, tmp_path / "ready")
    os.kill(holder.pid, signal.SIGKILL)
    assert gone(holder)
    s = open_redis(redis_server.url, str(tmp_path / "fallback"))
    lim = Limits(daily_usd=1.0)
    assert s.reserved("k", NOW) == 1.0
    assert s.admit("k", lim, NOW, reserve=Reservation("a", 0.25)) == refused("daily_usd", 1, [])
    assert s.reserved("k", NOW + LEASE_S + 1) == 0.0
    assert s.admit("k", lim, NOW + LEASE_S + 1, reserve=Reservation("a", 0.25)).allowed
    assert s.status()["reachable"] is True
    s.close()


def test_a_reservation_made_while_redis_was_out_is_given_back_on_the_host(store, redis_server):
    lim = Limits(daily_usd=1.0)
    redis_server.stop()
    assert store.admit("o", lim, NOW, reserve=Reservation("a", 1.0)).allowed  # held by the host's store
    assert store._local.reserved("o", NOW) == 1.0
    assert store.admit("o", lim, NOW, reserve=Reservation("b", 0.5)) == refused("daily_usd", 1, [])
    redis_server.start()
    store.charge("o", lim, 10, 0.25, NOW, release="a")  # charged in Redis, released on the host
    assert store._local.reserved("o", NOW) == 0.0 and not store.holds("a")
    assert store.status()["reachable"] is True
    assert store.reserved("o", NOW) == 0.0


def test_a_bare_release_makes_no_key(store, redis_server):
    assert store.admit("x", Limits(daily_usd=1.0), NOW, reserve=Reservation("a", 0.5)).allowed
    store.release("a", NOW)
    keys = sorted(k for k in redis_server.command("KEYS", "*").decode().split("\r\n")[2::2] if k)
    assert keys == [f"{KEY_PREFIX}x"]


def test_keys_live_under_the_prefix_and_expire(store, redis_server):
    assert store.admit("alice", Limits(rpm=10), NOW).allowed
    store.charge("bob", Limits(tpm=1), 10**7, 0.5, NOW)  # a token debt of 10 million minutes
    keys = sorted(k for k in redis_server.command("KEYS", "*").decode().split("\r\n")[2::2] if k)
    assert keys == [f"{KEY_PREFIX}alice", f"{KEY_PREFIX}bob"]
    ttl = int(redis_server.command("TTL", f"{KEY_PREFIX}alice").decode()[1:])
    assert 35 * 86400 - 60 <= ttl <= 35 * 86400
    ttl = int(redis_server.command("TTL", f"{KEY_PREFIX}bob").decode()[1:])
    assert ttl == 10 * 365 * 86400  # capped: no key lives forever


def test_redis_clock_is_used_when_now_is_not_given(store, redis_server):
    lim = Limits(rpm=1)
    assert store.admit("c", lim).allowed
    got = store.admit("c", lim)
    assert (got.allowed, got.limit) == (False, "requests")
    at = float(redis_server.command("HGET", f"{KEY_PREFIX}c", "at").decode().split("\r\n")[1])
    assert abs(at - time.time()) < 60  # Redis's clock, not 0 and not a test's NOW


def test_redis_down_falls_back_to_the_host_and_comes_back(store, redis_server, caplog):
    caplog.set_level(logging.INFO, LIMITS_LOG)
    lim = Limits(rpm=2, daily_usd=1.0)
    assert store.admit("c", lim, NOW) == allowed(trio("requests", 2, 1, "30s"))
    redis_server.stop()
    # Counted on this host from now on (its own window: the fleet is bounded per host), never an error.
    assert store.admit("c", lim, NOW) == allowed(trio("requests", 2, 1, "30s"))
    assert store.admit("c", lim, NOW) == allowed(trio("requests", 2, 0, "1m0s"))
    assert store.admit("c", lim, NOW) == refused("requests", 30, trio("requests", 2, 0, "1m0s"))
    store.charge("c", lim, 5, 1.0, NOW)  # charged to the fallback
    assert store.admit("c", lim, NOW + 60).limit == "daily_usd"
    status = store.status()
    assert (status["backend"], status["reachable"], status["usingFallback"]) == ("redis", False, True)
    assert status["lastError"].startswith("ConnectionError: ") and re.fullmatch(ISO_MS, status["downSince"])
    assert status["fallback"]["backend"] == "local" and status["uri"] == redis_server.url
    warnings = [r.getMessage() for r in caplog.records if r.name == LIMITS_LOG]
    assert len(warnings) == 1, warnings  # once per outage, not once per request
    assert warnings[0].startswith(f"client limits: Redis at {redis_server.url} failed (ConnectionError: ")

    redis_server.start()  # empty: nothing of the outage reaches Redis
    assert store.admit("c", lim, NOW + 60) == allowed(trio("requests", 2, 1, "30s"))
    assert store.status()["reachable"] is True and store.status()["usingFallback"] is False
    assert redis_server.command("EXISTS", f"{KEY_PREFIX}c") == b":1\r\n"
    messages = [r.getMessage() for r in caplog.records if r.name == LIMITS_LOG]
    assert len(messages) == 2 and "answers again after" in messages[1]
    # The fallback's own counts stay where they were, for the next outage.
    assert store._local.admit("c", lim, NOW + 60).limit == "daily_usd"


def test_a_restart_between_calls_or_lost_scripts_are_no_outage(tmp_path, redis_server, caplog):
    s = open_redis(redis_server.url, str(tmp_path / "fallback"), retry_s=3600)
    lim = Limits(rpm=3)
    # Two idle connections, both made stale by the restart below.
    admits = [gevent.spawn(s.admit, "c", lim, NOW) for _ in range(2)]
    gevent.joinall(admits, raise_error=True)
    assert len(s._link._free) == 2
    redis_server.stop()
    redis_server.start()  # empty, scripts gone too
    assert s.admit("c", lim, NOW) == allowed(trio("requests", 3, 2, "20s"))  # counted once, in Redis
    assert s.status()["reachable"] is True and s.status()["lastError"] is None
    assert len(s._link._free) == 1
    assert redis_server.command("SCRIPT", "FLUSH") == b"+OK\r\n"
    assert s.admit("c", lim, NOW) == allowed(trio("requests", 3, 1, "40s"))
    s.charge("c", Limits(rpm=3, daily_usd=1.0), 0, 1.0, NOW)
    assert s.admit("c", Limits(rpm=3, daily_usd=1.0), NOW).limit == "daily_usd"
    assert s.status()["reachable"] is True and s.status()["lastError"] is None
    assert not [r for r in caplog.records if r.name == LIMITS_LOG]
    s.close()


def test_a_redis_down_at_start_is_an_outage_not_an_error(tmp_path, redis_server, caplog):
    redis_server.stop()
    s = open_redis(redis_server.url, str(tmp_path / "fallback"))
    assert s.admit("c", Limits(rpm=1), NOW).allowed
    assert s.admit("c", Limits(rpm=1), NOW).limit == "requests"
    s.charge("c", Limits(rpm=1), 1, 1.0, NOW)  # never raises
    assert s.status()["reachable"] is False
    s.close()


def test_a_stalled_redis_falls_back_within_the_timeout(store, redis_server):
    lim = Limits(rpm=5)
    assert store.admit("c", lim, NOW).allowed
    # CLIENT PAUSE WRITE holds every script and write of every client: Redis is up, but does not answer.
    assert redis_server.command("CLIENT", "PAUSE", "60000", "WRITE") == b"+OK\r\n"
    try:
        with gevent.Timeout(20):
            assert store.admit("c", lim, NOW) == allowed(trio("requests", 5, 4, "12s"))
            store.charge("c", lim, 1, 0.1, NOW)
        assert store.status()["lastError"].startswith("TimeoutError: ")
    finally:
        redis_server.command("CLIENT", "UNPAUSE")
    deadline = time.monotonic() + 20
    while not store.status()["reachable"] and time.monotonic() < deadline:
        store.admit("d", lim, NOW)
    assert store.status()["reachable"] is True
    assert store.admit("c", lim, NOW) == allowed(trio("requests", 5, 3, "24s"))  # Redis kept its count


def test_redis_is_retried_only_every_few_seconds_while_down(tmp_path, redis_server):
    s = open_redis(redis_server.url, str(tmp_path / "fallback"), retry_s=3600)
    redis_server.stop()
    assert s.admit("c", Limits(rpm=5), NOW).allowed
    redis_server.start()
    # Back, but the next try is an hour away: this host keeps counting on its own meanwhile.
    assert s.admit("c", Limits(rpm=5), NOW) == allowed(trio("requests", 5, 3, "24s"))
    assert s.status()["usingFallback"] is True
    assert redis_server.command("EXISTS", f"{KEY_PREFIX}c") == b":0\r\n"
    s.close()


def test_open_limit_store_picks_redis_from_either_variable(tmp_path, redis_server):
    db = str(tmp_path / "log.sqlite3")
    elsewhere = redis_server.url.replace("/0", "/1")
    cases = [
        {"OPENAI_PROXY_LIMITS_URI": redis_server.url},
        {"OPENAI_PROXY_RATELIMIT_STORAGE_URI": redis_server.url},
        {"OPENAI_PROXY_RATELIMIT_STORAGE_URI": elsewhere, "OPENAI_PROXY_LIMITS_URI": redis_server.url},
    ]
    for i, env in enumerate(cases):
        s = open_limit_store(build_config({"OPENAI_PROXY_LOG_DB": db, **env}))
        assert isinstance(s, RedisLimitStore) and s.status()["uri"] == redis_server.url
        assert s.status()["fallback"]["path"] == f"{db}-limits"
        assert s.admit(f"c{i}", Limits(rpm=1), NOW).allowed
        assert s.status()["reachable"] is True
        s.close()
    for i in range(len(cases)):  # all three counted in database 0
        assert redis_server.command("EXISTS", f"{KEY_PREFIX}c{i}") == b":1\r\n"
    local = open_limit_store(build_config({"OPENAI_PROXY_LOG_DB": db}))
    assert isinstance(local, LocalLimitStore)
    local.close()


def test_a_password_never_shows_in_status(tmp_path):
    config = build_config({"OPENAI_PROXY_LIMITS_URI": "redis://:limits-secret-pw@127.0.0.1:1/0",
                           "OPENAI_PROXY_LOG_DB": str(tmp_path / "db")})  # fmt: skip
    s = open_limit_store(config)
    assert s.admit("c", Limits(rpm=1), NOW).allowed  # nothing listens: counted on the host
    assert "limits-secret-pw" not in repr(s.status())
    assert s.status()["uri"] == "redis://127.0.0.1:1/0"
    s.close()


# -- the page rate limits on the same Redis ----------------------------------------------------------


def health_statuses(client, n: int) -> list[int]:
    return [client.get("/health", headers=AUTH).status_code for _ in range(n)]


@pytest.mark.parametrize("variable", ["OPENAI_PROXY_LIMITS_URI", "OPENAI_PROXY_RATELIMIT_STORAGE_URI"])
def test_page_limits_are_shared_through_redis(make_app, redis_server, variable):
    env = {variable: redis_server.url, "OPENAI_PROXY_PAGES_RATE_LIMIT": "3/minute"}
    one, two = make_app(**env).test_client(), make_app(**env).test_client()  # two workers, or two hosts
    assert health_statuses(one, 2) + health_statuses(two, 1) == [200, 200, 200]
    assert health_statuses(two, 1) + health_statuses(one, 1) == [429, 429]
    assert b"LIMITS" in redis_server.command("KEYS", "LIMITS*")


def test_limits_uri_wins_for_the_page_limits(make_app, redis_server):
    app = make_app(OPENAI_PROXY_LIMITS_URI=redis_server.url, OPENAI_PROXY_RATELIMIT_STORAGE_URI="memory://",
                   OPENAI_PROXY_PAGES_RATE_LIMIT="1/minute")  # fmt: skip
    assert health_statuses(app.test_client(), 2) == [200, 429]
    assert b"LIMITS" in redis_server.command("KEYS", "LIMITS*")


@pytest.mark.parametrize("variable", ["OPENAI_PROXY_LIMITS_URI", "OPENAI_PROXY_RATELIMIT_STORAGE_URI"])
def test_page_limits_survive_redis_going_down(make_app, redis_server, variable):
    client = make_app(
        **{variable: redis_server.url, "OPENAI_PROXY_PAGES_RATE_LIMIT": "2/minute"}
    ).test_client()
    assert health_statuses(client, 1) == [200]
    redis_server.stop()
    # The page answers (never a 500), counting in memory meanwhile: still limited.
    r = client.get("/health", headers=AUTH)
    assert r.status_code == 200 and r.get_json()["status"] == "ok"
    assert health_statuses(client, 2) == [200, 429]
    assert client.get("/health", headers=AUTH).get_json()["error"]["code"] == "OPENAI_PROXY_RATE_LIMITED"


@pytest.mark.parametrize("variable", ["OPENAI_PROXY_LIMITS_URI", "OPENAI_PROXY_RATELIMIT_STORAGE_URI"])
def test_page_limits_with_redis_down_at_start(make_app, redis_server, variable):
    redis_server.stop()
    client = make_app(
        **{variable: redis_server.url, "OPENAI_PROXY_PAGES_RATE_LIMIT": "2/minute"}
    ).test_client()
    assert health_statuses(client, 3) == [200, 200, 429]


@pytest.mark.parametrize("variable", ["OPENAI_PROXY_LIMITS_URI", "OPENAI_PROXY_RATELIMIT_STORAGE_URI"])
def test_a_stalled_redis_does_not_stall_the_pages(make_app, redis_server, variable):
    client = make_app(
        **{variable: redis_server.url, "OPENAI_PROXY_PAGES_RATE_LIMIT": "5/minute"}
    ).test_client()
    assert health_statuses(client, 1) == [200]
    assert redis_server.command("CLIENT", "PAUSE", "60000", "WRITE") == b"+OK\r\n"
    try:
        with gevent.Timeout(20):
            assert health_statuses(client, 1) == [200]
    finally:
        redis_server.command("CLIENT", "UNPAUSE")
