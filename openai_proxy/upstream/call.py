"""One upstream call, as the routes describe it, and the credentials it is made with."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from openai_proxy.jsonio import dumps_text
from openai_proxy.record import RequestRecord, TimeoutDecision
from openai_proxy.redact import redact_text

log = logging.getLogger("openai_proxy.upstream")


def authorization(key: str) -> tuple[str, str]:
    """The upstream `Authorization` header for an API key: the one place it is spelled."""
    return ("Authorization", f"Bearer {key}")


@dataclass(frozen=True)
class Credentials:
    """Who the upstream call is made as: overrides from the request, else the configured values.

    `pooled`: the request brought no key of its own and the proxy has a key pool, so `api_key` is None
    and each attempt takes a key from the pool (`openai_proxy.keys.pool`), among `key_names` if given
    (a client restricted to named keys). `object_key`: the pool key that holds the stored object the
    call is about (`openai_proxy.objects`); every attempt goes to that key, or to none.
    """

    api_key: str | None
    project: str | None
    organization: str | None
    pooled: bool = False
    key_names: frozenset[str] | None = None
    object_key: str | None = None

    def header_list(self) -> list[tuple[str, str]]:
        """`Authorization`, `OpenAI-Project`, `OpenAI-Organization`: only those that are set."""
        out = [authorization(self.api_key)] if self.api_key else []
        if self.project:
            out.append(("OpenAI-Project", self.project))
        if self.organization:
            out.append(("OpenAI-Organization", self.organization))
        return out


@dataclass
class UpstreamCall:
    """What to send upstream, as whom, how long to wait for headers, and how often to try.

    `path` is below the base URL's path (`/chat/completions`); `query` is sent as given, `params` are
    encoded the way the SDK encodes them. `body` is bytes or an iterable of bytes (with
    `content_length` when known; one with `replayable = True` may be iterated again for a failover); `form` and `files` make a multipart upload instead.
    """

    method: str
    path: str
    record: RequestRecord
    timeout: TimeoutDecision
    credentials: Credentials
    query: str = ""
    params: Mapping[str, Any] | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | Iterable[bytes] | None = None
    content_length: int | None = None
    retries: int = 0
    form: Mapping[str, Any] | None = None
    files: Any = None


# Who else keeps the retries and failovers of calls (the log store: /log_errors shows them).
RetrySink = Callable[[dict[str, Any]], None]


def report_retry(
    record: RequestRecord,
    sinks: list[RetrySink],
    kind: str,
    attempt: int,
    path: str,
    reason: str,
    **extra: Any,
) -> None:
    """Count one more attempt of the request (an SDK retry, a key failover), log it, and hand the
    same event once to whoever else keeps retries (the log store: /log_errors shows them)."""
    record.retries += 1
    event = {"event": kind, "requestId": record.request_id, "endpoint": record.endpoint, "attempt": attempt,
             "retry": record.retries, "upstreamPath": path, **extra, "reason": redact_text(reason)}  # fmt: skip
    log.warning(dumps_text(event))
    for sink in sinks:
        try:
            sink(event)
        except Exception:
            log.exception("retry sink %r failed", sink)
