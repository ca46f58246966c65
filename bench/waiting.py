"""What a request costs the proxy while it waits on upstream: CPU of the whole gunicorn tree per
second while `--requests` calls are held in flight by an upstream that does not answer (the fake
with a 10-minute latency), nothing completing meanwhile. Every feature on, as `run.sh --features`.

    .venv/bin/python bench/waiting.py
    .venv/bin/python bench/waiting.py --requests 64 1000 --seconds 10
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.procs import FakeSettings, cpu_by_pid, raise_open_files_limit, start_proxy, start_upstream
from bench.scenarios import chat_body, features_env

CLOCK_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def held(port: int, body: bytes, n: int) -> list[http.client.HTTPConnection]:
    """`n` connections, each with one /openai call sent (its answer never comes while measured)."""
    out = []
    for _ in range(n):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/openai", body, {"Content-Type": "application/json"})
        out.append(conn)
    return out


def connections_to(port: int) -> int:
    """Established TCP connections to 127.0.0.1:`port` (the proxy's to the fake), from /proc/net/tcp."""
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return sum(1 for row in rows if row[3] == "01" and int(row[2].rsplit(":", 1)[1], 16) == port)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, nargs="+", default=[64, 1000])
    parser.add_argument("--seconds", type=float, default=10.0)
    opts = parser.parse_args()
    raise_open_files_limit()
    for n in opts.requests:
        with tempfile.TemporaryDirectory(prefix="waiting-") as tmp:
            workdir = Path(tmp)
            env, key = features_env(workdir, argparse.Namespace(features=True))
            body = json.dumps({**chat_body(), "security_key": key}).encode()
            with (
                start_upstream(workdir, FakeSettings(latency_ms=600_000)) as fake,
                start_proxy(workdir, fake, 2 * n, env, check=False) as proxy,
            ):
                time.sleep(2)  # the workers' start-up is over
                conns = held(proxy.port, body, n)
                try:
                    deadline = time.monotonic() + 30
                    while (upstream := connections_to(fake.port)) < n and time.monotonic() < deadline:
                        time.sleep(0.2)  # until every call is in flight upstream
                    if upstream < n:
                        raise RuntimeError(f"only {upstream} of {n} calls reached the fake upstream")
                    before, start = cpu_by_pid(proxy.pid), time.monotonic()
                    time.sleep(opts.seconds)
                    after, wall = cpu_by_pid(proxy.pid), time.monotonic() - start
                finally:
                    for conn in conns:
                        conn.close()
            used = sum(after[pid] - before.get(pid, 0.0) for pid in after)
            print(f"{n:5d} calls waiting on upstream for {wall:.1f} s: {used * 1000 / wall:.2f} ms of CPU per second"
                  f" in all, {used * 1e6 / wall / n:.2f} us per second per waiting call"
                  f" (the clock counts in {CLOCK_TICK_S * 1000:.0f} ms ticks)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
