"""What one log store write costs, SQLite against PostgreSQL: median time of `write_batch` (records,
counters, aggregates, trim: one transaction) for batches of 1, 100 and 1000 completion records, and
records per second through `LogStore` (the queue, the writer thread, the batches).

    python -m bench.logstore                    # starts a throwaway PostgreSQL on loopback (Debian's)
    python -m bench.logstore --pg-url postgresql://user@host/db   # or measure against a real one

The PostgreSQL started here runs with fsync off (like the test suite's): it measures the proxy's
side and the round trips, not the disk.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from openai_proxy.log import db as logdb  # noqa: E402
from openai_proxy.log.db import Batch  # noqa: E402
from openai_proxy.log.sql import open_database  # noqa: E402
from openai_proxy.log.store import LogStore  # noqa: E402

ENTRY = {"event": "completion", "requestId": "0b0f1f4e-3c1d-4f7e-9a57-0c9b8f6f2d11", "endpoint": "/openai",
         "method": "POST", "model": "gpt-4o-mini", "client": "default", "status": 200, "durationMs": 812.4,
         "usage": {"prompt_tokens": 1200, "cached_tokens": 1024, "completion_tokens": 300}, "costUsd": 0.0004,
         "host": "bench", "pid": 1}  # fmt: skip


def batch_times(target: str, size: int, rounds: int) -> float:
    """Median ms of one write_batch of `size` records."""
    db = open_database(target, 2000)
    logdb.create_schema(db)
    times = []
    for seq in range(1, rounds + 1):
        now = time.time()
        items = [("completion", ENTRY, now)] * size
        started = time.perf_counter()
        logdb.write_batch(db, Batch(f"bench-{size}", seq, "bench", 1, items, 0, 0, False, now), 10_000)
        times.append((time.perf_counter() - started) * 1000)
    db.close()
    return statistics.median(times)


def store_rate(target: str, records: int) -> float:
    """Records per second through a LogStore: append them all, then flush until the queue is empty."""
    store = LogStore(target, retention=10_000, max_queue=records + 1, host="bench")
    started = time.perf_counter()
    for _ in range(records):
        store.append(ENTRY)
    while store.queued:
        store.flush()
    elapsed = time.perf_counter() - started
    store.close()
    return records / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg-url", help="measure this PostgreSQL database instead of starting one")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    server = None
    pg_url = args.pg_url
    if pg_url is None:
        from tests.support.postgres_server import PostgresServer, postgres_bin_dir

        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            raise SystemExit("PostgreSQL is not installed (Debian package postgresql); or pass --pg-url")
        server = PostgresServer(bin_dir).start()
        pg_url = server.url(server.create_database())
    try:
        with tempfile.TemporaryDirectory() as tmp:
            targets = {"sqlite": str(Path(tmp) / "bench.sqlite3"), "postgresql": pg_url}
            print(f"{'backend':<11} {'1 rec ms':>9} {'100 rec ms':>11} {'1000 rec ms':>12} {'records/s':>10}")
            for name, target in targets.items():
                ms = [batch_times(target, size, args.rounds) for size in (1, 100, 1000)]
                rate = store_rate(target, 20_000)
                print(f"{name:<11} {ms[0]:>9.2f} {ms[1]:>11.2f} {ms[2]:>12.2f} {rate:>10.0f}")
    finally:
        if server is not None:
            server.close()


if __name__ == "__main__":
    main()
