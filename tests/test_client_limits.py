"""Per-client limits through the HTTP surface: 429 shapes, x-ratelimit headers, exact across workers."""

from __future__ import annotations

import textwrap

import gevent
import openai
import pytest
import requests

from tests.conftest import error_of, post_json
from tests.support.fake_upstream import delay
from tests.support.files import write_clients

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
LIMITED_KEY = "limited-client-key-0123456789"
FREE_KEY = "free-client-key-0123456789"


def clients_file(tmp_path, **limits) -> str:
    lines = "".join(f"{name} = {value!r}\n" for name, value in limits.items())
    text = textwrap.dedent(f"""\
        [[client]]
        name = "limited"
        key = "{LIMITED_KEY}"
        """) + lines + textwrap.dedent(f"""\

        [[client]]
        name = "free"
        key = "{FREE_KEY}"
        """)  # fmt: skip
    return write_clients(tmp_path, text)


def as_client(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_past_rpm_is_429_in_the_legacy_shape_with_openai_headers(make_app, fake, tmp_path):
    app = make_app(OPENAI_PROXY_CLIENTS_FILE=clients_file(tmp_path, rpm=2))
    client = app.test_client()
    first = post_json(client, "/openai", CHAT, headers=as_client(LIMITED_KEY))
    second = post_json(client, "/openai", CHAT, headers=as_client(LIMITED_KEY))
    third = post_json(client, "/openai", CHAT, headers=as_client(LIMITED_KEY))
    assert [first.status_code, second.status_code, third.status_code] == [200, 200, 429]
    assert [r.headers["x-ratelimit-limit-requests"] for r in (first, second, third)] == ["2", "2", "2"]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in (first, second, third)] == ["1", "0", "0"]
    for r in (first, second, third):
        assert r.headers["x-ratelimit-reset-requests"].endswith("s")
        assert "x-ratelimit-limit-tokens" not in r.headers
    error = error_of(third)
    assert error["type"] == "rate_limited" and error["code"] == "OPENAI_PROXY_CLIENT_LIMIT"
    assert error["message"].startswith(
        "Client 'limited' is past its limit of 2 requests per minute; retry in "
    )
    assert 1 <= int(third.headers["Retry-After"]) <= 30
    assert fake.count("/v1/chat/completions") == 2
    assert app.records[-1]["client"] == "limited" and app.records[-1]["status"] == 429
    # Another client is not affected, and has no limit headers.
    other = post_json(client, "/openai", CHAT, headers=as_client(FREE_KEY))
    assert other.status_code == 200 and "x-ratelimit-limit-requests" not in other.headers
    text = client.get("/metrics", headers={"Authorization": "Bearer test-access-token"}).get_data(
        as_text=True
    )
    assert 'openai_proxy_limit_rejections_total{client="limited",limit="requests"} 1.0' in text


def test_v1_gets_openais_rate_limit_error(make_app, fake, tmp_path):
    app = make_app(OPENAI_PROXY_CLIENTS_FILE=clients_file(tmp_path, rpm=1))
    client = app.test_client()
    assert post_json(client, "/v1/chat/completions", CHAT, headers=as_client(LIMITED_KEY)).status_code == 200
    r = post_json(client, "/v1/chat/completions", CHAT, headers=as_client(LIMITED_KEY))
    assert r.status_code == 429
    error = r.get_json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("requests", "rate_limit_exceeded", None)
    assert r.headers["x-ratelimit-remaining-requests"] == "0" and int(r.headers["Retry-After"]) >= 1


def test_tokens_are_charged_when_usage_arrives(make_app, fake, tmp_path):
    # The fake's chat answer reports 32 tokens: the first call starts under tpm=20 and is served whole,
    # then the allowance is overdrawn and the next call waits for it to refill.
    app = make_app(OPENAI_PROXY_CLIENTS_FILE=clients_file(tmp_path, tpm=20))
    client = app.test_client()
    first = post_json(client, "/openai", CHAT, headers=as_client(LIMITED_KEY))
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-tokens"] == "20"
    assert first.headers["x-ratelimit-remaining-tokens"] == "20"  # judged before the answer's usage
    second = post_json(client, "/v1/chat/completions", CHAT, headers=as_client(LIMITED_KEY))
    assert second.status_code == 429
    error = second.get_json()["error"]
    assert (error["type"], error["code"]) == ("tokens", "rate_limit_exceeded")
    assert second.headers["x-ratelimit-remaining-tokens"] == "0"
    assert fake.count("/v1/chat/completions") == 1


@pytest.mark.gunicorn
def test_rpm_is_exact_across_gunicorn_workers(gunicorn_server, fake, tmp_path):
    n = 6
    fake.push("POST", "/v1/chat/completions", delay(0.5), times=None)
    server = gunicorn_server(workers=2, OPENAI_PROXY_CLIENTS_FILE=clients_file(tmp_path, rpm=n))
    jobs = [gevent.spawn(requests.post, server.url + "/openai", json=CHAT, headers=as_client(LIMITED_KEY),
                         timeout=30) for _ in range(n + 1)]  # fmt: skip
    gevent.joinall(jobs, raise_error=True)
    statuses = sorted(job.value.status_code for job in jobs)
    assert statuses == [200] * n + [429]
    assert fake.count("/v1/chat/completions") == n


@pytest.mark.gunicorn
def test_rpm_is_exact_across_hosts_with_redis(gunicorn_server, fake, tmp_path, redis_server):
    n = 5
    fake.push("POST", "/v1/chat/completions", delay(0.5), times=None)
    path = clients_file(tmp_path, rpm=n)
    hosts = [gunicorn_server(workers=2, OPENAI_PROXY_CLIENTS_FILE=path, OPENAI_PROXY_LIMITS_URI=redis_server.url,
                             OPENAI_PROXY_RUNTIME_DIR=str(tmp_path / f"host{i}"),
                             OPENAI_PROXY_LOG_DB=str(tmp_path / f"host{i}.sqlite3")) for i in range(2)]  # fmt: skip
    jobs = [gevent.spawn(requests.post, hosts[i % 2].url + "/openai", json=CHAT, headers=as_client(LIMITED_KEY),
                         timeout=30) for i in range(n + 1)]  # fmt: skip
    gevent.joinall(jobs, raise_error=True)
    assert sorted(job.value.status_code for job in jobs) == [200] * n + [429]
    assert fake.count("/v1/chat/completions") == n


@pytest.mark.gunicorn
def test_the_sdk_sees_a_rate_limit_error(gunicorn_server, fake, tmp_path):
    server = gunicorn_server(workers=1, OPENAI_PROXY_CLIENTS_FILE=clients_file(tmp_path, rpm=1))
    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key=LIMITED_KEY, max_retries=0)
    sdk.chat.completions.create(**CHAT)
    with pytest.raises(openai.RateLimitError) as info:
        sdk.chat.completions.create(**CHAT)
    assert info.value.code == "rate_limit_exceeded"
    assert info.value.response.headers["x-ratelimit-limit-requests"] == "1"


@pytest.mark.parametrize("budget", ["daily_usd", "monthly_usd"])
def test_a_spent_budget_is_insufficient_quota_until_the_period_ends(make_app, fake, tmp_path, budget):
    # The fake's chat answer costs 7.725e-06 USD at gpt-4o-mini's prices: the first call is admitted
    # (nothing spent yet) and charged; then the budget is spent.
    app = make_app(OPENAI_PROXY_CLIENTS_FILE=clients_file(tmp_path, **{budget: 0.000005}))
    client = app.test_client()
    assert post_json(client, "/openai", CHAT, headers=as_client(LIMITED_KEY)).status_code == 200
    assert app.records[-1]["costUsd"] == pytest.approx(7.725e-06)
    legacy = post_json(client, "/openai", CHAT, headers=as_client(LIMITED_KEY))
    assert legacy.status_code == 429
    error = error_of(legacy)
    assert error["code"] == "OPENAI_PROXY_CLIENT_LIMIT"
    period = "today (UTC)" if budget == "daily_usd" else "this month (UTC)"
    assert f"past its limit of 5e-06 USD budget for {period}" in error["message"]
    v1 = post_json(client, "/v1/chat/completions", CHAT, headers=as_client(LIMITED_KEY))
    assert v1.status_code == 429
    assert (v1.get_json()["error"]["type"], v1.get_json()["error"]["code"]) == ("insufficient_quota",) * 2
    # Retry-After runs to the next UTC day (month): more than a second, at most a day (31 days).
    assert 1 <= int(v1.headers["Retry-After"]) <= (86400 if budget == "daily_usd" else 31 * 86400)
    assert fake.count("/v1/chat/completions") == 1
    # Spend survives a restart of the server (a new app on the same files).
    again = make_app(OPENAI_PROXY_CLIENTS_FILE=clients_file(tmp_path, **{budget: 0.000005}))
    assert post_json(again.test_client(), "/openai", CHAT, headers=as_client(LIMITED_KEY)).status_code == 429


def test_on_v1_the_clients_own_headers_replace_upstreams(make_app, fake, tmp_path):
    import json

    from tests.support.fake_upstream import raw

    answer = json.dumps({"id": "c1", "object": "chat.completion", "model": "gpt-4o-mini", "choices": [],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()  # fmt: skip
    org_limits = {"x-ratelimit-limit-requests": "10000", "x-ratelimit-remaining-requests": "9999"}
    fake.push("POST", "/v1/chat/completions", raw(200, answer, "application/json", org_limits))
    app = make_app(OPENAI_PROXY_CLIENTS_FILE=clients_file(tmp_path, rpm=3))
    r = post_json(app.test_client(), "/v1/chat/completions", CHAT, headers=as_client(LIMITED_KEY))
    assert r.status_code == 200
    assert r.headers.getlist("x-ratelimit-limit-requests") == ["3"]
    assert r.headers.getlist("x-ratelimit-remaining-requests") == ["2"]
    # A client without limits sees what upstream says, as before.
    fake.push("POST", "/v1/chat/completions", raw(200, answer, "application/json", org_limits))
    r = post_json(app.test_client(), "/v1/chat/completions", CHAT, headers=as_client(FREE_KEY))
    assert r.headers.getlist("x-ratelimit-limit-requests") == ["10000"]
