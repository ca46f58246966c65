"""What receiving a `/v1` upload whole before it goes upstream costs: time, temp disk, worker memory.

Starts the fake OpenAI API (plain HTTP) and a one-worker gunicorn on 127.0.0.1 with TMPDIR set to a
fresh directory, then sends one upload of `--mib` MiB (default 100) to `POST /v1/uploads/<id>/parts`,
a path the generic relay spools (the fake reads the body whole, then answers 404: it has no such
upload). The same upload is also sent straight to the fake, so "added" is what going through the
proxy costs. While the upload runs, the worker's VmRSS and the disk its open spool files use (they
are unlinked, so only /proc/<pid>/fd finds them) are sampled every ~10 ms; VmHWM (reset at the
baseline) catches any RSS peak between samples. The fake holds each body in memory: that is its
process, not the proxy's.

    .venv/bin/python bench/upload_spool.py              # one 100 MiB upload, 3 runs
    .venv/bin/python bench/upload_spool.py --mib 25 --runs 5
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.audio_memory import children, free_port, rss_kib, wait_http  # noqa: E402

SECURITY_KEY = "bench-security-key"
BLOCK = b"\xab" * (1024 * 1024)
PATH = "/v1/uploads/upload_bench/parts"


def upload(port: int, size: int, auth: bool) -> tuple[int, float]:
    """One upload of `size` bytes with a Content-Length, 1 MiB per write; (status, seconds)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    started = time.perf_counter()
    conn.putrequest("POST", PATH)
    conn.putheader("Content-Type", "application/octet-stream")
    conn.putheader("Content-Length", str(size))
    if auth:
        conn.putheader("Authorization", f"Bearer {SECURITY_KEY}")
    conn.endheaders()
    for start in range(0, size, len(BLOCK)):
        conn.send(BLOCK[: size - start])
    response = conn.getresponse()
    response.read()
    took = time.perf_counter() - started
    conn.close()
    return response.status, took


def spool_bytes(pid: int, spool_dir: str) -> int:
    """Disk blocks held by the worker's open files in `spool_dir` (gunicorn's heartbeat file aside)."""
    total = 0
    fds = f"/proc/{pid}/fd"
    for fd in os.listdir(fds):
        try:
            target = os.readlink(f"{fds}/{fd}")
            if target.startswith(spool_dir) and "wgunicorn-" not in target:
                total += os.stat(f"{fds}/{fd}").st_blocks * 512
        except OSError:
            continue
    return total


class Sampler(threading.Thread):
    def __init__(self, pid: int, spool_dir: str) -> None:
        super().__init__(daemon=True)
        self.pid, self.spool_dir = pid, spool_dir
        self.peak_rss_kib = self.peak_disk = self.samples = 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.peak_rss_kib = max(self.peak_rss_kib, rss_kib(self.pid))
            self.peak_disk = max(self.peak_disk, spool_bytes(self.pid, self.spool_dir))
            self.samples += 1
            time.sleep(0.01)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=float, default=100, help="size of the upload in MiB (default 100)")
    parser.add_argument("--runs", type=int, default=3, help="uploads each way, alternating (default 3)")
    args = parser.parse_args()
    size = int(args.mib * 1024 * 1024)
    fake_port, proxy_port = free_port(), free_port()
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="upload-bench-") as tmp:
        spool_dir = os.path.join(tmp, "spool")
        os.mkdir(spool_dir)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SECURITY_KEY"))},
            "PORT": str(proxy_port),
            "OPENAI_PROXY_WORKERS": "1",
            "OPENAI_BASE_URL": f"http://127.0.0.1:{fake_port}/v1",
            "OPENAI_API_KEY": "sk-bench-not-a-real-key",
            "SECURITY_KEY": SECURITY_KEY,
            "OPENAI_PROXY_RUNTIME_DIR": os.path.join(tmp, "run"),
            "OPENAI_PROXY_LOG_DB": os.path.join(tmp, "log.sqlite3"),
            "TMPDIR": spool_dir,
        }
        log = open(os.path.join(tmp, "gunicorn.log"), "wb")  # noqa: SIM115 (closed below)
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
            deadline = time.monotonic() + 60
            wait_http(proxy_port, "/", deadline)
            wait_http(fake_port, "/", deadline)
            (worker,) = children(procs[1].pid)
            assert upload(proxy_port, 1024 * 1024, True)[0] == 404  # warm-up: imports, pool, first spool
            time.sleep(0.5)
            direct, proxied, rss_growth, disk = [], [], [], []
            for _ in range(args.runs):
                direct.append(upload(fake_port, size, False)[1])
                baseline = rss_kib(worker)
                Path(f"/proc/{worker}/clear_refs").write_text("5")  # VmHWM := VmRSS
                sampler = Sampler(worker, spool_dir)
                sampler.start()
                status, took = upload(proxy_port, size, True)
                sampler.stop_event.set()
                sampler.join()
                assert status == 404, status  # upstream's answer, after it read the whole body
                proxied.append(took)
                peak = max(sampler.peak_rss_kib, rss_kib(worker, "VmHWM"))
                rss_growth.append((peak - baseline) / 1024)
                disk.append(sampler.peak_disk / 2**20)
            left = os.listdir(spool_dir), spool_bytes(worker, spool_dir)
            time.sleep(0.5)  # the completion records: time with the client, and with upstream
            log.flush()
            records = [
                json.loads(line)
                for line in Path(tmp, "gunicorn.log").read_text().splitlines()
                if line.startswith('{"event":"completion"')
            ][-args.runs :]
        finally:
            for proc in reversed(procs):
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
            log.close()

    med = statistics.median
    print(f"one {args.mib:g} MiB upload to {PATH}, {args.runs} runs each way (medians, then every run)")
    print(f"straight to the fake: {med(direct):.2f} s   {' '.join(f'{t:.2f}' for t in direct)}")
    print(f"through the proxy:    {med(proxied):.2f} s   {' '.join(f'{t:.2f}' for t in proxied)}")
    print(f"added by the proxy:   {med(proxied) - med(direct):.2f} s")
    upstream_s = [r["upstreamMs"] / 1000 for r in records]
    receiving_s = [r["durationMs"] / 1000 - u for r, u in zip(records, upstream_s, strict=True)]
    print(f"  receiving the body (proxy's record): {med(receiving_s):.2f} s, then upstream "
          f"(sending it, its answer): {med(upstream_s):.2f} s")  # fmt: skip
    print(f"peak spool on disk:   {med(disk):.1f} MiB   {' '.join(f'{d:.1f}' for d in disk)}")
    print(f"worker peak RSS growth: {med(rss_growth):.1f} MiB   {' '.join(f'{g:.1f}' for g in rss_growth)}")
    print(f"left in the temp dir afterwards: {len(left[0])} files, {left[1]} bytes held open")
    return 0


if __name__ == "__main__":
    sys.exit(main())
