"""The gunicorn worker (`gunicorn.conf.py` names it): gunicorn's gevent worker, plus a drain that a load
balancer can see, and the proxy's JSON for the errors gunicorn answers itself.

Stopping. SIGTERM to the master: the master (`gunicorn.conf.py` `when_ready`) first leaves a `stopping`
marker in the runtime dir, so `/ready` answers 503 in every worker from then on, then closes its copy
of the listening sockets and sends SIGTERM to the workers. gunicorn's own gevent worker notices that
within a second, then closes its listeners and waits for every connection, idle keep-alive ones too.
This one wakes at once and:
1. if the server is stopping, keeps accepting for `OPENAI_PROXY_DRAIN_DELAY_S`, so health checks get
   `/ready` 503 before connections are refused (a worker retired by a reload stops accepting at once:
   the new workers already serve the same sockets, and `/ready` stays 200);
2. closes its listeners and every idle keep-alive connection;
3. gives in-flight requests and streams the rest of `OPENAI_PROXY_GRACEFUL_TIMEOUT_S` (counted from
   the signal), then ends what still runs, a little before the master's SIGKILL, so `worker_exit`
   can still flush the log store.
From the signal on, every response says `Connection: close` (gunicorn does that once `alive` is false).

Errors. Requests gunicorn cannot parse (a bad request line, a header line over 8190 bytes, ...) and
crashes outside the app get gunicorn's HTML page (`Worker.handle_error`). Here gunicorn still picks
the status and writes its log lines, but the bytes sent are the proxy's JSON error (`openai_proxy.errors`):
OpenAI's shape when the path is known and under `/v1/`, the legacy shape otherwise.

The master imports this module (to find the class), so it imports nothing that loads ssl-using
libraries; the app's modules are imported where they are used, in the worker.
"""

from __future__ import annotations

import contextlib
import html
import os
import re
import socket
import time
from functools import partial
from typing import Any

import gevent
from gevent.event import Event
from gevent.pool import Pool
from gevent.server import StreamServer
from gunicorn import util
from gunicorn.http.message import Request
from gunicorn.sock import ssl_context
from gunicorn.workers.ggevent import GeventWorker

STOPPING_MARKER = "stopping"
# What the master's last reload (SIGHUP) made of the clients and prices files, for `/health`.
RELOAD_STATUS = "reload.json"
# Kept back from the graceful timeout: time to end what still runs and flush the log store before the
# master's SIGKILL (the master counts the same timeout from the same signal).
EXIT_MARGIN_S = 0.5
# A supervisor that signals the whole process group (systemd's default) reaches workers and master at
# once: a worker that sees no marker yet looks again after this long before taking it for a reload.
LATE_MARKER_S = 0.1
MAX_MESSAGE = 300
# After an error answer, the client's unread bytes are read for at most this long / this much.
LINGER_S = 1.0
LINGER_BYTES = 1024 * 1024
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) ([^\r\n]*)\r\n")
_PAGE_MESSAGE = re.compile(rb"</h1>\s*(.*?)\s*</body>", re.S)


def mark_server_stopping(runtime_dir: str) -> None:
    """Say, for every worker's `/ready` and `/health`, that the server was told to stop."""
    with open(os.path.join(runtime_dir, STOPPING_MARKER), "w") as marker:
        marker.write(str(os.getpid()))


def clear_server_stopping(runtime_dir: str) -> None:
    """Forget a stop marker (a server starting in a runtime dir that an earlier one left behind)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(runtime_dir, STOPPING_MARKER))


def server_stopping(runtime_dir: str) -> bool:
    """Whether the server using `runtime_dir` was told to stop (SIGTERM); a stat, cheap enough per request."""
    return os.path.exists(os.path.join(runtime_dir, STOPPING_MARKER))


def write_reload_status(runtime_dir: str, problems: list[dict[str, str]], at: float | None = None) -> None:
    """Record, for every worker's `/health`, what the reload that just ran made of the files it checks
    (`problems`: `{"file", "problem"}` for each file refused, its previous version kept)."""
    from openai_proxy import jsonio

    status = {"at": time.time() if at is None else at, "ok": not problems, "problems": problems}
    path = os.path.join(runtime_dir, RELOAD_STATUS)
    temporary = f"{path}.{os.getpid()}.new"
    with open(temporary, "wb") as f:
        f.write(jsonio.dumps(status))
    os.replace(temporary, path)  # a reader sees the old status or the new one, never half of one


def clear_reload_status(runtime_dir: str) -> None:
    """A server starting knows of no reload yet (an earlier server may have left one behind)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(runtime_dir, RELOAD_STATUS))


def reload_status(runtime_dir: str) -> dict[str, Any] | None:
    """The last reload's `{"at", "ok", "problems"}`, or None when there was none (or it is unreadable)."""
    from openai_proxy import jsonio

    try:
        with open(os.path.join(runtime_dir, RELOAD_STATUS), "rb") as f:
            status = jsonio.loads(f.read())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


class ProxyWorker(GeventWorker):
    """gunicorn's gevent worker that drains visibly on SIGTERM and answers its own errors in JSON."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._wake: Event | None = None  # made in run(), after the fork
        self._stop_signalled_at: float | None = None
        self._accepting = True
        # Client connections waiting for their next request; closed at once when the listeners close.
        self._idle: set[socket.socket] = set()

    # -- stopping ------------------------------------------------------------------------------------
    def handle_exit(self, sig: int, frame: Any) -> None:
        # A Python signal handler runs between any two bytecodes of whatever runs, possibly inside
        # Event.wait() between its flag check and its wait: setting the event here could be missed.
        # The hub sets it instead, from its loop, where no wait is half done.
        super().handle_exit(sig, frame)
        self._stop_signalled_at = time.monotonic()
        if self._wake is not None:
            gevent.get_hub().loop.run_callback_threadsafe(self._wake.set)

    def run(self) -> None:
        self._wake = Event()
        if not self.alive:
            return  # told to stop while it was booting
        servers = self._start_servers()
        while self.alive:
            self.notify()
            self._wake.wait(1.0)
        signalled = self._stop_signalled_at or time.monotonic()
        deadline = signalled + max(self.cfg.graceful_timeout - EXIT_MARGIN_S, 0.0)
        try:
            self._keep_accepting_until(signalled + self._drain_delay())
            self._accepting = False
            for server in servers:
                server.close()
            for client in list(self._idle):
                _shut(client)
            self._finish_in_flight(servers, deadline)
        except Exception:
            self.log.exception("Error while draining (pid:%s)", self.pid)

    def _start_servers(self) -> list[StreamServer]:
        # As gunicorn's GeventWorker.run() starts them (its plain StreamServer branch).
        ssl_args = {"ssl_context": ssl_context(self.cfg)} if self.cfg.is_ssl else {}
        servers = []
        for listener in self.sockets:
            listener.setblocking(1)
            server = StreamServer(
                listener,
                handle=partial(self.handle, listener),
                spawn=Pool(self.worker_connections),
                **ssl_args,
            )
            if self.cfg.workers > 1:
                server.max_accept = 1
            server.start()
            servers.append(server)
        return servers

    def _drain_delay(self) -> float:
        """How long to keep accepting after the signal: the drain delay if the whole server stops."""
        st = self._proxy_state()
        delay = float(st.config.drain_delay_s) if st is not None else 0.0
        if delay <= 0:
            return 0.0
        if server_stopping(st.runtime_dir):
            return delay
        gevent.sleep(LATE_MARKER_S)
        return delay if server_stopping(st.runtime_dir) else 0.0

    def _keep_accepting_until(self, until: float) -> None:
        while (left := until - time.monotonic()) > 0:
            self.notify()
            gevent.sleep(min(left, 1.0))

    def _finish_in_flight(self, servers: list[StreamServer], deadline: float) -> None:
        while any(server.pool.free_count() != server.pool.size for server in servers):
            left = deadline - time.monotonic()
            if left <= 0:
                self.log.warning("Worker graceful timeout (pid:%s)", self.pid)
                for server in servers:
                    server.stop(timeout=0)
                return
            self.notify()
            for server in servers:
                server.pool.join(timeout=min(left, 1.0))

    def _proxy_state(self) -> Any:
        return getattr(getattr(self, "wsgi", None), "extensions", {}).get("openai_proxy")

    def handle(self, listener: Any, client: socket.socket, addr: Any) -> None:
        self._idle.add(client)
        try:
            super().handle(listener, client, addr)
        finally:
            self._idle.discard(client)

    def handle_request(self, listener_name: Any, req: Any, sock: socket.socket, addr: Any) -> Any:
        self._idle.discard(sock)
        keep_open = super().handle_request(listener_name, req, sock, addr)
        if not self._accepting:
            # The listeners closed while this request ran: its connection ends with it.
            raise StopIteration()
        self._idle.add(sock)
        return keep_open

    # -- gunicorn's own error answers ----------------------------------------------------------------
    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        page = _Recorder(client)
        # gunicorn decides the status (400, 403, 414, 417, 431, 500, 501, ...) and logs as usual; only
        # what it would have sent is replaced.
        super().handle_error(req, page, addr, exc)
        head = _STATUS_LINE.match(bytes(page.sent))
        if head is None:
            return
        status, reason = int(head.group(1)), head.group(2).decode("latin-1")
        found = _PAGE_MESSAGE.search(bytes(page.sent))
        detail = html.unescape(found.group(1).decode("latin-1")) if found else ""
        try:
            util.write_nonblock(client, _json_error(status, reason, detail, _request_path(req, exc)))
        except Exception:
            self.log.debug("Failed to send error message.")
            return
        _linger(client)


class _Recorder:
    """Stands in for the client socket while gunicorn renders its error page, and keeps the bytes."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self.sent = bytearray()

    def sendall(self, data: bytes) -> None:
        self.sent += data

    def gettimeout(self) -> float:
        return 0.0  # so gunicorn does not toggle the real socket's blocking mode around the write

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _request_path(req: Any, exc: BaseException) -> str | None:
    """The failed request's path, if gunicorn got as far as its request line.

    Bad headers fail inside gunicorn's `Request` constructor, so `req` is None there; the half-built
    request (its request line parsed) is still `self` in one of the traceback's frames.
    """
    found = req if isinstance(req, Request) else getattr(exc, "req", None)
    tb = exc.__traceback__
    while not isinstance(found, Request) and tb is not None:
        found = tb.tb_frame.f_locals.get("self")
        tb = tb.tb_next
    path = found.path if isinstance(found, Request) else None
    return path if isinstance(path, str) else None


def _json_error(status: int, reason: str, detail: str, path: str | None) -> bytes:
    """A whole HTTP/1.1 answer: gunicorn's status, the proxy's JSON error body, then close."""
    # Imported here, in the worker: the master imports this module and must not load the SDK.
    from openai_proxy import jsonio
    from openai_proxy.errors import BadRequest, Forbidden, Internal, ProxyError
    from openai_proxy.extension import CORS_ALLOW_HEADERS, CORS_EXPOSE_HEADERS, CORS_METHODS
    from openai_proxy.record import new_request_id
    from openai_proxy.redact import redact_text

    err: ProxyError
    if status == 403:
        err = Forbidden(reason)
    elif status >= 500 and status != 501:  # 501: a transfer coding the client chose
        err = Internal("Internal proxy error", status=status)
    else:
        message = f"{reason}: {detail}" if detail else reason
        err = BadRequest(redact_text(message)[:MAX_MESSAGE], status=status)
    request_id = new_request_id()
    v1 = path is not None and (path == "/v1" or path.startswith("/v1/"))
    body = jsonio.dumps(err.openai_body(request_id) if v1 else err.body(request_id))
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"X-Proxy-Request-Id: {request_id}\r\n"
        "Access-Control-Allow-Origin: *\r\n"
        f"Access-Control-Allow-Methods: {CORS_METHODS}\r\n"
        f"Access-Control-Allow-Headers: {CORS_ALLOW_HEADERS}\r\n"
        f"Access-Control-Expose-Headers: {CORS_EXPOSE_HEADERS}\r\n"
        "\r\n"
    )
    return head.encode("latin-1") + body


def _linger(client: Any) -> None:
    """Read (and drop) what the client is still sending before its socket is closed.

    gunicorn closes right after its error answer; closing with unread bytes (the rest of an oversized
    request line, a body) sends a TCP RST, which can destroy the answer before the client reads it.
    """
    with contextlib.suppress(OSError):
        client.shutdown(socket.SHUT_WR)
        client.settimeout(LINGER_S)
        left = LINGER_BYTES
        while left > 0 and (chunk := client.recv(min(left, 65536))):
            left -= len(chunk)


def _shut(client: socket.socket) -> None:
    # Its greenlet, waiting for the next request, reads EOF and closes the connection.
    with contextlib.suppress(OSError):
        client.shutdown(socket.SHUT_RDWR)
