"""Budget reservations: what this worker's calls in flight may still spend, per client.

A budgeted client's call reserves its estimated cost when it is admitted and gives it back when its
completion record settles it (the real cost is charged then, `openai_proxy.clients.admission`). Each
store keeps the reservations of all workers side by side, one entry per (client, worker): the sum of
that worker's reservations for the client, and the time its lease ends. Admission adds up the live
entries, so it is exact across workers and hosts.

Why one entry per worker with a lease, rather than one shared counter:
- a worker that dies (SIGKILL, OOM, a host powered off) never settles its calls; its entry stops
  counting when its lease lapses (`LEASE_S`), while a live worker renews its entries every
  `LEASE_S / 3` seconds for as long as it holds reservations;
- each write stores the worker's own total (not an increment), recomputed from this ledger, so
  nothing drifts and a lost write is repaired by the next one. A write carries a sequence number, and
  a store keeps the newest, so writes that overtake each other on the way to Redis cannot reorder.

The ledger is also the source of truth for what a worker reserved: a reservation whose request never
reaches its completion record is dropped with the record object (`forget_with`), so a live worker
never renews a reservation nobody will settle.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("openai_proxy.limits")

# How long a worker's reservations keep counting after it last renewed them: a dead worker's calls in
# flight stop holding the budget within this many seconds.
LEASE_S = 30.0


@dataclass(frozen=True)
class Reservation:
    """One call's estimated cost, held from admission until its completion record settles it."""

    request_id: str
    usd: float


class Ledger:
    """This process's reservations in one store: request id -> (client, USD), and a renewer."""

    def __init__(self, renew: Callable[[list[str]], None], lease_s: float = LEASE_S) -> None:
        self._renew = renew
        self.lease_s = lease_s
        self._lock = threading.Lock()
        self._reset(os.getpid())
        self._closed = False

    def _reset(self, pid: int) -> None:
        self._pid = pid
        self.worker = os.urandom(8).hex()  # never a pid: two stores of one process must not collide
        self._held: dict[str, tuple[str, float]] = {}
        self._by_client: dict[str, dict[str, float]] = {}
        self._seq = 0
        self._renewer: threading.Thread | None = None
        self._wake = threading.Event()
        self._orphans: list[str] = []  # reservations whose request is gone unsettled (`forget_with`)
        self._dirty: set[str] = set()  # clients whose total dropped that way, to write at the renewal

    def _here(self) -> None:
        """Under the lock: after a fork the parent's reservations are not this process's to renew or
        settle; reservations orphaned since the last call are dropped."""
        pid = os.getpid()
        if pid != self._pid:
            self._reset(pid)
        while self._orphans:
            request_id = self._orphans.pop()
            held = self._held.pop(request_id, None)
            if held is not None:
                log.warning("client limits: request %s ended without settling its reservation", request_id)
                self._drop(held[0], request_id)
                self._dirty.add(held[0])

    def _drop(self, client: str, request_id: str) -> None:
        mine = self._by_client.get(client, {})
        mine.pop(request_id, None)
        if not mine:
            self._by_client.pop(client, None)

    def add(self, reservation: Reservation, client: str) -> tuple[float, float, int]:
        """Hold `reservation`: (this worker's total for `client` before it, after it, write number)."""
        with self._lock:
            self._here()
            before = self._total(client)
            self._held[reservation.request_id] = (client, reservation.usd)
            self._by_client.setdefault(client, {})[reservation.request_id] = reservation.usd
            start = self._claim_renewer()
            result = before, self._total(client), self._next_seq()
        if start is not None:
            start.start()
        return result

    def remove(self, request_id: str) -> tuple[str, float, int] | None:
        """Give a reservation back: (its client, this worker's total left for it, write number), or
        None when this ledger does not hold it."""
        with self._lock:
            self._here()
            held = self._held.pop(request_id, None)
            if held is None:
                return None
            client = held[0]
            self._drop(client, request_id)
            return client, self._total(client), self._next_seq()

    def holds(self, request_id: str) -> bool:
        return request_id in self._held and request_id not in self._orphans

    def total(self, client: str) -> float:
        with self._lock:
            self._here()
            return self._total(client)

    def snapshot(self, also: tuple[str, ...] = ()) -> list[tuple[str, float, int]]:
        """Every client this worker holds reservations for (and `also`), with its total and a write
        number."""
        with self._lock:
            self._here()
            clients = [*self._by_client, *(c for c in also if c not in self._by_client)]
            return [(client, self._total(client), self._next_seq()) for client in clients]

    def forget_with(self, owner: object, request_id: str) -> None:
        """Drop the reservation when `owner` (the request's record) is garbage without having settled
        it: a request that never reached its completion record must not hold the budget forever."""
        weakref.finalize(owner, self._orphans.append, request_id)
        # Runs from the garbage collector, possibly while this very thread holds the lock: it only
        # queues the id (list.append is atomic); the next call under the lock drops it, and the next
        # write or renewal of the client's entry carries the smaller total.

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    def _total(self, client: str) -> float:
        return math.fsum(self._by_client.get(client, {}).values())

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # -- the renewer -------------------------------------------------------------------------------
    def _claim_renewer(self) -> threading.Thread | None:
        """Under the lock: a renewer to start, or None when one runs (or the ledger is closed)."""
        if self._renewer is not None or self._closed:
            return None
        self._renewer = threading.Thread(target=self._renew_loop, name="budget-renewer", daemon=True)
        return self._renewer

    def _renew_loop(self) -> None:
        me = threading.current_thread()
        while True:
            self._wake.wait(self.lease_s / 3)
            with self._lock:
                if self._closed or self._renewer is not me:
                    return
                self._here()
                if not self._by_client and not self._dirty:
                    self._renewer = None  # decided under the lock: the next reservation starts one
                    return
                clients = [*self._by_client, *(c for c in self._dirty if c not in self._by_client)]
                self._dirty.clear()
            try:
                self._renew(clients)
            except Exception:  # never let the renewer die: live reservations would lapse
                log.exception("client limits: renewing budget reservations failed")
