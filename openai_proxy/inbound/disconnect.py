"""Noticing that the client hung up, without reading from its socket.

Under gunicorn's gevent worker the client socket is `environ["gunicorn.socket"]`. While we wait on
upstream, nothing reads that socket, so "readable" can only mean the client sent more (pipelining,
rare) or closed it. A libev I/O watcher (no greenlet, no polling) peeks once when it becomes
readable: zero bytes means the client is gone. Without a real socket (the Flask test client) the
watch is inert.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import gevent
from gevent import Greenlet

from openai_proxy.errors import ClientCancelled

_READ = 1  # libev/libuv EV_READ


class DisconnectWatch:
    """Calls `on_gone` (from the event loop) once if the client closes its connection."""

    __slots__ = ("_on_gone", "_raw", "_watcher", "gone")

    def __init__(self, environ: dict[str, Any]) -> None:
        sock = environ.get("gunicorn.socket")
        # gevent sockets wrap a non-blocking OS socket; peeking must not go through gevent's
        # blocking recv, since the callback runs in the hub.
        self._raw = getattr(sock, "_sock", sock) if sock is not None else None
        self._watcher = None
        self._on_gone: Callable[[], None] | None = None
        self.gone = False

    def start(self, on_gone: Callable[[], None]) -> DisconnectWatch:
        if self._raw is None or self._watcher is not None or self.gone:
            return self
        try:
            fd = self._raw.fileno()
        except OSError:
            return self
        if fd < 0:
            return self
        self._on_gone = on_gone
        self._watcher = gevent.get_hub().loop.io(fd, _READ)
        self._watcher.start(self._readable)
        return self

    def stop(self) -> None:
        watcher, self._watcher = self._watcher, None
        self._on_gone = None
        if watcher is not None:
            watcher.stop()
            watcher.close()

    def _readable(self) -> None:
        try:
            data = self._raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        on_gone = self._on_gone
        self.stop()
        if data or on_gone is None:
            return  # the client sent more: it is still there, and we cannot tell more from here
        self.gone = True
        on_gone()


def cancel(target: Any) -> None:
    """Raise ClientCancelled in `target` wherever it waits (called from the event loop)."""
    error = ClientCancelled("The client closed the connection")
    if isinstance(target, Greenlet):
        target.kill(error, block=False)
    else:
        gevent.get_hub().loop.run_callback(target.throw, error)


def cancel_current_greenlet(environ: dict[str, Any]) -> DisconnectWatch:
    """Watch the client; if it leaves, raise ClientCancelled in this greenlet wherever it waits."""
    target = gevent.getcurrent()
    return DisconnectWatch(environ).start(lambda: cancel(target))
