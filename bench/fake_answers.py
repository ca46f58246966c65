"""The fake upstream's canned answers: chat, responses (JSON and SSE events), embeddings, and HTTP heads."""

from __future__ import annotations

import json


def compact(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


CHAT = compact(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1741476542,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the bench upstream."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 25, "completion_tokens": 7, "total_tokens": 32},
    }
)
RESPONSE = compact(
    {
        "id": "resp_bench",
        "object": "response",
        "status": "completed",
        "model": "gpt-4o-mini",
        "output": [
            {
                "type": "message",
                "id": "msg_1",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Hello.", "annotations": []}],
            }
        ],
        "usage": {"input_tokens": 10, "output_tokens": 2, "total_tokens": 12},
    }
)
EMBEDDINGS = compact(
    {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.0023064255, -0.009327292] * 64}],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 9, "total_tokens": 9},
    }
)
NOT_FOUND = b'{"error":{"message":"unknown path","type":"invalid_request_error","code":null,"param":null}}'
CHUNKED_END = b"0\r\n\r\n"


def sse_events(n: int, full: bool = False) -> list[bytes]:
    """`n` Responses stream events (created, deltas, completed), each one chunk of a chunked body.

    `full` (n >= 4): the stream a client that rebuilds the response needs, as OpenAI sends it: the
    output item and its content part announced before the deltas, which name them, and the whole
    response in `response.completed` (the openai Node SDK's stream helper, which the original
    proxy relays through, fails on the second event of the short form)."""
    if full and n >= 4:
        return [_frame(ev) for ev in _full_events(n)]
    created = {
        "type": "response.created",
        "sequence_number": 0,
        "response": {"id": "resp_bench", "model": "m"},
    }
    events = [created]
    for i in range(max(n - 2, 0)):
        events.append({"type": "response.output_text.delta", "sequence_number": i + 1, "delta": f"tok{i} "})
    events.append(
        {
            "type": "response.completed",
            "sequence_number": n - 1,
            "response": {
                "id": "resp_bench",
                "status": "completed",
                "usage": {"input_tokens": 5, "output_tokens": n},
            },
        }
    )
    return [_frame(ev) for ev in events[:n]]


def _frame(ev: dict) -> bytes:
    frame = b"event: " + ev["type"].encode() + b"\ndata: " + compact(ev) + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(frame), frame)


def _full_events(n: int) -> list[dict]:
    """created, output_item.added, content_part.added, n - 4 deltas, completed: n events."""
    tokens = [f"tok{i} " for i in range(n - 4)]
    part = {"type": "output_text", "text": "", "annotations": []}
    item = {"id": "msg_1", "type": "message", "role": "assistant", "status": "in_progress", "content": []}
    where = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    events: list[dict] = [
        {"type": "response.created", "response": {"id": "resp_bench", "object": "response",
                                                  "status": "in_progress", "model": "m", "output": []}},
        {"type": "response.output_item.added", "output_index": 0, "item": item},
        {"type": "response.content_part.added", **where, "part": part},
    ]  # fmt: skip
    events += [{"type": "response.output_text.delta", **where, "delta": t} for t in tokens]
    done = {**item, "status": "completed", "content": [{**part, "text": "".join(tokens)}]}
    events.append(
        {
            "type": "response.completed",
            "response": {
                "id": "resp_bench",
                "object": "response",
                "status": "completed",
                "model": "m",
                "output": [done],
                "usage": {"input_tokens": 5, "output_tokens": n, "total_tokens": n + 5},
            },
        }
    )
    return [{"type": ev.pop("type"), "sequence_number": i, **ev} for i, ev in enumerate(events)]


def head(status: int, length: int | None, content_type: bytes) -> bytes:
    reason = b"OK" if status == 200 else b"Not Found"
    lines = [
        b"HTTP/1.1 %d %s" % (status, reason),
        b"Content-Type: " + content_type,
        b"x-request-id: req_bench",
        b"Content-Length: %d" % length if length is not None else b"Transfer-Encoding: chunked",
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def answer(status: int, body: bytes) -> bytes:
    return head(status, len(body), b"application/json") + body
