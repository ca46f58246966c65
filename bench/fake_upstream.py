"""A fast fake OpenAI API for benchmarks: asyncio callbacks, pre-rendered answers, optional processes.

Unlike tests/support/fake_upstream.py (built for faults and inspection), this one is built to not be the
bottleneck. It answers chat completions, responses (JSON, or SSE when the body asks to stream) and
embeddings after `--latency-ms`; a stream sends its first event at once and then one event every
`--gap-ms` on a fixed schedule from its start (a late event does not push the later ones back, as a
model producing tokens would not wait for the network).

Everything runs from loop callbacks (no coroutine or task per request or event), so one emitted
event costs one timer and one `send`. Every scheduled write also records how late it went out in a
histogram shared by all processes (`GET /_bench/stats`), so a run can tell when the fake itself was
too busy to keep its schedule. It also counts the connections that carried a request (shared by all
processes; the stats requests' own connections, and connections that never sent a request such as
wrk's address probe, left out) and how many of them are still open, so a run can tell whether a
client reused its connections or opened one per request.

With `--tls-cert PEM` (a private key and certificate chain, e.g. from a throwaway `trustme.CA()`)
it serves HTTPS instead: the same protocol object behind asyncio's SSL layer, which still hands it
one read buffer (`BufferedProtocol`) and leaves TCP_NODELAY on the socket underneath.

    python -m bench.fake_upstream --port 9100 --latency-ms 50 --events 50 --gap-ms 20 --procs 1
    python -m bench.fake_upstream --port 9100 --tls-cert /tmp/tls/server.pem
"""

from __future__ import annotations

import argparse
import asyncio
import math
import mmap
import os
import signal
import socket
import ssl
import sys
from collections import Counter, deque

from bench.fake_answers import (
    CHAT,
    CHUNKED_END,
    EMBEDDINGS,
    NOT_FOUND,
    RESPONSE,
    answer,
    compact,
    head,
    sse_events,
)

# Lateness histogram: LATE_BUCKETS buckets of LATE_STEP_MS each, the last one open-ended.
LATE_STEP_MS = 0.25
LATE_BUCKETS = 1000
_SLOT_BYTES = LATE_BUCKETS * 8
MAX_PROCS = 16


class Lateness:
    """How late scheduled writes went out: one histogram row per process in anonymous shared memory."""

    def __init__(self, procs: int) -> None:
        self.shm = mmap.mmap(-1, _SLOT_BYTES * procs)
        self.procs = procs
        self.row = memoryview(self.shm)[:_SLOT_BYTES].cast("q")

    def use_slot(self, index: int) -> None:
        """Called once in each process after the fork: write to its own row, so no locks are needed."""
        self.row = memoryview(self.shm)[index * _SLOT_BYTES : (index + 1) * _SLOT_BYTES].cast("q")

    def note(self, late_s: float) -> None:
        bucket = int(late_s * 1000.0 / LATE_STEP_MS)
        self.row[bucket if bucket < LATE_BUCKETS else LATE_BUCKETS - 1] += 1

    def totals(self) -> list[int]:
        rows = [
            memoryview(self.shm)[i * _SLOT_BYTES : (i + 1) * _SLOT_BYTES].cast("q") for i in range(self.procs)
        ]
        return [sum(col) for col in zip(*rows, strict=True)]


class Connections:
    """Client connections opened and closed: two counters per process in anonymous shared memory."""

    def __init__(self, procs: int) -> None:
        self.shm = mmap.mmap(-1, 16 * procs)
        self.counts = memoryview(self.shm).cast("q")  # [opened, closed] for each process
        self.slot = 0

    def use_slot(self, index: int) -> None:
        self.slot = 2 * index

    def opened(self) -> None:
        self.counts[self.slot] += 1

    def closed(self) -> None:
        self.counts[self.slot + 1] += 1

    def totals(self) -> tuple[int, int]:
        """(opened, still open), over all processes."""
        opened, closed = sum(self.counts[0::2]), sum(self.counts[1::2])
        return opened, opened - closed


# TLS version and cipher of each connection this process accepted (stats connections left out).
TLS_SEEN: Counter[str] = Counter()


class Wheel:
    """Stream events due in the same millisecond are written from one timer callback.

    One asyncio timer per event (a TimerHandle, a heap push and pop, a callback) cost more than the
    event's own `send`; the loop's timers have millisecond resolution anyway (epoll), so a 1 ms
    wheel changes no event's time by more than the loop already did.
    """

    TICK_S = 0.001

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.buckets: dict[int, list[tuple[Upstream, int, float]]] = {}
        self.timer: asyncio.TimerHandle | None = None
        self.running = False

    def add(self, due: float, protocol: Upstream, index: int, start: float) -> None:
        tick = math.ceil(due / self.TICK_S - 1e-6)  # the first tick at or after `due`
        bucket = self.buckets.get(tick)
        if bucket is None:
            self.buckets[tick] = [(protocol, index, start)]
            if self.running:
                return  # run() schedules the next tick when it is done
            if self.timer is None or tick * self.TICK_S < self.timer.when():
                if self.timer is not None:
                    self.timer.cancel()
                self.timer = self.loop.call_at(tick * self.TICK_S, self.run)
        else:
            bucket.append((protocol, index, start))

    def run(self) -> None:
        self.timer = None
        self.running = True
        try:
            now_tick = math.floor(self.loop.time() / self.TICK_S + 1e-6)
            for tick in sorted(t for t in self.buckets if t <= now_tick):
                for protocol, index, start in self.buckets.pop(tick):
                    if not protocol.closed:
                        protocol.emit(index, start)
        finally:
            self.running = False
        if self.buckets:
            self.timer = self.loop.call_at(min(self.buckets) * self.TICK_S, self.run)


# One receive buffer per process (see get_buffer): asyncio's plain `data_received` allocates a new
# 256 KiB bytes object for every read, which costs more than the rest of a request here.
_RECV = memoryview(bytearray(256 * 1024))
MAX_HEAD = 16384  # where a request head is looked for before falling back to buffering


class Upstream(asyncio.BufferedProtocol):
    """One client connection: parse requests (Content-Length bodies), answer them in order."""

    def __init__(
        self,
        opts: argparse.Namespace,
        events: list[bytes],
        lateness: Lateness,
        wheel: Wheel,
        connections: Connections,
    ) -> None:
        self.opts = opts
        self.wheel = wheel
        self.events = events
        self.lateness = lateness
        self.connections = connections
        self.tls = ""  # "TLSv1.3 TLS_AES_256_GCM_SHA384" on an HTTPS connection
        self.counted = False  # counted in `connections` at its first request
        self.client = False  # that request was not the bench's own stats request
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.head_buf = bytearray()  # request head bytes until its blank line
        self.scan_from = 0
        self.request_head: tuple[str, str, int] | None = None  # (path, target, content length)
        self.body_parts: list[bytes] = []  # a list, not a growing buffer: 1 MiB bodies come in pieces
        self.body_left = 0
        self.keep_body = False
        self.pending: deque[tuple[str, str, bytes]] = deque()
        self.busy = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP, and accepted sockets
        # of a listener made with proto 0 are not: without this, Nagle holds an event back until
        # the peer's delayed ACK (~40 ms) on every kept-alive connection.
        # Over TLS this is the TCP socket under asyncio's SSL layer (its transport passes the query on).
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.tls = f"{ssl_object.version()} {ssl_object.cipher()[0]}"

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.client:
            self.connections.closed()

    def get_buffer(self, sizehint: int) -> memoryview:
        return _RECV

    def buffer_updated(self, nbytes: int) -> None:
        data = _RECV[:nbytes]
        while True:
            if self.request_head is None:
                if not data:
                    return
                data = self.read_head(data)
                if self.request_head is None:
                    return
            take = min(self.body_left, len(data))
            if take:
                if self.keep_body:
                    self.body_parts.append(bytes(data[:take]))
                self.body_left -= take
                data = data[take:]
            if self.body_left:
                return
            path, target, _ = self.request_head
            self.pending.append((path, target, b"".join(self.body_parts)))
            self.request_head, self.body_parts = None, []
            self.next_request()

    def read_head(self, data: memoryview) -> memoryview:
        """Parse a request head from `data` (or from it and earlier reads); return what follows it."""
        if self.head_buf:
            self.head_buf += data
            window, data = self.head_buf, memoryview(b"")
        else:
            window = bytes(data[:MAX_HEAD])
        end = window.find(b"\r\n\r\n", self.scan_from)
        if end < 0:
            if not self.head_buf:
                self.head_buf += data
            self.scan_from = max(len(window) - 3, 0)
            return memoryview(b"")
        if self.head_buf:
            data = memoryview(bytes(self.head_buf[end + 4 :]))
            self.head_buf = bytearray()
        else:
            data = data[end + 4 :]
        self.scan_from = 0
        lines = bytes(window[:end]).decode("latin-1").split("\r\n")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        # The proxy and the load tools send Content-Length bodies; that is all we need.
        target = lines[0].split(" ", 2)[1]
        path = target.split("?", 1)[0]
        self.request_head = (path, target, length)
        if not self.counted:
            self.counted = True
            if path != "/_bench/stats":  # the bench's own connection is not a client's
                self.client = True
                self.connections.opened()
                if self.tls:
                    TLS_SEEN[self.tls] += 1
        self.body_left = length
        # Only /v1/responses looks at its body (does it ask to stream?). Not keeping a 1 MiB chat
        # body saves copying it, and touching fresh pages costs more than the copy on a VM.
        self.keep_body = path.startswith("/v1/responses")
        return data

    def next_request(self) -> None:
        if self.busy or not self.pending or self.closed:
            return
        self.busy = True
        request = self.pending.popleft()
        if self.opts.latency_ms:
            due = self.loop.time() + self.opts.latency_ms / 1000.0
            self.loop.call_at(due, self.respond, request, due)
        else:
            self.respond(request, None)

    def respond(self, request: tuple[str, str, bytes], due: float | None) -> None:
        if self.closed:
            return
        if due is not None:
            self.lateness.note(self.loop.time() - due)
        path, target, body = request
        write = self.transport.write
        if path == "/v1/chat/completions":
            write(answer(200, CHAT))
        elif path == "/v1/embeddings":
            write(answer(200, EMBEDDINGS))
        elif path == "/_bench/stats":
            stats = {
                "late_step_ms": LATE_STEP_MS,
                "late": self.lateness.totals(),
                "connections": self.connections.totals()[0],
                "connections_open": self.connections.totals()[1],
                "tls": dict(TLS_SEEN),  # this process's connections only
            }
            write(answer(200, compact(stats)))
        elif path == "/v1/responses" and b'"stream":true' not in body.replace(b" ", b""):
            write(answer(200, RESPONSE))
        elif path == "/v1/responses" or (path.startswith("/v1/responses/") and "stream=true" in target):
            write(head(200, None, b"text/event-stream") + self.events[0])
            self.emit(1, self.loop.time())
            return
        else:
            write(answer(404, NOT_FOUND))
        self.busy = False
        self.next_request()

    def emit(self, index: int, start: float) -> None:
        """Write the events from `index` on that are due, schedule the next one; end the body after the last."""
        gap = self.opts.gap_ms / 1000.0
        events, write, loop = self.events, self.transport.write, self.loop
        while index < len(events):
            if gap:
                due = start + index * gap
                late = loop.time() - due
                if late < 0:
                    self.wheel.add(due, self, index, start)
                    return
                self.lateness.note(late)
            write(events[index])
            index += 1
        write(CHUNKED_END)
        self.busy = False
        self.next_request()


def server_ssl_context(cert_pem: str) -> ssl.SSLContext:
    """HTTPS with `cert_pem` (private key and certificate chain); the fake speaks HTTP/1.1 only."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_pem)
    context.set_alpn_protocols(["http/1.1"])
    return context


def serve(
    opts: argparse.Namespace, sock: socket.socket, lateness: Lateness, connections: Connections
) -> None:
    async def main() -> None:
        events = sse_events(opts.events, full=opts.full_stream)
        loop = asyncio.get_running_loop()
        wheel = Wheel()
        context = server_ssl_context(opts.tls_cert) if opts.tls_cert else None
        server = await loop.create_server(
            lambda: Upstream(opts, events, lateness, wheel, connections),
            sock=sock,
            backlog=4096,
            ssl=context,
        )
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--events", type=int, default=50)
    parser.add_argument("--gap-ms", type=float, default=20.0)
    parser.add_argument("--procs", type=int, default=1, help=f"processes sharing the socket (1-{MAX_PROCS})")
    parser.add_argument(
        "--tls-cert", metavar="PEM", help="serve HTTPS with this private key and certificate chain"
    )
    parser.add_argument(
        "--full-stream",
        action="store_true",
        help="streams announce their output item and content part, as a client rebuilding them needs",
    )
    opts = parser.parse_args(argv)
    opts.procs = min(max(opts.procs, 1), MAX_PROCS)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", opts.port))
    sock.listen(4096)
    sock.setblocking(False)
    if opts.tls_cert:
        server_ssl_context(opts.tls_cert)  # a bad PEM fails here, before any fork
    lateness = Lateness(opts.procs)
    connections = Connections(opts.procs)
    children = []
    for index in range(1, opts.procs):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            lateness.use_slot(index)
            connections.use_slot(index)
            serve(opts, sock, lateness, connections)
            os._exit(0)
        children.append(pid)

    def stop(*_: object) -> None:
        for pid in children:
            os.kill(pid, signal.SIGTERM)
        for pid in children:
            os.waitpid(pid, 0)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    scheme = "https" if opts.tls_cert else "http"
    print(f"bench upstream on {scheme}://127.0.0.1:{opts.port} ({opts.procs} process(es))", flush=True)
    serve(opts, sock, lateness, connections)


if __name__ == "__main__":
    main()
