"""The fleet-wide gate: `OPENAI_PROXY_MAX_PARALLEL_REQUESTS` across every server that shares one Redis.

Slots are leases: the members of one sorted set (`openai-proxy:gate`), each a lease id scored by the
moment it expires on Redis's own clock (so the hosts' clocks never matter). Taking a slot is one Lua
script, one round trip: drop the expired leases, count, add one if below the limit, atomically, so the
limit is exact however many workers and hosts ask at once. Giving one back is one ZREM, before the
answer is complete, so a client that got its answer never finds its own slot still taken. Commands go
through `openai_proxy.redis_link` (redis-py's connections, without its costlier client layer). A renewer (one
background greenlet per worker, running while the worker holds leases) extends all of that worker's
leases every lease/3 seconds in one round trip. A server that dies (power off, `kill -9` of master and
workers) stops renewing, so its slots come back when their leases expire: within
`OPENAI_PROXY_GATE_LEASE_S`. Lease ids read `host:pid:nonce:n`, so
`redis-cli ZRANGE openai-proxy:gate 0 -1 WITHSCORES` shows who holds what, and until when.

Redis down or slow: every call has a connect and read timeout (`OPENAI_PROXY_REDIS_TIMEOUT_S`, 0.25 s),
and nothing is retried after a timeout (only a kept connection that Redis closed meanwhile is replaced,
at once). A failure opens the link's breaker (`openai_proxy.redis_link.Breaker`): this worker takes its
slots from the host's own gate (`openai_proxy.gate.local.Gate`, the same limit) without asking Redis,
and its renewer asks Redis again every `OPENAI_PROXY_REDIS_RETRY_S` (1 s; a third of the lease if that
is shorter); once Redis answers, the fleet-wide gate is used again. An outage therefore costs one
timeout to each request in flight when it starts, and none after that; those requests still get their
slot, from the host's gate. `/health` reports the backend,
whether Redis is reachable and says `degraded` while falling back; `/metrics` has
`openai_proxy_gate_fallback`.

Why fall back rather than fail closed (503 for every call while Redis is unreachable): sites run several
hosts for availability, and a gate that refuses everything without Redis would make one Redis the single
point of failure of the whole fleet. The bound protects upstream capacity, and upstream enforces its own
rate limits (429s that clients already handle). While falling back every host still holds its own
limit, so the fleet makes at most hosts x limit upstream calls: exactly the bound of running without
this gate, never unbounded. What the fallback costs, for as long as those calls last:
- calls admitted by a host's gate during an outage are not in Redis, so when Redis is back the fleet
  may be over its limit by them until they end;
- a Redis that restarts empty has forgotten the leases held at that moment (same effect; the renewers
  log how many leases they lost).
Every host should set the same `OPENAI_PROXY_MAX_PARALLEL_REQUESTS`: each admits against its own.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.exceptions import RedisError

from openai_proxy.gate import Slot
from openai_proxy.gate.local import Gate
from openai_proxy.jsonio import iso_or_none
from openai_proxy.redis_link import RETRY_S, TIMEOUT_S, RedisLink

log = logging.getLogger("openai_proxy.gate")

KEY = "openai-proxy:gate"

# Redis's clock in milliseconds (TIME is allowed in scripts since Redis 5: effects are replicated).
_NOW = "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"

# KEYS[1] the leases; ARGV limit, lease ms, lease id. Returns {granted, leases in use afterwards}.
ACQUIRE = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local busy = redis.call('ZCARD', KEYS[1])
-- A call repeated after its connection broke may already hold its lease: it must not count itself.
if redis.call('ZSCORE', KEYS[1], ARGV[3]) then
  return {1, busy}
end
if busy >= tonumber(ARGV[1]) then
  return {0, busy}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
return {1, busy + 1}
"""
)

# KEYS[1] the leases; ARGV lease ms, n, then n lease ids to extend, then ids to drop (released while
# Redis did not answer). Returns the ids to extend that were no longer leased: an expired lease is
# free (another host may have its slot by now), so it is dropped, never revived.
RENEW = (
    _NOW
    + """
local lease, n, lost = tonumber(ARGV[1]), tonumber(ARGV[2]), {}
for i = 3, 2 + n do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) > now then
    redis.call('ZADD', KEYS[1], now + lease, ARGV[i])
  else
    lost[#lost + 1] = ARGV[i]
    if score then redis.call('ZREM', KEYS[1], ARGV[i]) end
  end
end
for i = 3 + n, #ARGV do
  redis.call('ZREM', KEYS[1], ARGV[i])
end
return lost
"""
)

IN_USE = _NOW + "return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')\n"


def shown_uri(uri: str) -> str:
    """The URI without its user and password (what pages and logs may show)."""
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


class RedisGate:
    """Fleet-wide, non-blocking slot allocator: leases in Redis, the host's `Gate` while Redis is out."""

    def __init__(
        self,
        uri: str,
        limit: int,
        lease_s: int,
        *,
        fallback: Gate,
        key: str = KEY,
        timeout_s: float = TIMEOUT_S,
        retry_s: float = RETRY_S,
    ) -> None:
        self.limit = limit
        self.lease_s = lease_s
        self.key = key
        self.fallback = fallback
        self.uri = shown_uri(uri)
        self.peak = 0
        self.on_new_peak: Callable[[int], None] | None = None
        # The host's gate reports its own (host-wide) peaks here while it stands in.
        fallback.on_new_peak = self._raise_peak
        self._link = RedisLink(uri, timeout_s, retry_s)
        self._breaker = self._link.breaker  # open: Redis failed; the host's gate stands in
        # Greenlets (or a dev server's threads) share these; the lock is never held across a Redis call.
        self._lock = threading.Lock()
        self._held: set[str] = set()  # leases this worker holds and renews
        self._stale: set[str] = set()  # leases released (or maybe granted) while Redis did not answer
        self._renewer: threading.Thread | None = None
        self._wake = threading.Event()
        self._closed = False
        self._pid = 0
        self._prefix = ""
        self._ids = itertools.count(1)

    @property
    def lease_ms(self) -> int:
        return self.lease_s * 1000

    # -- the interface ------------------------------------------------------------------------------
    def try_acquire(self) -> Slot | None:
        """A lease id, a slot of the host's gate while Redis is out, or None when the fleet is full."""
        if self._breaker.down_since is None:
            lease = self._new_lease_id()
            try:
                granted, busy = self._script(ACQUIRE, self.limit, self.lease_ms, lease)
            except BaseException as exc:
                with self._lock:
                    self._stale.add(lease)  # granted perhaps, before the answer was lost
                if not isinstance(exc, RedisError):
                    raise  # not Redis's doing (the greenlet is being killed, ...): nothing to fall back for
                self._failed(exc)
            else:
                if not granted:
                    return None
                self._hold(lease)
                self._raise_peak(int(busy))
                return lease
        return self.fallback.try_acquire()

    def release(self, slot: Slot) -> None:
        """Give a slot back; releasing twice is harmless, and never raises (nor waits while Redis is out)."""
        if isinstance(slot, int):
            self.fallback.release(slot)
            return
        with self._lock:
            if slot not in self._held:
                return
            self._held.discard(slot)
            if self._breaker.down_since is not None:
                self._stale.add(slot)  # dropped by the renewer once Redis answers; else it expires
                return
        try:
            self._link.call("ZREM", self.key, slot)
        except RedisError as exc:
            with self._lock:
                self._stale.add(slot)
            self._failed(exc)

    def in_use(self) -> int:
        """Live leases of the whole fleet; the host's gate's count while Redis is out."""
        if self._breaker.down_since is None:
            try:
                return int(self._script(IN_USE))
            except RedisError as exc:
                self._failed(exc)
        return self.fallback.in_use()

    def held_here(self) -> int:
        return len(self._held) + self.fallback.held_here()

    def status(self) -> dict[str, Any]:
        down = self._breaker.down_since
        return {
            "backend": "redis",
            "scope": "host" if down is not None else "fleet",
            "fallback": down is not None,
            "leaseS": self.lease_s,
            "redis": {
                "uri": self.uri,
                "reachable": down is None,
                "unreachableSince": iso_or_none(down),
                "lastError": self._breaker.last_error,
            },
        }

    def close(self) -> None:
        """Stop renewing and give back what this worker still holds (best effort)."""
        with self._lock:
            self._closed = True
            held = list(self._held | self._stale) if self._pid == os.getpid() else []
            self._held.clear()
            self._stale.clear()
        self._wake.set()
        if held and self._breaker.down_since is None:
            with contextlib.suppress(RedisError):  # else they expire within the lease
                self._link.call("ZREM", self.key, *held)
        self._link.close()
        self.fallback.close()

    # -- leases and the renewer ---------------------------------------------------------------------
    def _script(self, text: str, *args: Any) -> Any:
        return self._link.script(text, self.key, args)

    def _new_lease_id(self) -> str:
        pid = os.getpid()
        if pid != self._pid:
            # The first lease of this process (or a fork: the parent's leases, renewer and counter
            # are not this process's).
            with self._lock:
                if pid != self._pid:  # threads that asked at once: the first one starts the series
                    self._held, self._stale, self._renewer = set(), set(), None
                    self._prefix = f"{socket.gethostname()}:{pid}:{secrets.token_hex(2)}:"
                    self._ids = itertools.count(1)
                    self._pid = pid  # last: a thread that sees it sees the prefix and counter too
        return f"{self._prefix}{next(self._ids)}"

    def _hold(self, lease: str) -> None:
        with self._lock:
            self._held.add(lease)
            start = self._claim_renewer()
        if start is not None:
            start.start()

    def _claim_renewer(self) -> threading.Thread | None:
        """Under the lock: a new renewer to start, or None when one runs (or the gate is closed)."""
        if self._renewer is not None or self._closed:
            return None
        self._renewer = threading.Thread(target=self._renew_loop, name="gate-renewer", daemon=True)
        return self._renewer

    def _renew_loop(self) -> None:
        while True:
            down = self._breaker.down_since is not None
            woken = self._wake.wait(self._probe_interval_s() if down else self.lease_s / 3)
            self._wake.clear()
            if woken and not self._closed:
                continue  # the breaker opened during a long renewal wait: probe at the probe interval
            with self._lock:
                if self._closed or self._renewer is not threading.current_thread():
                    return
                held, stale = list(self._held), list(self._stale)
                if not held and not stale and self._breaker.down_since is None:
                    self._renewer = None  # decided under the lock: the next lease starts a new one
                    return
            try:
                # Also the probe while the breaker is open: one round trip that proves Redis works.
                lost_raw = self._script(RENEW, self.lease_ms, len(held), *held, *stale)
            except RedisError as exc:
                self._failed(exc)
                continue
            except Exception:  # never let the renewer die: held leases would expire under live calls
                log.exception("gate: renewing leases failed")
                continue
            lost = {item.decode() if isinstance(item, bytes) else str(item) for item in lost_raw}
            with self._lock:
                self._stale.difference_update(stale)
                lost &= self._held
                self._held -= lost
            self._recovered()
            if lost:
                log.warning(
                    "gate: %d lease(s) of this worker were gone from Redis (expired while it did not "
                    "answer, or Redis restarted or was flushed); their calls go on, and the fleet may be "
                    "over its limit by them until they end",
                    len(lost),
                )

    # -- the breaker --------------------------------------------------------------------------------
    def _probe_interval_s(self) -> float:
        """While Redis does not answer, the renewer asks it this often (renewing leases as it does)."""
        return min(self._breaker.retry_s, self.lease_s / 3)

    def _failed(self, exc: Exception) -> None:
        with self._lock:
            opened = self._breaker.failed(exc)
            start = self._claim_renewer()  # it probes Redis until it answers
        if start is not None:
            start.start()
        elif opened:
            self._wake.set()  # a renewer waiting out lease/3 now waits the probe interval instead
        if opened:
            log.warning(
                "gate: Redis at %s does not answer (%s): this worker uses the host's own gate "
                "(limit %d) and asks Redis again every %g s",
                self.uri,
                self._breaker.last_error,
                self.limit,
                self._probe_interval_s(),
            )

    def _recovered(self) -> None:
        with self._lock:
            since = self._breaker.answered()
        if since is not None:
            log.warning(
                "gate: Redis at %s answers again after %.1f s: the fleet-wide gate is used again",
                self.uri,
                time.time() - since,
            )

    def _raise_peak(self, busy: int) -> None:
        if busy > self.peak:
            self.peak = busy
            if self.on_new_peak is not None:
                self.on_new_peak(busy)
