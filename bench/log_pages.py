"""The log pages at a million records: how long `/log`, `/log_errors` and the spend tables take with
1,000,000 records in SQLite and in PostgreSQL, through the Flask test client (the whole page: the
records, the totals, the counters, the spend tables and the chart).

    python -m bench.log_pages                    # 1,000,000 records; starts a throwaway PostgreSQL
    python -m bench.log_pages --records 100000 --runs 5
    python -m bench.log_pages --pg-url postgresql://user@host/db   # or a real one (its tables are filled)

The log is filled through the log's own write path (`openai_proxy.log.db.write_batch`: records,
counters, totals, spend and minute aggregates, trim) in batches of 5,000 records, so its aggregates
are the ones the proxy would have kept. The records are `tests/support/logfill.py`'s: 30 days of a fleet of
three hosts, eight clients (one with 0.1 % of the traffic), six endpoints, 8 % errors, 1 % retried
attempts. Each page is asked once to warm up, then `--runs` times; the table shows the median and
the slowest, in milliseconds. The PostgreSQL started here runs with fsync off (like the test
suite's): it measures the queries, not the disk.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from openai_proxy import create_app  # noqa: E402
from openai_proxy.config import build_config  # noqa: E402
from openai_proxy.log.db import Cursor  # noqa: E402
from openai_proxy.log.sql import open_database  # noqa: E402
from tests.support.logfill import fill, records  # noqa: E402

ACCESS_TOKEN = "bench-access-token"
AUTH = {"Authorization": f"Bearer {ACCESS_TOKEN}"}
PER_PAGE = 50


def pages(target: str) -> list[tuple[str, str]]:
    """(what, URL) of each page to time; cursors and ids read from the filled log."""
    db = open_database(target, 10_000)
    try:

        def one(sql: str, args: tuple = ()) -> Any:
            return db.execute(sql, args).fetchone()

        ts, ident = one("SELECT ts, id FROM records WHERE level = 'info' ORDER BY ts DESC, id DESC LIMIT 1 "
                        "OFFSET ?", (499 * PER_PAGE - 1,))  # fmt: skip
        (request_id,) = one(
            "SELECT request_id FROM records WHERE level = 'info' ORDER BY id LIMIT 1 OFFSET 12345"
        )
        (info,) = one("SELECT COUNT(*) FROM records WHERE level = 'info'")
    finally:
        db.close()
    last = -(-info // PER_PAGE)
    return [
        ("/log: first page", "/log"),
        ("/log: client filter", "/log?client=support-bot"),
        ("/log: client + status", "/log?client=search-backend&status=2xx"),
        ("/log: rare client + status", "/log?client=rare-client&status=200"),
        ("/log_errors: first page", "/log_errors"),
        ("/log_errors: client + status", "/log_errors?client=default&status=429"),
        ("/log_errors: status class", "/log_errors?status=5xx"),
        ("/log: page 500 (Older links)", f"/log?before={Cursor(ts, ident)}"),
        ("/log: page 500 (?page=500)", "/log?page=500"),
        (f"/log: last page (?page={last})", f"/log?page={last}"),
        ("/log: a request id", f"/log?request_id={request_id}"),
        ("/log: no match (client=nobody)", "/log?client=nobody"),
    ]


def timed(fn: Callable[[], Any], runs: int) -> tuple[float, float, float]:
    """(first, median, slowest) ms of `fn`: once cold, then `runs` more times."""
    times = []
    for _ in range(runs + 1):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return times[0], statistics.median(times[1:]), max(times[1:])


def measure(target: str, runs: int, tmp: Path) -> dict[str, tuple[float, float, float]]:
    env = {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "OPENAI_API_KEY": "sk-bench-0123456789abcdef",
           "SECURITY_KEY": "bench-security-key", "ACCESS_TOKEN": ACCESS_TOKEN, "OPENAI_PROXY_LOG_DB": target,
           "OPENAI_PROXY_LOG_RETENTION": "2000000", "OPENAI_PROXY_RUNTIME_DIR": str(tmp / f"run-{len(target)}"),
           "OPENAI_PROXY_PAGES_RATE_LIMIT": "1000000/minute"}  # fmt: skip
    app = create_app(build_config(env))
    client = app.test_client()
    store = app.extensions["openai_proxy"].log_store
    out = {}
    try:
        for what, url in pages(target):

            def get(url: str = url) -> None:
                r = client.get(url, headers=AUTH)
                assert r.status_code == 200, (url, r.status_code, r.get_data(as_text=True)[:300])

            out[what] = timed(get, runs)
        today = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 29 * 86400))
        out["spend tables (30 days of aggregates)"] = timed(lambda: store.spend(today), runs)
        out["last hour chart (minute aggregates)"] = timed(
            lambda: store.minutes(int(time.time() // 60) - 59), runs
        )
    finally:
        store.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--pg-url", help="fill and measure this PostgreSQL database instead of starting one")
    parser.add_argument("--only", choices=("sqlite", "postgresql"), help="one backend")
    args = parser.parse_args()
    server = None
    pg_url = args.pg_url
    if pg_url is None and args.only != "sqlite":
        from tests.support.postgres_server import PostgresServer, postgres_bin_dir

        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            raise SystemExit("PostgreSQL is not installed (Debian package postgresql); or pass --pg-url")
        server = PostgresServer(bin_dir).start()
        pg_url = server.url(server.create_database())
    try:
        with tempfile.TemporaryDirectory() as tmp:
            targets = {"sqlite": str(Path(tmp) / "log.sqlite3"), "postgresql": pg_url}
            if args.only:
                targets = {args.only: targets[args.only]}
            results = {}
            now = time.time()
            for name, target in targets.items():
                started = time.perf_counter()
                written = fill(target, records(args.records, now, 30 * 86400, last_hour=3000))
                elapsed = time.perf_counter() - started
                print(f"{name}: {written:,} records written in {elapsed:.0f} s ({written / elapsed:,.0f}/s)")
                if name == "postgresql":
                    db = open_database(target, 10_000)
                    db.execute("VACUUM ANALYZE")  # what autovacuum does soon after a bulk load
                    db.close()
                results[name] = measure(target, args.runs, Path(tmp))
    finally:
        if server is not None:
            server.close()
    names = list(results)
    header = f"{'page (' + format(args.records, ',') + ' records)':<40}" + "".join(
        f"{name + ' cold / median / max':>32}" for name in names
    )
    print(header)
    for what in results[names[0]]:
        cells = "".join(
            f"{r[0]:>16.1f} / {r[1]:>6.1f} / {r[2]:>6.1f}" for r in (results[n][what] for n in names)
        )
        print(f"{what:<40}{cells}")
    print(
        f"(milliseconds: the first time each page is asked, then the median and the slowest of {args.runs} more)"
    )


if __name__ == "__main__":
    main()
