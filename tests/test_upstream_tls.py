"""The upstream leg as deployed: HTTPS, kept-alive connections reused, one worker, many calls."""

from __future__ import annotations

import gevent.pool
import pytest
import requests

from tests.conftest import ACCESS_TOKEN, SECURITY_KEY

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
KEY = {"X-Security-Key": SECURITY_KEY}


@pytest.fixture(scope="module")
def server(module_gunicorn):
    # Room for 100 calls at once: the gate is a policy, not what is being tested here.
    return module_gunicorn(workers=1, OPENAI_PROXY_MAX_PARALLEL_REQUESTS="128")


def gate_in_use(server) -> int:
    r = requests.get(server.url + "/health", headers={"Authorization": f"Bearer {ACCESS_TOKEN}"}, timeout=10)
    return r.json()["gate"]["inUse"]


def connections_used(fake) -> set[int]:
    return {r.connection for r in fake.requests}


def test_fake_upstream_is_https(fake):
    assert fake.url.startswith("https://")


def test_200_sequential_calls_share_one_tls_connection(server, fake):
    with requests.Session() as session:
        statuses = [
            session.post(server.url + "/openai", json=CHAT, headers=KEY, timeout=10).status_code
            for _ in range(200)
        ]
    assert statuses == [200] * 200
    assert fake.count("/v1/chat/completions") == 200
    assert len(connections_used(fake)) == 1


def test_100_concurrent_calls_then_100_more_reuse_the_pool(server, fake):
    def call(_: int) -> int:
        return requests.post(server.url + "/openai", json=CHAT, headers=KEY, timeout=20).status_code

    pool = gevent.pool.Pool(100)
    assert pool.map(call, range(100)) == [200] * 100
    assert 1 <= len(connections_used(fake)) <= 100
    accepted = fake.connections
    assert pool.map(call, range(100)) == [200] * 100
    # The second wave found idle connections in the pool: the fake accepted no new one.
    assert fake.connections == accepted
    assert gate_in_use(server) == 0


def test_streams_and_v1_reuse_the_same_connection(server, fake):
    with requests.Session() as session:
        for _ in range(3):
            r = session.post(server.url + "/openai2", json={**CHAT, "stream": True}, headers=KEY, timeout=10)
            assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
            r = session.post(
                server.url + "/v1/chat/completions",
                json=CHAT,
                headers={"Authorization": f"Bearer {SECURITY_KEY}"},
                timeout=10,
            )
            assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    assert len(connections_used(fake)) == 1


@pytest.mark.parametrize("path", ["/openai", "/v1/chat/completions"])
def test_upstream_closing_idle_connections_never_fails_the_next_call(server, fake, path):
    headers = {**KEY, "Authorization": f"Bearer {SECURITY_KEY}"}
    for round_ in range(5):
        r = requests.post(server.url + path, json=CHAT, headers=headers, timeout=10)
        assert r.status_code == 200, (round_, r.text)
        gevent.sleep(0.05)  # the fake's side of the connection is back to waiting for a request
        # What an upstream (or a load balancer in front of it) does after its idle timeout.
        assert fake.close_idle() >= 1
        gevent.sleep(0.05)  # the close reaches the proxy's side of the connection
    assert fake.count("/v1/chat/completions") == 5
    # Every call after a close went out on a new connection, none on a closed one.
    assert len(connections_used(fake)) == 5


def test_connections_are_reused_when_the_worker_has_more_than_1024_descriptors(make_app, fake):
    """A gevent worker serves up to 2000 connections, so its sockets' numbers pass 1024, where
    `select()` cannot look: the pool's liveness check must still tell an open connection from a
    closed one there, or every call opens a new upstream connection (and a new TLS handshake)."""
    import os
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1300:
        pytest.skip(f"this process may open only {hard} files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1300), hard))
    ballast = []
    try:
        while not ballast or ballast[-1] < 1100:
            ballast.append(os.open(os.devnull, os.O_RDONLY))
        client = make_app().test_client()
        for _ in range(5):
            r = client.post("/openai", json=CHAT, headers=KEY)
            assert r.status_code == 200
        assert len(connections_used(fake)) == 1
    finally:
        for fd in ballast:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
