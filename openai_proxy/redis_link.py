"""The Redis toolkit of the shared backends (the fleet-wide gate, the client limits): one small client
for the hot path, one breaker, one timeout and one retry interval (`OPENAI_PROXY_REDIS_TIMEOUT_S`,
`OPENAI_PROXY_REDIS_RETRY_S`).

redis-py's `Connection` speaks the protocol (RESP, AUTH and SELECT from the URL, TLS for rediss://,
socket timeouts). Its `Redis` client and `ConnectionPool` add, per command, a connection health poll,
observability hooks and locking: ~60 µs of CPU on top of the ~35 µs a command costs here under
gevent, which the fleet-wide gate would pay twice per request. `RedisLink` keeps the connections in a
plain list instead, and retries nothing that could have waited: it is for short commands whose
callers decide what a failure means.

What they decide is kept in the link's `Breaker`, the one notion of an outage both backends share:
Redis failed at T, so the backend uses its local fallback until a call works again, and asks Redis
again once per retry interval meanwhile. Who asks is the backend's policy (the gate's renewer probes
in the background; the limits let one request try).
"""

from __future__ import annotations

import hashlib
import os
import time
import weakref
from collections.abc import Sequence
from typing import Any

import redis
from redis.connection import AbstractConnection
from redis.driver_info import DriverInfo
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from openai_proxy.config import Config
from openai_proxy.redact import redact_text

# The defaults of the settings, for a backend made without a Config (tests, benchmarks).
TIMEOUT_S: float = Config.redis_timeout_s
RETRY_S: float = Config.redis_retry_s


class Breaker:
    """Whether Redis answers, for a backend that falls back while it does not: open from a failure
    (`down_since`) until a call succeeds again. No lock: each update is a few attribute writes, which
    greenlets never interleave (a dev server's threads could at worst log one outage twice)."""

    __slots__ = ("down_since", "last_error", "retry_at", "retry_s")

    def __init__(self, retry_s: float) -> None:
        self.retry_s = retry_s
        self.down_since: float | None = None  # wall time of the failure that opened it; None: closed
        self.retry_at = 0.0  # monotonic: while open, when a caller may ask Redis again
        self.last_error: str | None = None  # masked: /health shows it and the backends log it

    def may_try(self) -> bool:
        """Whether to ask Redis now: always while it answers; while it does not, once per retry
        interval (that caller asks, the others use the fallback meanwhile)."""
        if self.down_since is None:
            return True
        now = time.monotonic()
        if now < self.retry_at:
            return False
        self.retry_at = now + self.retry_s
        return True

    def failed(self, exc: BaseException) -> bool:
        """Note a failed call; True when it opens the breaker (an outage starts: say so once)."""
        self.last_error = redact_text(f"{type(exc).__name__}: {exc}")
        self.retry_at = time.monotonic() + self.retry_s
        if self.down_since is None:
            self.down_since = time.time()
            return True
        return False

    def answered(self) -> float | None:
        """Note a call that worked; the wall time the outage it ends began, or None (there was none)."""
        since, self.down_since = self.down_since, None
        return since


# Every link of this process, so a forked child drops the parent's connections (its sockets are
# the parent's) once, at the fork, instead of each call asking for the pid.
_LINKS: weakref.WeakSet[RedisLink] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for link in list(_LINKS):
        link._free = []


os.register_at_fork(after_in_child=_after_fork_in_child)


class RedisLink:
    """One worker's connections to one Redis, one command per round trip, and its `breaker`.
    Connections wait in a LIFO list (greenlets never preempt between a pop and an append); one is made
    whenever none is free."""

    def __init__(self, uri: str, timeout_s: float = TIMEOUT_S, retry_s: float = RETRY_S) -> None:
        pool = redis.ConnectionPool.from_url(
            uri,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            socket_keepalive=True,
            # No CLIENT SETINFO round trips on every new connection.
            driver_info=DriverInfo(name=None, lib_version=None),
        )
        self._class, self._kwargs = pool.connection_class, pool.connection_kwargs
        self._free: list[AbstractConnection] = []
        self._shas: dict[str, str] = {}
        self.breaker = Breaker(retry_s)
        _LINKS.add(self)

    def call(self, *args: Any) -> Any:
        """Send one command and return its reply. A connection that waited in the list and turns out
        broken (Redis restarted since) is replaced once, at once; a timeout is never repeated."""
        return self._send(args)

    def script(self, text: str, key: str, args: Sequence[Any] = ()) -> Any:
        """Run a Lua script on one key with `args`, by its digest (one round trip), loading it when
        Redis does not know it (a restarted Redis has forgotten every script)."""
        sha = self._shas.get(text)
        if sha is None:
            sha = self._shas[text] = hashlib.sha1(text.encode()).hexdigest()
        try:
            return self._send(("EVALSHA", sha, 1, key, *args))
        except NoScriptError:
            return self._send(("EVAL", text, 1, key, *args))

    def _send(self, command: tuple[Any, ...]) -> Any:
        # The hot path, kept lean: no contextlib.suppress, no pid check (a system call; forks are
        # `_after_fork_in_child`'s), no loop over attempts, no argument tuple built twice. Together
        # they cost ~1 µs of CPU per call, which the gate and the limits each pay twice a request.
        try:
            conn = self._free.pop()
            reused = True
        except IndexError:  # none free (a dev server's threads may race for the last one)
            conn, reused = self._class(**self._kwargs), False
        while True:
            try:
                conn.send_command(*command)
                reply = conn.read_response()
            except ResponseError:
                self._free.append(conn)  # an error reply was read whole: the connection is in step
                raise
            except RedisConnectionError:
                conn.disconnect()
                if not reused:
                    raise
                # Closed while it waited (Redis restarted, an idle timeout): Redis closed it before
                # the command arrived, so sending it again counts it once. The others waited as long.
                self.close()
                conn, reused = self._class(**self._kwargs), False
            except BaseException:
                conn.disconnect()  # a timeout, or the greenlet killed mid-call: never reuse it half read
                raise
            else:
                self._free.append(conn)
                return reply

    def close(self) -> None:
        free, self._free = self._free, []
        for conn in free:
            conn.disconnect()
