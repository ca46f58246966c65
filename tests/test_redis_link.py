"""The Redis toolkit of the shared backends (openai_proxy/redis_link.py): the breaker, a fork, and the
one timeout and retry interval the gate, the client limits and the page limits all take from config."""

from __future__ import annotations

import os
import time

import gevent
import pytest

from openai_proxy import redis_link
from openai_proxy.config import ConfigError, build_config
from openai_proxy.limits import Limits
from openai_proxy.redis_link import Breaker, RedisLink

SETTINGS = ("OPENAI_PROXY_REDIS_TIMEOUT_S", "OPENAI_PROXY_REDIS_RETRY_S")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(redis_link.time, "monotonic", fake)
    return fake


# ---- the breaker ----------------------------------------------------------------------------------


def test_a_closed_breaker_lets_every_call_through(clock):
    breaker = Breaker(2.0)
    assert [breaker.may_try() for _ in range(3)] == [True, True, True]
    assert breaker.down_since is None and breaker.answered() is None


def test_an_open_breaker_lets_one_call_through_per_retry_interval(clock):
    breaker = Breaker(2.0)
    before = time.time()
    assert breaker.failed(ConnectionError("refused")) is True  # opens: the outage is logged once
    assert breaker.failed(ConnectionError("refused")) is False
    assert breaker.down_since is not None and before <= breaker.down_since <= time.time()
    assert breaker.may_try() is False
    clock.now += 1.9
    assert breaker.may_try() is False
    clock.now += 0.1
    assert (breaker.may_try(), breaker.may_try()) == (True, False)  # one caller asks, the rest wait
    clock.now += 1.0
    breaker.failed(TimeoutError("timed out"))  # that one failed: the next try is an interval away
    clock.now += 1.9
    assert breaker.may_try() is False
    clock.now += 0.1
    since = breaker.down_since
    assert breaker.may_try() is True and breaker.answered() == since
    assert breaker.down_since is None and breaker.may_try() is True
    assert breaker.last_error == "TimeoutError: timed out"  # kept for /health after the outage


def test_the_last_error_is_masked():
    breaker = Breaker(1.0)
    breaker.failed(ConnectionError("AUTH failed for sk-proj-abcdefghijklmnopqrstuvwxyz0123456789"))
    assert "abcdefghijklmnopqrstuvwxyz" not in str(breaker.last_error)


def test_a_forked_child_drops_the_parents_connections():
    link = RedisLink("redis://127.0.0.1:1/0")
    parents = object()
    link._free.append(parents)  # type: ignore[arg-type]
    pid = os.fork()
    if pid == 0:  # the child: its copy of the socket is the parent's, never to be used here
        os._exit(0 if link._free == [] else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert link._free == [parents]


# ---- the settings ---------------------------------------------------------------------------------


def test_the_defaults():
    config = build_config({})
    assert (config.redis_timeout_s, config.redis_retry_s) == (0.25, 1.0)
    assert (redis_link.TIMEOUT_S, redis_link.RETRY_S) == (0.25, 1.0)


def test_seconds_with_fractions_are_read():
    config = build_config({"OPENAI_PROXY_REDIS_TIMEOUT_S": " 0.1 ", "OPENAI_PROXY_REDIS_RETRY_S": "3"})
    assert (config.redis_timeout_s, config.redis_retry_s) == (0.1, 3.0)
    assert build_config({"OPENAI_PROXY_REDIS_TIMEOUT_S": ""}).redis_timeout_s == 0.25  # empty: unset
    assert not [w for w in config.warnings if "REDIS" in w]


@pytest.mark.parametrize("variable", SETTINGS)
@pytest.mark.parametrize("raw", ["0", "-1", "abc", "0.25s", "nan", "inf", "1e999"])
def test_a_value_that_is_not_seconds_above_zero_stops_the_server_naming_the_variable(variable, raw):
    with pytest.raises(ConfigError) as info:
        build_config({variable: raw})
    assert str(info.value) == f"{variable}={raw!r} is not a number of seconds > 0 (such as 0.25)"


def test_every_redis_client_takes_the_settings(make_app, redis_server):
    app = make_app(
        OPENAI_PROXY_GATE_URI=redis_server.url,
        OPENAI_PROXY_LIMITS_URI=redis_server.url,
        OPENAI_PROXY_REDIS_TIMEOUT_S="0.125",
        OPENAI_PROXY_REDIS_RETRY_S="3",
    )
    st = app.extensions["openai_proxy"]
    for link in (st.gate._link, st.limits._link):
        assert link._kwargs["socket_timeout"] == link._kwargs["socket_connect_timeout"] == 0.125
        assert link.breaker.retry_s == 3.0
    pages = st.limiter._storage_options
    assert pages["socket_timeout"] == pages["socket_connect_timeout"] == 0.125
    st.limits.close()


def test_replies_are_parsed_by_hiredis(make_app, redis_server):
    from redis._parsers import _HiredisParser

    app = make_app(OPENAI_PROXY_GATE_URI=redis_server.url, OPENAI_PROXY_LIMITS_URI=redis_server.url)
    st = app.extensions["openai_proxy"]
    for link in (st.gate._link, st.limits._link):
        assert link.call("PING") == b"PONG"
        assert [type(c._parser) for c in link._free] == [_HiredisParser]
    st.limits.close()


def test_the_gate_and_the_limits_use_a_redis_that_is_back_within_the_retry_interval(make_app, redis_server):
    retry_s = 0.3
    app = make_app(
        OPENAI_PROXY_GATE_URI=redis_server.url,
        OPENAI_PROXY_LIMITS_URI=redis_server.url,
        OPENAI_PROXY_REDIS_RETRY_S=str(retry_s),
    )
    st = app.extensions["openai_proxy"]
    gate, limits, lim = st.gate, st.limits, Limits(rpm=1000)
    try:
        assert isinstance(gate.try_acquire(), str) and limits.admit("c", lim).allowed  # both in Redis
        redis_server.stop()
        assert isinstance(gate.try_acquire(), int)  # the host's gate stands in
        assert limits.admit("c", lim).allowed  # counted on this host
        assert gate.status()["fallback"] is True and limits.status()["usingFallback"] is True
        redis_server.start()
        started = time.monotonic()

        def both_back() -> bool:
            limits.admit("c", lim)  # the limits try Redis on a request, once per interval
            return bool(gate.status()["redis"]["reachable"] and limits.status()["reachable"])

        # The gate's renewer probes every interval; the old intervals (1 s and 5 s) would not do.
        with gevent.Timeout(10):
            while not both_back():
                gevent.sleep(0.02)
        back_after = time.monotonic() - started
        assert back_after < retry_s + 0.6, back_after
        assert isinstance(gate.try_acquire(), str)
        assert limits.status()["downSince"] is None and gate.status()["scope"] == "fleet"
    finally:
        limits.close()
