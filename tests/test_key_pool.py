"""The upstream key pool (`OPENAI_API_KEYS`), in one process: spreading, rests, revocations, failover,
what operators see, and the configuration. The same under real gunicorn: test_key_pool_gunicorn.py."""

from __future__ import annotations

import dataclasses
import json
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from openai_proxy import create_app
from openai_proxy.config import ConfigError, build_config
from openai_proxy.keys.pool import KeyPool, KeysUnavailable
from openai_proxy.keys.specs import key_spec
from tests.conftest import SECURITY_KEY, UPSTREAM_KEY, ClosingClient, base_env, error_of, post_json
from tests.support.fake_upstream import chat_completion, delay, error, reset, response_events
from tests.support.logpage import AUTH, CHAT, rows
from tests.test_metrics import samples, value

KEY_A = "sk-pool-alpha-0000000000000000AAAA"
KEY_B = "sk-pool-beta-11111111111111111BBBB"
KEY_C = "sk-pool-gamma-2222222222222222CCCC"
NAMES = {KEY_A: "alpha", KEY_B: "beta", KEY_C: "gamma"}
# Tests poll /health: the pages' own rate limit must not get in the way.
PAGES = {"OPENAI_PROXY_PAGES_RATE_LIMIT": "100000/minute"}
POOL = {"OPENAI_API_KEYS": f"alpha={KEY_A}, beta={KEY_B},gamma={KEY_C}", "OPENAI_API_KEY": None, **PAGES}
CHAT_PATH = "/v1/chat/completions"
V1 = {"Authorization": f"Bearer {SECURITY_KEY}"}


def used(fake, path: str = CHAT_PATH) -> list[str]:
    """The pool key name of each upstream request for `path`, in order."""
    return [NAMES.get(key or "", key) for key in fake.keys(path)]


def health_keys(client) -> dict[str, dict]:
    body = client.get("/health", headers=AUTH).get_json()
    assert body["upstreamKeys"]["pooled"] is True
    return {k["name"]: k for k in body["upstreamKeys"]["keys"]}


def until_active(client, name: str, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while health_keys(client)[name]["state"] != "active":
        assert time.monotonic() < deadline, f"key {name} did not come back"
        time.sleep(0.05)


def wall(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


@pytest.fixture
def pool_app(make_app):
    return make_app(**POOL)


@pytest.fixture
def pool_client(pool_app):
    return pool_app.test_client()


# ---- spreading ----------------------------------------------------------------------------------


def test_sequential_calls_take_turns_on_every_key(pool_app, pool_client, fake):
    for _ in range(6):
        assert post_json(pool_client, "/openai", CHAT).status_code == 200
    assert used(fake) == ["alpha", "beta", "gamma", "alpha", "beta", "gamma"]
    assert [r["attempts"] for r in pool_app.records] == [[{"key": n, "outcome": "ok", "status": 200}]
                                                         for n in ("alpha", "beta", "gamma") * 2]  # fmt: skip
    assert all(r["retries"] == 0 for r in pool_app.records)


def test_weights_share_sequential_calls_and_models_restrict_keys(make_app, fake, tmp_path):
    specs = (
        key_spec(KEY_A, "alpha", weight=2, where="test"),
        key_spec(KEY_B, "beta", where="test"),
        key_spec(KEY_C, "gamma", models=frozenset({"gpt-4.1"}), where="test"),
    )
    config = build_config(base_env(fake, OPENAI_PROXY_RUNTIME_DIR=str(tmp_path / "run"),
                                   OPENAI_PROXY_LOG_DB=str(tmp_path / "log.sqlite3")))  # fmt: skip
    app = create_app(dataclasses.replace(config, upstream_keys=specs))
    app.test_client_class = ClosingClient  # answers are closed, so their completion records go out
    client = app.test_client()
    try:
        for _ in range(6):
            assert post_json(client, "/openai", CHAT).status_code == 200
        assert sorted(used(fake)) == ["alpha"] * 4 + ["beta"] * 2
        assert used(fake)[:3] in (["alpha", "beta", "alpha"], ["alpha", "alpha", "beta"])
        fake.reset()
        for _ in range(2):
            assert post_json(client, "/openai", {**CHAT, "model": "gpt-4.1"}).status_code == 200
        assert "gamma" in used(fake)
        keys = {k["name"]: k for k in client.get("/health", headers=AUTH).get_json()["upstreamKeys"]["keys"]}
        assert keys["alpha"]["weight"] == 2 and keys["gamma"]["models"] == ["gpt-4.1"]
        assert "models" not in keys["alpha"]
    finally:
        app.extensions["openai_proxy"].upstream.close()
        app.extensions["openai_proxy"].log_store.close()


def test_choose_honours_allowed_names_models_and_exclusions(tmp_path):
    """The pool's own interface, for a clients file restricting a client to named keys."""
    pool = KeyPool(
        (key_spec(KEY_A, "alpha", where="t"), key_spec(KEY_B, "beta", models=frozenset({"m1"}), where="t")),
        str(tmp_path),
    )
    lease = pool.choose("m2", allowed={"beta", "alpha"})
    assert lease.name == "alpha"  # beta does not serve m2
    lease.release()
    assert pool.choose("m1", allowed={"beta"}).name == "beta"
    assert pool.choose(None, allowed={"beta"}).name == "beta"  # a call naming no model may use any key
    with pytest.raises(KeysUnavailable) as caught:
        pool.choose("m2", allowed={"beta"})
    assert caught.value.retry_after is None and "allowed for this client" in str(caught.value)
    with pytest.raises(KeysUnavailable):
        pool.choose("m2", exclude={0})
    assert pool.choose("m1", exclude={0}).name == "beta"


def test_fewest_in_flight_wins_over_the_rotation(pool_app, pool_client, fake):
    """A long call holds alpha: the next calls go to the keys with nothing in flight."""
    import gevent
    from gevent.event import Event

    release = Event()

    def held(req, conn):
        while not release.is_set():
            conn.wait(0.02)
        conn.send_json(200, chat_completion("gpt-4o-mini"))

    fake.push("POST", CHAT_PATH, held, key=KEY_A)
    call = gevent.spawn(post_json, pool_client, "/openai", CHAT)
    deadline = time.monotonic() + 10
    while health_keys(pool_client)["alpha"]["inFlight"] != 1:
        assert time.monotonic() < deadline
        gevent.sleep(0.02)
    for _ in range(4):
        assert post_json(pool_client, "/openai", CHAT).status_code == 200
    assert used(fake)[1:] == ["beta", "gamma", "beta", "gamma"]
    release.set()
    assert call.get(timeout=10).status_code == 200
    assert {k["inFlight"] for k in health_keys(pool_client).values()} == {0}


# ---- rests ----------------------------------------------------------------------------------------


def test_429_rests_the_key_for_retry_after_and_the_call_fails_over(pool_app, pool_client, fake, caplog):
    fake.push("POST", CHAT_PATH, error(429, "Rate limit reached", headers={"Retry-After": "30"}), key=KEY_A)
    before = time.time()
    r = post_json(pool_client, "/openai", CHAT)
    after = time.time()
    assert r.status_code == 200 and r.get_json()["id"] == "chatcmpl-fake123"
    assert used(fake) == ["alpha", "beta"]
    record = pool_app.records[-1]
    assert record["attempts"] == [{"key": "alpha", "outcome": "rate_limited", "status": 429},
                                  {"key": "beta", "outcome": "ok", "status": 200}]  # fmt: skip
    assert record["retries"] == 1 and record["status"] == 200
    alpha = health_keys(pool_client)["alpha"]
    assert alpha["state"] == "resting" and 0 < alpha["restingForS"] <= 30
    assert before + 30 - 0.01 <= wall(alpha["restingUntil"]) <= after + 30 + 0.01
    for _ in range(4):
        assert post_json(pool_client, "/openai", CHAT).status_code == 200
    assert "alpha" not in used(fake)[2:]
    failover = [rec.getMessage() for rec in caplog.records if "upstream_failover" in rec.getMessage()]
    assert len(failover) == 1 and KEY_A not in failover[0]
    event = json.loads(failover[0])
    assert (
        event["key"] == "alpha" and event["nextKey"] == "beta" and event["requestId"] == record["requestId"]
    )


NOW = datetime.now(UTC)


@pytest.mark.parametrize(
    ("headers", "rest"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"Retry-After": "2.5"}, 2.5),
        ({"retry-after-ms": "4500"}, 4.5),
        ({"retry-after-ms": "3000", "Retry-After": "9"}, 3.0),
        ({"x-ratelimit-reset-requests": "6m0s", "x-ratelimit-remaining-requests": "0"}, 360.0),
        ({"x-ratelimit-reset-tokens": "1m30.5s"}, 90.5),
        ({"x-ratelimit-reset-requests": "2s", "x-ratelimit-reset-tokens": "45s",
          "x-ratelimit-remaining-tokens": "0", "x-ratelimit-remaining-requests": "10"}, 45.0),
        ({"x-ratelimit-reset-requests": "2s", "x-ratelimit-reset-tokens": "45s"}, 2.0),
        ({"Retry-After": "99999"}, 600.0),
        ({"Retry-After": "soon", "x-ratelimit-reset-requests": "3s"}, 3.0),
        ({"Retry-After": "-5", "x-ratelimit-reset-requests": "5 seconds"}, None),
        ({"x-ratelimit-reset-requests": "1m2.5s250ms"}, 62.75),
    ],
)  # fmt: skip
def test_rest_time_comes_from_upstream_headers_within_bounds(pool_client, fake, headers, rest):
    fake.push("POST", CHAT_PATH, error(429, "Slow down", headers=headers), key=KEY_A)
    before = time.time()
    assert post_json(pool_client, "/openai", CHAT).status_code == 200
    after = time.time()
    alpha = health_keys(pool_client)["alpha"]
    assert alpha["state"] == "resting"
    expected = 1.0 if rest is None else rest  # nothing readable: the back-off's first second
    assert before + expected - 0.01 <= wall(alpha["restingUntil"]) <= after + expected + 0.01


def test_retry_after_as_an_http_date(pool_client, fake):
    when = (datetime.now(UTC) + timedelta(seconds=40)).replace(microsecond=0)
    fake.push("POST", CHAT_PATH, error(429, "Slow down", headers={"Retry-After": format_datetime(when, usegmt=True)}),
              key=KEY_A)  # fmt: skip
    assert post_json(pool_client, "/openai", CHAT).status_code == 200
    assert abs(wall(health_keys(pool_client)["alpha"]["restingUntil"]) - when.timestamp()) < 0.01


@pytest.mark.slow
def test_back_off_doubles_without_a_rest_time_and_an_answer_ends_it(make_app, fake):
    client = make_app(OPENAI_API_KEYS=f"solo={KEY_A}", OPENAI_API_KEY=None, **PAGES).test_client()
    for expected in (1.0, 2.0, 4.0):
        fake.push("POST", CHAT_PATH, error(429, "Slow down"), key=KEY_A)
        before = time.time()
        r = post_json(client, "/openai", CHAT)
        after = time.time()
        assert r.status_code == 429 and error_of(r)["code"] == "OPENAI_PROXY_UPSTREAM_API_ERROR"
        solo = health_keys(client)["solo"]
        assert before + expected - 0.01 <= wall(solo["restingUntil"]) <= after + expected + 0.01
        until_active(client, "solo")
    assert post_json(client, "/openai", CHAT).status_code == 200  # an answer: the back-off starts over
    fake.push("POST", CHAT_PATH, error(429, "Slow down"), key=KEY_A)
    before = time.time()
    post_json(client, "/openai", CHAT)
    assert wall(health_keys(client)["solo"]["restingUntil"]) <= time.time() + 1.0 + 0.01
    assert wall(health_keys(client)["solo"]["restingUntil"]) >= before + 1.0 - 0.01


def test_every_key_resting_answers_429_with_the_shortest_retry_after_without_calling_upstream(
    pool_app, pool_client, fake
):
    for key, seconds in ((KEY_A, "30"), (KEY_B, "20"), (KEY_C, "40")):
        fake.push(
            "POST", CHAT_PATH, error(429, "Rate limit reached", headers={"Retry-After": seconds}), key=key
        )
    # alpha, beta, then gamma: every key refused, so the client gets the last refusal
    r1 = post_json(pool_client, "/openai", CHAT)
    assert r1.status_code == 429 and r1.headers["Retry-After"] == "40"
    assert error_of(r1)["code"] == "OPENAI_PROXY_UPSTREAM_API_ERROR"
    assert used(fake) == ["alpha", "beta", "gamma"]
    assert [a["outcome"] for a in pool_app.records[-1]["attempts"]] == ["rate_limited"] * 3

    r = post_json(pool_client, "/openai", CHAT)
    assert r.status_code == 429
    retry_after = int(r.headers["Retry-After"])
    assert 15 <= retry_after <= 20
    err = error_of(r)
    assert (err["type"], err["code"]) == ("rate_limited", "OPENAI_PROXY_UPSTREAM_KEYS_RESTING")
    assert "resting" in err["message"] and "upstream" not in err
    v1 = pool_client.post("/v1/chat/completions", data=json.dumps(CHAT), headers=V1)
    assert v1.status_code == 429 and 15 <= int(v1.headers["Retry-After"]) <= 20
    body = v1.get_json()["error"]
    assert (body["type"], body["code"], body["param"]) == ("requests", "rate_limit_exceeded", None)
    get = pool_client.get("/openai2/resp_1", headers=V1)  # the SDK's road: refused before it starts
    assert get.status_code == 429 and error_of(get)["code"] == "OPENAI_PROXY_UPSTREAM_KEYS_RESTING"
    assert len(fake.requests) == 3
    record = pool_app.records[-3]
    assert (record["status"], record["result"], record["attempts"]) == (429, "rate_limited", None)
    assert record["upstreamMs"] is None


# ---- revocations ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("handler", "outcome", "status"),
    [
        (error(401, "Incorrect API key provided", code="invalid_api_key"), "unauthorized", 401),
        (error(403, "Your key lacks access", code="forbidden"), "forbidden", 403),
        (error(429, "You exceeded your current quota", type="insufficient_quota", code="insufficient_quota"),
         "insufficient_quota", 429),
    ],
)  # fmt: skip
def test_a_refused_key_is_taken_out_and_stays_out(pool_app, pool_client, fake, handler, outcome, status):
    fake.push("POST", CHAT_PATH, handler, times=None, key=KEY_A)
    assert post_json(pool_client, "/openai", CHAT).status_code == 200
    assert pool_app.records[-1]["attempts"] == [{"key": "alpha", "outcome": outcome, "status": status},
                                                {"key": "beta", "outcome": "ok", "status": 200}]  # fmt: skip
    for _ in range(8):
        assert post_json(pool_client, "/openai", CHAT).status_code == 200
    assert used(fake).count("alpha") == 1
    alpha = health_keys(pool_client)["alpha"]
    assert (alpha["state"], alpha["reason"], alpha["restingUntil"]) == ("revoked", outcome, None)
    assert wall(alpha["revokedAt"]) <= time.time()


def test_every_key_revoked_answers_503_without_calling_upstream(pool_app, pool_client, fake):
    fake.push("POST", CHAT_PATH, error(401, "Incorrect API key provided"), times=3)
    r = post_json(pool_client, "/openai", CHAT)  # alpha, beta, then gamma: the last refusal is the answer
    assert r.status_code == 401
    assert used(fake) == ["alpha", "beta", "gamma"]
    r = post_json(pool_client, "/openai", CHAT)
    assert r.status_code == 503 and "Retry-After" not in r.headers
    err = error_of(r)
    assert (err["type"], err["code"]) == ("upstream_keys_unavailable", "OPENAI_PROXY_NO_UPSTREAM_KEY")
    assert "restarted or reloaded" in err["message"]
    v1 = pool_client.post("/v1/embeddings", data=json.dumps({"input": "x", "model": "m"}), headers=V1)
    assert v1.status_code == 503 and v1.get_json()["error"]["code"] == "OPENAI_PROXY_NO_UPSTREAM_KEY"
    assert len(fake.requests) == 3
    health = pool_client.get("/health", headers=AUTH).get_json()
    assert health["status"] == "degraded" and health["upstreamKeys"]["allRevoked"] is True
    # A request's own key still works: it never goes through the pool.
    r = post_json(pool_client, "/openai", {**CHAT, "openai_api_key": "sk-own-key-9999999999"})
    assert r.status_code == 200 and fake.keys(CHAT_PATH)[-1] == "sk-own-key-9999999999"


def test_a_request_key_bypasses_the_pool(pool_app, pool_client, fake):
    r = post_json(pool_client, "/openai", {**CHAT, "openai_api_key": "sk-own-key-9999999999"})
    assert r.status_code == 200
    assert fake.keys(CHAT_PATH) == ["sk-own-key-9999999999"]
    assert pool_app.records[-1]["attempts"] is None
    assert {k["inFlight"] for k in health_keys(pool_client).values()} == {0}
    # Its 401 revokes nothing, and it is never failed over to a pool key.
    fake.push("POST", CHAT_PATH, error(401, "Incorrect API key provided: sk-own-key-9999999999"))
    r = post_json(pool_client, "/openai", {**CHAT, "openai_api_key": "sk-own-key-9999999999"})
    assert r.status_code == 401 and "sk-own-key-9999999999" not in r.get_data(as_text=True)
    assert len(fake.requests) == 2
    assert {k["state"] for k in health_keys(pool_client).values()} == {"active"}


# ---- failover: when, and when never ---------------------------------------------------------------


def test_503_fails_over_and_leaves_the_key_usable(pool_app, pool_client, fake):
    fake.push("POST", CHAT_PATH, error(503, "Overloaded", type="server_error"), key=KEY_A)
    assert post_json(pool_client, "/openai", CHAT).status_code == 200
    assert pool_app.records[-1]["attempts"][0] == {"key": "alpha", "outcome": "unavailable", "status": 503}
    assert health_keys(pool_client)["alpha"]["state"] == "active"


REFUSING = {"OPENAI_API_KEYS": f"rl={KEY_A},rev={KEY_B},good={KEY_C}", "OPENAI_API_KEY": None, **PAGES}


def refusing_keys(fake) -> None:
    """`rl` answers 429, `rev` 401 (revoked), `good` serves, on every route."""
    for path in (CHAT_PATH, "/v1/responses", "/v1/responses/resp_1"):
        method = "GET" if path.endswith("resp_1") else "POST"
        fake.push(method, path, error(429, "Rate limit reached", headers={"Retry-After": "30"}), key=KEY_A)
        fake.push(method, path, error(401, "Incorrect API key provided"), key=KEY_B)


@pytest.mark.parametrize(
    ("method", "path", "body", "upstream"),
    [
        ("POST", "/openai", CHAT, CHAT_PATH),
        ("POST", "/openai2", {"model": "gpt-4o-mini", "input": "hi"}, "/v1/responses"),
        ("POST", "/v1/chat/completions", CHAT, CHAT_PATH),
        ("GET", "/openai2/resp_1", None, "/v1/responses/resp_1"),  # the SDK's road (retried reads)
    ],
)
def test_a_refusal_is_never_the_answer_while_another_key_is_left(
    make_app, fake, method, path, body, upstream
):
    """rl (429), rev (401) and good: the call goes on to good, each key once, and the client gets 200."""
    app = make_app(**REFUSING)
    refusing_keys(fake)
    client = app.test_client()
    r = client.open(path, method=method, data=None if body is None else json.dumps(body),
                    headers={**V1, "Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 200, r.get_data()[:300]
    assert [NAMES.get(k or "") for k in fake.keys(upstream)] == ["alpha", "beta", "gamma"]
    record = app.records[-1]
    assert record["attempts"] == [{"key": "rl", "outcome": "rate_limited", "status": 429},
                                  {"key": "rev", "outcome": "unauthorized", "status": 401},
                                  {"key": "good", "outcome": "ok", "status": 200}]  # fmt: skip
    assert record["retries"] == 2 and record["status"] == 200
    states = {k["name"]: k["state"] for k in health_keys(client).values()}
    assert states == {"rl": "resting", "rev": "revoked", "good": "active"}


def test_each_key_is_tried_once_and_the_last_refusal_is_the_answer(make_app, fake):
    app = make_app(**REFUSING)
    refusing_keys(fake)
    fake.push("POST", CHAT_PATH, error(403, "Your key lacks access"), key=KEY_C)
    r = post_json(app.test_client(), "/openai", CHAT)
    assert r.status_code == 403 and error_of(r)["message"] == "403 Your key lacks access"
    assert [a["key"] for a in app.records[-1]["attempts"]] == ["rl", "rev", "good"]
    assert len(fake.requests) == 3


def test_a_503_is_sent_again_once_and_a_refusal_after_it_still_fails_over(pool_app, pool_client, fake):
    fake.push("POST", CHAT_PATH, error(503, "Overloaded", type="server_error"), key=KEY_A)
    fake.push("POST", CHAT_PATH, error(429, "Slow down", headers={"Retry-After": "5"}), key=KEY_B)
    assert post_json(pool_client, "/openai", CHAT).status_code == 200
    assert [(a["key"], a["outcome"]) for a in pool_app.records[-1]["attempts"]] == [
        ("alpha", "unavailable"), ("beta", "rate_limited"), ("gamma", "ok")]  # fmt: skip


def test_a_create_call_is_failed_over_at_most_once(pool_app, pool_client, fake):
    """A 503 says nothing against its key: sent again once, not once per key."""
    fake.push("POST", CHAT_PATH, error(503, "Overloaded", type="server_error"), times=None)
    r = post_json(pool_client, "/openai", CHAT)
    assert r.status_code == 503 and error_of(r)["code"] == "OPENAI_PROXY_UPSTREAM_API_ERROR"
    assert used(fake) == ["alpha", "beta"]
    record = pool_app.records[-1]
    assert [a["outcome"] for a in record["attempts"]] == ["unavailable", "unavailable"]
    assert record["retries"] == 1


@pytest.mark.parametrize("status", [400, 404, 409, 413, 422, 500, 502])
def test_other_statuses_are_never_failed_over(pool_app, pool_client, fake, status):
    fake.push("POST", CHAT_PATH, error(status, "No"), key=KEY_A)
    r = post_json(pool_client, "/openai", CHAT)
    assert r.status_code == status
    assert used(fake) == ["alpha"]
    outcome = "client_error" if status < 500 else "server_error"
    assert pool_app.records[-1]["attempts"] == [{"key": "alpha", "outcome": outcome, "status": status}]
    assert health_keys(pool_client)["alpha"]["state"] == "active"


def test_a_connect_error_fails_over(pool_app, pool_client, fake):
    fake.close_idle()
    fake.refuse_connections(1)
    r = post_json(pool_client, "/openai", CHAT)
    assert r.status_code == 200
    assert fake.refused == 1 and used(fake) == ["beta"]
    assert pool_app.records[-1]["attempts"] == [{"key": "alpha", "outcome": "connect_error"},
                                                {"key": "beta", "outcome": "ok", "status": 200}]  # fmt: skip
    assert health_keys(pool_client)["alpha"]["state"] == "active"  # not the key's fault


def test_a_connect_error_on_both_attempts_is_502(pool_app, pool_client, fake):
    fake.close_idle()
    fake.refuse_connections(3)
    r = post_json(pool_client, "/openai", CHAT)
    assert r.status_code == 502 and error_of(r)["code"] == "OPENAI_PROXY_TRANSPORT"
    assert fake.refused == 2 and fake.requests == []


def test_a_connection_lost_after_the_request_was_sent_is_not_failed_over(pool_app, pool_client, fake):
    """Upstream may have started (and billed) the work: never sent twice."""
    fake.push("POST", CHAT_PATH, reset(), key=KEY_A)
    r = post_json(pool_client, "/openai", CHAT)
    assert r.status_code == 502 and error_of(r)["code"] == "OPENAI_PROXY_TRANSPORT"
    assert used(fake) == ["alpha"]
    assert pool_app.records[-1]["attempts"] == [{"key": "alpha", "outcome": "transport_error"}]


def test_a_timeout_waiting_for_headers_is_not_failed_over(pool_app, pool_client, fake):
    fake.push("POST", CHAT_PATH, delay(5), key=KEY_A)
    r = post_json(pool_client, "/openai", {**CHAT, "timeout": 300})
    assert r.status_code == 504
    assert used(fake) == ["alpha"]
    assert pool_app.records[-1]["attempts"] == [{"key": "alpha", "outcome": "timeout"}]


def _broken_stream(req, conn) -> None:
    conn.start_stream()
    conn.event(response_events("gpt-4o-mini")[0], "response.created")
    conn.close()


def test_a_stream_that_breaks_after_its_first_event_is_never_sent_again(pool_app, pool_client, fake):
    fake.push("POST", "/v1/responses", _broken_stream, key=KEY_A)
    r = post_json(pool_client, "/openai2", {**CHAT, "input": "hi", "stream": True})
    text = r.get_data(as_text=True)
    assert r.status_code == 200 and text.startswith("data: {") and "event: error" in text
    assert "[DONE]" not in text
    assert used(fake, "/v1/responses") == ["alpha"]
    assert pool_app.records[-1]["attempts"] == [{"key": "alpha", "outcome": "ok", "status": 200}]
    fake.push("POST", "/v1/responses", _broken_stream, key=KEY_B)
    r = pool_client.post("/v1/responses", data=json.dumps({"model": "m", "input": "hi", "stream": True}),
                         headers=V1)  # fmt: skip
    assert r.status_code == 200 and "[DONE]" not in r.get_data(as_text=True)
    assert used(fake, "/v1/responses") == ["alpha", "beta"]


def test_a_stream_refused_before_it_starts_fails_over(pool_app, pool_client, fake):
    fake.push("POST", "/v1/responses", error(429, "Slow down", headers={"Retry-After": "5"}), key=KEY_A)
    r = post_json(pool_client, "/openai2", {**CHAT, "input": "hi", "stream": True})
    assert r.status_code == 200 and r.get_data(as_text=True).endswith("data: [DONE]\n\n")
    assert used(fake, "/v1/responses") == ["alpha", "beta"]


def test_sdk_road_fails_over_within_its_retries(pool_app, pool_client, fake):
    """Retried reads go through the SDK: a key per SDK attempt, one failover in all."""
    fake.push("GET", "/v1/responses/resp_1", error(401, "Incorrect API key provided"), key=KEY_A)
    r = pool_client.get("/openai2/resp_1", headers=V1)
    assert r.status_code == 200 and r.get_json()["id"] == "resp_1"
    assert used(fake, "/v1/responses/resp_1") == ["alpha", "beta"]
    assert pool_app.records[-1]["attempts"] == [{"key": "alpha", "outcome": "unauthorized", "status": 401},
                                                {"key": "beta", "outcome": "ok", "status": 200}]  # fmt: skip
    # The SDK's own retries (503) each take the next usable key; the failover is spent only once.
    fake.push("GET", "/v1/responses/resp_2", error(503, "Overloaded", type="server_error"), times=2)
    r = pool_client.get("/openai2/resp_2", headers=V1)
    assert r.status_code == 200
    assert used(fake, "/v1/responses/resp_2") == ["gamma", "beta", "gamma"]
    assert pool_app.records[-1]["retries"] == 2


def test_multipart_upload_is_sent_whole_again_on_failover(pool_app, pool_client, fake):
    import hashlib

    audio = bytes(range(256)) * 4000
    fake.push(
        "POST", "/v1/audio/transcriptions", error(429, "Slow down", headers={"Retry-After": "5"}), key=KEY_A
    )
    r = pool_client.post(
        "/openai/audio/transcriptions",
        data={"security_key": SECURITY_KEY, "file": (__import__("io").BytesIO(audio), "a.mp3")},
        content_type="multipart/form-data",
    )
    assert r.status_code == 200
    assert f"size={len(audio)} sha256={hashlib.sha256(audio).hexdigest()}" in r.get_json()["text"]
    assert used(fake, "/v1/audio/transcriptions") == ["alpha", "beta"]


@pytest.mark.parametrize("size", [10, 400_000])  # in memory, and spooled to disk
def test_a_v1_upload_is_sent_whole_again_on_failover(pool_app, pool_client, fake, size):
    """`/v1/files` bodies are received whole before they go upstream, so a refused one can go again."""
    fake.push("POST", "/v1/files", error(429, "Slow down", headers={"Retry-After": "5"}), key=KEY_A)
    data = b"x" * size
    body = b"--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--b\r\n" \
           b"Content-Disposition: form-data; name=\"file\"; filename=\"f.jsonl\"\r\n\r\n" + data + b"\r\n--b--\r\n"  # fmt: skip
    r = pool_client.post(
        "/v1/files", data=body, headers={**V1, "Content-Type": "multipart/form-data; boundary=b"}
    )
    assert r.status_code == 200 and r.get_json()["bytes"] == size
    assert used(fake, "/v1/files") == ["alpha", "beta"]
    assert [req.body for req in fake.matching("/v1/files")] == [body, body]
    assert pool_app.records[-1]["attempts"] == [{"key": "alpha", "outcome": "rate_limited", "status": 429},
                                                {"key": "beta", "outcome": "ok", "status": 200}]  # fmt: skip


def test_v1_json_calls_fail_over(pool_app, pool_client, fake):
    fake.push("POST", CHAT_PATH, error(429, "Slow down", headers={"Retry-After": "5"}), key=KEY_A)
    r = pool_client.post(CHAT_PATH, data=json.dumps(CHAT), headers=V1)
    assert r.status_code == 200 and r.get_json() == chat_completion("gpt-4o-mini")
    assert used(fake) == ["alpha", "beta"]


# ---- what operators see ---------------------------------------------------------------------------


def test_health_metrics_and_log_errors_show_the_keys_never_their_secrets(pool_app, pool_client, fake, caplog):
    fake.push("POST", CHAT_PATH, error(429, f"Rate limit reached for {KEY_A}", headers={"Retry-After": "30"}),
              key=KEY_A)  # fmt: skip
    fake.push("POST", CHAT_PATH, error(401, f"Incorrect API key provided: {KEY_C}"), key=KEY_C)
    before = samples(pool_client.get("/metrics", headers=AUTH).get_data(as_text=True))
    for _ in range(3):
        assert post_json(pool_client, "/openai", CHAT).status_code == 200
    keys = health_keys(pool_client)
    assert [(k["name"], k["last4"], k["state"]) for k in keys.values()] == [
        ("alpha", "AAAA", "resting"), ("beta", "BBBB", "active"), ("gamma", "CCCC", "revoked")]  # fmt: skip
    assert keys["beta"] == {"name": "beta", "last4": "BBBB", "weight": 1, "inFlight": 0, "state": "active",
                            "restingUntil": None}  # fmt: skip

    text = pool_client.get("/metrics", headers=AUTH).get_data(as_text=True)
    after = samples(text)

    def calls(key: str, outcome: str) -> float:
        name = "openai_proxy_upstream_key_calls_total"
        return value(after, name, key=key, outcome=outcome) - value(before, name, key=key, outcome=outcome)

    assert (calls("alpha", "rate_limited"), calls("beta", "ok"), calls("gamma", "unauthorized")) == (1, 3, 1)
    assert calls("alpha", "ok") == calls("gamma", "ok") == 0
    gauges = {(name, dict(labels)["key"]): v for (name, labels), v in after.items() if "_key_" in name and
              not name.endswith("_total")}  # fmt: skip
    assert {k: v for k, v in gauges.items() if k[0] != "openai_proxy_upstream_key_resting_seconds"} == {
        (f"openai_proxy_upstream_key_{g}", n): float(g == "revoked" and n == "gamma")
        for g in ("in_flight", "revoked") for n in ("alpha", "beta", "gamma")}  # fmt: skip
    resting = {n: gauges["openai_proxy_upstream_key_resting_seconds", n] for n in ("alpha", "beta", "gamma")}
    assert 0 < resting["alpha"] <= 30 and resting["beta"] == resting["gamma"] == 0

    page = pool_client.get("/log_errors", headers=AUTH).get_data(as_text=True)
    failovers = [rid for kind, rid, _ in rows(page) if kind == "retry"]
    assert len(failovers) == 2
    assert "key alpha: rate_limited (HTTP 429); sent again with key beta" in page
    assert "key gamma: unauthorized (HTTP 401); sent again with key" in page

    runtime = pool_client.get("/debug/runtime", headers=AUTH).get_json()["config"]
    assert runtime["upstream_keys"] == [
        {"name": n, "weight": 1, "models": None} for n in ("alpha", "beta", "gamma")
    ]
    everything = "\n".join([text, page, json.dumps(runtime), json.dumps(keys), caplog.text,
                            json.dumps(pool_app.records)])  # fmt: skip
    for key in (KEY_A, KEY_B, KEY_C):
        assert key not in everything


def test_a_pool_key_echoed_by_upstream_is_masked(make_app, fake):
    app = make_app(OPENAI_API_KEYS=f"solo={KEY_A}", OPENAI_API_KEY=None)
    fake.push("POST", CHAT_PATH, error(401, f"Incorrect API key provided: {KEY_A}."))
    r = post_json(app.test_client(), "/openai", CHAT)
    assert r.status_code == 401
    assert error_of(r)["message"] == "401 Incorrect API key provided: ***AAAA."
    assert KEY_A not in json.dumps(app.records)


def test_one_configured_key_is_not_a_pool(app, client, fake, records):
    assert post_json(client, "/openai", CHAT).status_code == 200
    assert fake.keys(CHAT_PATH) == [UPSTREAM_KEY]
    assert records[-1]["attempts"] is None
    fake.push("POST", CHAT_PATH, error(429, "Slow down", headers={"Retry-After": "30"}))
    assert post_json(client, "/openai", CHAT).status_code == 429
    assert post_json(client, "/openai", CHAT).status_code == 200  # no rest without a pool
    health = client.get("/health", headers=AUTH).get_json()
    assert health["upstreamKeys"] == {"pooled": False, "allRevoked": False, "keys": []}
    assert app.extensions["openai_proxy"].upstream.pool is None


# ---- configuration --------------------------------------------------------------------------------


def test_keys_from_both_variables_with_names_and_default_names():
    config = build_config(
        {"OPENAI_API_KEY": "sk-single-key-5555", "OPENAI_API_KEYS": f" alpha={KEY_A} ,{KEY_B},,"}
    )
    assert [(k.name, k.key, k.weight, k.models) for k in config.upstream_keys] == [
        ("key-5555", "sk-single-key-5555", 1, None), ("alpha", KEY_A, 1, None), ("key-BBBB", KEY_B, 1, None)]  # fmt: skip
    assert KEY_A not in repr(config)
    assert not any(
        "OPENAI_API_KEY is not set" in w for w in build_config({"OPENAI_API_KEYS": KEY_A}).warnings
    )
    # Listed in both: one key, under the name the list gives it.
    config = build_config({"OPENAI_API_KEY": KEY_A, "OPENAI_API_KEYS": f"main={KEY_A},{KEY_B}"})
    assert [k.name for k in config.upstream_keys] == ["main", "key-BBBB"]
    assert build_config({"OPENAI_API_KEY": KEY_A, "OPENAI_API_KEYS": " , "}).upstream_keys == ()
    assert build_config({"OPENAI_API_KEY": KEY_A}).upstream_keys == ()


@pytest.mark.parametrize(
    ("listed", "message"),
    [
        (f"a={KEY_A},a={KEY_B}", "the name 'a' is used twice"),
        (f"a={KEY_A},b={KEY_A}", "already listed as 'a'"),
        (f"bad name={KEY_A}", "is not 1 to 64 of"),
        (f"{'n' * 65}={KEY_A}", "is not 1 to 64 of"),
        ("a=", "at least 4 characters"),
        ("a=sk-with space", "one token of printable characters"),
        ("a=sk-\u00e9t\u00e9-key", "one token of printable characters"),
        ("=sk-nameless-key", "the name '' is not"),
    ],
)
def test_bad_key_lists_stop_the_server_naming_the_variable(listed, message):
    with pytest.raises(ConfigError) as caught:
        build_config({"OPENAI_API_KEYS": listed})
    assert "OPENAI_API_KEYS entry" in str(caught.value) and message in str(caught.value)
    assert KEY_A not in str(caught.value) and KEY_B not in str(caught.value)


def test_keys_shorter_than_12_characters_show_no_tail_anywhere(make_app, fake):
    """A tail of 4 is most of a short key: not on /health, in default names or metric labels."""
    short, eleven, long = "sk-short10", "sk-eleven11", "sk-twelve-12"
    config = build_config({"OPENAI_API_KEYS": f"{short},named={eleven},{long}"})
    assert [(k.name, k.last4) for k in config.upstream_keys] == [
        ("key-1", None), ("named", None), ("key-e-12", "e-12")]  # fmt: skip
    app = make_app(OPENAI_API_KEYS=f"{short},named={eleven},{long}", OPENAI_API_KEY=None, **PAGES)
    client = app.test_client()
    fake.push("POST", CHAT_PATH, error(401, f"Incorrect API key provided: {short}"), key=short)
    assert post_json(client, "/openai", CHAT).status_code == 200
    keys = health_keys(client)
    assert [(k["name"], k["last4"]) for k in keys.values()] == [
        ("key-1", None), ("named", None), ("key-e-12", "e-12")]  # fmt: skip
    metrics = client.get("/metrics", headers=AUTH).get_data(as_text=True)
    assert 'key="key-1"' in metrics
    page = client.get("/log_errors", headers=AUTH).get_data(as_text=True)
    everything = "\n".join([metrics, page, json.dumps(keys), json.dumps(app.records)])
    for key in (short, eleven):
        assert key[-4:] not in everything
    # Listed again without a name, a short key is still one key.
    config = build_config({"OPENAI_API_KEY": short, "OPENAI_API_KEYS": f"{long},{short}"})
    assert [k.name for k in config.upstream_keys] == ["key-1", "key-e-12"]


def test_a_bad_single_key_with_a_list_is_named(fake):
    with pytest.raises(ConfigError, match="OPENAI_API_KEY: a key must be one token"):
        build_config({"OPENAI_API_KEY": "sk bad", "OPENAI_API_KEYS": KEY_A})
