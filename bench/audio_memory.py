"""Peak RSS growth of one gunicorn worker while large audio uploads are in flight.

Starts the fake OpenAI API and a one-worker gunicorn on 127.0.0.1, samples the worker's VmRSS every
~20 ms, sends concurrent uploads through `POST /openai/audio/transcriptions`, and prints baseline,
peak and growth. The fake upstream holds each body in memory; that is its process, not the proxy's.

    .venv/bin/python bench/audio_memory.py            # 4 concurrent uploads of 25 MiB
    .venv/bin/python bench/audio_memory.py --uploads 8 --mib 10
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECURITY_KEY = "bench-security-key"
DEADLINE_S = 180
CHUNK = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            # The command may contain spaces and parentheses: fields resume after the last ")".
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry))
    return found


def wait_http(port: int, path: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", path)
            conn.getresponse().read()
            conn.close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing answers on port {port}")


def upload(port: int, path: Path, results: list, index: int) -> None:
    """One multipart upload streamed from disk with a known Content-Length."""
    boundary = uuid.uuid4().hex
    head = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_S)
    conn.putrequest("POST", "/openai/audio/transcriptions")
    conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
    conn.putheader("Content-Length", str(len(head) + path.stat().st_size + len(tail)))
    conn.putheader("X-Security-Key", SECURITY_KEY)
    conn.endheaders()
    conn.send(head)
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            conn.send(chunk)
    conn.send(tail)
    response = conn.getresponse()
    results[index] = (response.status, response.read())
    conn.close()


class Sampler(threading.Thread):
    """Reads the worker's RSS every `interval` seconds until stopped; remembers the peak."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = self.samples = 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.peak = max(self.peak, rss_kib(self.pid))
            self.samples += 1
            time.sleep(self.interval)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uploads", type=int, default=4, help="concurrent uploads (default 4)")
    parser.add_argument("--mib", type=float, default=25, help="size of each upload in MiB (default 25)")
    args = parser.parse_args()
    size = int(args.mib * 1024 * 1024)
    deadline = time.monotonic() + DEADLINE_S
    fake_port, proxy_port = free_port(), free_port()
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="audio-bench-") as tmp:
        audio = Path(tmp) / "speech.wav"
        with audio.open("wb") as f:
            for _ in range(0, size, CHUNK):
                f.write(os.urandom(min(CHUNK, size - f.tell())))
        digest = hashlib.sha256(audio.read_bytes()).hexdigest()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SECURITY_KEY"))},
            "PORT": str(proxy_port),
            "OPENAI_PROXY_WORKERS": "1",
            "OPENAI_BASE_URL": f"http://127.0.0.1:{fake_port}/v1",
            "OPENAI_API_KEY": "sk-bench-not-a-real-key",
            "SECURITY_KEY": SECURITY_KEY,
            "OPENAI_PROXY_MAX_AUDIO_BYTES": str(max(size, 25 * 1024 * 1024)),
        }
        log = open(Path(tmp) / "gunicorn.log", "wb")  # noqa: SIM115 (closed below)
        try:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "tests.support.fake_upstream", "--port", str(fake_port)],
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                )
            )
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app.wsgi:app"],
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            wait_http(proxy_port, "/", deadline)
            workers = children(procs[1].pid)
            assert len(workers) == 1, f"expected one worker, found {workers}"
            worker = workers[0]
            # Warm up (imports, connection pool, first temp file) so the baseline is a serving worker.
            warm: list = [None]
            upload(proxy_port, audio, warm, 0)
            assert warm[0][0] == 200, warm[0]
            time.sleep(0.5)
            baseline = rss_kib(worker)
            try:  # reset VmHWM to the current RSS, so it catches any peak the sampler misses
                Path(f"/proc/{worker}/clear_refs").write_text("5")
                hwm_reset = True
            except OSError:
                hwm_reset = False
            sampler = Sampler(worker)
            sampler.start()
            results: list = [None] * args.uploads
            started = time.monotonic()
            threads = [
                threading.Thread(target=upload, args=(proxy_port, audio, results, i))
                for i in range(args.uploads)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(max(1.0, deadline - time.monotonic()))
            elapsed = time.monotonic() - started
            sampler.stop_event.set()
            sampler.join()
            hwm = rss_kib(worker, "VmHWM") if hwm_reset else None
        finally:
            for proc in reversed(procs):
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
            log.close()

    ok = True
    for i, result in enumerate(results):
        if result is None:
            print(f"upload {i}: no answer")
            ok = False
            continue
        status, body = result
        text = json.loads(body).get("text", "") if status == 200 else body[:200]
        if status != 200 or f"size={size} sha256={digest}" not in text:
            print(f"upload {i}: {status} {text}")
            ok = False
    mib = 1024
    print(f"uploads:      {args.uploads} x {size / 2**20:.1f} MiB, concurrently, in {elapsed:.2f} s")
    print(f"baseline RSS: {baseline / mib:.1f} MiB (worker {worker}, after one warm-up upload)")
    print(f"peak RSS:     {sampler.peak / mib:.1f} MiB ({sampler.samples} samples, every ~20 ms)")
    print(f"growth:       {(sampler.peak - baseline) / mib:.1f} MiB")
    if hwm is not None:
        print(f"VmHWM growth: {(hwm - baseline) / mib:.1f} MiB (kernel's own peak, reset at baseline)")
    print("all uploads relayed intact" if ok else "SOME UPLOADS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
