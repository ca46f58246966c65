"""SSE on /openai2 and GET /openai2/<id>?stream=true, through the test client."""

from __future__ import annotations

import json
import time

import pytest

from openai_proxy.errors import UpstreamTransport
from openai_proxy.stream.sse import SSEParser
from tests.conftest import SECURITY_KEY, error_of, post_json, safety_id
from tests.support.fake_upstream import chat_chunks, delay, error, raw, reset, response_events, sse

STREAM_BODY = {"security_key": SECURITY_KEY, "model": "gpt-4o", "input": "Write a poem.", "stream": True}


def frames_of(events) -> bytes:
    return b"".join(b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n" for e in events)


def stream(client, body=None, **kwargs):
    return post_json(client, "/openai2", body or STREAM_BODY, buffered=False, **kwargs)


def read_timed(response):
    """(seconds since start, chunk) for every non-empty chunk the app yields."""
    start = time.monotonic()
    out = []
    for chunk in response.response:
        if chunk:
            out.append((time.monotonic() - start, chunk))
    response.close()
    return out


def test_stream_framing_and_headers(client, fake, records):
    r = stream(client)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "text/event-stream"
    assert r.headers["Cache-Control"] == "no-cache"
    assert r.headers["X-Accel-Buffering"] == "no"
    assert r.headers["X-Proxy-Request-Id"]
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert r.headers["Server-Timing"].startswith("upstream;dur=")
    body = b"".join(r.response)
    r.close()
    assert body == frames_of(response_events("gpt-4o")) + b"data: [DONE]\n\n"
    sent = fake.last("/v1/responses").json
    assert sent == {
        "model": "gpt-4o",
        "input": "Write a poem.",
        "safety_identifier": safety_id(),
        "stream": True,
    }
    entry = records[-1]
    assert entry["stream"] is True and entry["status"] == 200 and entry["result"] == "ok"
    assert entry["usage"] == {
        "prompt_tokens": 36,
        "completion_tokens": 87,
        "cached_tokens": 4,
        "total_tokens": 123,
    }


@pytest.mark.parametrize("truthy", [True, 1, "true", "false"])
def test_stream_flag_is_js_truthy(client, fake, truthy):
    r = stream(client, {**STREAM_BODY, "stream": truthy})
    assert r.headers["Content-Type"] == "text/event-stream"
    r.close()


def test_retrieve_stream(client, fake, records):
    r = client.get(
        f"/openai2/resp_9?security_key={SECURITY_KEY}&stream=true&starting_after=2", buffered=False
    )
    assert r.status_code == 200 and r.headers["Content-Type"] == "text/event-stream"
    body = b"".join(r.response)
    r.close()
    assert body.endswith(b"data: [DONE]\n\n")
    assert fake.last("/v1/responses/resp_9").query == {"starting_after": ["2"], "stream": ["true"]}
    assert records[-1]["stream"] is True and records[-1]["model"] == "gpt-4o-mini"


def test_named_upstream_events_become_data_lines(client, fake):
    events = response_events("gpt-4o", 1)
    fake.push("POST", "/v1/responses", sse(events, event_names=True))
    r = stream(client)
    body = b"".join(r.response)
    r.close()
    assert b"event:" not in body
    assert body == frames_of(events) + b"data: [DONE]\n\n"


def test_non_compact_upstream_json_is_compacted(client, fake):
    completed = response_events("m", 0)[-1]

    def handler(req, conn):
        conn.start_stream()
        conn.chunk(b'data: {"type": "response.output_text.delta",  "delta": "hi"}\r\n\r\n')
        conn.chunk(b": upstream comment\n\n")
        conn.chunk(b"data: " + json.dumps(completed).encode() + b"\n\n")
        conn.end_stream()

    fake.push("POST", "/v1/responses", handler)
    r = stream(client)
    body = b"".join(r.response)
    r.close()
    assert body.startswith(b'data: {"type":"response.output_text.delta","delta":"hi"}\n\n')
    assert b"upstream comment" not in body


def test_events_split_across_reads(client, fake):
    events = response_events("gpt-4o", 2)
    payload = frames_of(events)

    def handler(req, conn):
        conn.start_stream()
        for i in range(0, len(payload), 7):
            conn.chunk(payload[i : i + 7])
        conn.end_stream()

    fake.push("POST", "/v1/responses", handler)
    r = stream(client)
    body = b"".join(r.response)
    r.close()
    assert body == payload + b"data: [DONE]\n\n"


# ---- failures before the stream starts: proper status and JSON ---------------------------------------


def test_upstream_error_before_stream_is_json(client, fake, records):
    fake.push("POST", "/v1/responses", error(429, "Slow down", headers={"Retry-After": "3"}))
    r = stream(client)
    assert r.status_code == 429
    assert r.headers["Content-Type"] == "application/json"
    assert r.headers["Retry-After"] == "3"
    assert error_of(r)["message"] == "429 Slow down"
    r.close()
    assert records[-1]["stream"] is True and records[-1]["status"] == 429


def test_connection_failure_before_stream_is_502_json(client, fake):
    fake.push("POST", "/v1/responses", reset())
    r = stream(client)
    assert r.status_code == 502 and error_of(r)["code"] == "OPENAI_PROXY_TRANSPORT"


def test_no_headers_in_time_is_504_json(client, fake):
    fake.push("POST", "/v1/responses", delay(2))
    r = stream(client, {**STREAM_BODY, "timeout": 200})
    assert r.status_code == 504 and error_of(r)["code"] == "OPENAI_PROXY_TIMEOUT"


def test_upstream_answering_json_instead_of_a_stream_is_502(client, fake, app):
    fake.push("POST", "/v1/responses", raw(200, b'{"id":"resp_1"}', "application/json"))
    r = stream(client)
    assert r.status_code == 502 and error_of(r)["code"] == "OPENAI_PROXY_UPSTREAM_BAD_RESPONSE"
    assert app.extensions["openai_proxy"].gate.in_use() == 0


@pytest.mark.parametrize(
    ("body", "status"),
    [({**STREAM_BODY, "security_key": "bad"}, 403), ({"security_key": SECURITY_KEY, "stream": True}, 200)],
)
def test_auth_before_stream(client, fake, body, status):
    r = stream(client, body)
    assert r.status_code == status
    r.close()


def test_bad_json_before_stream(client):
    r = client.post("/openai2", data=b'{"stream": true', buffered=False)
    assert r.status_code == 400 and r.headers["Content-Type"] == "application/json"


def test_overload_before_stream_is_503_json(make_app, fake):
    app = make_app(OPENAI_PROXY_MAX_PARALLEL_REQUESTS="1")
    client = app.test_client()
    first = stream(client)  # holds the only slot until it is closed
    second = stream(client)
    assert second.status_code == 503 and second.headers["Retry-After"] == "1"
    assert error_of(second)["code"] == "OPENAI_PROXY_OVERLOADED"
    assert app.extensions["openai_proxy"].gate.in_use() == 1
    b"".join(first.response)
    first.close()
    assert app.extensions["openai_proxy"].gate.in_use() == 0
    third = stream(client)
    assert third.status_code == 200
    third.close()


# ---- failures after our headers: an error event, no [DONE] -------------------------------------------


def _error_event(body: bytes) -> dict:
    last = body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert last.startswith(b"event: error\ndata: "), body[-300:]
    return json.loads(last[len(b"event: error\ndata: ") :])


def test_upstream_drop_mid_stream(client, fake, records):
    events = response_events("gpt-4o", 3)[:3]
    fake.push("POST", "/v1/responses", sse(events, end="drop"))
    r = stream(client)
    assert r.status_code == 200
    body = b"".join(r.response)
    r.close()
    assert body.startswith(frames_of(events))
    assert b"[DONE]" not in body
    err = _error_event(body)["error"]
    assert err["type"] == "upstream_transport" and err["code"] == "OPENAI_PROXY_TRANSPORT"
    assert err["requestId"] == r.headers["X-Proxy-Request-Id"]
    assert records[-1]["status"] == 200 and records[-1]["result"] == "upstream_transport"


def test_invalid_stream_data(client, fake, records):
    fake.push("POST", "/v1/responses", sse(response_events("m", 1)[:2], end="invalid"))
    r = stream(client)
    body = b"".join(r.response)
    r.close()
    assert _error_event(body)["error"]["type"] == "upstream_bad_response"
    assert b"[DONE]" not in body
    assert records[-1]["result"] == "upstream_bad_response"


def test_clean_close_without_terminal_event_is_not_a_clean_end(client, fake):
    fake.push("POST", "/v1/responses", sse(response_events("m", 2)[:3]))
    r = stream(client)
    body = b"".join(r.response)
    r.close()
    err = _error_event(body)["error"]
    assert err["message"] == "OpenAI closed the stream before the response finished"
    assert b"[DONE]" not in body


def test_failed_response_is_relayed_and_flagged(client, fake, records):
    failed = {"type": "response.failed", "response": {"id": "r", "status": "failed",
              "error": {"code": "server_error", "message": "The model crashed"}}}  # fmt: skip
    fake.push("POST", "/v1/responses", sse([response_events("m", 0)[0], failed]))
    r = stream(client)
    body = b"".join(r.response)
    r.close()
    assert body.endswith(b"data: [DONE]\n\n")
    assert records[-1]["result"] == "upstream_api_error"
    assert records[-1]["error"] == {"message": "The model crashed"}


# ---- time: keep-alives, no buffering, the timeout only bounds headers ---------------------------------


@pytest.mark.slow
def test_keepalive_while_waiting_for_first_event_and_during_gaps(make_app, fake):
    client = make_app(OPENAI_PROXY_SSE_KEEPALIVE_INTERVAL_MS="100").test_client()
    fake.push("POST", "/v1/responses", sse(response_events("m", 1), first_delay=0.45, gap=0.35))
    chunks = [c for _, c in read_timed(stream(client))]
    first_event = next(i for i, c in enumerate(chunks) if c.startswith(b"data:"))
    assert first_event >= 3 and all(c == b": keep-alive\n\n" for c in chunks[:first_event])
    between = chunks[first_event + 1 : first_event + 3]
    assert b": keep-alive\n\n" in between
    assert chunks[-1] == b"data: [DONE]\n\n"


@pytest.mark.slow
def test_events_are_relayed_as_they_arrive(client, fake):
    fake.push("POST", "/v1/responses", sse(response_events("m", 1), gap=0.6))
    timed = read_timed(stream(client))
    first = next(t for t, c in timed if c.startswith(b"data:"))
    second = [t for t, c in timed if c.startswith(b"data:")][1]
    assert first < 0.3
    assert second - first > 0.5


@pytest.mark.slow
def test_timeout_bounds_only_the_wait_for_headers(client, fake, records):
    fake.push("POST", "/v1/responses", sse(response_events("m", 2), first_delay=0.4, gap=0.4))
    r = stream(client, {**STREAM_BODY, "timeout": 150})
    body = b"".join(r.response)
    r.close()
    assert body.endswith(b"data: [DONE]\n\n")
    assert records[-1]["result"] == "ok" and records[-1]["timeoutMs"] == 150


# ---- the parser ----------------------------------------------------------------------------------------


def test_sse_parser():
    parser = SSEParser()
    out = list(parser.feed(b"event: a\ndata: 1\n\n: comment\nid: 5\ndata:2\ndata: 3\r\n\r\ndata: 4"))
    assert out == [(b"a", b"1"), (None, b"2\n3")]
    assert parser.pending()
    assert list(parser.feed(b"\n\n")) == [(None, b"4")]
    assert not parser.pending()


def test_sse_parser_joins_a_line_split_into_many_reads_once():
    parser = SSEParser(max_event_bytes=1 << 20)
    data = b'data: {"type":"x","delta":"' + b"a" * 700_000 + b'"}\r\n\r\n'
    events = [ev for i in range(0, len(data), 1000) for ev in parser.feed(data[i : i + 1000])]
    assert events == [(None, data[6:-4])]
    assert not parser.pending()


def test_sse_parser_refuses_an_event_past_its_cap():
    parser = SSEParser(max_event_bytes=1000)
    list(parser.feed(b"data: " + b"a" * 900))
    with pytest.raises(Exception, match="larger than 1000 bytes"):
        list(parser.feed(b"a" * 200))


@pytest.mark.parametrize(
    ("buffer", "end"),
    [(b"a\n\nb", 3), (b"a\r\n\r\nb", 5), (b"a\n\r\nb", 4), (b"a\r\n\nb", 4), (b"a\n", -1), (b"a\n\r", -1),
     (b"a\nb\n", -1), (b"\n\n", 2)],
)  # fmt: skip
def test_event_end(buffer, end):
    from openai_proxy.stream.sse import event_end

    assert event_end(buffer, 0) == end


BIG_IMAGE = "A" * (3 * 1024 * 1024)  # past the size where usage is read from the event's tail


def big_final_event(model: str) -> dict:
    event = response_events(model)[-1]
    event["response"]["output"].append({"type": "image_generation_call", "id": "ig_1", "result": BIG_IMAGE})
    # Keys named "usage" after the usage object (metadata follows it): the tail reader must skip them.
    event["response"]["metadata"] = {"usage": "high", "note": '"usage": {"input_tokens": 999}'}
    return event


@pytest.mark.parametrize("path", ["/openai2", "/v1/responses"])
def test_a_multi_mib_final_event_is_relayed_whole_with_its_usage(client, fake, records, path):
    events = [*response_events("gpt-4o")[:-1], big_final_event("gpt-4o")]
    fake.push("POST", "/v1/responses", sse(events, event_names=True))
    r = post_json(
        client, path, {"model": "gpt-4o", "input": "draw", "stream": True},
        headers={"Authorization": f"Bearer {SECURITY_KEY}"},
    )  # fmt: skip
    assert r.status_code == 200
    last = [e for e in r.data.split(b"\n\n") if b"response.completed" in e][-1]
    payload = json.loads(last.split(b"data: ", 1)[1])
    assert payload["response"]["output"][-1]["result"] == BIG_IMAGE
    assert records[-1]["usage"] == {"prompt_tokens": 36, "completion_tokens": 87, "cached_tokens": 4,
                                    "total_tokens": 123}  # fmt: skip
    assert records[-1]["result"] == "ok"


# ---- /v1: events relayed as they arrive, big ones never held --------------------------------------------


def passthrough_relay(**kwargs):
    from openai_proxy.record import RequestRecord
    from openai_proxy.stream.sse import PassthroughEventRelay

    return PassthroughEventRelay(
        None,
        record=RequestRecord("/v1/chat/completions", "POST"),
        slot=None,
        environ={},
        idle_s=None,
        max_silence_s=1.0,
        **kwargs,
    )


def chat_frames(events: list[dict]) -> list[bytes]:
    return [b"data: " + json.dumps(e).encode() + b"\r\n\r\n" for e in events] + [b"data: [DONE]\r\n\r\n"]


def relayed(relay, data: bytes, cuts) -> bytes:
    """What the relay gives out when upstream's bytes arrive cut at `cuts`."""
    out, start = [], 0
    for cut in [*cuts, len(data)]:
        out.append(relay.on_data(data[start:cut]) or b"")
        start = cut
    assert relay.on_end() is None
    return b"".join(out)


def big_chat_stream() -> tuple[bytes, bytes, int]:
    """A streamed chat with a 300 kB delta (past what the relay holds) and the usage chunk the proxy
    asked for: upstream's bytes, what the client gets, and where the big event ends."""
    events = chat_chunks("gpt-4o-mini", include_usage=True)
    events[1]["choices"][0]["delta"]["content"] = "x" * 300_000
    frames = [b"data: " + json.dumps(e).encode() + b"\r\n\r\n" for e in events] + [b"data: [DONE]\r\n\r\n"]
    data = b"".join(frames)
    return data, b"".join(f for f in frames if b'"choices": []' not in f), len(b"".join(frames[:2]))


@pytest.mark.parametrize("read", [5, 4096, 65536])
def test_v1_relay_passes_a_big_event_through_as_it_comes(read):
    from openai_proxy.stream.sse import HOLD_EVENT

    data, expected, _ = big_chat_stream()
    relay = passthrough_relay(strip_usage_chunk=True)
    out, held_most = b"", 0
    for start in range(0, len(data), read):
        out += relay.on_data(data[start : start + read]) or b""
        held_most = max(held_most, start + read - len(out))
    assert relay.on_end() is None
    assert out == expected
    assert held_most <= HOLD_EVENT + read
    assert relay._record.usage == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}


def test_v1_relay_finds_a_big_events_end_wherever_reads_split_it():
    data, expected, end = big_chat_stream()
    for cut in range(end - 6, end + 2):  # the big event is being passed on when its `\r\n\r\n` comes
        relay = passthrough_relay(strip_usage_chunk=True)
        assert relayed(relay, data, [280_000, cut]) == expected, cut
        assert relay._record.usage is not None


def test_v1_relay_cuts_the_connection_when_upstream_ends_inside_a_passed_on_event():
    relay = passthrough_relay()
    data = b"event: response.output_text.delta\ndata: " + b"a" * 300_000
    assert relay.on_data(data) == data
    with pytest.raises(Exception, match="closed the stream before it finished"):
        relay.on_end()
    aborted = []
    relay.abort_client = lambda: aborted.append(True)
    assert relay.on_failure(UpstreamTransport("cut")) is None and aborted == [True]
