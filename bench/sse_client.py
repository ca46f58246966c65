"""One SSE client process of bench.sse_load: an epoll loop that opens its slots' streams on time and
timestamps every event with the kernel's receive time.

    python -m bench.sse_client --plan plan.json --index 0 --out records.json

A plain epoll loop over non-blocking sockets: no asyncio, no object per event, one shared receive
buffer (asyncio's `data_received` allocates 256 KiB per read, and its machinery made the client the
busiest process at 1000 streams). Arrival times are the kernel's receive timestamps
(SO_TIMESTAMPNS, CLOCK_REALTIME, one clock for all processes), not the time the client got round to
reading: a busy or descheduled client does not inflate any latency. So the loop can poll every
`poll_ms` instead of waking for each event, which saves a wake-up per event in the client and in
whoever sends to it. It still records how late its own 10 ms ticker ran, which shows when the
client was starved of CPU.
"""

from __future__ import annotations

import argparse
import errno
import heapq
import itertools
import json
import resource
import select
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

DONE = b"data: [DONE]"
EVENT = b"data: "
ERROR_EVENT = b"event: error"
CHUNKED_END = b"\r\n0\r\n\r\n"
TAIL = 16  # longer than every marker above, so a marker split across two reads is seen once
TICK_S = 0.01
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; the cmsg type has the same number
_TIMESPEC = struct.Struct("qq")
_BUFFER = bytearray(65536)
_VIEW = memoryview(_BUFFER)


@dataclass
class StreamPlan:
    port: int
    path: str
    body: dict
    streams: int
    mode: str  # "steady" or "burst"
    ramp_s: float
    hold_s: float
    events: int  # expected per stream
    want_done: bool  # the proxy ends a stream with `data: [DONE]`; the upstream does not
    timeout_s: float
    procs: int
    fresh_connections: bool = False
    poll_ms: float = 1.0
    t0: float = 0.0  # time.time() of the first scheduled start


@dataclass
class StreamRecord:
    slot: int
    scheduled: float  # planned start, seconds after t0
    start: float  # actual start (connect, or request on a kept connection), seconds after t0
    status: int = 0
    events: int = 0
    complete: bool = False
    error: str | None = None
    end: float | None = None  # seconds after t0
    arrivals: list[float] = field(default_factory=list)  # seconds after start, one per event

    @property
    def first_s(self) -> float | None:
        return self.arrivals[0] if self.arrivals else None

    def worst_gap_s(self) -> float | None:
        a = self.arrivals
        return max(b - x for x, b in itertools.pairwise(a)) if len(a) > 1 else None


class Stream:
    """One stream on one connection: request sent, `data: ` lines counted as they arrive."""

    __slots__ = ("deadline", "head", "keep", "record", "saw_done", "sock", "started", "tail")

    def __init__(self, sock: socket.socket, record: StreamRecord, started: float, deadline: float) -> None:
        self.sock = sock
        self.record = record
        self.started = started
        self.deadline = deadline
        self.head = b""
        self.tail = b""
        self.saw_done = False
        self.keep = True  # the server did not say `Connection: close`

    def feed(self, data: bytes, now: float) -> str | None:
        """Account for `data`; "" when the response ended, an error text when it failed, else None."""
        rec = self.record
        if not rec.status:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return None
            rec.status = int(self.head[: self.head.find(b"\r\n")].split(b" ", 2)[1])
            self.keep = b"connection: close" not in self.head[:end].lower()
            data, self.head = self.head[end + 4 :], b""
            if rec.status != 200:
                return f"HTTP {rec.status}"
        tail = self.tail
        seen = tail + data
        new = seen.count(EVENT) - tail.count(EVENT)
        if new:
            done = seen.count(DONE) - tail.count(DONE)
            if done:
                self.saw_done = True
                new -= done
            if new:
                rec.events += new
                rec.arrivals.extend([now - self.started] * new)
        if seen.count(ERROR_EVENT) > tail.count(ERROR_EVENT):
            return "error event"
        if seen.count(CHUNKED_END) > tail.count(CHUNKED_END):
            return ""
        self.tail = seen[-TAIL:]
        return None


class Client:
    """The epoll loop of one client process: starts its slots' streams on time and reads them."""

    def __init__(self, plan: StreamPlan, index: int) -> None:
        self.plan = plan
        self.addr = ("127.0.0.1", plan.port)
        payload = json.dumps(plan.body).encode()
        self.request = (
            f"POST {plan.path} HTTP/1.1\r\nHost: 127.0.0.1:{plan.port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode() + payload
        self.epoll = select.epoll()
        self.active: dict[int, Stream] = {}  # by fd
        self.connecting: dict[int, Stream] = {}
        self.records: list[StreamRecord] = []
        self.lags: list[float] = []
        self.stop_at = plan.t0 + plan.ramp_s + plan.hold_s
        slots = range(index, plan.streams, plan.procs)
        step = plan.ramp_s / plan.streams if plan.mode == "steady" else 0.0
        # (due time, slot, kept-alive socket or None)
        self.due: list[tuple[float, int, socket.socket | None]] = [
            (plan.t0 + s * step, s, None) for s in slots
        ]
        heapq.heapify(self.due)

    def run(self) -> None:
        tick = self.plan.t0
        next_expiry = tick
        nap = self.plan.poll_ms / 1000.0
        while self.due or self.active or self.connecting:
            now = time.time()
            while self.due and self.due[0][0] <= now:
                due, slot, sock = heapq.heappop(self.due)
                self.start(slot, due, sock)
            if now >= tick:
                if tick > self.plan.t0:
                    self.lags.append((now - tick) * 1000.0)
                tick += TICK_S
                if now > tick:  # fell behind by more than a tick: note it once, do not replay
                    tick = now + TICK_S
            if now >= next_expiry:
                next_expiry = now + 0.1
                self.expire(now)
            wake = min(tick, self.due[0][0]) if self.due else tick
            wait = max(wake - time.time(), 0.0)
            if nap and (self.active or self.connecting):
                time.sleep(min(wait, nap))
                wait = 0.0
            for fd, mask in self.epoll.poll(wait):
                if fd in self.connecting:
                    self.connected(fd, mask)
                else:
                    self.readable(fd)

    def start(self, slot: int, due: float, sock: socket.socket | None) -> None:
        t0, now = self.plan.t0, time.time()  # per stream: a burst's starts take a while in a row
        record = StreamRecord(slot=slot, scheduled=due - t0, start=now - t0)
        self.records.append(record)
        if sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            stream = Stream(sock, record, now, now + self.plan.timeout_s)
            code = sock.connect_ex(self.addr)
            if code not in (0, errno.EINPROGRESS):
                self.fail(stream, f"connect: {errno.errorcode.get(code, code)}")
                return
            self.connecting[sock.fileno()] = stream
            self.epoll.register(sock.fileno(), select.EPOLLOUT)
        else:  # a kept-alive connection, already registered for reading
            stream = Stream(sock, record, now, now + self.plan.timeout_s)
            self.active[sock.fileno()] = stream
            self.send(stream)

    def connected(self, fd: int, mask: int) -> None:
        stream = self.connecting.pop(fd)
        code = stream.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self.epoll.unregister(fd)
            self.fail(stream, f"connect: {errno.errorcode.get(code, code)}")
            return
        self.epoll.modify(fd, select.EPOLLIN)
        self.active[fd] = stream
        self.send(stream)

    def send(self, stream: Stream) -> None:
        try:
            sent = stream.sock.send(self.request)
        except OSError as exc:
            sent, error = 0, f"send: {exc}"
        else:
            error = "send: short write"
        if sent != len(self.request):
            self.end(stream, error)

    def readable(self, fd: int) -> None:
        stream = self.active.get(fd)
        if stream is None:
            return
        try:
            n, ancillary, _, _ = stream.sock.recvmsg_into([_BUFFER], 64)
        except BlockingIOError:
            return
        except OSError as exc:
            self.end(stream, f"recv: {exc}")
            return
        now = time.time()
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                sec, nsec = _TIMESPEC.unpack_from(data)
                now = sec + nsec * 1e-9
        if not n:
            ok = self.plan.want_done and stream.saw_done and stream.record.status == 200
            self.end(stream, None if ok else "closed before the end", reusable=False)
            return
        outcome = stream.feed(bytes(_VIEW[:n]), now)
        if outcome is not None:
            self.end(stream, outcome or None)

    def expire(self, now: float) -> None:
        for stream in [s for s in self.active.values() if s.deadline < now]:
            self.end(stream, "timeout")
        for fd, stream in [(fd, s) for fd, s in self.connecting.items() if s.deadline < now]:
            del self.connecting[fd]
            self.epoll.unregister(fd)
            self.fail(stream, "connect timeout")

    def end(self, stream: Stream, error: str | None, reusable: bool = True) -> None:
        """The stream is over: judge it, then keep its connection for the slot's next stream or close it."""
        plan, rec, now = self.plan, stream.record, time.time()
        self.active.pop(stream.sock.fileno(), None)
        if error is None and rec.events != plan.events:
            error = f"{rec.events} events, expected {plan.events}"
        if error is None and plan.want_done and not stream.saw_done:
            error = "no [DONE]"
        rec.error, rec.complete, rec.end = error, error is None, now - plan.t0
        again = plan.mode == "steady" and now < self.stop_at
        if again and error is None and reusable and stream.keep and not plan.fresh_connections:
            heapq.heappush(self.due, (now, rec.slot, stream.sock))
            return
        self.epoll.unregister(stream.sock.fileno())
        stream.sock.close()
        if again:
            heapq.heappush(self.due, (now, rec.slot, None))

    def fail(self, stream: Stream, error: str) -> None:
        stream.sock.close()
        rec = stream.record
        rec.error, rec.end = error, time.time() - self.plan.t0
        if self.plan.mode == "steady" and time.time() < self.stop_at:
            heapq.heappush(self.due, (time.time() + 0.01, rec.slot, None))


def client_main(plan: StreamPlan, index: int) -> dict:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = usage.ru_utime + usage.ru_stime  # not the interpreter's start-up
    client = Client(plan, index)
    client.run()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "cpu_s": usage.ru_utime + usage.ru_stime - cpu0,
        "lags_ms": [round(x, 3) for x in client.lags],
        "records": [
            [
                r.slot,
                r.scheduled,
                r.start,
                r.status,
                r.events,
                r.complete,
                r.error,
                r.end,
                [round(a, 6) for a in r.arrivals],
            ]
            for r in client.records
        ],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one SSE client process of bench.sse_load")
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    plan = StreamPlan(**json.loads(args.plan.read_text()))
    args.out.write_text(json.dumps(client_main(plan, args.index)))


if __name__ == "__main__":
    main()
