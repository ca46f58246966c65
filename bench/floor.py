"""The floor of the stack: CPU per request of gunicorn's gevent worker serving `/openai` with nothing
of the proxy in it (`bench/floor_apps.py`: a bare WSGI app, a bare Flask app, the bare WSGI app plus
one call through the proxy's upstream client to the fake, and that call from a Flask view), measured
as the suite measures the proxy: wrk c=64 against `gunicorn -k gevent -w 2`, CPU of the gunicorn
tree, a fast fake upstream. What the proxy costs above these is its own work.

    .venv/bin/python bench/floor.py
    .venv/bin/python bench/floor.py --apps relay --runs 5 --seconds 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.procs import ROOT, FakeSettings, cpu_by_pid, free_port, start_upstream, tree, wait_port
from bench.scenarios import chat_body
from bench.wrk import wrk

APPS = ("wsgi", "flask", "relay", "flask_relay")


def measure(app: str, workdir: Path, upstream: str, opts: argparse.Namespace) -> list[float]:
    """CPU ms per request of each run (gunicorn tree, all processes)."""
    port = free_port()
    env = {**os.environ, "FLOOR_UPSTREAM": upstream, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", str(opts.workers),
               "--worker-connections", "2000", "-b", f"127.0.0.1:{port}", f"bench.floor_apps:{app}"]  # fmt: skip
    with open(workdir / f"floor-{app}.log", "wb") as log:
        server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port, popen=server)
        body = json.dumps({**chat_body(), "security_key": "floor"}).encode()
        wrk(workdir, port, "/openai", body, connections=opts.connections, seconds=2)  # warm-up
        out = []
        for _ in range(opts.runs):
            before = sum(cpu_by_pid(server.pid).values())
            result = wrk(workdir, port, "/openai", body, connections=opts.connections, seconds=opts.seconds)
            used = sum(cpu_by_pid(server.pid).values()) - before
            if result.errors:
                raise RuntimeError(f"{app}: {result.errors} failed requests")
            out.append(used * 1000.0 / max(result.requests, 1))
        return out
    finally:
        pids = tree(server.pid)
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            for pid in pids:
                os.kill(pid, 9)
            server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--apps", nargs="+", choices=APPS, default=list(APPS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="floor-") as tmp:
        workdir = Path(tmp)
        with start_upstream(workdir, FakeSettings()) as fake:
            for app in opts.apps:
                runs = measure(app, workdir, fake.url("/v1"), opts)
                shown = " ".join(f"{r:.3f}" for r in runs)
                print(f"{app:11s} CPU per request: min {min(runs):.3f} ms, median {sorted(runs)[len(runs) // 2]:.3f} ms"
                      f" (runs: {shown})", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
