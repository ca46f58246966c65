"""What each request cost (`costUsd`, `upstreamModel`), on every route, plain and streamed.

Expected costs are worked out by hand from the shipped standard-tier prices (USD per million
tokens), written next to each figure.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable

import pytest

from tests.conftest import SECURITY_KEY, post_json
from tests.support.fake_upstream import (
    chat_chunks,
    chat_completion,
    chunked_json,
    response_events,
    response_object,
    sse,
    transcript_events,
)
from tests.test_metrics import samples, value

AUTH = {"Authorization": f"Bearer {SECURITY_KEY}"}
ACCESS = {"Authorization": "Bearer test-access-token"}
MESSAGES = [{"role": "user", "content": "hi"}]
WAV = b"RIFF....WAVEfmt fake audio bytes"


def send(obj, status: int = 200):
    return lambda req, conn: conn.send_json(status, obj)


def entry_of(app) -> dict:
    assert app.records, "no completion record"
    return app.records[-1]


# gpt-4o ($2.50 in, $1.25 cached, $10 out) answered by its dated snapshot.
CHAT_USAGE = {
    "prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500,
    "prompt_tokens_details": {"cached_tokens": 200, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 300, "audio_tokens": 0, "accepted_prediction_tokens": 0,
                                  "rejected_prediction_tokens": 0},
}  # fmt: skip
CHAT_COST = 0.00725  # 800 x 2.50 + 200 x 1.25 + 500 x 10 (reasoning is inside the 500) = 7250 / 1e6
CHAT_RECORDED = {"prompt_tokens": 1000, "completion_tokens": 500, "cached_tokens": 200, "total_tokens": 1500,
                 "reasoning_tokens": 300}  # fmt: skip

# o4-mini ($1.10 in, $0.275 cached, $4.40 out) through the Responses API.
RESPONSE_USAGE = {"input_tokens": 2000, "input_tokens_details": {"cached_tokens": 1500}, "output_tokens": 1000,
                  "output_tokens_details": {"reasoning_tokens": 800}, "total_tokens": 3000}  # fmt: skip
RESPONSE_COST = 0.0053625  # 500 x 1.10 + 1500 x 0.275 + 1000 x 4.40 = 5362.5 / 1e6
RESPONSE_RECORDED = {"prompt_tokens": 2000, "completion_tokens": 1000, "cached_tokens": 1500,
                     "total_tokens": 3000, "reasoning_tokens": 800}  # fmt: skip


# ---- legacy routes -----------------------------------------------------------------------------------


def test_openai_chat_priced_at_the_snapshot_base_model(app, fake):
    fake.push("POST", "/v1/chat/completions", send(chat_completion("gpt-4o-2024-08-06", usage=CHAT_USAGE)))
    r = post_json(app.test_client(), "/openai", {"model": "gpt-4o", "messages": MESSAGES}, headers=AUTH)
    assert r.status_code == 200
    entry = entry_of(app)
    assert (entry["model"], entry["upstreamModel"]) == ("gpt-4o", "gpt-4o-2024-08-06")
    assert entry["usage"] == CHAT_RECORDED
    assert entry["costUsd"] == CHAT_COST


def test_chatgpt_default_model(app, fake):
    r = post_json(app.test_client(), "/chatgpt", {"prompt": "hi"}, headers=AUTH)
    assert r.status_code == 200
    entry = entry_of(app)
    # gpt-4o-mini ($0.15 in, $0.075 cached, $0.60 out): 22 x 0.15 + 3 x 0.075 + 7 x 0.60 = 7.725 / 1e6
    assert entry["upstreamModel"] == "gpt-4o-mini" and entry["costUsd"] == 7.725e-06


def test_openai2_plain(app, fake):
    answer = response_object("o4-mini-2025-04-16", usage=RESPONSE_USAGE)
    fake.push("POST", "/v1/responses", send(answer))
    r = post_json(app.test_client(), "/openai2", {"model": "o4-mini", "input": "x"}, headers=AUTH)
    assert r.status_code == 200
    entry = entry_of(app)
    assert entry["upstreamModel"] == "o4-mini-2025-04-16" and entry["usage"] == RESPONSE_RECORDED
    assert entry["costUsd"] == RESPONSE_COST


@pytest.mark.parametrize("final", ["response.completed", "response.incomplete", "response.failed"])
@pytest.mark.parametrize("path", ["/openai2", "/v1/responses"])
def test_responses_stream_priced_from_any_final_event(app, fake, path, final):
    events = response_events("o4-mini-2025-04-16", final=final, usage=RESPONSE_USAGE)
    fake.push("POST", "/v1/responses", sse(events, event_names=True))
    r = post_json(app.test_client(), path, {"model": "o4-mini", "input": "x", "stream": True}, headers=AUTH)
    assert r.status_code == 200 and final.encode() in r.data
    entry = entry_of(app)
    assert entry["stream"] is True
    assert entry["result"] == ("upstream_api_error" if final == "response.failed" else "ok")
    assert entry["upstreamModel"] == "o4-mini-2025-04-16" and entry["usage"] == RESPONSE_RECORDED
    assert entry["costUsd"] == RESPONSE_COST


@pytest.mark.parametrize("path", ["/openai2", "/v1/responses"])
def test_responses_stream_cut_before_its_final_event_is_charged_its_estimate(app, fake, path):
    events = response_events("o4-mini", usage=RESPONSE_USAGE)
    fake.push("POST", "/v1/responses", sse(events[:-1], event_names=True, end="drop"))
    r = post_json(app.test_client(), path, {"model": "o4-mini", "input": "x", "stream": True}, headers=AUTH)
    assert r.status_code == 200 and b"event: error" in r.data
    # The bytes that went upstream / 4, rounded up (with the client's `safety_identifier` added).
    body_tokens = -(-len(fake.last("/v1/responses").body) // 4)
    entry = entry_of(app)
    assert entry["result"] == "upstream_transport" and entry["upstreamModel"] is None
    # No usage arrived: the estimate stands in, never 0. o4-mini ($1.10 in, $4.40 out), no maximum
    # asked, so the default of 4096 output tokens.
    assert entry["usageSource"] == "estimated"
    assert entry["usage"] == {"prompt_tokens": body_tokens, "completion_tokens": 4096,
                              "total_tokens": body_tokens + 4096}  # fmt: skip
    assert entry["costUsd"] == pytest.approx((body_tokens * 1.10 + 4096 * 4.40) / 1e6, abs=1e-12)


@pytest.mark.parametrize("path", ["/openai2", "/v1/responses"])
def test_big_final_event_priced_from_its_ends(app, fake, path):
    events = response_events("gpt-5-2025-08-07", usage={
        "input_tokens": 10000, "input_tokens_details": {"cached_tokens": 8000}, "output_tokens": 2000,
        "output_tokens_details": {"reasoning_tokens": 1500}, "total_tokens": 12000})  # fmt: skip
    final = events[-1]["response"]
    final["output"].append({"type": "image_generation_call", "id": "ig_1", "result": "A" * (3 * 1024 * 1024)})
    final["metadata"] = {"usage": '"usage": {"input_tokens": 1}', "model": '"model": "gpt-4o"'}
    fake.push("POST", "/v1/responses", sse(events, event_names=True))
    r = post_json(app.test_client(), path, {"model": "gpt-5", "input": "x", "stream": True}, headers=AUTH)
    assert r.status_code == 200
    entry = entry_of(app)
    assert entry["upstreamModel"] == "gpt-5-2025-08-07"
    # gpt-5 ($1.25 in, $0.125 cached, $10 out): 2000 x 1.25 + 8000 x 0.125 + 2000 x 10 = 23500 / 1e6
    assert entry["costUsd"] == 0.0235


# ---- service tiers ---------------------------------------------------------------------------------

# gpt-5 ($1.25 in, $0.125 cached, $10 out; flex $0.625 / $0.0625 / $5; priority $2.50 / $0.25 / $20):
# 1000 prompt tokens (200 cached) and 500 completion tokens.
TIER_USAGE = {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500,
              "prompt_tokens_details": {"cached_tokens": 200}}  # fmt: skip
TIER_COST = {"flex": 0.0030125, "priority": 0.01205, "default": 0.006025, None: 0.006025, "scale": 0.006025}


@pytest.mark.parametrize("tier", ["flex", "priority", "default", "scale", None])
@pytest.mark.parametrize("path", ["/openai", "/v1/chat/completions"])
def test_chat_priced_by_the_tier_upstream_says_it_ran_on(app, fake, path, tier):
    answer = chat_completion("gpt-5-2025-08-07", usage=TIER_USAGE)
    if tier is not None:
        answer["service_tier"] = tier
    fake.push("POST", "/v1/chat/completions", send(answer))
    # What the call asked for does not matter: upstream may run it on another tier (auto, project default).
    body = {"model": "gpt-5", "messages": MESSAGES, "service_tier": "auto"}
    assert post_json(app.test_client(), path, body, headers=AUTH).status_code == 200
    entry = entry_of(app)
    assert (entry["serviceTier"], entry["costUsd"]) == (tier, TIER_COST[tier])


def test_chat_stream_priced_by_the_tier_of_its_usage_chunk(app, fake):
    chunks = chat_chunks("gpt-4o-mini", True, usage={"prompt_tokens": 1000, "completion_tokens": 1000,
                                                     "total_tokens": 2000})  # fmt: skip
    for chunk in chunks:
        chunk["service_tier"] = "priority"
    fake.push("POST", "/v1/chat/completions", sse(chunks))
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True, "service_tier": "priority"}
    r = post_json(app.test_client(), "/v1/chat/completions", body, headers=AUTH)
    assert r.status_code == 200
    entry = entry_of(app)
    # gpt-4o-mini on priority ($0.25 in, $1 out): 1000 x 0.25 + 1000 x 1 = 1250 / 1e6
    assert (entry["serviceTier"], entry["costUsd"]) == ("priority", 0.00125)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", ["/openai2", "/v1/responses"])
def test_responses_priced_by_the_tier_upstream_says_it_ran_on(app, fake, path, stream):
    usage = {"input_tokens": 2000, "input_tokens_details": {"cached_tokens": 1000}, "output_tokens": 1000,
             "total_tokens": 3000}  # fmt: skip
    if stream:
        handler = sse(response_events("o3-2025-04-16", usage=usage, service_tier="flex"), event_names=True)
    else:
        handler = send(response_object("o3-2025-04-16", usage=usage, service_tier="flex"))
    fake.push("POST", "/v1/responses", handler)
    body = {"model": "o3", "input": "x", "service_tier": "flex", "stream": stream}
    assert post_json(app.test_client(), path, body, headers=AUTH).status_code == 200
    entry = entry_of(app)
    # o3 on flex ($1 in, $0.25 cached, $4 out): 1000 x 1 + 1000 x 0.25 + 1000 x 4 = 5250 / 1e6
    assert (entry["upstreamModel"], entry["serviceTier"], entry["costUsd"]) == (
        "o3-2025-04-16",
        "flex",
        0.00525,
    )


@pytest.mark.parametrize("path", ["/openai2", "/v1/responses"])
def test_a_big_final_event_says_its_tier_in_its_tail(app, fake, path):
    events = response_events("gpt-5-2025-08-07", usage={"input_tokens": 1000, "output_tokens": 500,
                                                        "input_tokens_details": {"cached_tokens": 200},
                                                        "total_tokens": 1500})  # fmt: skip
    final = events[-1]["response"]
    final["output"].append({"type": "image_generation_call", "id": "ig_1", "result": "A" * (3 * 1024 * 1024)})
    usage = final.pop("usage")
    final.update(service_tier="priority", usage=usage)  # OpenAI's order: the tier after the output
    fake.push("POST", "/v1/responses", sse(events, event_names=True))
    r = post_json(app.test_client(), path, {"model": "gpt-5", "input": "x", "stream": True}, headers=AUTH)
    assert r.status_code == 200
    assert (entry_of(app)["serviceTier"], entry_of(app)["costUsd"]) == ("priority", TIER_COST["priority"])


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", ["/openai2/resp_1", "/v1/responses/resp_1"])
def test_a_retrieve_costs_nothing_unless_the_response_ran_in_the_background(app, fake, path, stream):
    """A response made in the foreground was priced by the request that made it; one made in the
    background answered its create call before any usage existed, so it is priced where usage shows."""
    client = app.test_client()
    query = "?stream=true" if stream else ""
    for background, expected in ((False, 0.0), (True, RESPONSE_COST)):
        model, extra = "o4-mini-2025-04-16", {"usage": RESPONSE_USAGE, "background": background}
        handler = (sse(response_events(model, **extra), event_names=True) if stream
                   else send(response_object(model, rid="resp_1", **extra)))  # fmt: skip
        fake.push("GET", "/v1/responses/resp_1", handler)
        r = client.get(path + query, headers=AUTH)
        assert r.status_code == 200
        entry = entry_of(app)
        assert entry["usage"] == RESPONSE_RECORDED and entry["upstreamModel"] == "o4-mini-2025-04-16"
        assert entry["costUsd"] == expected, background


def test_embeddings(app, fake):
    r = post_json(app.test_client(), "/embeddings", {"input": "x"}, headers=AUTH)
    assert r.status_code == 200
    entry = entry_of(app)
    # text-embedding-3-large ($0.13 in): 9 x 0.13 = 1.17 / 1e6
    assert entry["upstreamModel"] == "text-embedding-3-large" and entry["costUsd"] == 1.17e-06


def test_whisper_priced_per_minute(app, fake):
    r = app.test_client().post("/openai/audio/transcriptions", headers=AUTH,
                               data={"file": (_wav(), "a.wav")}, content_type="multipart/form-data")  # fmt: skip
    assert r.status_code == 200
    entry = entry_of(app)
    # whisper-1 ($0.006 per minute): 2 seconds = 0.006 x 2 / 60
    assert (entry["model"], entry["usage"], entry["costUsd"]) == ("whisper-1", {"seconds": 2}, 0.0002)


TRANSCRIBE_USAGE = {"type": "tokens", "input_tokens": 14, "input_token_details": {"text_tokens": 4, "audio_tokens": 10},
                    "output_tokens": 45, "total_tokens": 59}  # fmt: skip
# gpt-4o-transcribe ($2.50 text in, $6 audio in, $10 out): 4 x 2.50 + 10 x 6 + 45 x 10 = 520 / 1e6
TRANSCRIBE_COST = 0.00052


def test_transcription_priced_by_token_kind(app, fake):
    fake.push("POST", "/v1/audio/transcriptions", send({"text": "Hi.", "usage": TRANSCRIBE_USAGE}))
    r = app.test_client().post("/openai/audio/transcriptions", headers=AUTH, content_type="multipart/form-data",
                               data={"file": (_wav(), "a.wav"), "model": "gpt-4o-transcribe"})  # fmt: skip
    assert r.status_code == 200
    entry = entry_of(app)
    assert entry["usage"] == {"prompt_tokens": 14, "completion_tokens": 45, "total_tokens": 59,
                              "input_audio_tokens": 10}  # fmt: skip
    assert entry["upstreamModel"] is None and entry["costUsd"] == TRANSCRIBE_COST


# ---- /v1 -------------------------------------------------------------------------------------------


def test_v1_chat_snapshot_of_a_mini_model_is_not_priced_as_the_big_one(app, fake):
    usage = {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100,
             "prompt_tokens_details": {"cached_tokens": 400}}  # fmt: skip
    fake.push("POST", "/v1/chat/completions", send(chat_completion("gpt-4o-mini-2024-07-18", usage=usage)))
    r = post_json(app.test_client(), "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": MESSAGES},
                  headers=AUTH)  # fmt: skip
    assert r.status_code == 200
    entry = entry_of(app)
    assert entry["upstreamModel"] == "gpt-4o-mini-2024-07-18"
    # gpt-4o-mini, not gpt-4o: 600 x 0.15 + 400 x 0.075 + 100 x 0.60 = 180 / 1e6
    assert entry["costUsd"] == 0.00018


def test_v1_chat_audio_tokens_at_audio_rates(app, fake):
    usage = {"prompt_tokens": 100, "completion_tokens": 200, "total_tokens": 300,
             "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 60},
             "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 150}}  # fmt: skip
    fake.push("POST", "/v1/chat/completions",
              send(chat_completion("gpt-4o-audio-preview-2024-12-17", usage=usage)))  # fmt: skip
    body = {"model": "gpt-4o-audio-preview", "modalities": ["text", "audio"], "messages": MESSAGES}
    r = post_json(app.test_client(), "/v1/chat/completions", body, headers=AUTH)
    assert r.status_code == 200
    entry = entry_of(app)
    assert entry["usage"] == {"prompt_tokens": 100, "completion_tokens": 200, "cached_tokens": 0,
                              "total_tokens": 300, "input_audio_tokens": 60, "output_audio_tokens": 150}  # fmt: skip
    # gpt-4o-audio-preview ($2.50 / $10 text, $40 / $80 audio):
    # 40 x 2.50 + 60 x 40 + 50 x 10 + 150 x 80 = 15000 / 1e6
    assert entry["costUsd"] == 0.015


@pytest.mark.parametrize("asked", [False, True])
def test_v1_chat_stream_priced_from_its_usage_chunk(app, fake, asked):
    usage = {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500,
             "prompt_tokens_details": {"cached_tokens": 200}, "completion_tokens_details": {"reasoning_tokens": 300}}  # fmt: skip
    fake.push(
        "POST", "/v1/chat/completions", sse([*chat_chunks("gpt-4o-2024-08-06", True, usage=usage), "[DONE]"])
    )
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    if asked:
        body["stream_options"] = {"include_usage": True}
    r = post_json(app.test_client(), "/v1/chat/completions", body, headers=AUTH)
    assert r.status_code == 200 and r.data.endswith(b"data: [DONE]\n\n")
    assert (b'"choices":[]' in r.data) is asked  # the chunk the proxy asked for itself stays hidden
    entry = entry_of(app)
    assert entry["upstreamModel"] == "gpt-4o-2024-08-06" and entry["usage"] == CHAT_RECORDED
    assert entry["costUsd"] == CHAT_COST


@pytest.mark.parametrize(
    ("sent", "source", "usage", "cost"),
    [
        # Before the usage chunk: the estimate. The body sent upstream (the client's, with
        # `stream_options` and its `safety_identifier` added) is 225 bytes = 57 tokens; max_tokens = 100
        # asked: 57 x 0.15 + 100 x 0.60 = 68.55 / 1e6.
        (3, "estimated", {"prompt_tokens": 57, "completion_tokens": 100, "total_tokens": 157}, 6.855e-05),
        # After it: what upstream reported. gpt-4o-mini: 12 x 0.15 + 3 x 0.60 = 3.6 / 1e6
        (6, "upstream", {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}, 3.6e-06),
    ],
    ids=["before-usage", "after-usage"],
)
def test_v1_chat_stream_cut_keeps_the_usage_sent_before_else_its_estimate(
    app, fake, sent, source, usage, cost
):
    chunks = chat_chunks("gpt-4o-mini", True)  # 5 chunks, then the usage chunk
    fake.push("POST", "/v1/chat/completions", sse(chunks[:sent], end="drop"))
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True, "max_tokens": 100}
    r = post_json(app.test_client(), "/v1/chat/completions", body, headers=AUTH)
    assert r.status_code == 200 and b"event: error" in r.data and b"[DONE]" not in r.data
    entry = entry_of(app)
    assert entry["result"] == "upstream_transport"
    assert (entry["usageSource"], entry["usage"], entry["costUsd"]) == (source, usage, cost)
    assert len(fake.last("/v1/chat/completions").body) == 225


def test_v1_chat_stream_the_client_left_keeps_the_usage_it_had(app, fake):
    def handler(req, conn):
        conn.start_stream()
        for chunk in chat_chunks("gpt-4o-mini", True):
            conn.event(chunk)
        conn.wait(30)  # the [DONE] never comes before the client leaves

    fake.push("POST", "/v1/chat/completions", handler)
    body = {
        "model": "gpt-4o-mini",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = post_json(app.test_client(), "/v1/chat/completions", body, headers=AUTH, buffered=False)
    seen = b""
    for piece in r.response:
        seen += piece
        if b'"choices":[]' in seen:
            break
    r.close()
    entry = entry_of(app)
    assert entry["cancelled"] is True and entry["status"] == 499
    assert entry["usage"] == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    assert entry["costUsd"] == 3.6e-06


def test_v1_embeddings(app, fake):
    r = post_json(app.test_client(), "/v1/embeddings", {"model": "text-embedding-3-small", "input": ["a", "b"]},
                  headers=AUTH)  # fmt: skip
    assert r.status_code == 200
    # text-embedding-3-small ($0.02 in): 9 x 0.02 = 0.18 / 1e6
    assert entry_of(app)["costUsd"] == 1.8e-07


def _v1_transcription(app, fields: dict, stream: bool = False):
    data = {"file": (_wav(), "a.wav"), **fields}
    if stream:
        data["stream"] = "true"
    return app.test_client().post("/v1/audio/transcriptions", headers=AUTH, data=data,
                                  content_type="multipart/form-data")  # fmt: skip


@pytest.mark.parametrize("model", ["whisper-1", "gpt-4o-transcribe"])
def test_v1_transcription_model_read_from_the_upload(app, fake, model):
    if model == "gpt-4o-transcribe":
        fake.push("POST", "/v1/audio/transcriptions", send({"text": "Hi.", "usage": TRANSCRIBE_USAGE}))
    r = _v1_transcription(app, {"model": model})
    assert r.status_code == 200
    entry = entry_of(app)
    assert entry["model"] == model
    assert entry["costUsd"] == (0.0002 if model == "whisper-1" else TRANSCRIBE_COST)


@pytest.mark.parametrize("model_first", [True, False])
def test_v1_transcription_model_before_or_after_a_big_file(app, fake, model_first):
    """The Python SDK sends fields before the file, the Node SDK's form may put the file first: the
    model is found either way, while the body streams upstream unchanged."""
    audio = bytes(range(256)) * 1200  # 300 KiB: several reads
    boundary = "b0undary"
    model = f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'.encode()
    file = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n").encode() + audio + b"\r\n"  # fmt: skip
    body = (model + file if model_first else file + model) + f"--{boundary}--\r\n".encode()
    r = app.test_client().post("/v1/audio/transcriptions", data=body,
                               headers={**AUTH, "Content-Type": f"multipart/form-data; boundary={boundary}"})  # fmt: skip
    assert r.status_code == 200
    assert fake.last("/v1/audio/transcriptions").body == body
    entry = entry_of(app)
    assert (entry["model"], entry["costUsd"]) == ("whisper-1", 0.0002)


def test_v1_transcription_stream(app, fake):
    fake.push("POST", "/v1/audio/transcriptions", sse(transcript_events("Hello there.", TRANSCRIBE_USAGE),
                                                      event_names=True))  # fmt: skip
    r = _v1_transcription(app, {"model": "gpt-4o-transcribe"}, stream=True)
    assert r.status_code == 200 and b"transcript.text.done" in r.data
    entry = entry_of(app)
    assert entry["stream"] is True and entry["costUsd"] == TRANSCRIBE_COST


def test_v1_json_answer_too_big_to_read_whole_is_priced_from_its_ends(app, fake):
    answer = response_object("o4-mini-2025-04-16", usage=RESPONSE_USAGE)
    answer["output"].append(
        {"type": "image_generation_call", "id": "ig_1", "result": "A" * (9 * 1024 * 1024)}
    )
    answer["metadata"] = {"note": '"usage": {"input_tokens": 1}'}
    fake.push("POST", "/v1/responses", send(answer))
    r = post_json(app.test_client(), "/v1/responses", {"model": "o4-mini", "input": "x"}, headers=AUTH)
    assert r.status_code == 200 and json.loads(r.data) == answer
    entry = entry_of(app)
    assert entry["upstreamModel"] == "o4-mini-2025-04-16" and entry["usage"] == RESPONSE_RECORDED
    assert entry["costUsd"] == RESPONSE_COST


@pytest.mark.parametrize("image_mib", [0, 3])  # read whole; past the size read whole, relayed as it comes
def test_v1_json_answer_of_unknown_length_is_priced(app, fake, image_mib):
    answer = response_object("o4-mini-2025-04-16", usage=RESPONSE_USAGE)
    answer["output"].append(
        {"type": "image_generation_call", "id": "ig_1", "result": "A" * (image_mib << 20)}
    )
    answer["metadata"] = {"note": '"usage": {"input_tokens": 1}'}
    fake.push("POST", "/v1/responses", chunked_json(answer))
    r = post_json(app.test_client(), "/v1/responses", {"model": "o4-mini", "input": "x"}, headers=AUTH)
    assert r.status_code == 200 and r.data == json.dumps(answer).encode()
    entry = entry_of(app)
    assert entry["upstreamModel"] == "o4-mini-2025-04-16" and entry["usage"] == RESPONSE_RECORDED
    assert entry["costUsd"] == RESPONSE_COST


def test_v1_big_json_answer_whose_tail_has_no_usage_has_unknown_usage(app, fake):
    """Only the tail of a big answer is kept: usage written before 3 MiB of output is not guessed; the
    call ran, so it is charged its estimate (`usageSource: estimated`), never 0."""
    rest = response_object("o4-mini")
    answer = {"usage": rest.pop("usage"), **rest}
    answer["output"].append({"type": "image_generation_call", "id": "ig_1", "result": "A" * (3 << 20)})
    answer["metadata"] = {"note": '"usage": {"input_tokens": 1}'}
    fake.push("POST", "/v1/responses", chunked_json(answer))
    r = post_json(app.test_client(), "/v1/responses", {"model": "o4-mini", "input": "x"}, headers=AUTH)
    assert r.status_code == 200 and r.data == json.dumps(answer).encode()
    entry = entry_of(app)
    tokens = -(-len(fake.last("/v1/responses").body) // 4)
    assert entry["usageSource"] == "estimated"
    assert entry["usage"] == {
        "prompt_tokens": tokens,
        "completion_tokens": 4096,
        "total_tokens": tokens + 4096,
    }


def test_v1_answer_without_usage_has_no_cost(app, fake):
    r = app.test_client().get("/v1/models", headers=AUTH)
    assert r.status_code == 200
    entry = entry_of(app)
    assert (entry["usage"], entry["costUsd"]) == (None, None)


# ---- prices from the operator, unpriced models, metrics --------------------------------------------------


def metrics_change(app, action) -> Callable[..., float]:
    """Run `action`; a function giving how much a metric (with some labels) changed meanwhile (the
    metrics of every app in this process add up, as a server's workers do)."""
    client = app.test_client()
    before = samples(client.get("/metrics", headers=ACCESS).get_data(as_text=True))
    action(client)
    after = samples(client.get("/metrics", headers=ACCESS).get_data(as_text=True))
    return lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)


def test_an_unpriced_model_has_no_cost_and_is_counted(app, fake):
    def action(client):
        r = post_json(client, "/openai", {"model": "my-local-llama", "messages": MESSAGES}, headers=AUTH)
        assert r.status_code == 200

    change = metrics_change(app, action)
    entry = entry_of(app)
    assert entry["usage"]["prompt_tokens"] == 25 and entry["costUsd"] is None
    assert change("openai_proxy_unpriced_requests_total", client="default", model="other") == 1
    assert change("openai_proxy_cost_usd_total") == 0


def test_the_operators_file_overrides_and_extends_the_shipped_prices(make_app, fake, tmp_path):
    prices = tmp_path / "prices.toml"
    prices.write_text('[models."gpt-4o-mini"]\ninput = 1\noutput = 2\n\n'
                      '[models."my-local-llama"]\ninput = 0.5\ncached_input = 0.25\noutput = 1.5\n')  # fmt: skip
    app = make_app(OPENAI_PROXY_PRICES_FILE=str(prices))
    client = app.test_client()
    assert post_json(client, "/chatgpt", {"prompt": "hi"}, headers=AUTH).status_code == 200
    # 25 prompt tokens (3 cached, at `input` as no cached price is given) x 1 + 7 x 2 = 39 / 1e6
    assert entry_of(app)["costUsd"] == 3.9e-05
    r = post_json(client, "/openai", {"model": "my-local-llama", "messages": MESSAGES}, headers=AUTH)
    assert r.status_code == 200
    assert entry_of(app)["costUsd"] == 2.225e-05  # 22 x 0.5 + 3 x 0.25 + 7 x 1.5 = 22.25 / 1e6


def test_metrics_count_cost_per_client_and_price_table_model(app, fake):
    def action(client):
        answer = send(chat_completion("gpt-4o-2024-08-06", usage=CHAT_USAGE))
        fake.push("POST", "/v1/chat/completions", answer, times=2)
        for _ in range(2):
            assert (
                post_json(
                    client, "/openai", {"model": "gpt-4o", "messages": MESSAGES}, headers=AUTH
                ).status_code
                == 200
            )
        body = {"model": "text-embedding-3-small", "input": "a"}
        assert post_json(client, "/v1/embeddings", body, headers=AUTH).status_code == 200

    change = metrics_change(app, action)
    cost = "openai_proxy_cost_usd_total"
    assert change(cost, client="default", model="gpt-4o") == pytest.approx(2 * CHAT_COST)
    assert change(cost, client="default", model="text-embedding-3-small") == pytest.approx(1.8e-07)
    assert change(cost, model="gpt-4o-2024-08-06") == 0  # labels are price-table rows
    assert change("openai_proxy_unpriced_requests_total") == 0
    ok = {"route": "/openai", "method": "POST", "status": "200", "result": "ok", "client": "default"}
    assert change("openai_proxy_requests_total", **ok) == 2
    assert change("openai_proxy_tokens_total", model="gpt-4o", kind="cached", client="default") == 400


def test_a_client_name_labels_the_metrics(app, fake):
    """The client's name comes from authentication (another part fills it); a record that has one
    is counted under it."""
    metrics = app.extensions["openai_proxy"].metrics
    entry = {"endpoint": "/openai", "method": "POST", "status": 200, "result": "ok", "client": "team-a",
             "model": "gpt-4o", "upstreamModel": "gpt-4o-2024-08-06", "usage": {"prompt_tokens": 1},
             "costUsd": 2.5e-06, "durationMs": 1.0}  # fmt: skip

    def action(client):
        for one in (entry, {**entry, "model": "made-up", "upstreamModel": None, "costUsd": None}):
            metrics.request_started()
            metrics.observe(one)

    change = metrics_change(app, action)
    assert change("openai_proxy_cost_usd_total", client="team-a", model="gpt-4o") == pytest.approx(2.5e-06)
    assert change("openai_proxy_unpriced_requests_total", client="team-a", model="other") == 1
    assert change("openai_proxy_requests_total", client="team-a") == 2
    assert change("openai_proxy_tokens_total", client="team-a", kind="prompt") == 2


def _wav() -> io.BytesIO:
    return io.BytesIO(WAV)
