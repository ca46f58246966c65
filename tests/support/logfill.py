"""A request log full of believable records, written fast through the log's own write path.

`records()` makes completion and retry records like a busy fleet's (clients with very different
traffic, several models and endpoints, errors, streams, cancellations, retried attempts, long ids
and names, costs from millionths of a dollar up), spread over a period that ends now, the last hour
included. `fill()` writes them with `openai_proxy.log.db.write_batch` in large batches: the same
transaction as the proxy's writer (records, counters, totals, spend and minute aggregates, trim),
thousands of records per statement instead of one request each. The browser tests use 10,000;
`bench/log_pages.py` a million.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from typing import Any

from openai_proxy.log import db as logdb
from openai_proxy.log.db import Batch
from openai_proxy.log.sql import open_database

# (name, share of the traffic): one client makes most calls, one almost none.
CLIENTS = (("default", 40), ("search-backend", 25), ("support-bot", 15), ("analytics-nightly-batch-jobs", 8),
           ("mobile-app", 6), ("eval-harness", 3), ("data-science-notebook-shared-team-account", 2),
           ("rare-client", 0.1))  # fmt: skip
# (endpoint, method, model, stream, USD per 1M tokens in / out)
CALLS = (("/openai", "POST", "gpt-4o-mini", False, 0.15, 0.60), ("/openai2", "POST", "gpt-4.1", True, 2.0, 8.0),
         ("/v1/chat/completions", "POST", "gpt-4o", False, 2.5, 10.0),
         ("/v1/responses", "POST", "o3-mini", True, 1.1, 4.4),
         ("/embeddings", "POST", "text-embedding-3-small", False, 0.02, 0.0),
         ("/openai/audio/transcriptions", "POST", "whisper-1", False, None, None))  # fmt: skip
ERRORS = ((400, "invalid_request_error", "Invalid 'messages[1].content': string too long. Expected a string "
           "with maximum length 1048576, but got a string with length 2301442 instead."),
          (401, "invalid_api_key", "Invalid security_key"),
          (404, "not_found", "No response with id 'resp_67ccd2bed1ec8190b14f964abc054267' found."),
          (429, "rate_limit_exceeded", "Rate limit reached for gpt-4o in organization org-abc on tokens per "
           "min (TPM): Limit 30000000, Used 29999980, Requested 1843. Please try again in 3ms."),
          (500, "upstream_error", "The server had an error while processing your request. Sorry about that!"),
          (502, "upstream_transport", "Could not reach OpenAI: connection reset by peer"),
          (503, "overloaded", "The proxy is at OPENAI_PROXY_MAX_PARALLEL_REQUESTS (32); try again shortly"))  # fmt: skip
HOSTS = ("web-1.eu-west.internal", "web-2.eu-west.internal", "web-3.us-east.internal")


def records(
    n: int, now: float, span_s: float, *, seed: int = 23, last_hour: int = 600
) -> Iterator[logdb.Queued]:
    """`n` records finished within `span_s` seconds before `now`, in time order, `last_hour` of them
    in the last hour (the chart's)."""
    rng = random.Random(seed)
    names, weights = zip(*CLIENTS, strict=True)
    older = sorted(now - 3600 - rng.random() * max(span_s - 3600, 1) for _ in range(n - last_hour))
    recent = sorted(now - rng.random() * 3600 for _ in range(min(last_hour, n)))
    for ts in (*older, *recent):
        if rng.random() < 0.01:
            yield "retry", _retry(rng), ts
        else:
            yield "completion", _completion(rng, rng.choices(names, weights)[0]), ts


def _id(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _completion(rng: random.Random, client: str) -> dict[str, Any]:
    endpoint, method, model, stream, usd_in, usd_out = rng.choice(CALLS)
    duration = round(rng.lognormvariate(6.5, 1.0), 1)
    entry: dict[str, Any] = {
        "event": "completion", "requestId": _id(rng),
        "incomingRequestId": f"job-{rng.randrange(10**6)}-{_id(rng)[:8]}" if rng.random() < 0.2 else None,
        "upstreamRequestId": f"req_{rng.getrandbits(96):024x}", "client": client, "endpoint": endpoint,
        "method": method, "model": model, "upstreamModel": f"{model}-2025-04-14", "stream": stream,
        "timeoutMs": 600000.0, "timeoutSource": rng.choice(("default",) * 20 + ("provided", "clamped")),
        "durationMs": duration, "upstreamMs": round(duration * 0.93, 1), "result": "ok", "status": 200,
        "retries": 0, "overloaded": False, "cancelled": False, "usage": None, "costUsd": None,
        "error": None, "host": rng.choice(HOSTS), "pid": rng.choice((4101, 4102, 4103, 4104)),
    }  # fmt: skip
    roll = rng.random()
    if roll < 0.08:
        status, kind, message = rng.choice(ERRORS)
        entry.update(status=status, result="error", error={"message": message, "type": kind, "code": kind},
                     upstreamRequestId=None if status in (401, 503) else entry["upstreamRequestId"],
                     overloaded=status == 503, retries=1 if status in (500, 502) else 0)  # fmt: skip
    elif roll < 0.09:
        entry.update(status=499, result="cancelled", cancelled=True)
    if entry["status"] == 200 and usd_in is not None:
        prompt = int(rng.lognormvariate(6, 1.3)) + 1
        cached = prompt // 2 if rng.random() < 0.3 else 0
        out = 0 if endpoint == "/embeddings" else int(rng.lognormvariate(5, 1.2)) + 1
        entry["usage"] = {"prompt_tokens": prompt, "cached_tokens": cached, "completion_tokens": out,
                          "total_tokens": prompt + out}  # fmt: skip
        entry["costUsd"] = round((prompt * usd_in + out * usd_out) / 1e6, 12)
    return entry


def _retry(rng: random.Random) -> dict[str, Any]:
    return {"event": "retry", "requestId": _id(rng), "endpoint": "/openai2/<response_id>", "attempt": 2,
            "retry": 1, "upstreamPath": "/responses/resp_abc", "reason": "HTTP 503 from upstream",
            "pid": 4102}  # fmt: skip


def fill(target: str, items: Iterator[logdb.Queued], *, batch: int = 5000, retention: int = 2_000_000) -> int:
    """Write `items` to the log at `target`, in batches of up to `batch` records of one host each (a
    record's `host`, as the writer of that host would); how many were written."""
    db = open_database(target, 10_000)
    written, seq = 0, 0
    chunks: dict[str, list[logdb.Queued]] = {}

    def write(host: str) -> None:
        nonlocal written, seq
        chunk = chunks.pop(host)
        seq += 1
        logdb.write_batch(
            db, Batch(f"{host}:0:fill", seq, host, 0, chunk, 0, 0, False, chunk[-1][2]), retention
        )
        written += len(chunk)

    try:
        logdb.create_schema(db)
        for item in items:
            host = item[1].get("host") or HOSTS[0]
            chunks.setdefault(host, []).append(item)
            if len(chunks[host]) == batch:
                write(host)
        for host in list(chunks):
            write(host)
    finally:
        db.close()
    return written
