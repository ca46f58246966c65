"""The benchmark suite: the proxy under real gunicorn against a fast fake upstream, vs the fake alone.

    ./bench/run.sh                      # every scenario, 3 runs each after a warm-up
    ./bench/run.sh --only stream --streams 1000
    ./bench/run.sh --soak-minutes 10    # adds the memory soak

Each scenario runs the same load twice per run: through the proxy and directly against the fake
upstream, so every figure has its baseline from the same minute on the same machine. Load comes
from wrk (JSON scenarios) and bench/sse_load.py (streams). The proxy's CPU is read from /proc for
the whole gunicorn process tree. Everything stays on 127.0.0.1 and every run is time-bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.sse_load import run_streams

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-security-key"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# ---- processes ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    pids, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            children = []
        for child in map(int, children):
            pids.append(child)
            frontier.append(child)
    return pids


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / CLK_TCK


def rss_bytes(pid: int) -> int:
    total = 0
    for p in tree(pid):
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE
        except OSError:
            continue
    return total


class Proc:
    def __init__(self, args: list[str], env: dict[str, str], port: int, log: Path) -> None:
        self.port = port
        self.log = log
        self._log = open(log, "wb")  # noqa: SIM115
        self.popen = subprocess.Popen(args, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        wait_port(port)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()


def start_upstream(workdir: Path, *, latency_ms=0.0, events=50, gap_ms=20.0, procs=1) -> Proc:
    port = free_port()
    args = [sys.executable, "-m", "bench.fake_upstream", "--port", str(port), "--latency-ms", str(latency_ms),
            "--events", str(events), "--gap-ms", str(gap_ms), "--procs", str(procs)]  # fmt: skip
    return Proc(args, dict(os.environ), port, workdir / f"upstream-{port}.log")


def start_proxy(workdir: Path, upstream: Proc, **env: str) -> Proc:
    port = free_port()
    full_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SECURITY_KEY", "ACCESS_TOKEN"))
    }
    full_env.update(
        PORT=str(port),
        OPENAI_BASE_URL=f"http://127.0.0.1:{upstream.port}/v1",
        OPENAI_API_KEY="sk-bench-0000000000000000",
        SECURITY_KEY=KEY,
        # The gate is a policy, not a speed limit: the bench must not hit it.
        OPENAI_PROXY_MAX_PARALLEL_REQUESTS="4096",
        OPENAI_PROXY_LOG_DB=str(workdir / "log.sqlite3"),
        **env,
    )
    gunicorn = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app.wsgi:app"]
    proc = Proc(gunicorn, full_env, port, workdir / f"proxy-{port}.log")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).read()
            return proc
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("proxy did not start: " + proc.log.read_text())


# ---- load ---------------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int


def wrk(
    port: int, path: str, body: bytes, *, connections: int, seconds: float, threads: int = 1
) -> WrkResult:
    with tempfile.TemporaryDirectory() as tmp:
        body_file = Path(tmp) / "body.json"
        body_file.write_bytes(body)
        script = Path(tmp) / "post.lua"
        script.write_text(
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f'local f = io.open("{body_file}", "rb")\nwrk.body = f:read("*a")\nf:close()\n'
            "done = function(summary, latency, requests)\n"
            '  io.write(string.format("JSON {\\"p50\\": %d, \\"p99\\": %d, \\"errors\\": %d}\\n",\n'
            "    latency:percentile(50), latency:percentile(99),\n"
            "    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.status"
            " + summary.errors.timeout))\nend\n"
        )
        out = subprocess.run(
            [
                "wrk",
                f"-t{threads}",
                f"-c{connections}",
                f"-d{max(int(seconds), 1)}s",
                "--timeout",
                "10s",
                "-s",
                str(script),
                f"http://127.0.0.1:{port}{path}",
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 30,
            check=True,
        ).stdout
    stats = json.loads(out[out.index("JSON ") + 5 :].splitlines()[0])
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return WrkResult(rps, stats["p50"] / 1000.0, stats["p99"] / 1000.0, requests, stats["errors"])


def chat_body(size: int = 0) -> dict:
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "What is TypeScript?"}],
        "max_tokens": 50,
    }
    if size:
        body["messages"][0]["content"] = "x" * size
    return body


# ---- scenarios ------------------------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    metric: str
    proxy: float
    direct: float | None
    unit: str
    target: str = ""
    verdict: str = ""


@dataclass
class Scenario:
    name: str
    describe: str
    run: Callable[[argparse.Namespace, Path], dict[str, tuple[float, float | None]]]
    rows: Callable[[dict[str, float], dict[str, float | None]], list[Row]] = field(default=lambda p, d: [])


def _json_scenario(path_proxy: str, body: dict, *, connections: int, latency_ms: float, seconds: float):
    def run(opts: argparse.Namespace, workdir: Path) -> dict[str, tuple[float, float | None]]:
        upstream = start_upstream(workdir, latency_ms=latency_ms, procs=opts.upstream_procs)
        proxy = start_proxy(workdir, upstream)
        try:
            payload = json.dumps({**body, "security_key": KEY}).encode()
            direct_payload = json.dumps(body).encode()
            wrk(proxy.port, path_proxy, payload, connections=connections, seconds=2)  # warm-up
            wrk(upstream.port, "/v1/chat/completions", direct_payload, connections=connections, seconds=1)
            cpu0 = cpu_seconds(proxy.popen.pid)
            rss_peak = rss_bytes(proxy.popen.pid)
            via = wrk(proxy.port, path_proxy, payload, connections=connections, seconds=seconds)
            cpu = cpu_seconds(proxy.popen.pid) - cpu0
            rss_peak = max(rss_peak, rss_bytes(proxy.popen.pid))
            direct = wrk(
                upstream.port,
                "/v1/chat/completions",
                direct_payload,
                connections=connections,
                seconds=seconds,
            )
            return {
                "rps": (via.rps, direct.rps),
                "p50_ms": (via.p50_ms, direct.p50_ms),
                "p99_ms": (via.p99_ms, direct.p99_ms),
                "cpu_ms_per_req": (cpu * 1000.0 / max(via.requests, 1), None),
                "errors": (via.errors, direct.errors),
                "rss_mib": (rss_peak / 2**20, None),
            }
        finally:
            proxy.stop()
            upstream.stop()

    return run


def stream_scenario(opts: argparse.Namespace, workdir: Path) -> dict[str, tuple[float, float | None]]:
    n, events, gap_ms = opts.streams, opts.events, opts.gap_ms
    upstream = start_upstream(workdir, events=events, gap_ms=gap_ms, procs=opts.upstream_procs)
    proxy = start_proxy(workdir, upstream)
    body = {"model": "gpt-4o-mini", "input": "Write a poem.", "stream": True}
    try:
        asyncio.run(
            run_streams(
                "127.0.0.1", proxy.port, "/openai2", {**body, "security_key": KEY}, 20, b"data: [DONE]"
            )
        )
        cpu0 = cpu_seconds(proxy.popen.pid)
        via = asyncio.run(run_streams("127.0.0.1", proxy.port, "/openai2", {**body, "security_key": KEY}, n,
                                      b"data: [DONE]"))  # fmt: skip
        cpu = cpu_seconds(proxy.popen.pid) - cpu0
        direct = asyncio.run(
            run_streams("127.0.0.1", upstream.port, "/v1/responses", body, n, b"\r\n0\r\n\r\n")
        )
    finally:
        proxy.stop()
        upstream.stop()

    def summary(results):
        complete = [r for r in results if r.ok and r.events == events]
        firsts = sorted(r.first_event_s * 1000 for r in results if r.first_event_s is not None)
        gaps = sorted((r.worst_gap_s() or 0) * 1000 - gap_ms for r in results if r.arrivals)
        return len(complete), firsts, gaps

    v_complete, v_first, v_gap = summary(via)
    d_complete, d_first, d_gap = summary(direct)
    relayed = sum(r.events for r in via)
    return {
        "complete": (v_complete, d_complete),
        "first_p50_ms": (pct(v_first, 50), pct(d_first, 50)),
        "first_p99_ms": (pct(v_first, 99), pct(d_first, 99)),
        "added_gap_p99_ms": (pct(v_gap, 99), pct(d_gap, 99)),
        "cpu_us_per_event": (cpu * 1e6 / max(relayed, 1), None),
    }


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100.0 * (len(values) - 1))))
    return values[k]


def body_scenario(opts: argparse.Namespace, workdir: Path) -> dict[str, tuple[float, float | None]]:
    return _json_scenario(
        "/openai", chat_body(1024 * 1024), connections=1, latency_ms=0, seconds=opts.seconds
    )(opts, workdir)


SCENARIOS = {
    "c1": ("small /openai chat, concurrency 1, upstream 0 ms",
           lambda o, w: _json_scenario("/openai", chat_body(), connections=1, latency_ms=0, seconds=o.seconds)(o, w)),
    "c64_50ms": ("/openai, concurrency 64, upstream 50 ms",
                 lambda o, w: _json_scenario("/openai", chat_body(), connections=64, latency_ms=50, seconds=o.seconds)(o, w)),
    "c64_0ms": ("/openai, concurrency 64, upstream 0 ms",
                lambda o, w: _json_scenario("/openai", chat_body(), connections=64, latency_ms=0, seconds=o.seconds)(o, w)),
    "stream": ("/openai2 streams", stream_scenario),
    "body_1mib": ("1 MiB request body, concurrency 1", body_scenario),
}  # fmt: skip


def median_of(runs: list[dict[str, tuple[float, float | None]]]) -> dict[str, tuple[float, float | None]]:
    out = {}
    for key in runs[0]:
        proxy = statistics.median(r[key][0] for r in runs)
        directs = [r[key][1] for r in runs if r[key][1] is not None]
        out[key] = (proxy, statistics.median(directs) if directs else None)
    return out


def upstream_ceiling(workdir: Path, opts: argparse.Namespace) -> float:
    upstream = start_upstream(workdir, procs=opts.upstream_procs)
    try:
        body = json.dumps(chat_body()).encode()
        return wrk(upstream.port, "/v1/chat/completions", body, connections=64, seconds=opts.seconds).rps
    finally:
        upstream.stop()


def fmt(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="openai-proxy benchmark suite")
    parser.add_argument(
        "--only", nargs="*", choices=sorted(SCENARIOS), help="scenarios to run (default: all)"
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5, help="duration of each wrk run")
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--events", type=int, default=50)
    parser.add_argument("--gap-ms", type=float, default=20.0)
    parser.add_argument("--upstream-procs", type=int, default=1)
    opts = parser.parse_args(argv)
    if not shutil.which("wrk") and set(opts.only or SCENARIOS) - {"stream"}:
        sys.exit("wrk is needed for the JSON scenarios (Debian: apt-get install wrk); or run --only stream")

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} "
          f"{platform.python_version()}, {platform.platform()}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="openai-proxy-bench-") as tmp:
        workdir = Path(tmp)
        if set(opts.only or SCENARIOS) - {"stream"}:
            print(f"fake upstream ceiling (wrk c=64, direct): {upstream_ceiling(workdir, opts):,.0f} req/s")
        for name in opts.only or SCENARIOS:
            describe, run = SCENARIOS[name]
            if name == "stream":
                describe = f"{opts.streams} concurrent /openai2 streams x {opts.events} events {opts.gap_ms:g} ms apart"
            runs = []
            for i in range(opts.runs):
                started = time.monotonic()
                runs.append(run(opts, workdir))
                print(f"  {name} run {i + 1}/{opts.runs}: {time.monotonic() - started:.1f}s", file=sys.stderr)
            result = median_of(runs)
            print(f"\n## {describe} (median of {opts.runs})")
            print("| metric | proxy | direct | added |\n|---|---|---|---|")
            for key, (proxy, direct) in result.items():
                added = proxy - direct if direct is not None and key.endswith("_ms") else None
                print(f"| {key} | {fmt(proxy)} | {fmt(direct)} | {fmt(added)} |")


if __name__ == "__main__":
    main()
