"""What one huge stream event, or one huge JSON answer, costs the worker and its other requests.

A `response.completed` event carrying base64 images is several MiB in one SSE event. Relaying must be
linear in the bytes: if the proxy re-scanned the event from its start on every read, one such event
would block its worker for seconds. This starts a small upstream on 127.0.0.1 (plain HTTP, so the
figure is the relay's, not TLS's) and a one-worker gunicorn; one client streams `--path` whose
upstream sends one event of `--mib` MiB (64 KiB writes, as fast as the socket takes them), while
another sends small `/openai` calls one after the other. The small calls' latencies during the
event are compared with the same calls with no event in flight, and the worker's peak RSS growth
(VmHWM, reset before the big answers) is printed.

`--endless`: the event never ends (upstream hangs up after `--mib` MiB of it). `--json`: instead of
an event, a JSON answer of `--mib` MiB with no length (chunked, usage at its end) to `/v1/chat/completions`.

    .venv/bin/python bench/big_event.py              # one 8 MiB event on /openai2
    .venv/bin/python bench/big_event.py --mib 16 --endless --path /v1/responses
    .venv/bin/python bench/big_event.py --mib 40 --json
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

from bench.audio_memory import Sampler, children, free_port, rss_kib, wait_http  # noqa: E402

SECURITY_KEY = "bench-security-key"
CHAT_ANSWER = json.dumps(
    {"id": "c", "object": "chat.completion", "model": "m", "choices": [], "usage": {"total_tokens": 1}}
).encode()


class Upstream(threading.Thread):
    """Answers chat calls at once, and a Responses stream with one event of `size` bytes (or a chat
    call with `"big": true` with a chunked JSON answer of `size` bytes)."""

    def __init__(self, size: int, endless: bool = False) -> None:
        super().__init__(daemon=True)
        # Built once, up front: building it while the small calls run would hold this process's GIL.
        response = {"id": "r", "output": [{"image": "A" * size}], "usage": {"input_tokens": 1}}
        event = json.dumps({"type": "response.completed", "response": response}).encode()
        self.data = b"event: response.completed\ndata: " + event + b"\n\n"
        if endless:  # one event that never ends: upstream hangs up in the middle of it
            self.data = b"event: response.output_text.delta\ndata: " + b"A" * size
        self.endless = endless
        answer = {"id": "c", "object": "chat.completion", "model": "m", "choices": [{"text": "A" * size}]}
        self.json = json.dumps({**answer, "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode()
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
                body = reader.read(length)
                if b"/responses" in line:
                    self.stream(conn, b"text/event-stream", self.data, not self.endless)
                    if self.endless:
                        return
                elif b'"big": true' in body:
                    self.stream(conn, b"application/json", self.json, True)
                else:
                    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                    conn.sendall(head % len(CHAT_ANSWER) + CHAT_ANSWER)

    def stream(self, conn: socket.socket, content_type: bytes, data: bytes, end: bool) -> None:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nTransfer-Encoding: chunked\r\n\r\n" % content_type
        )
        for start in range(0, len(data), 65536):
            piece = data[start : start + 65536]
            conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        if end:
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


def big_stream(port: int, path: str, mode: str) -> tuple[float, int]:
    """The big answer from another process (curl): decoding 8 MiB here would hold this process's
    GIL and slow the small calls' client, not the proxy. `mode` is event, endless or json."""
    body = {"model": "m", "messages": [], "big": True} if mode == "json" else {"model": "m", "stream": True}
    started = time.perf_counter()
    out = subprocess.run(
        ["curl", "-sS", "-N", "--max-time", "120", "-H", f"Authorization: Bearer {SECURITY_KEY}",
         "-H", f"X-Security-Key: {SECURITY_KEY}", "-H", "Content-Type: application/json",
         "-d", json.dumps(body), f"http://127.0.0.1:{port}{path}"],
        capture_output=True,
    )  # fmt: skip
    took = (time.perf_counter() - started) * 1000.0
    if mode == "endless":
        # Cut short (curl: 18, partial transfer) or, where an event is capped, an error event.
        assert out.returncode == 18 or b"event: error" in out.stdout, (out.returncode, out.stdout[-200:])
        return took, len(out.stdout)
    assert out.returncode == 0, (out.returncode, out.stderr)
    end = b"data: [DONE]\n\n" if path == "/openai2" else b"}" if mode == "json" else b"\n\n"
    assert out.stdout.endswith(end), out.stdout[-200:]
    return took, len(out.stdout)


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
    parser.add_argument("--endless", action="store_true", help="the event never ends (upstream hangs up)")
    parser.add_argument("--json", action="store_true", help="a chunked JSON answer to /v1/chat/completions")
    args = parser.parse_args()
    mode = "json" if args.json else "endless" if args.endless else "event"
    path = "/v1/chat/completions" if args.json else args.path
    upstream = Upstream(int(args.mib * 1024 * 1024), endless=args.endless)
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
        (worker,) = children(proc.pid)
        during: list[float] = []
        stop = threading.Event()
        runner = threading.Thread(target=small_calls, args=(port, stop, during))
        runner.start()
        time.sleep(0.2)
        rss_before = rss_kib(worker)
        Path(f"/proc/{worker}/clear_refs").write_text("5")  # VmHWM := VmRSS, to catch any peak
        sampler = Sampler(worker)
        sampler.start()
        streams = [big_stream(port, path, mode) for _ in range(args.events)]
        sampler.stop_event.set()
        sampler.join()
        peak = max(sampler.peak, rss_kib(worker, "VmHWM"))
        stop.set()
        runner.join()
        took = statistics.median(ms for ms, _ in streams)
        what = {"event": "one event", "endless": "one endless event", "json": "a chunked JSON answer"}[mode]
        print(
            f"{path}: {args.events} answers of {what} of {args.mib:g} MiB each, one after the other; "
            f"each relayed in {took:.0f} ms (median), {streams[0][1] / 1048576:.1f} MiB to the client"
        )
        print(
            f"worker peak RSS growth: {(peak - rss_before) / 1024:.1f} MiB (from {rss_before / 1024:.1f} MiB)"
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
