"""What per-client limits cost per request: one `admit` plus one `charge`, as a limited request pays.

Measured in a gevent-patched process, as in a gunicorn worker, for a client with all four limits:
- local, one process: CPU per admit+charge, one client and 1,000 clients in turn;
- local, `--procs` processes hammering one client at once (the file lock contended): wall time per
  pair in each process, and CPU per pair;
- redis (a redis-server of its own on 127.0.0.1, when the Debian package is installed): CPU and wall
  time per pair, one round trip each, next to a bare socket PING (the system's own cost of a round
  trip, which no client library can go below).
The proxy's budget is ~1.2 ms of CPU per request; limits may add at most ~10 % of it (120 us).

    .venv/bin/python bench/limits.py
    .venv/bin/python bench/limits.py --pairs 50000 --procs 4
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from openai_proxy.limits import Limits, LocalLimitStore  # noqa: E402

LIMITS = Limits(rpm=10**9, tpm=10**12, daily_usd=10.0**9, monthly_usd=10.0**9)  # never refuses


def pairs(store, clients: list[str], n: int) -> tuple[float, float]:
    """CPU and wall seconds per admit+charge pair over `n` pairs."""
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(n):
        client = clients[i % len(clients)]
        store.admit(client, LIMITS)
        store.charge(client, LIMITS, 120, 0.0003)
    return (time.process_time() - cpu) / n, (time.perf_counter() - wall) / n


def _contender(path: str, barrier, n: int, out) -> None:
    store = LocalLimitStore(path)
    barrier.wait(30)
    out.put(pairs(store, ["shared"], n))


def contended(path: str, procs: int, n: int) -> list[tuple[float, float]]:
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(procs), ctx.SimpleQueue()
    workers = [
        ctx.Process(target=_contender, args=(path, barrier, n, out), daemon=True) for _ in range(procs)
    ]
    for w in workers:
        w.start()
    return [out.get() for _ in workers]


def start_redis() -> tuple[subprocess.Popen, str] | None:
    binary = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin:/usr/local/bin")
    if binary is None:
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    return None


def us(seconds: float) -> str:
    return f"{seconds * 1e6:7.1f} us"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=20000, help="admit+charge pairs per measurement")
    parser.add_argument("--procs", type=int, default=4, help="processes contending for one client")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="openai-proxy-bench-limits-")
    try:
        path = os.path.join(folder, "openai-proxy.sqlite3-limits")
        store = LocalLimitStore(path)
        pairs(store, ["warm"], 1000)
        cpu, _ = pairs(store, ["one"], args.pairs)
        print(f"local, 1 process, 1 client:        CPU {us(cpu)} per admit+charge")
        clients = [f"client-{i}" for i in range(1000)]
        pairs(store, clients, 1000)
        cpu, _ = pairs(store, clients, args.pairs)
        print(f"local, 1 process, 1,000 clients:   CPU {us(cpu)} per admit+charge")
        results = contended(path, args.procs, args.pairs)
        cpu = sum(c for c, _ in results) / len(results)
        wall = sum(w for _, w in results) / len(results)
        print(
            f"local, {args.procs} processes, 1 client:      CPU {us(cpu)}, wall {us(wall)} per admit+charge"
        )
        store.close()

        started = start_redis()
        if started is None:
            print("redis: redis-server not installed, skipped")
            return
        proc, uri = started
        try:
            from openai_proxy.limits.shared import RedisLimitStore

            host, port = uri[len("redis://") :].split("/")[0].split(":")
            with socket.create_connection((host, int(port))) as bare:
                bare.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                n = args.pairs // 4
                cpu, wall = time.process_time(), time.perf_counter()
                for _ in range(n):
                    bare.sendall(b"*1\r\n$4\r\nPING\r\n")
                    bare.recv(64)
                cpu, wall = (time.process_time() - cpu) / n, (time.perf_counter() - wall) / n
            print(
                f"redis, the round trip alone:       CPU {us(cpu)}, wall {us(wall)} per bare PING (the floor)"
            )
            shared = RedisLimitStore(uri, uri, LocalLimitStore(path))
            pairs(shared, ["warm"], 500)
            cpu, wall = pairs(shared, clients, args.pairs // 4)
            assert shared.status()["reachable"], shared.status()
            print(f"redis, 1 process, 1,000 clients:   CPU {us(cpu)}, wall {us(wall)} per admit+charge")
            shared.close()
        finally:
            proc.kill()
            proc.wait()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
