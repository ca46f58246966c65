"""A small, cheap Redis client for the hot path: redis-py's connections without its client layer.

redis-py's `Connection` speaks the protocol (RESP, AUTH and SELECT from the URL, TLS for rediss://,
socket timeouts). Its `Redis` client and `ConnectionPool` add, per command, a connection health poll,
observability hooks and locking: ~60 µs of CPU on top of the ~35 µs a command costs here under
gevent, which the fleet-wide gate would pay twice per request. `RedisLink` keeps the connections in a
plain list instead, and retries nothing that could have waited: it is for short commands whose
callers decide what a failure means.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from typing import Any

import redis
from redis.connection import AbstractConnection
from redis.driver_info import DriverInfo
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

# Every link of this process, so a forked child drops the parent's connections (its sockets are
# the parent's) once, at the fork, instead of each call asking for the pid.
_LINKS: weakref.WeakSet[RedisLink] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for link in list(_LINKS):
        link._free = []


os.register_at_fork(after_in_child=_after_fork_in_child)


class RedisLink:
    """One worker's connections to one Redis, one command per round trip. Connections wait in a LIFO
    list (greenlets never preempt between a pop and an append); one is made whenever none is free."""

    def __init__(self, uri: str, timeout_s: float) -> None:
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
        _LINKS.add(self)

    def call(self, *args: Any) -> Any:
        """Send one command and return its reply. A connection that waited in the list and turns out
        broken (Redis restarted since) is replaced once, at once; a timeout is never repeated."""
        for attempt in range(2):
            # No contextlib.suppress and no pid check (a system call) here: ~0.5 µs each, per call.
            try:
                conn = self._free.pop() if attempt == 0 else None
            except IndexError:  # none free (a dev server's threads may race for the last one)
                conn = None
            reused = conn is not None
            if conn is None:
                conn = self._class(**self._kwargs)
            try:
                conn.send_command(*args)
                reply = conn.read_response()
            except ResponseError:
                self._free.append(conn)  # an error reply was read whole: the connection is in step
                raise
            except RedisConnectionError:
                conn.disconnect()
                if not reused:
                    raise
                self.close()  # the others waited as long: as likely broken
            except BaseException:
                conn.disconnect()  # a timeout, or the greenlet killed mid-call: never reuse it half read
                raise
            else:
                self._free.append(conn)
                return reply
        raise AssertionError("unreachable")

    def script(self, text: str, key: str, *args: Any) -> Any:
        """Run a Lua script on one key by its digest, loading it when Redis does not know it (a
        restarted Redis has forgotten every script)."""
        sha = self._shas.get(text)
        if sha is None:
            sha = self._shas[text] = hashlib.sha1(text.encode()).hexdigest()
        try:
            return self.call("EVALSHA", sha, 1, key, *args)
        except NoScriptError:
            return self.call("EVAL", text, 1, key, *args)

    def close(self) -> None:
        free, self._free = self._free, []
        for conn in free:
            conn.disconnect()
