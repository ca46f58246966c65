"""Budgets cannot be escaped (contract §14): an unpriced model is refused for a budgeted client, calls
in flight hold their estimated cost, a cut stream is charged, and upstream's usage is checked; through
the HTTP surface, and with real gunicorn workers and Redis for the concurrent case."""

from __future__ import annotations

import io
import json

import gevent
import gevent.event
import pytest
import requests

from openai_proxy.limits import LocalLimitStore
from openai_proxy.limits.shared import RedisLimitStore
from tests.conftest import SECURITY_KEY, error_of, post_json
from tests.support.fake_upstream import chat_completion, default_handler, delay, error, response_events, sse
from tests.test_client_limits import FREE_KEY, LIMITED_KEY, as_client, clients_file

AUTH = {"Authorization": f"Bearer {SECURITY_KEY}"}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
# gpt-4o-mini: $0.15 in, $0.075 cached, $0.60 out. The fake's default answer: 25 prompt tokens (3 of
# them cached) and 7 completion tokens = 22 x 0.15 + 3 x 0.075 + 7 x 0.60 = 7.725 / 1e6.
FAKE_CHAT_COST = 7.725e-06


def send(obj, status: int = 200):
    return lambda req, conn: conn.send_json(status, obj)


def sent_tokens(fake, path: str) -> int:
    """The documented input estimate: the bytes that went upstream / 4, rounded up (the proxy may add
    to the client's body: a `safety_identifier`, `stream_options`)."""
    return -(-len(fake.last(path).body) // 4)


def estimate_of(fake, path: str, output_tokens: int, input_price: float, output_price: float) -> float:
    """The documented estimate: the input estimate, and the output asked for, at the model's prices."""
    return round((sent_tokens(fake, path) * input_price + output_tokens * output_price) / 1e6, 10)


# ---- unpriced models ---------------------------------------------------------------------------------


def test_an_unpriced_model_is_refused_for_a_budgeted_client_on_both_route_families(make_app, fake, tmp_path):
    app = make_app(OPENAI_PROXY_CLIENTS_FILE=clients_file(tmp_path, daily_usd=5.0))
    client = app.test_client()
    body = {**CHAT, "model": "my-local-llama"}
    legacy = post_json(client, "/openai", body, headers=as_client(LIMITED_KEY))
    assert legacy.status_code == 403
    error = error_of(legacy)
    assert (error["type"], error["code"]) == ("forbidden", "OPENAI_PROXY_UNPRICED_MODEL")
    assert error["message"] == (
        "Model 'my-local-llama' has no price, and client 'limited' has a budget: its cost could not be "
        "counted (the operator can price it in OPENAI_PROXY_PRICES_FILE, or give a [default] price)"
    )
    v1 = post_json(client, "/v1/chat/completions", body, headers=as_client(LIMITED_KEY))
    assert v1.status_code == 403
    assert set(v1.get_json()["error"]) == {"message", "type", "param", "code"}
    assert (v1.get_json()["error"]["type"], v1.get_json()["error"]["code"]) == (
        "invalid_request_error",
        "model_not_priced",
    )
    stream = post_json(client, "/openai2", {"model": "o5-preview", "input": "x", "stream": True},
                       headers=as_client(LIMITED_KEY))  # fmt: skip
    assert stream.status_code == 403 and error_of(stream)["code"] == "OPENAI_PROXY_UNPRICED_MODEL"
    assert fake.count("/v1/chat/completions") == 0 and fake.count("/v1/responses") == 0
    assert [(r["status"], r["result"], r["client"]) for r in app.records] == [
        (403, "forbidden", "limited")
    ] * 3
    # A priced model (and its dated snapshot) is served; a client without a budget may call anything.
    for model in ("gpt-4o-mini", "gpt-4o-mini-2024-07-18"):
        r = post_json(client, "/openai", {**CHAT, "model": model}, headers=as_client(LIMITED_KEY))
        assert r.status_code == 200
    r = post_json(client, "/openai", body, headers=as_client(FREE_KEY))
    assert r.status_code == 200 and app.records[-1]["costUsd"] is None


@pytest.mark.parametrize(
    ("path", "body", "named"),
    [
        ("/v1/images/generations", {"model": "gpt-image-1", "prompt": "a cat"}, "gpt-image-1"),
        ("/v1/audio/speech", {"model": "tts-1", "input": "hello", "voice": "alloy"}, "tts-1"),
        ("/v1/completions", {"model": "davinci-002", "prompt": "Say this"}, "davinci-002"),
        ("/v1/fine_tuning/jobs", {"model": "babbage-002", "training_file": "file-abc"}, "babbage-002"),
        # A priced model on top, an unpriced one inside a tool: the tool's model runs too.
        ("/v1/responses", {"model": "gpt-4o-mini", "input": "draw",
                           "tools": [{"type": "image_generation", "model": "gpt-image-1"}]}, "gpt-image-1"),
    ],
)  # fmt: skip
def test_an_unpriced_model_is_refused_for_a_budgeted_client_on_every_route(
    make_app, fake, tmp_path, path, body, named
):
    app = make_app(OPENAI_PROXY_CLIENTS_FILE=clients_file(tmp_path, daily_usd=5.0))
    r = post_json(app.test_client(), path, body, headers=as_client(LIMITED_KEY))
    assert r.status_code == 403
    assert (r.get_json()["error"]["code"], r.get_json()["error"]["type"]) == (
        "model_not_priced",
        "invalid_request_error",
    )
    assert r.get_json()["error"]["message"].startswith(f"Model {named!r} has no price, and client 'limited'")
    assert fake.requests == []  # upstream never saw it
    assert (app.records[-1]["status"], app.records[-1]["result"]) == (403, "forbidden")


def test_a_budgeted_call_that_names_no_model_is_refused(make_app, fake, tmp_path):
    """A stored prompt chooses its model upstream: its cost could not be judged before it runs."""
    app = make_app(OPENAI_PROXY_CLIENTS_FILE=clients_file(tmp_path, daily_usd=5.0))
    r = post_json(app.test_client(), "/v1/responses", {"prompt": {"id": "pmpt_1"}, "input": "x"},
                  headers=as_client(LIMITED_KEY))  # fmt: skip
    assert r.status_code == 403 and r.get_json()["error"]["code"] == "model_not_priced"
    assert r.get_json()["error"]["message"].startswith("The call names no model (upstream would choose one)")
    assert fake.requests == []


def test_a_client_with_only_rate_limits_may_call_an_unpriced_model(make_app, fake, tmp_path):
    app = make_app(OPENAI_PROXY_CLIENTS_FILE=clients_file(tmp_path, rpm=5, tpm=1000))
    r = post_json(app.test_client(), "/v1/chat/completions", {**CHAT, "model": "my-local-llama"},
                  headers=as_client(LIMITED_KEY))  # fmt: skip
    assert r.status_code == 200
    assert (app.records[-1]["usageSource"], app.records[-1]["costUsd"]) == ("upstream", None)


def test_a_default_price_admits_and_prices_every_model_without_a_row(make_app, fake, tmp_path):
    prices = tmp_path / "prices.toml"
    prices.write_text("[default]\ninput = 1.0\noutput = 2.0\n")
    app = make_app(OPENAI_PROXY_CLIENTS_FILE=clients_file(tmp_path, daily_usd=5.0),
                   OPENAI_PROXY_PRICES_FILE=str(prices))  # fmt: skip
    client = app.test_client()
    body = {**CHAT, "model": "my-local-llama"}
    for path in ("/openai", "/v1/chat/completions"):
        r = post_json(client, path, body, headers=as_client(LIMITED_KEY))
        assert r.status_code == 200
        # 25 prompt tokens (no cached rate: at input) x 1 + 7 x 2 = 39 / 1e6
        assert (app.records[-1]["usageSource"], app.records[-1]["costUsd"]) == ("upstream", 3.9e-05)
    # Rows of their own keep their own price.
    assert post_json(client, "/openai", CHAT, headers=as_client(LIMITED_KEY)).status_code == 200
    assert app.records[-1]["costUsd"] == FAKE_CHAT_COST


# ---- reservations ------------------------------------------------------------------------------------


def held_upstream(fake, path: str = "/v1/chat/completions", then=default_handler):
    """Hold the next call at the fake until the returned event is set; the list says when it arrived."""
    go, arrived = gevent.event.Event(), []

    def handler(req, conn):
        arrived.append(req)
        go.wait(30)
        then(req, conn)

    fake.push("POST", path, handler)
    return go, arrived


def wait_until(condition, timeout_s: float = 10.0) -> None:
    with gevent.Timeout(timeout_s):
        while not condition():
            gevent.sleep(0.01)


def test_a_call_in_flight_holds_its_estimate_until_it_settles(make_app, fake, tmp_path):
    # $0.001 a day; a call asking for 2000 output tokens of gpt-4o-mini may cost ~$0.0012.
    app = make_app(OPENAI_PROXY_CLIENTS_FILE=clients_file(tmp_path, daily_usd=0.001))
    store = app.extensions["openai_proxy"].limits
    body = {**CHAT, "max_tokens": 2000}
    go, arrived = held_upstream(fake)
    first = gevent.spawn(post_json, app.test_client(), "/openai", body, headers=as_client(LIMITED_KEY))
    wait_until(lambda: arrived)
    estimate = estimate_of(fake, "/v1/chat/completions", 2000, 0.15, 0.60)
    assert store.reserved("limited") == pytest.approx(estimate)
    # Nothing is spent yet, but the call in flight holds more than the budget: the next one waits.
    second = post_json(app.test_client(), "/openai", CHAT, headers=as_client(LIMITED_KEY))
    assert second.status_code == 429 and second.headers["Retry-After"] == "1"
    assert error_of(second)["message"] == (
        "Client 'limited' is past its limit of 0.001 USD budget for today (UTC) with what its calls in "
        "flight may spend; retry in 1 s"
    )
    v1 = post_json(app.test_client(), "/v1/chat/completions", CHAT, headers=as_client(LIMITED_KEY))
    assert v1.status_code == 429 and v1.get_json()["error"]["code"] == "insufficient_quota"
    go.set()
    assert first.get(timeout=10).status_code == 200
    # Settled at its real cost; nothing held any more; $0.000008 of $0.001 spent: admitted again.
    assert app.records[-1]["costUsd"] == FAKE_CHAT_COST and app.records[-1]["usageSource"] == "upstream"
    assert store.reserved("limited") == 0.0
    assert post_json(app.test_client(), "/openai", CHAT, headers=as_client(LIMITED_KEY)).status_code == 200
    assert fake.count("/v1/chat/completions") == 2


@pytest.mark.parametrize("failure", ["status", "reset"])
def test_a_failed_call_gives_its_reservation_back(make_app, fake, tmp_path, failure):
    from tests.support.fake_upstream import reset

    app = make_app(OPENAI_PROXY_CLIENTS_FILE=clients_file(tmp_path, daily_usd=0.001))
    store = app.extensions["openai_proxy"].limits
    handler = error(500, "boom") if failure == "status" else reset()
    go, arrived = held_upstream(fake, then=handler)
    first = gevent.spawn(post_json, app.test_client(), "/v1/chat/completions", {**CHAT, "max_tokens": 2000},
                         headers=as_client(LIMITED_KEY))  # fmt: skip
    wait_until(lambda: arrived)
    assert store.reserved("limited") > 0.001
    go.set()
    assert first.get(timeout=10).status_code in (500, 502)
    record = app.records[-1]
    assert (record["usage"], record["usageSource"], record["costUsd"]) == (None, "unknown", None)
    assert store.reserved("limited") == 0.0
    assert post_json(app.test_client(), "/openai", CHAT, headers=as_client(LIMITED_KEY)).status_code == 200


def test_a_request_that_never_settles_does_not_hold_the_budget(make_app, fake, tmp_path):
    import gc

    from openai_proxy.limits import Reservation
    from openai_proxy.record import RequestRecord

    app = make_app(OPENAI_PROXY_CLIENTS_FILE=clients_file(tmp_path, daily_usd=1.0))
    store = app.extensions["openai_proxy"].limits
    record = RequestRecord(endpoint="/openai", method="POST")
    assert store.admit("limited", store_limits(app), reserve=Reservation(record.request_id, 2.0)).allowed
    store.forget_with(record, record.request_id)
    assert store.reserved("limited") == 2.0
    del record
    gc.collect()
    # Its record is gone without a completion: the next write of the client's entry drops it.
    assert post_json(app.test_client(), "/openai", CHAT, headers=as_client(LIMITED_KEY)).status_code == 200
    assert store.reserved("limited") == 0.0


def store_limits(app):
    return app.extensions["openai_proxy"].clients.get("limited").limits


# ---- streams cut short, usage that is not usage --------------------------------------------------------


def cut_stream(app, path: str, body: dict, key: str) -> dict:
    """Start a stream, read until its first text delta, and leave: the record it leaves behind."""
    r = post_json(app.test_client(), path, body, headers=as_client(key), buffered=False)
    assert r.status_code == 200
    seen = b""
    for piece in r.response:
        seen += piece
        if b"response.output_text.delta" in seen:
            break
    r.close()
    return app.records[-1]


@pytest.mark.parametrize("path", ["/openai2", "/v1/responses"])
def test_a_stream_the_client_cut_before_usage_is_charged_its_estimate(make_app, fake, tmp_path, path):
    events = response_events("o4-mini", usage={"input_tokens": 10, "output_tokens": 5, "total_tokens": 15})

    def handler(req, conn):
        conn.start_stream()
        for event in events[:-1]:  # everything but response.completed, which carries the usage
            conn.event(event, event["type"])
        conn.wait(30)

    fake.push("POST", "/v1/responses", handler)
    app = make_app(OPENAI_PROXY_CLIENTS_FILE=clients_file(tmp_path, daily_usd=0.005))
    body = {"model": "o4-mini", "input": "Write a long poem.", "stream": True, "max_output_tokens": 1000}
    record = cut_stream(app, path, body, LIMITED_KEY)
    assert (record["cancelled"], record["status"], record["client"]) == (True, 499, "limited")
    # o4-mini ($1.10 in, $4.40 out): the body's bytes / 4 in, the 1000 tokens it asked for out.
    tokens = sent_tokens(fake, "/v1/responses")
    assert record["usageSource"] == "estimated"
    assert record["usage"] == {
        "prompt_tokens": tokens,
        "completion_tokens": 1000,
        "total_tokens": tokens + 1000,
    }
    assert record["costUsd"] == round((tokens * 1.10 + 1000 * 4.40) / 1e6, 10)
    # Charged against the budget: $0.0044 of $0.005 spent, and what a second cut would cost does not fit.
    assert app.extensions["openai_proxy"].limits.reserved("limited") == 0.0
    r = post_json(app.test_client(), "/openai", CHAT, headers=as_client(LIMITED_KEY))
    assert r.status_code == 200  # 0.0044 < 0.005
    r = post_json(app.test_client(), "/openai", CHAT, headers=as_client(LIMITED_KEY))
    assert r.status_code == 200  # estimates settle at the real cost: still under
    fake.push("POST", "/v1/responses", handler)
    cut_stream(app, path, body, LIMITED_KEY)
    r = post_json(app.test_client(), "/openai", CHAT, headers=as_client(LIMITED_KEY))
    assert r.status_code == 429 and error_of(r)["code"] == "OPENAI_PROXY_CLIENT_LIMIT"


@pytest.mark.parametrize("path", ["/openai2", "/v1/responses"])
def test_a_response_that_failed_without_usage_is_not_charged(app, fake, path):
    events = response_events("o4-mini", final="response.failed")
    events[-1]["response"].update(usage=None, error={"code": "server_error", "message": "It broke."})
    fake.push("POST", "/v1/responses", sse(events, event_names=True))
    r = post_json(app.test_client(), path, {"model": "o4-mini", "input": "x", "stream": True}, headers=AUTH)
    assert r.status_code == 200 and b"response.failed" in r.data
    record = app.records[-1]
    assert record["result"] == "upstream_api_error"
    assert (record["usage"], record["usageSource"], record["costUsd"]) == (None, "unknown", None)


def test_an_answer_that_reports_no_usage_is_charged_its_estimate(make_app, fake, tmp_path):
    # A transcript in a text format says nothing of its duration: a budgeted client would transcribe
    # for ever. whisper-1 ($0.006 a minute): 960 000 bytes at 16 kB a second = 60 s = $0.006.
    app = make_app(OPENAI_PROXY_CLIENTS_FILE=clients_file(tmp_path, daily_usd=0.01))
    client = app.test_client()
    for status in (200, 200, 429):
        fake.push(
            "POST", "/v1/audio/transcriptions", lambda req, conn: conn.send(200, b"hello", "text/plain")
        )
        r = client.post(
            "/openai/audio/transcriptions",
            data={"file": (io.BytesIO(b"\0" * 960_000), "a.wav"), "response_format": "text"},
            headers=as_client(LIMITED_KEY),
            content_type="multipart/form-data",
        )
        assert r.status_code == status
    record = app.records[-2]
    assert (record["usageSource"], record["costUsd"]) == ("estimated", 0.006)


def test_an_estimate_does_not_raise_the_logs_token_maxima(app, fake):
    from tests.support.fake_upstream import chat_chunks
    from tests.support.logpage import AUTH as PAGE_AUTH
    from tests.support.logpage import counters

    fake.push("POST", "/v1/chat/completions", sse(chat_chunks("gpt-4o-mini", True)[:3], end="drop"))
    body = {**CHAT, "stream": True, "max_tokens": 900}
    assert post_json(app.test_client(), "/v1/chat/completions", body, headers=AUTH).status_code == 200
    record = app.records[-1]
    assert record["usageSource"] == "estimated" and record["usage"]["completion_tokens"] == 900
    html = app.test_client().get("/log", headers=PAGE_AUTH).get_data(as_text=True)
    # "Max completion tokens" is what upstream reported; an estimate is not a count.
    assert counters(html)["Max completion tokens"] == "0" and counters(html)["Request count"] == "1"


BAD_USAGE = [
    {"prompt_tokens": -1000000, "completion_tokens": 10, "total_tokens": -999990},
    {"prompt_tokens": 2**53, "completion_tokens": 10, "total_tokens": 2**53 + 10},
    {"prompt_tokens": 10**30, "completion_tokens": 10},
    {"prompt_tokens": 12.0, "completion_tokens": 10, "total_tokens": 22},
    {"prompt_tokens": "12", "completion_tokens": 10, "total_tokens": 22},
    {"prompt_tokens": True, "completion_tokens": 10},
    {"prompt_tokens": 12, "completion_tokens": -3, "total_tokens": 9},
    {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15, "prompt_tokens_details": {"cached_tokens": -5}},
    {"prompt_tokens": 12, "completion_tokens": 3, "completion_tokens_details": {"reasoning_tokens": 1.5}},
    {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": "15"},
    "lots",
]  # fmt: skip


@pytest.mark.parametrize("usage", BAD_USAGE, ids=range(len(BAD_USAGE)))
@pytest.mark.parametrize("path", ["/openai", "/v1/chat/completions"])
def test_usage_that_is_not_counts_is_unknown_never_a_negative_cost(app, fake, path, usage):
    fake.push("POST", "/v1/chat/completions", send(chat_completion("gpt-4o-mini", usage=usage)))
    r = post_json(app.test_client(), path, CHAT, headers=AUTH)
    assert r.status_code == 200
    record = app.records[-1]
    assert (record["usage"], record["usageSource"], record["costUsd"]) == (None, "unknown", None)


@pytest.mark.parametrize("seconds", [-60, 2**53, "60", None, [1]])
def test_a_duration_that_is_not_one_is_unknown(app, fake, seconds):
    answer = {"text": "hi", "usage": {"type": "duration", "seconds": seconds}}
    fake.push("POST", "/v1/audio/transcriptions", send(answer))
    r = app.test_client().post(
        "/openai/audio/transcriptions",
        data={"file": (io.BytesIO(b"RIFF...."), "a.wav")},
        headers=AUTH,
        content_type="multipart/form-data",
    )
    assert r.status_code == 200
    record = app.records[-1]
    assert (record["usage"], record["usageSource"], record["costUsd"]) == (None, "unknown", None)


@pytest.mark.parametrize("path", ["/openai2", "/v1/responses"])
def test_a_stream_whose_final_usage_is_not_counts_is_unknown(app, fake, path):
    events = response_events(
        "o4-mini", usage={"input_tokens": -1000000, "output_tokens": 5, "total_tokens": 5}
    )
    fake.push("POST", "/v1/responses", sse(events, event_names=True))
    r = post_json(app.test_client(), path, {"model": "o4-mini", "input": "x", "stream": True}, headers=AUTH)
    assert r.status_code == 200 and b"response.completed" in r.data
    record = app.records[-1]
    assert (record["usage"], record["usageSource"], record["costUsd"]) == (None, "unknown", None)


def test_negative_usage_never_lowers_a_budgets_spend(make_app, fake, tmp_path):
    # $0.00001 a day; each good call costs $0.000007725.
    app = make_app(OPENAI_PROXY_CLIENTS_FILE=clients_file(tmp_path, daily_usd=0.00001))
    client = app.test_client()
    assert post_json(client, "/openai", CHAT, headers=as_client(LIMITED_KEY)).status_code == 200
    # Was costUsd -1.25, and the day's spend went negative: the client could go on for ever.
    negative = {"prompt_tokens": -1000000, "completion_tokens": 7, "total_tokens": -999993}
    fake.push("POST", "/v1/chat/completions", send(chat_completion("gpt-4o-mini", usage=negative)))
    assert post_json(client, "/openai", CHAT, headers=as_client(LIMITED_KEY)).status_code == 200
    assert app.records[-1]["costUsd"] is None
    assert post_json(client, "/openai", CHAT, headers=as_client(LIMITED_KEY)).status_code == 200
    assert post_json(client, "/openai", CHAT, headers=as_client(LIMITED_KEY)).status_code == 429


# ---- many calls at once, on several workers and hosts ----------------------------------------------------

# Each call asks for 2000 output tokens of gpt-4o-mini and upstream reports 50 in and 2000 out:
# 50 x 0.15 + 2000 x 0.60 = $0.0012075 a call. The budget is $0.01: about 8 calls.
BIG_CALL = {**CHAT, "max_tokens": 2000}
BIG_USAGE = {"prompt_tokens": 50, "completion_tokens": 2000, "total_tokens": 2050}
BIG_CALL_COST = 0.0012075
BUDGET = 0.01


def spend_of(log_text: str, client: str) -> tuple[float, int]:
    """USD charged to `client` by the completion records in a server's log, and how many were charged."""
    costs = [entry["costUsd"] for line in log_text.splitlines() if line.startswith('{"event":"completion"')
             if (entry := json.loads(line))["client"] == client and entry["costUsd"]]  # fmt: skip
    return sum(costs), len(costs)


def twenty_at_once(urls: list[str]) -> list[int]:
    jobs = [gevent.spawn(requests.post, urls[i % len(urls)] + "/openai", json=BIG_CALL,
                         headers=as_client(LIMITED_KEY), timeout=60) for i in range(20)]  # fmt: skip
    gevent.joinall(jobs, raise_error=True)
    return [job.value.status_code for job in jobs]


def wait_for_records(servers, count: int) -> tuple[float, int]:
    with gevent.Timeout(20):
        while True:
            found = [spend_of(server.log_text(), "limited") for server in servers]
            spent, charged = sum(f[0] for f in found), sum(f[1] for f in found)
            if charged >= count:
                return spent, charged
            gevent.sleep(0.05)


@pytest.mark.gunicorn
def test_twenty_simultaneous_calls_spend_at_most_the_budget_and_one_call(gunicorn_server, fake, tmp_path):
    # Slow upstream: every call is in flight when the others are judged.
    fake.push("POST", "/v1/chat/completions", delay(1.0, send(chat_completion("gpt-4o-mini", usage=BIG_USAGE))),
              times=None)  # fmt: skip
    server = gunicorn_server(workers=2, OPENAI_PROXY_CLIENTS_FILE=clients_file(tmp_path, daily_usd=BUDGET))
    statuses = twenty_at_once([server.url])
    served = statuses.count(200)
    assert sorted(statuses) == [200] * served + [429] * (20 - served)
    assert fake.count("/v1/chat/completions") == served
    spent, charged = wait_for_records([server], served)
    assert charged == served
    # Before reservations all 20 ran ($0.024, 2.4 x the budget). Now: at most the budget and one call,
    # and the budget was used to within one call (estimates run a little above the real cost).
    assert BUDGET - BIG_CALL_COST < spent <= BUDGET + BIG_CALL_COST, (served, spent)
    print(f"\n20 calls, budget ${BUDGET}: {served} served, ${spent:.7f} spent "
          f"(overshoot ${spent - BUDGET:.7f}, {(spent - BUDGET) / BIG_CALL_COST:.2f} call)")  # fmt: skip
    # Every settled call gave its reservation back, in whichever worker it ran.
    store = LocalLimitStore(str(tmp_path / "openai-proxy.sqlite3-limits"))
    assert store.reserved("limited") == 0.0
    store.close()
    # The day is spent: the next call is refused until tomorrow.
    r = requests.post(server.url + "/openai", json=CHAT, headers=as_client(LIMITED_KEY), timeout=30)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 1


@pytest.mark.gunicorn
def test_twenty_simultaneous_calls_on_two_hosts_sharing_redis(gunicorn_server, fake, tmp_path, redis_server):
    fake.push("POST", "/v1/chat/completions", delay(1.0, send(chat_completion("gpt-4o-mini", usage=BIG_USAGE))),
              times=None)  # fmt: skip
    path = clients_file(tmp_path, daily_usd=BUDGET)
    hosts = [gunicorn_server(workers=2, OPENAI_PROXY_CLIENTS_FILE=path, OPENAI_PROXY_LIMITS_URI=redis_server.url,
                             OPENAI_PROXY_RUNTIME_DIR=str(tmp_path / f"host{i}"),
                             OPENAI_PROXY_LOG_DB=str(tmp_path / f"host{i}.sqlite3")) for i in range(2)]  # fmt: skip
    statuses = twenty_at_once([host.url for host in hosts])
    served = statuses.count(200)
    assert served + statuses.count(429) == 20 and fake.count("/v1/chat/completions") == served
    spent, charged = wait_for_records(hosts, served)
    assert charged == served
    assert spent <= BUDGET + BIG_CALL_COST, (served, spent)
    print(f"\n20 calls on 2 hosts, budget ${BUDGET}: {served} served, ${spent:.7f} spent")
    # In Redis, a worker writes its reservations before Redis has judged them all, so a burst can be
    # held below the budget by the estimates still being judged (fail closed): 7 to 9 served. Nothing
    # is lost: once they settle, calls one at a time spend the rest, to within one call.
    while True:
        r = requests.post(hosts[served % 2].url + "/openai", json=BIG_CALL, headers=as_client(LIMITED_KEY),
                          timeout=30)  # fmt: skip
        if r.status_code == 429:
            break
        assert r.status_code == 200, r.text
        served += 1
        spent, charged = wait_for_records(hosts, served)
    assert int(r.headers["Retry-After"]) > 1  # the day is spent, not held by calls in flight
    assert BUDGET - BIG_CALL_COST < spent <= BUDGET + BIG_CALL_COST, (served, spent)
    store = RedisLimitStore(redis_server.url, redis_server.url, LocalLimitStore(str(tmp_path / "fallback")))
    assert store.reserved("limited") == 0.0
    store.close()
