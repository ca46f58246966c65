"""Per-client limits (openai_proxy/limits, contract §11): the host's own store, exact across processes and
crash-safe; the arithmetic; the configuration of where limits are shared."""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import signal
import struct
import time

import pytest

from openai_proxy.config import Config, ConfigError, build_config
from openai_proxy.extension import configured_secrets
from openai_proxy.limits import (
    Admission,
    LimitFileError,
    Limits,
    LocalLimitStore,
    Reservation,
    local_state_path,
    open_limit_store,
)
from openai_proxy.limits import local as local_module
from openai_proxy.limits.reservations import LEASE_S
from openai_proxy.limits.rules import reset_text
from openai_proxy.redact import redact_text
from tests.conftest import ACCESS_TOKEN
from tests.support.limits_contract import NOW, StoreContract, allowed, refused, trio
from tests.support.limits_worker import report  # the spawned processes import this module, never conftest

SPAWN = multiprocessing.get_context("spawn")


class TestLocalStore(StoreContract):
    @pytest.fixture
    def open_store(self, tmp_path):
        stores: list[LocalLimitStore] = []

        def opener() -> LocalLimitStore:
            stores.append(LocalLimitStore(str(tmp_path / "openai-proxy.sqlite3-limits")))
            return stores[-1]

        yield opener
        for store in stores:
            store.close()


@pytest.fixture
def store(tmp_path):
    s = LocalLimitStore(str(tmp_path / "limits"))
    yield s
    s.close()


def run_processes(name: str, argss: list[tuple], deadline_s: float = 60) -> list:
    """Run `limits_worker.<name>(*args)` in one spawned process per `args`; their results in order."""
    results = SPAWN.SimpleQueue()
    procs = [
        SPAWN.Process(target=report, args=(results, i, name, *args), daemon=True)
        for i, args in enumerate(argss)
    ]
    for p in procs:
        p.start()
    out: dict[int, tuple[bool, object]] = {}
    deadline = time.monotonic() + deadline_s
    while len(out) < len(procs) and time.monotonic() < deadline:
        if results.empty():  # polled: a blocking get() would hang the test on a crashed child
            time.sleep(0.02)
            continue
        index, ok, value = results.get()
        out[index] = (ok, value)
    for p in procs:
        assert gone(p), f"process {p.pid} still runs"
    assert len(out) == len(procs), f"{len(procs) - len(out)} processes gave no result"
    assert all(ok for ok, _ in out.values()), out
    return [out[i][1] for i in range(len(procs))]


def gone(proc, deadline_s: float = 30) -> bool:
    """Whether a spawned process has ended (within the deadline).

    Not `join()` or `exitcode`: once a test has started a gevent subprocess (the Redis fixture does),
    gevent's SIGCHLD watcher reaps every child, so multiprocessing never learns the exit status.
    """
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.exitcode is not None:
            return True
        try:
            os.kill(proc.pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


def test_spawned_workers_are_fresh_interpreters_not_gevent_forks():
    from gevent import monkey

    assert monkey.is_module_patched("socket")  # this test process is patched (conftest)
    assert SPAWN.get_start_method() == "spawn"
    assert run_processes("patched", [()]) == [False]


@pytest.mark.parametrize(("processes", "rpm"), [(2, 501), (4, 2003)])
def test_rpm_is_exact_across_processes(tmp_path, processes, rpm):
    backend = {"kind": "local", "path": str(tmp_path / "limits")}
    barrier = SPAWN.Barrier(processes)
    attempts = rpm  # each process alone would get them all
    got = run_processes("hammer", [(backend, barrier, "c", {"rpm": rpm}, attempts, NOW)] * processes)
    assert sum(got) == rpm, got
    store = LocalLimitStore(backend["path"])
    assert store.admit("c", Limits(rpm=rpm), NOW) == refused(
        "requests", math.ceil(60 / rpm), trio("requests", rpm, 0, "1m0s")
    )
    store.close()


def test_charges_from_many_processes_are_never_lost(tmp_path):
    backend = {"kind": "local", "path": str(tmp_path / "limits")}
    processes, times = 4, 150
    limits = {"tpm": processes * times, "daily_usd": 150.0}  # 600 charges: 600 tokens, exactly $150
    run_processes("spend", [(backend, SPAWN.Barrier(processes), "s", limits, times, NOW)] * processes)
    store = LocalLimitStore(backend["path"])
    assert store.admit("s", Limits(**limits), NOW) == refused(
        "daily_usd", 12 * 3600, trio("tokens", 600, 0, "1m0s")
    )
    assert store.admit("s", Limits(daily_usd=150.25), NOW) == allowed([])
    store.close()


@pytest.mark.parametrize("processes", [2, 4])
def test_reservations_are_exact_across_processes(tmp_path, processes):
    backend = {"kind": "local", "path": str(tmp_path / "limits")}
    # Each call reserves $0.125 of a $10 budget and none settles: exactly 80 are admitted, however the
    # processes interleave (admitted while spent + reserved < budget: 79 x 0.125 < 10 <= 80 x 0.125).
    args = (backend, SPAWN.Barrier(processes), "c", {"daily_usd": 10.0}, 60, NOW, 0.125)
    got = run_processes("reserve", [args] * processes)
    assert sum(got) == 80, got
    # Every process closed its store: nothing is held any more.
    store = LocalLimitStore(backend["path"])
    assert store.reserved("c", NOW) == 0.0
    store.close()


def hang_with_a_reservation(backend: dict, ready) -> SPAWN.Process:
    unused = SPAWN.SimpleQueue()  # kept referenced until the child has started
    holder = SPAWN.Process(
        target=report, args=(unused, 0, "reserve_and_hang", backend, "k", 1.0, NOW, str(ready))
    )
    holder.start()
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists()
    return holder


def test_a_killed_workers_reservation_lapses_with_its_lease(tmp_path):
    backend = {"kind": "local", "path": str(tmp_path / "limits")}
    holder = hang_with_a_reservation(backend, tmp_path / "ready")
    os.kill(holder.pid, signal.SIGKILL)
    assert gone(holder)
    store = LocalLimitStore(backend["path"])
    lim = Limits(daily_usd=1.0)
    # Its call never settles: the reservation holds the budget for one lease, then no more.
    assert store.reserved("k", NOW) == 1.0
    assert store.admit("k", lim, NOW, reserve=Reservation("a", 0.25)) == refused("daily_usd", 1, [])
    assert store.reserved("k", NOW + LEASE_S + 1) == 0.0
    assert store.admit("k", lim, NOW + LEASE_S + 1, reserve=Reservation("a", 0.25)).allowed
    store.close()


def test_a_bare_release_takes_no_slot(store):
    assert store.admit("x", Limits(daily_usd=1.0), NOW, reserve=Reservation("a", 0.5)).allowed
    store.charge("", Limits(), 0, None, NOW, release="a")  # what a release is, said another way
    assert list(store._table.slots) == ["x"]
    assert store.reserved("x", NOW) == 0.0


def test_more_workers_reserving_for_one_client_than_entries_are_refused_not_unmetered(tmp_path):
    path = str(tmp_path / "limits")
    workers = [LocalLimitStore(path) for _ in range(local_module.RES_ENTRIES + 1)]
    lim = Limits(rpm=1000, daily_usd=100.0)
    got = [w.admit("c", lim, NOW, reserve=Reservation(f"r{i}", 0.5)) for i, w in enumerate(workers)]
    assert [a.allowed for a in got] == [True] * local_module.RES_ENTRIES + [False]
    # Refused as a held budget (retry soon), and not counted as a request.
    assert (got[-1].limit, got[-1].retry_after_s) == ("daily_usd", 1)
    assert got[-1].headers == trio("requests", 1000, 1000 - local_module.RES_ENTRIES, "1.92s")
    workers[0].release("r0", NOW)  # one worker's entry is free again: the last one fits
    assert workers[-1].admit("c", lim, NOW, reserve=Reservation("r-last", 0.5)).allowed
    for w in workers:
        w.close()


def test_a_file_from_before_reservations_gets_them_and_keeps_its_spend(tmp_path):
    path = tmp_path / "limits"
    s = LocalLimitStore(str(path), capacity=8)
    s.charge("c", Limits(daily_usd=1.0), 0, 0.5, NOW)
    s.close()
    # The layout of earlier versions: no reservation header, no region after the slots.
    with open(path, "r+b") as f:
        f.seek(local_module.RES_HEADER_AT)
        f.write(bytes(local_module.RES_HEADER.size))
    os.truncate(path, local_module.HEADER_BYTES + 8 * local_module.SLOT_BYTES)
    s = LocalLimitStore(str(path))
    lim = Limits(daily_usd=1.0)
    assert s.admit("c", lim, NOW, reserve=Reservation("a", 0.25)).allowed  # 0.5 spent
    assert s.admit("c", lim, NOW, reserve=Reservation("b", 0.25)).allowed  # + 0.25 reserved
    assert s.admit("c", lim, NOW, reserve=Reservation("c", 0.25)) == refused("daily_usd", 1, [])
    s.close()
    with open(path, "r+b") as f:
        f.seek(local_module.RES_HEADER_AT)
        f.write(b"OPXRESv9")
    with pytest.raises(LimitFileError, match="unknown reservation layout"):
        LocalLimitStore(str(path))


def test_a_killed_process_holding_the_lock_blocks_no_one(tmp_path):
    path, ready = str(tmp_path / "limits"), tmp_path / "ready"
    unused = SPAWN.SimpleQueue()  # kept referenced until the child has started
    holder = SPAWN.Process(target=report, args=(unused, 0, "hold_the_lock", path, str(ready)))
    holder.start()
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists()
    os.kill(holder.pid, signal.SIGKILL)
    assert gone(holder)
    # In another process, so that a lock left behind would hang that process, not this test.
    assert run_processes("admit_once", [(path, "after", 1, NOW)]) == [True]


def test_a_write_cut_short_leaves_the_previous_state(store):
    lim = Limits(rpm=2)
    assert store.admit("c", lim, NOW).allowed
    table = store._table
    offset = table.slots["c"]
    before = table.read(offset)
    # A process killed while packing a new state has written into the spare copy only: the selector
    # byte still names the old one, so garbage there is never read.
    spare = (
        offset
        + local_module._COPIES
        + local_module._STATE.size * (table.map[offset + local_module._SELECTOR] ^ 1)
    )
    table.map[spare : spare + local_module._STATE.size] = b"\xff" * local_module._STATE.size
    assert table.read(offset) == before
    assert store.admit("c", lim, NOW) == allowed(trio("requests", 2, 0, "1m0s"))
    assert store.admit("c", lim, NOW).allowed is False


def test_idle_slots_are_reused_and_a_full_table_fails_open(tmp_path, caplog):
    path = str(tmp_path / "small")
    small = LocalLimitStore(path, capacity=4)
    lim = Limits(rpm=1, daily_usd=1.0)
    for name in "abcd":
        assert small.admit(name, lim, NOW).allowed
    small.charge("a", lim, 0, 1.0, NOW)  # a's spend today keeps its slot
    # Every slot holds live limits: a fifth client is served unmetered, and that is reported.
    assert small.admit("e", lim, NOW) == Admission(True, None, 0, [])
    assert small.admit("e", lim, NOW).allowed
    assert "is full" in small.status()["lastError"]
    assert [r.levelname for r in caplog.records if "is full" in r.getMessage()] == ["ERROR"]
    # A minute later b, c and d are idle (as good as new): e takes one of their slots and is limited.
    later = NOW + 60
    assert small.admit("e", lim, later).allowed
    assert small.admit("e", lim, later) == refused("requests", 60, trio("requests", 1, 0, "1m0s"))
    assert small.admit("a", lim, later) == refused("daily_usd", 12 * 3600 - 60, trio("requests", 1, 1, "0s"))
    for name in "bcd":  # those that lost their slot start fresh, which is what they had
        assert small.admit(name, lim, later).allowed
    assert small.admit("a", lim, later).limit == "daily_usd"
    small.close()
    # The capacity is the file's: reopening with another number keeps the table as it is.
    again = LocalLimitStore(path, capacity=1024)
    assert again._table.capacity == 4
    assert again.admit("a", lim, later).limit == "daily_usd"
    again.close()


def test_stores_on_one_file_in_one_process_share_one_mapping(tmp_path):
    a = LocalLimitStore(str(tmp_path / "f"))
    b = LocalLimitStore(str(tmp_path / "." / "f"))
    assert a._table is b._table
    assert a.admit("c", Limits(rpm=1), NOW).allowed
    a.close()  # b keeps working: closing a's descriptor would have dropped b's locks
    assert b.admit("c", Limits(rpm=1), NOW).allowed is False
    b.close()
    with pytest.raises(LimitFileError, match="closed"):
        b.admit("c", Limits(rpm=1), NOW)


def test_a_file_that_is_not_ours_stops_the_start(tmp_path):
    alien = tmp_path / "openai-proxy.sqlite3-limits"
    alien.write_bytes(b"SQLite format 3\x00" + bytes(100))
    with pytest.raises(LimitFileError, match="is not a client limits file"):
        LocalLimitStore(str(alien))
    short = tmp_path / "short"
    short.write_bytes(b"OPX")
    with pytest.raises(LimitFileError, match="is not a client limits file"):
        LocalLimitStore(str(short))
    odd = tmp_path / "odd"
    odd.write_bytes(struct.pack("<8sII", local_module.MAGIC, 4, 64))
    with pytest.raises(LimitFileError, match="unknown layout"):
        LocalLimitStore(str(odd))
    (tmp_path / "dir").mkdir()
    with pytest.raises(LimitFileError, match="cannot open the client limits file"):
        LocalLimitStore(str(tmp_path / "dir"))


def test_a_truncated_file_is_extended_and_keeps_what_it_has(tmp_path):
    path = tmp_path / "limits"
    s = LocalLimitStore(str(path), capacity=8)
    s.charge("c", Limits(daily_usd=1.0), 0, 1.0, NOW)
    end_of_c = s._table.slots["c"] + local_module.SLOT_BYTES
    s.close()
    os.truncate(path, end_of_c)  # e.g. copied by a tool that stops at the last non-zero byte
    s = LocalLimitStore(str(path))
    assert os.path.getsize(path) == local_module.HEADER_BYTES + 8 * (
        local_module.SLOT_BYTES + local_module.RES_BLOCK
    )
    assert s.admit("c", Limits(daily_usd=1.0), NOW) == refused("daily_usd", 12 * 3600, [])
    assert s.admit("d", Limits(daily_usd=1.0), NOW) == allowed([])
    s.close()


def test_the_file_lives_beside_the_request_log(tmp_path):
    config = build_config({"OPENAI_PROXY_LOG_DB": str(tmp_path / "db" / "log.sqlite3")})
    assert local_state_path(config) == str(tmp_path / "db" / "log.sqlite3-limits")
    assert local_state_path(Config()) == "var/openai-proxy.sqlite3-limits"
    # A database URL (the shared PostgreSQL log) has no directory: the default one is used.
    assert local_state_path(dataclasses.replace(Config(), log_db="postgresql://u:p@db/log")) == (
        "var/openai-proxy.sqlite3-limits"
    )
    store = open_limit_store(config)
    assert isinstance(store, LocalLimitStore)
    assert store.status() == {"backend": "local", "path": str(tmp_path / "db" / "log.sqlite3-limits"),
                              "reachable": True, "lastError": None}  # fmt: skip
    assert os.path.isfile(tmp_path / "db" / "log.sqlite3-limits")
    store.close()


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (-3, "0s"), (0.0001, "1ms"), (0.12, "120ms"), (0.999, "999ms"), (1, "1s"), (8.64, "8.64s"),
     (59.94, "59.94s"), (60, "1m0s"), (360, "6m0s"), (61.5, "1m1.5s"), (3600, "1h0m0s"),
     (3723.25, "1h2m3.25s"), (90061, "25h1m1s")],
)  # fmt: skip
def test_reset_durations_are_written_like_openai(seconds, text):
    assert reset_text(seconds) == text


@pytest.mark.parametrize(
    "kwargs",
    [{"rpm": 0}, {"rpm": -1}, {"rpm": 1.5}, {"rpm": True}, {"rpm": "5"}, {"tpm": 0},
     {"daily_usd": -0.01}, {"daily_usd": float("nan")}, {"monthly_usd": float("inf")}, {"monthly_usd": "3"},
     {"daily_usd": False}],
)  # fmt: skip
def test_bad_limits_are_refused(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Limits(**kwargs)


def test_limits_any():
    assert not Limits().any()
    assert all(Limits(**{k: 1}).any() for k in ("rpm", "tpm", "daily_usd", "monthly_usd"))
    assert Limits(daily_usd=0).any()


# -- configuration ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri",
    ["redis://cache:6379/0", "redis://cache", "redis://cache:6379", "redis://cache/", "rediss://cache:6380/2",
     "redis://:pw@cache:6379/1", "redis://user:pw@[::1]:6379/0", "REDIS://cache/0"],
)  # fmt: skip
def test_limits_uri_accepts_redis_urls(uri):
    config = build_config({"OPENAI_PROXY_LIMITS_URI": f" {uri} "})
    assert config.limits_uri == uri
    assert config.shared_limits_uri == uri
    assert config.pages_limits_uri == uri


@pytest.mark.parametrize(
    ("uri", "why"),
    [("memory://", "only redis:// or rediss://"), ("http://cache:6379", "only redis:// or rediss://"),
     ("unix:///run/redis.sock", "only redis:// or rediss://"), ("cache:6379", "only redis:// or rediss://"),
     ("redis+sentinel://s:26379/m", "only redis:// or rediss://"), ("redis://", "has no host"),
     ("redis://:secretpw@:6379/0", "has no host"), ("redis://cache:port/0", "invalid port"),
     ("redis://cache:99999/0", "invalid port"), ("redis://cache:6379/zero", "only a database number"),
     ("redis://cache:6379/0/1", "only a database number"), ("redis://cache:6379/0?ssl=1", "only a database number"),
     ("redis://:secretpw@cache:6379/0#x", "only a database number")],
)  # fmt: skip
def test_limits_uri_refuses_anything_else_at_start(uri, why):
    with pytest.raises(ConfigError, match="OPENAI_PROXY_LIMITS_URI") as info:
        build_config({"OPENAI_PROXY_LIMITS_URI": uri})
    assert why in str(info.value)
    assert "secretpw" not in str(info.value)


def test_limits_uri_falls_back_to_a_redis_page_storage_uri():
    assert build_config({}).shared_limits_uri is None
    assert build_config({}).pages_limits_uri == "memory://"
    only_pages = build_config({"OPENAI_PROXY_RATELIMIT_STORAGE_URI": "redis://pages:6379/1"})
    assert (only_pages.limits_uri, only_pages.shared_limits_uri) == (None, "redis://pages:6379/1")
    assert only_pages.pages_limits_uri == "redis://pages:6379/1"
    memcached = build_config({"OPENAI_PROXY_RATELIMIT_STORAGE_URI": "memcached://m:11211"})
    assert memcached.shared_limits_uri is None
    both = build_config({"OPENAI_PROXY_RATELIMIT_STORAGE_URI": "redis://pages:6379/1",
                         "OPENAI_PROXY_LIMITS_URI": "redis://limits:6379/2"})  # fmt: skip
    assert both.shared_limits_uri == both.pages_limits_uri == "redis://limits:6379/2"


def test_a_password_in_the_limits_uri_is_a_secret(make_app):
    password = "limits-redis-password-0123"
    uri = f"redis://:{password}@127.0.0.1:1/0"  # nothing listens: the app must start anyway
    config = build_config({"OPENAI_PROXY_LIMITS_URI": uri})
    assert configured_secrets(config)["the password in OPENAI_PROXY_LIMITS_URI"] == password
    assert config.public_view()["limits_uri"] == "redis://127.0.0.1:1/0"
    app = make_app(OPENAI_PROXY_LIMITS_URI=uri)
    runtime = app.test_client().get("/debug/runtime", headers={"Authorization": f"Bearer {ACCESS_TOKEN}"})
    assert runtime.status_code == 200
    text = runtime.get_data(as_text=True)
    assert password not in text and "redis://127.0.0.1:1/0" in text
    assert password not in redact_text(f"AUTH failed for {password}")
