"""What the spawned processes of the limits tests run: each is a fresh interpreter (like a gunicorn
worker), not a fork of the gevent-patched test process, and imports nothing from conftest."""

from __future__ import annotations

import fcntl
import os
import time
from typing import Any

from openai_proxy.limits import LocalLimitStore, Reservation
from openai_proxy.limits.rules import Limits


def _open(backend: dict[str, Any]) -> Any:
    if backend["kind"] == "local":
        return LocalLimitStore(backend["path"])
    from openai_proxy.limits.shared import RedisLimitStore

    return RedisLimitStore(backend["uri"], backend["uri"], LocalLimitStore(backend["path"]))


def hammer(
    backend: dict[str, Any], barrier: Any, client: str, limits: dict, attempts: int, now: float
) -> int:
    """Try `attempts` admissions at once with the other processes; how many were admitted."""
    store = _open(backend)
    try:
        barrier.wait(30)
        admitted = sum(store.admit(client, Limits(**limits), now).allowed for _ in range(attempts))
        if "uri" in backend and not store.status()["reachable"]:
            return -1  # counted on the fallback: the test would prove nothing
        return admitted
    finally:
        store.close()


def reserve(
    backend: dict[str, Any], barrier: Any, client: str, limits: dict, attempts: int, now: float, usd: float
) -> int:
    """Try `attempts` admissions at once with the other processes, each reserving `usd` and holding
    it until every process has tried; how many were admitted."""
    store = _open(backend)
    try:
        barrier.wait(30)
        admitted = sum(
            store.admit(client, Limits(**limits), now, reserve=Reservation(f"{os.getpid()}-{i}", usd)).allowed
            for i in range(attempts)
        )
        if "uri" in backend and not store.status()["reachable"]:
            return -1  # counted on the fallback: the test would prove nothing
        barrier.wait(30)
        return admitted
    finally:
        store.close()


def reserve_and_hang(backend: dict[str, Any], client: str, usd: float, now: float, ready: str) -> None:
    """Reserve `usd` for `client`, as a worker does for a call in flight, say so, and never settle."""
    store = _open(backend)
    assert store.admit(client, Limits(daily_usd=1.0), now, reserve=Reservation("hung", usd)).allowed
    with open(ready, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(3600)


def spend(backend: dict[str, Any], barrier: Any, client: str, limits: dict, times: int, now: float) -> int:
    """Charge 1 token and $0.25 `times` times at once with the other processes."""
    store = _open(backend)
    try:
        barrier.wait(30)
        for _ in range(times):
            store.charge(client, Limits(**limits), 1, 0.25, now)
        return times
    finally:
        store.close()


def hold_the_lock(path: str, ready: str) -> None:
    """Take the limits file's lock, as a worker does mid-update, say so, and never let go."""
    store = LocalLimitStore(path)
    fcntl.lockf(store._table.fd, fcntl.LOCK_EX, 1, 0)  # type: ignore[union-attr]
    with open(ready, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(3600)


def admit_once(path: str, client: str, rpm: int, now: float) -> bool:
    store = LocalLimitStore(path)
    return store.admit(client, Limits(rpm=rpm), now).allowed


def patched() -> bool:
    """Whether this process runs gevent-patched sockets (a spawned worker must not)."""
    from gevent import monkey

    return monkey.is_module_patched("socket")


def report(results: Any, index: int, name: str, *args: Any) -> None:
    """Run `name(*args)` and put (index, True, result), or (index, False, the error), on `results`."""
    try:
        value = globals()[name](*args)
    except BaseException as exc:
        results.put((index, False, repr(exc)))
        raise
    results.put((index, True, value))
