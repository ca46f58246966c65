"""The log pages at any size: keyset pagination (a page starts at a record of the one before, so page
20,000 costs what page 1 does), one query of `records` per page, and totals kept by every write and
trim instead of a COUNT(*) per page view. Both backends."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from openai_proxy.log import db as logdb
from openai_proxy.log.db import Batch, Cursor, LogFilter, Position
from openai_proxy.log.sql import Database, open_database

T = 1_900_000_000.0
CLIENTS = ("acme", "beta", "gamma")
STATUSES = (200, 200, 200, 201, 404, 429, 500)


@contextmanager
def opened(target: str) -> Iterator[Database]:
    db = open_database(target, 2000)
    try:
        logdb.create_schema(db)
        yield db
    finally:
        db.close()


def entry(n: int, rng: random.Random) -> dict:
    return {"requestId": f"r{n:04d}", "status": rng.choice(STATUSES), "client": rng.choice(CLIENTS),
            "endpoint": rng.choice(("/openai", "/embeddings")), "durationMs": 1.0, "pid": 1}  # fmt: skip


def fill(db: Database, batches: int, size: int, retention: int = 1_000_000, seed: int = 7) -> None:
    """Batches whose records finished out of order (workers flush late) and often at the same time."""
    rng = random.Random(seed)
    n = 0
    for seq in range(1, batches + 1):
        items = []
        for _ in range(size):
            items.append(("completion", entry(n, rng), T + rng.randrange(40) / 4))  # ties on purpose
            n += 1
        logdb.write_batch(db, Batch("w:1:a", seq, "h1", 1, items, 0, 0, False, T), retention)


def expected(db: Database, level: str, where: LogFilter) -> list[str]:
    sql, args = where.where(level)
    rows = db.execute(f"SELECT data FROM records WHERE {sql} ORDER BY ts DESC, id DESC", args).fetchall()
    return [logdb.loads(data)["requestId"] for (data,) in rows]


def ids(page: logdb.LogPage) -> list[str]:
    return [r["requestId"] for r in page.records]


FILTERS = [LogFilter(), LogFilter(client="beta"), LogFilter(status_class=2), LogFilter(status=404),
           LogFilter(client="acme", status=429), LogFilter(endpoint="/embeddings", client="gamma")]  # fmt: skip


@pytest.mark.parametrize("where", FILTERS, ids=str)
def test_cursors_walk_every_record_once_older_and_back_newer(log_db, where):
    with opened(log_db) as db:
        fill(db, batches=6, size=40)
        for level in ("info", "error"):
            want = expected(db, level, where)
            # Older, from the newest page to the last: every record once, in order.
            seen, at, pages = [], Position(), []
            while True:
                page = logdb.read_page(db, level, where, 7, at)
                assert page.total == len(want)
                seen += ids(page)
                pages.append(ids(page))
                if page.older is None:
                    break
                at = Position(before=page.older)
            assert seen == want
            # ... and the page-number form (an offset) gives the same pages.
            for number, shown in enumerate(pages, start=1):
                assert ids(logdb.read_page(db, level, where, 7, Position(page=number))) == shown
            # Newer, from the last page back up: the same pages in reverse.
            back = [pages[-1]]
            while page.newer is not None:
                page = logdb.read_page(db, level, where, 7, Position(after=page.newer))
                back.append(ids(page))
            assert back[::-1] == pages or want == []


def test_a_cursor_reads_back_exactly():
    cursor = Cursor(T + 0.1 + 1e-7, 123456789)
    assert Cursor.parse(str(cursor)) == cursor
    for bad in (
        "",
        "1.5",
        "1.5_",
        "_3",
        "nan_3",
        "inf_3",
        "1.5_-3",
        "1.5_3x",
        "1.5_\u0663",
        "1.5_" + "9" * 20,
    ):
        with pytest.raises(ValueError):
            Cursor.parse(bad)


def test_totals_follow_every_write_and_the_retention_trim(log_db):
    with opened(log_db) as db:
        fill(db, batches=8, size=50, retention=120)
        for level in ("info", "error"):
            (count,) = db.execute("SELECT COUNT(*) FROM records WHERE level = ?", (level,)).fetchone()
            assert count == 120
            # The newest 120 of the level are the ones kept (by id: the order they were written).
        kept = db.execute("SELECT level, MIN(id) FROM records GROUP BY level").fetchall()
        for level, oldest in kept:
            (older,) = db.execute("SELECT COUNT(*) FROM records WHERE level = ? AND id >= ?",
                                  (level, oldest)).fetchone()  # fmt: skip
            assert older == 120
        counted = db.execute(
            "SELECT level, COALESCE(endpoint, ''), COALESCE(client, ''), COALESCE(host, ''), COALESCE(status, 0),"
            " COUNT(*) FROM records GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5"
        ).fetchall()
        totals = db.execute(
            "SELECT level, endpoint, client, host, status, n FROM record_totals ORDER BY 1, 2, 3, 4, 5"
        ).fetchall()
        assert [tuple(r) for r in totals] == [tuple(r) for r in counted]  # exact, and no row of 0 left
        for where in FILTERS:
            assert logdb.read_page(db, "info", where, 5).total == len(expected(db, "info", where))


def test_a_log_without_totals_gets_them_once(log_db):
    with opened(log_db) as db:
        fill(db, batches=2, size=30)
        before = totals(db)
        db.execute("DELETE FROM record_totals")  # as a log written before totals were kept
    with opened(log_db) as db:  # opening it counts them
        assert totals(db) == before
    with opened(log_db) as db:  # once
        assert totals(db) == before


def totals(db: Database) -> list[tuple]:
    rows = db.execute(
        "SELECT level, endpoint, client, host, status, n FROM record_totals ORDER BY 1, 2, 3, 4, 5"
    )
    return [(*row[:5], int(row[5])) for row in rows.fetchall()]


class Counting:
    """A connection that remembers the statements that read `records`."""

    def __init__(self, db: Database) -> None:
        self.db, self.reads = db, []

    def __getattr__(self, name: str):
        return getattr(self.db, name)

    def execute(self, text: str, args=()):
        if "FROM records" in text:
            self.reads.append(text)
        return self.db.execute(text, args)


def test_a_page_reads_records_once_and_not_at_all_when_nothing_can_match(log_db):
    with opened(log_db) as db:
        fill(db, batches=3, size=40)
        counting = Counting(db)
        for at in (
            Position(),
            Position(page=3),
            Position(before=Cursor(T + 5, 10**9)),
            Position(after=Cursor(T, 0)),
        ):
            counting.reads.clear()
            logdb.read_page(counting, "info", LogFilter(client="beta"), 10, at)
            assert len(counting.reads) == 1 and "COUNT" not in counting.reads[0]
        counting.reads.clear()
        page = logdb.read_page(counting, "info", LogFilter(client="nobody"), 10)
        assert (page.records, page.total, counting.reads) == ([], 0, [])  # the totals say: none
        page = logdb.read_page(counting, "info", LogFilter(request_id="r0003"), 10)
        assert page.total is None and len(counting.reads) == 1  # ids are not in the totals: looked up


def test_sqlite_walks_the_index_the_totals_choose(tmp_path):
    """SQLite keeps no statistics: left alone it walks the status index for `status=200` (most of a
    level) when the client's index finds a rare client's page at once, and sorts every 2xx record
    of a level. The totals say which index to walk; the query lets it use no other."""
    path = str(tmp_path / "log.sqlite3")
    rng = random.Random(3)
    items = [("completion", {**entry(n, rng), "status": 200, "client": "common"}, T + n) for n in range(3000)]
    items += [
        ("completion", {**entry(n, rng), "status": 200, "client": "rare"}, T + n + 0.5) for n in range(3)
    ]
    with opened(path) as db:
        logdb.write_batch(db, Batch("w:1:a", 1, "h1", 1, items, 0, 0, False, T), 10**6)
        totals = [(*r[:4], int(r[4])) for r in
                  db.execute("SELECT endpoint, client, host, status, n FROM record_totals WHERE level = 'info'")]  # fmt: skip

        def plan(where: LogFilter) -> tuple[str, str]:
            walk = logdb.choose_walk(where, totals, 51)
            sql, args = where.where("info", walk)
            steps = db.execute(f"EXPLAIN QUERY PLAN SELECT id FROM records WHERE {sql} ORDER BY ts DESC, id DESC "
                               "LIMIT 51", args).fetchall()  # fmt: skip
            return walk, " | ".join(step[3] for step in steps)

        walk, steps = plan(LogFilter(client="rare", status=200))
        assert walk == "client" and "records_level_client_ts" in steps and "TEMP B-TREE" not in steps
        walk, steps = plan(LogFilter(client="common", status_class=2))
        assert walk == "client" and "TEMP B-TREE" not in steps  # not every 2xx record, sorted
        walk, steps = plan(LogFilter(status_class=2))
        assert walk == "level" and "records_level_ts_id" in steps and "TEMP B-TREE" not in steps
        walk, steps = plan(LogFilter(request_id="r0001"))
        assert walk == "request_id" and "records_request_id" in steps
        rows = logdb.read_page(db, "info", LogFilter(client="rare", status=200), 50).records
        assert [r["client"] for r in rows] == ["rare"] * 3


def open_temp_files() -> list[str]:
    """SQLite's temporary files this process holds open (named etilqs_..., unlinked at once)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if "etilqs_" in target:
                found.append(target)
    return found


@pytest.mark.slow
def test_a_sqlite_write_keeps_no_temp_file_open(tmp_path):
    """A write transaction's statement journal outgrew SQLite's in-memory 64 KiB with the totals and
    the indexes, and became a file in TMPDIR (the upload spool's directory) for the rest of each
    transaction; `temp_store = MEMORY` keeps it in memory."""
    with opened(str(tmp_path / "log.sqlite3")) as db:
        seen: list[str] = []
        execute, executemany = db.execute, db.executemany

        def watched(run):
            def call(text, args=()):
                result = run(text, args)
                seen.extend(open_temp_files())
                return result

            return call

        db.execute, db.executemany = watched(execute), watched(executemany)
        fill_rng = random.Random(5)
        for seq in range(1, 21):
            items = [("completion", entry(n, fill_rng), T + n) for n in range(seq * 10, seq * 10 + 10)]
            logdb.write_batch(db, Batch("w:1:a", seq, "h1", 1, items, 0, 0, False, T), 1_000_000)
        assert seen == []
