"""What one huge stream event costs the other requests of the same worker.

A `response.completed` event carrying base64 images is several MiB in one SSE event. Relaying must be
linear in the bytes: if the proxy re-scanned the event from its start on every read, one such event
would block its worker for seconds. This starts a small upstream on 127.0.0.1 (plain HTTP, so the
figure is the relay's, not TLS's) and a one-worker gunicorn; one client streams `/openai2` whose
upstream sends one event of `--mib` MiB (64 KiB writes, as fast as the socket takes them), while
another sends small `/openai` calls one after the other. The small calls' latencies during the
event are compared with the same calls with no event in flight.

    .venv/bin/python bench/big_event.py              # one 8 MiB event
    .venv/bin/python bench/big_event.py --mib 12
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.audio_memory import free_port, wait_http  # noqa: E402

SECURITY_KEY = "bench-security-key"
CHAT_ANSWER = json.dumps(
    {"id": "c", "object": "chat.completion", "model": "m", "choices": [], "usage": {"total_tokens": 1}}
).encode()


class Upstream(threading.Thread):
    """Answers chat calls at once, and a Responses stream with one event of `size` bytes."""

    def __init__(self, size: int) -> None:
        super().__init__(daemon=True)
        # Built once, up front: building it while the small calls run would hold this process's GIL.
        response = {"id": "r", "output": [{"image": "A" * size}], "usage": {"input_tokens": 1}}
        event = json.dumps({"type": "response.completed", "response": response}).encode()
        self.data = b"event: response.completed\ndata: " + event + b"\n\n"
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    def run(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        with conn, reader:
            while True:
                line = reader.readline()
                if not line:
                    return
                length = 0
                while (header := reader.readline()) not in (b"\r\n", b""):
                    name, _, value = header.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                reader.read(length)
                if b"/responses" in line:
                    self.stream(conn)
                else:
                    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                    conn.sendall(head % len(CHAT_ANSWER) + CHAT_ANSWER)

    def stream(self, conn: socket.socket) -> None:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        data = self.data
        for start in range(0, len(data), 65536):
            piece = data[start : start + 65536]
            conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        conn.sendall(b"0\r\n\r\n")


def small_calls(port: int, stop: threading.Event, out: list[float]) -> None:
    body = json.dumps({"model": "m", "messages": []})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    while not stop.is_set():
        started = time.perf_counter()
        conn.request("POST", "/openai", body, {"X-Security-Key": SECURITY_KEY})
        response = conn.getresponse()
        response.read()
        assert response.status == 200, response.status
        out.append((time.perf_counter() - started) * 1000.0)


def big_stream(port: int, path: str) -> tuple[float, int]:
    """The big stream from another process (curl): decoding 8 MiB here would hold this process's
    GIL and slow the small calls' client, not the proxy."""
    started = time.perf_counter()
    out = subprocess.run(
        ["curl", "-sS", "-N", "--max-time", "120", "-H", f"Authorization: Bearer {SECURITY_KEY}",
         "-H", f"X-Security-Key: {SECURITY_KEY}", "-d", json.dumps({"model": "m", "stream": True}),
         f"http://127.0.0.1:{port}{path}"],
        capture_output=True, check=True,
    )  # fmt: skip
    body = out.stdout
    end = b"data: [DONE]\n\n" if path == "/openai2" else b"\n\n"
    assert body.endswith(end), body[-200:]
    return (time.perf_counter() - started) * 1000.0, len(body)


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"n={len(values)} p50={statistics.median(values):.2f} ms p99={p99:.2f} ms max={ordered[-1]:.2f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=float, default=8.0, help="size of the one event (default 8 MiB)")
    parser.add_argument("--events", type=int, default=5, help="big streams, one after the other (default 5)")
    parser.add_argument(
        "--path", default="/openai2", choices=["/openai2", "/v1/responses"], help="the streaming route"
    )
    args = parser.parse_args()
    upstream = Upstream(int(args.mib * 1024 * 1024))
    upstream.start()
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="big-event-")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SECURITY_KEY"))},
        "PORT": str(port),
        "OPENAI_PROXY_WORKERS": "1",
        "OPENAI_BASE_URL": f"http://127.0.0.1:{upstream.port}/v1",
        "OPENAI_API_KEY": "sk-bench",
        "SECURITY_KEY": SECURITY_KEY,
        "OPENAI_PROXY_LOG_DB": os.path.join(workdir, "log.sqlite3"),
    }
    log = open(os.path.join(workdir, "gunicorn.log"), "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"), "app.wsgi:app"],
        cwd=workdir,
        env={**env, "PYTHONPATH": str(ROOT)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_http(port, "/", time.monotonic() + 30)
        for _ in range(50):  # warm-up
            small_calls_once(port)
        baseline: list[float] = []
        stop = threading.Event()
        runner = threading.Thread(target=small_calls, args=(port, stop, baseline))
        runner.start()
        time.sleep(2.0)
        stop.set()
        runner.join()
        during: list[float] = []
        stop = threading.Event()
        runner = threading.Thread(target=small_calls, args=(port, stop, during))
        runner.start()
        time.sleep(0.2)
        streams = [big_stream(port, args.path) for _ in range(args.events)]
        stop.set()
        runner.join()
        took = statistics.median(ms for ms, _ in streams)
        print(
            f"{args.path}: {args.events} streams of one {args.mib:g} MiB event each, one after the other; "
            f"each relayed in {took:.0f} ms (median), {streams[0][1] / 1048576:.1f} MiB to the client"
        )
        print(f"small /openai calls, no event in flight: {summary(baseline)}")
        print(f"small /openai calls, during the events:  {summary(during)}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        log.close()
    return 0


def small_calls_once(port: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(
        "POST", "/openai", json.dumps({"model": "m", "messages": []}), {"X-Security-Key": SECURITY_KEY}
    )
    conn.getresponse().read()
    conn.close()


if __name__ == "__main__":
    sys.exit(main())
