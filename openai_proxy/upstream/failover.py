"""One call through the key pool: a key per attempt, what each answer says about its key, and the
failovers the contract allows.

An attempt that failed before upstream accepted any work is sent again, on another usable key,
create calls included (nothing was billed):
- a key's refusal (429, 401, 403, `insufficient_quota`) is never the client's answer while another
  usable key is left: the call moves on to the next one, each key at most once per call, so it makes
  at most as many attempts as the pool has keys;
- a connect failure (connect error, TLS failure, connect timeout: the request never left) or a 503
  (upstream busy, not the key's fault) is sent again once per call, on another key.
The (small, capped) body of a refusal is read at once, so the connection can be reused, and kept for
whoever reads it next, in case it is what the client gets after all.
Never after any other status, after a timeout waiting for headers or a connection lost once the
request was sent (upstream may have started the work), nor once a stream has begun. And only if the
body can be sent again: bytes, a `/v1` upload received whole into its spool
(`openai_proxy.inbound.spool`), or a multipart upload the SDK re-reads from its spooled file. A call
about a stored object is pinned to the key that created it (`pinned`) and never fails over.

Each attempt is listed in the completion record (`attempts`: key name, outcome, status); a failover
is logged like an SDK retry (a warning line, and a retry row on `/log_errors`) and counted as one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx2

from openai_proxy import jsonio
from openai_proxy.keys import UpstreamKeys
from openai_proxy.keys import pool as kp
from openai_proxy.keys.pool import KeysUnavailable, Lease
from openai_proxy.keys.rest import rest_seconds
from openai_proxy.record import RequestRecord
from openai_proxy.upstream.call import RetrySink, report_retry
from openai_proxy.upstream.client import MAX_ERROR_BODY, UpstreamResponse

log = logging.getLogger("openai_proxy.upstream")

SendOnce = Callable[[str], UpstreamResponse]
# Answers that refuse the work before doing any: another key may take it.
REFUSED = frozenset({kp.RATE_LIMITED, kp.INSUFFICIENT_QUOTA, kp.UNAUTHORIZED, kp.FORBIDDEN, kp.UNAVAILABLE})
# Failures that say nothing against the key: sent again once per call, not once per key.
REPEATED_ONCE = frozenset({kp.CONNECT_ERROR, kp.UNAVAILABLE})
_BY_STATUS = {401: kp.UNAUTHORIZED, 403: kp.FORBIDDEN, 429: kp.RATE_LIMITED, 503: kp.UNAVAILABLE}


@dataclass
class PoolCall:
    """One logical upstream call's use of the pool: what it may use, what it tried, its failover."""

    pool: UpstreamKeys
    record: RequestRecord
    path: str
    sinks: list[RetrySink]
    allowed: frozenset[str] | None = None
    # The key that holds the stored object the call is about: the only key it may go to, no failover.
    pinned: str | None = None
    repeats: int = 1  # what is left of the one repeat of a connect failure or a 503
    tried: set[int] = field(default_factory=set)

    def first(self) -> Lease:
        """A key for the first attempt; KeysUnavailable (nothing sent) when none may take the call."""
        if self.pinned is not None:
            return self.pool.choose_named(self.pinned, self.record.model, self.allowed)
        return self.pool.choose(self.record.model, self.allowed)

    def send(self, send_once: SendOnce, *, replayable: bool, lease: Lease | None = None) -> UpstreamResponse:
        """Send with a pool key (`lease`, else one chosen now), failing over where that is safe.

        The returned response holds its key's lease until it is closed.
        """
        if lease is None:
            lease = self.first()
        while True:
            self.tried.add(lease.index)
            try:
                response = send_once(lease.key)
            except BaseException as exc:
                lease.release()
                outcome = _failure(exc)
                self._note(lease, outcome, None)
                following = self._failover(lease, outcome, str(exc)) if outcome == kp.CONNECT_ERROR else None
                if following is None:
                    raise
                lease = following
                continue
            response.lease = lease  # released when the response is closed: the call has ended
            try:
                outcome, rest_s = _judge(response)
            except BaseException:
                response.close()
                self._note(lease, kp.TRANSPORT_ERROR, response.status_code)
                raise
            self._note(lease, outcome, response.status_code)
            try:
                self.pool.report(lease.index, outcome, rest_s)
                following = None
                if outcome in REFUSED and replayable:
                    following = self._failover(lease, outcome, f"HTTP {response.status_code}")
            except BaseException:
                response.close()
                raise
            if following is None:
                return response
            response.close()
            lease = following

    def _note(self, lease: Lease, outcome: str, status: int | None) -> None:
        attempt: dict[str, Any] = {"key": lease.name, "outcome": outcome}
        if status is not None:
            attempt["status"] = status
        self.record.attempts.append(attempt)

    def _failover(self, failed: Lease, outcome: str, detail: str) -> Lease | None:
        """A usable key not yet tried by this call for one more attempt, or None (no key left, the
        call is pinned to one key, or the one repeat of a connect failure or 503 is spent)."""
        repeat = outcome in REPEATED_ONCE
        if self.pinned is not None or (repeat and self.repeats <= 0):
            return None
        try:
            following = self.pool.choose(self.record.model, self.allowed, exclude=self.tried)
        except KeysUnavailable:
            return None
        if repeat:
            self.repeats -= 1
        report_retry(self.record, self.sinks, "upstream_failover", len(self.record.attempts) + 1, self.path,
                     f"key {failed.name}: {outcome} ({detail}); sent again with key {following.name}",
                     key=failed.name, nextKey=following.name)  # fmt: skip
        return following


def _failure(exc: BaseException) -> str:
    """An attempt that got no answer: could it not connect (nothing sent), or did it fail later?"""
    if isinstance(exc, httpx2.ConnectError | httpx2.ConnectTimeout):
        return kp.CONNECT_ERROR
    if isinstance(exc, httpx2.TimeoutException):
        return kp.TIMEOUT
    if isinstance(exc, httpx2.TransportError):
        return kp.TRANSPORT_ERROR
    return kp.ABORTED  # the client left, or the worker is stopping


def _judge(response: UpstreamResponse) -> tuple[str, float | None]:
    """The outcome of an answer for its key, and for a 429 how long upstream wants the key to rest."""
    status = response.status_code
    if status < 400:
        return kp.OK, None
    outcome = _BY_STATUS.get(status)
    if outcome is None:
        return (kp.CLIENT_ERROR if status < 500 else kp.SERVER_ERROR), None
    body = response.buffer_body(MAX_ERROR_BODY)
    if status == 429:
        if _is_insufficient_quota(body):
            return kp.INSUFFICIENT_QUOTA, None
        return kp.RATE_LIMITED, rest_seconds(response.headers)
    return outcome, None


def _is_insufficient_quota(body: bytes) -> bool:
    """OpenAI's "you exceeded your current quota" 429: `error.code` (or `type`) `insufficient_quota`."""
    if b"insufficient_quota" not in body:
        return False
    try:
        parsed = jsonio.loads(body)
    except jsonio.JSONDecodeError:
        return False
    error = parsed.get("error") if isinstance(parsed, dict) else None
    return isinstance(error, dict) and "insufficient_quota" in (error.get("code"), error.get("type"))
