"""Client limits shared by every process of one host: a memory-mapped file and a POSIX record lock.

Layout: a header page (magic, capacity, slot size), then `capacity` slots of 128 bytes, a hash table
with linear probing keyed by a 16-byte BLAKE2b digest of the client name. A slot holds a used flag,
the digest, two copies of the client's state (`rules.State`, packed) and one byte naming the current
copy.

Exact: every read-modify-write happens under an exclusive `fcntl` lock on the file (and a thread lock,
since POSIX locks belong to the process, not to a thread or greenlet), and the clock is read inside
it, so the processes' updates are serialised in time order. The lock is held for the few
microseconds of a lookup and a struct pack, never across I/O, so a worker's hub waits for it only
that long (longer only if the OS deschedules the holder meanwhile; measured in bench/limits.py).

Crash-safe: the kernel drops a dead process's lock, so a SIGKILLed worker never blocks the others.
A new state is written into the copy not in use, then published by flipping the one-byte selector
(a single byte store is atomic), so a process killed at any instant leaves the old state or the new
one, never a torn mix. Slots are never emptied, so probe chains never break; a slot whose state is
idle (everything refilled, no spend today or this month) behaves exactly like a fresh one, so a new
client may take it over. The file lives next to the request log database: budgets survive restarts.

Budget reservations (`openai_proxy.limits.reservations`) live in a second region after the slots, one
block per slot: `RES_ENTRIES` entries of (worker id, USD, lease end, write number), written under the
same lock as the slot, so a decision sees the spend and every worker's reservations at one instant.
An entry counts while its lease runs (and never for longer than one lease from now, whatever a torn
write left); a worker's entry is its own total, rewritten by every admission, settlement and renewal.
Files made before this region existed get it on first use (the new bytes read as zeros: no entries).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import math
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from openai_proxy.limits import rules
from openai_proxy.limits.reservations import Ledger, Reservation
from openai_proxy.limits.rules import ALLOWED, Admission, Limits, State

log = logging.getLogger("openai_proxy.limits")

MAGIC = b"OPXLIMv1"
HEADER = struct.Struct("<8sII")  # magic, capacity, slot size
HEADER_BYTES = 4096
SLOT_BYTES = 128
DEFAULT_CAPACITY = 65_536  # 8 MiB, a sparse file: only the pages of slots in use take disk space
_STATE = struct.Struct("<5d2i")  # rules.State
_USED, _SELECTOR, _DIGEST, _COPIES = 0, 1, 8, 24  # offsets inside a slot
# The reservation region: its header (in the header page, after the table's own), then per slot
# RES_ENTRIES entries of worker id, USD, lease end (epoch seconds), write number. 32 entries per
# client: more workers than that holding reservations for one client at once are refused.
RES_MAGIC = b"OPXRESv1"
RES_HEADER = struct.Struct("<8sII")  # magic, entries per slot, entry size
RES_HEADER_AT = 64
RES_ENTRIES = 32
_ENTRY = struct.Struct("<8sddq")
RES_BLOCK = RES_ENTRIES * _ENTRY.size
_NO_WORKER = bytes(8)


class LimitFileError(RuntimeError):
    """The limits file cannot be used (not ours, unreadable); the message names the path."""


class _Table:
    """One process's mapping of the file, shared by every store opened on the same path."""

    def __init__(self, path: str, capacity: int) -> None:
        self.path = path
        self.users = 0
        self.mutex = threading.Lock()
        folder = os.path.dirname(path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            self.capacity = self._prepare(capacity)
            self.reservations_at = HEADER_BYTES + self.capacity * SLOT_BYTES
            self.map = mmap.mmap(self.fd, self.reservations_at + self.capacity * RES_BLOCK)
        except BaseException:
            os.close(self.fd)
            raise
        self.slots: dict[str, int] = {}  # client -> slot offset, checked against the digest on use
        self.digests: dict[str, bytes] = {}  # client -> its name's digest (names are few and fixed)

    def _prepare(self, capacity: int) -> int:
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, 0)
        try:
            head = os.pread(self.fd, HEADER.size, 0)
            if not head:
                os.ftruncate(self.fd, HEADER_BYTES + capacity * (SLOT_BYTES + RES_BLOCK))
                os.pwrite(self.fd, RES_HEADER.pack(RES_MAGIC, RES_ENTRIES, _ENTRY.size), RES_HEADER_AT)
                os.pwrite(self.fd, HEADER.pack(MAGIC, capacity, SLOT_BYTES), 0)
                return capacity
            if len(head) < HEADER.size or HEADER.unpack(head)[0] != MAGIC:
                raise LimitFileError(f"{self.path} is not a client limits file; move it away")
            _, found, slot_bytes = HEADER.unpack(head)
            if slot_bytes != SLOT_BYTES or found < 1:
                raise LimitFileError(f"{self.path} has an unknown layout; move it away")
            res_head = os.pread(self.fd, RES_HEADER.size, RES_HEADER_AT)
            if res_head != RES_HEADER.pack(RES_MAGIC, RES_ENTRIES, _ENTRY.size):
                if res_head.strip(b"\0"):
                    raise LimitFileError(f"{self.path} has an unknown reservation layout; move it away")
                # A file from before reservations: the region is added (zeros: no entries).
                os.pwrite(self.fd, RES_HEADER.pack(RES_MAGIC, RES_ENTRIES, _ENTRY.size), RES_HEADER_AT)
            size = HEADER_BYTES + found * (SLOT_BYTES + RES_BLOCK)
            if os.fstat(self.fd).st_size < size:  # cut short by a full disk or a copy: zeros are fresh
                os.ftruncate(self.fd, size)
            return found
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 0)

    def slot(self, client: str, now: float) -> int | None:
        """The offset of `client`'s slot, taking an empty or idle one for a new client (lock held)."""
        mm = self.map
        offset = self.slots.get(client)
        digest = self.digests.get(client)
        if digest is None:
            digest = self.digests[client] = hashlib.blake2b(client.encode(), digest_size=16).digest()
        if offset is not None and mm[offset + _DIGEST : offset + _DIGEST + 16] == digest:
            return offset
        start = int.from_bytes(digest[:8], "little") % self.capacity
        idle = None
        for i in range(self.capacity):
            offset = HEADER_BYTES + (start + i) % self.capacity * SLOT_BYTES
            if not mm[offset + _USED]:
                if idle is None:
                    mm[offset + _DIGEST : offset + _DIGEST + 16] = digest
                    mm[offset + _USED] = 1  # published last: a half-written digest is never used
                    self.slots[client] = offset
                    return offset
                break
            if mm[offset + _DIGEST : offset + _DIGEST + 16] == digest:
                self.slots[client] = offset
                return offset
            if idle is None and rules.is_idle(self.read(offset), now) and not self.reserving(offset, now):
                idle = offset
        if idle is None:
            return None
        # Reset first (an idle state already means "fresh", so a crash here changes nothing), then
        # hand the slot over; another process's cached offset for the old name sees the new digest.
        self.write(idle, rules.FRESH)
        block = self.block(idle)
        mm[block : block + RES_BLOCK] = bytes(RES_BLOCK)  # lapsed entries only: nothing is lost
        mm[idle + _DIGEST : idle + _DIGEST + 16] = digest
        self.slots[client] = idle
        return idle

    def read(self, offset: int) -> State:
        copy = offset + _COPIES + _STATE.size * self.map[offset + _SELECTOR]
        return _STATE.unpack_from(self.map, copy)  # type: ignore[return-value]

    def write(self, offset: int, state: State) -> None:
        spare = self.map[offset + _SELECTOR] ^ 1
        _STATE.pack_into(self.map, offset + _COPIES + _STATE.size * spare, *state)
        self.map[offset + _SELECTOR] = spare

    # -- reservations (lock held) ------------------------------------------------------------------
    def block(self, offset: int) -> int:
        """Where the reservation entries of the slot at `offset` start."""
        return self.reservations_at + (offset - HEADER_BYTES) // SLOT_BYTES * RES_BLOCK

    def _entries(self, offset: int) -> tuple[int, Iterator[tuple[bytes, float, float, int]]]:
        """Where the slot's entries start, and the entries (worker, USD, lease end, write number),
        read in one pass (most are empty: their worker is all zeros)."""
        block = self.block(offset)
        return block, _ENTRY.iter_unpack(self.map[block : block + RES_BLOCK])

    @staticmethod
    def _live(worker: bytes, usd: float, until: float, now: float, lease_s: float) -> bool:
        # Never longer than one lease from now: a torn write or a clock stepped back cannot pin it.
        return worker != _NO_WORKER and now < until <= now + lease_s + 1 and math.isfinite(usd) and usd > 0

    def reserved(self, offset: int, now: float, lease_s: float, except_worker: bytes) -> float:
        """USD reserved for this slot's client by every worker but `except_worker`."""
        live = self._live
        return math.fsum(
            usd for worker, usd, until, _ in self._entries(offset)[1]
            if worker != _NO_WORKER and worker != except_worker and live(worker, usd, until, now, lease_s)
        )  # fmt: skip

    def reserving(self, offset: int, now: float) -> bool:
        """Whether any worker may still hold a reservation in this slot."""
        return any(worker != _NO_WORKER and until > now for worker, _, until, _ in self._entries(offset)[1])

    def write_reservation(
        self, offset: int, worker: bytes, usd: float, seq: int, until: float, now: float, lease_s: float
    ) -> bool:
        """Store `worker`'s total (unless a newer write of it is there); False when every entry is
        taken by live workers."""
        free = None
        block, entries = self._entries(offset)
        for i, (found, stored_usd, stored_until, stored_seq) in enumerate(entries):
            at = block + i * _ENTRY.size
            if found == worker:
                if seq > stored_seq:
                    self._put(at, usd, until if usd > 0 else 0.0, seq)
                return True
            if free is None and not self._live(found, stored_usd, stored_until, now, lease_s):
                free = at  # unused, released, lapsed, or not believable: free to take
        if usd <= 0:
            return True  # nothing to hold, and nothing held
        if free is None:
            return False
        self._put(free, usd, until, seq)
        self.map[free : free + 8] = worker  # published last: a half-claimed entry belongs to no one
        return True

    def _put(self, at: int, usd: float, until: float, seq: int) -> None:
        # The worker id stays; lease end written last, so a write cut short keeps the old lease.
        struct.pack_into("<d", self.map, at + 8, usd)
        struct.pack_into("<q", self.map, at + 24, seq)
        struct.pack_into("<d", self.map, at + 16, until)

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self.map.flush()
        self.map.close()
        os.close(self.fd)


# One mapping per file per process: closing any descriptor of a file drops all of the process's
# locks on it, and two descriptors would not exclude each other (POSIX locks are per process).
_tables: dict[str, _Table] = {}
_tables_lock = threading.Lock()


class LocalLimitStore:
    """Exact per-client limits across the processes of one host, kept in a file that survives restarts."""

    def __init__(self, path: str, capacity: int = DEFAULT_CAPACITY) -> None:
        self.path = os.path.realpath(path)
        with _tables_lock:
            table = _tables.get(self.path)
            if table is None:
                try:
                    table = _tables[self.path] = _Table(self.path, capacity)
                except OSError as exc:
                    raise LimitFileError(f"cannot open the client limits file {self.path}: {exc}") from exc
            table.users += 1
        self._table: _Table | None = table
        self.last_error: str | None = None
        self.ledger = Ledger(self._renew)

    def _update(self, client: str, now: float | None, change: Callable[..., Any]) -> Any:
        """Run `change(state, now, offset) -> (state to store, result)` on `client` under the locks."""
        table = self._table
        if table is None:
            raise LimitFileError("the client limits store is closed")
        with table.mutex:
            fcntl.lockf(table.fd, fcntl.LOCK_EX, 1, 0)
            try:
                when = time.time() if now is None else now
                offset = table.slot(client, when)
                if offset is None:
                    return None
                stored, result = change(table.read(offset), when, offset)
                table.write(offset, stored)
                return result
            finally:
                fcntl.lockf(table.fd, fcntl.LOCK_UN, 1, 0)

    def admit(
        self, client: str, limits: Limits, now: float | None = None, *, reserve: Reservation | None = None
    ) -> Admission:
        """Check every limit of `client`; when all pass, count this request and hold `reserve` (a
        budgeted call's estimated cost) until `charge(..., release=)` settles it."""
        if not limits.any():
            return ALLOWED
        reserving = reserve is not None and limits.budgeted()
        ledger, me = self.ledger, self._worker()
        before, after, seq = ledger.add(reserve, client) if reserving else (0.0, 0.0, 0)  # type: ignore[arg-type]
        table = self._table
        lease_s = ledger.lease_s

        def change(state: State, when: float, offset: int) -> tuple[State, tuple[list[str], State]]:
            # Every worker's entry but this one's, whose total the ledger knows better (`before`).
            skip = me if reserving else b""
            others = table.reserved(offset, when, lease_s, skip) if limits.budgeted() else 0.0  # type: ignore[union-attr]
            refused, stored = rules.admit(limits, state, when, others + before)
            if (
                reserving
                and not refused
                and not table.write_reservation(  # type: ignore[union-attr]
                    offset, me, after, seq, when + lease_s, when, lease_s
                )
            ):
                # Every entry is held by another live worker: refused as if the budget were held,
                # never unmetered (and this request not counted).
                refused, stored = rules.admit(limits, state, when, math.inf)
            return stored, (refused, stored)

        decided = self._update(client, now, change)
        if reserving and (decided is None or decided[0]):
            self._give_back(reserve.request_id, now)  # type: ignore[union-attr]
        if decided is None:
            self._full(client)
            return ALLOWED
        return rules.admission(limits, decided[1], decided[0])

    def charge(
        self,
        client: str,
        limits: Limits,
        tokens: int,
        cost_usd: float | None,
        now: float | None = None,
        *,
        release: str | None = None,
    ) -> None:
        """Count an answer's tokens against tpm and its cost against the budgets, and give back the
        reservation of request `release` (in the same update). Never raises."""
        held = self.ledger.remove(release) if release is not None else None
        counts = limits.any() and (
            (limits.tpm is not None and rules.clean_tokens(tokens)) or rules.clean_cost(cost_usd)
        )
        if not counts and held is None:
            return
        me, table, lease_s = self._worker(), self._table, self.ledger.lease_s

        def change(state: State, when: float, offset: int) -> tuple[State, bool]:
            if held is not None and held[0] == client:
                table.write_reservation(offset, me, held[1], held[2], when + lease_s, when, lease_s)  # type: ignore[union-attr]
            return (rules.charge(limits, state, when, tokens, cost_usd) if counts else state), True

        try:
            if held is not None and held[0] != client:  # a bare release: settle it on its own
                self._write_total(*held, now)
                if not counts:
                    return
            done = self._update(client, now, change)
        except Exception as exc:
            self.last_error = f"charge failed: {exc}"
            log.exception("client limits: could not charge client %r", client)
            return
        if done is None:
            self._full(client)

    def release(self, request_id: str, now: float | None = None) -> None:
        """Give back a reservation whose call cost nothing to count. Never raises."""
        try:
            self._give_back(request_id, now)
        except Exception as exc:
            self.last_error = f"release failed: {exc}"
            log.exception("client limits: could not give back reservation %s", request_id)

    def holds(self, request_id: str) -> bool:
        return self.ledger.holds(request_id)

    def forget_with(self, owner: object, request_id: str) -> None:
        """Drop the reservation should `owner` (the request's record) go away unsettled."""
        if self.ledger.holds(request_id):
            self.ledger.forget_with(owner, request_id)

    def reserved(self, client: str, now: float | None = None) -> float:
        """USD the calls in flight of `client` hold, every worker's (for tests and pages)."""
        table, lease_s = self._table, self.ledger.lease_s

        def read(state: State, when: float, offset: int) -> tuple[State, float]:
            return state, table.reserved(offset, when, lease_s, b"")  # type: ignore[union-attr]

        return self._update(client, now, read) or 0.0

    def _give_back(self, request_id: str, now: float | None) -> None:
        held = self.ledger.remove(request_id)
        if held is not None:
            self._write_total(*held, now)

    def _write_total(self, client: str, usd: float, seq: int, now: float | None) -> None:
        me, table, lease_s = self._worker(), self._table, self.ledger.lease_s

        def change(state: State, when: float, offset: int) -> tuple[State, bool]:
            table.write_reservation(offset, me, usd, seq, when + lease_s, when, lease_s)  # type: ignore[union-attr]
            return state, True

        self._update(client, now, change)

    def _renew(self, clients: list[str]) -> None:
        """The renewer: this worker's totals again, with a new lease."""
        for client, usd, seq in self.ledger.snapshot(also=tuple(clients)):
            self._write_total(client, usd, seq, None)

    def _worker(self) -> bytes:
        return bytes.fromhex(self.ledger.worker)

    def _full(self, client: str) -> None:
        # Every slot holds a client with live limits: more than DEFAULT_CAPACITY of them at once.
        # Serving unmetered is the lesser harm than refusing a client the operator configured.
        error = f"the client limits file {self.path} is full; client {client!r} is not limited"
        if self.last_error != error:
            log.error("client limits: %s", error)
        self.last_error = error

    def status(self) -> dict[str, Any]:
        return {"backend": "local", "path": self.path, "reachable": True, "lastError": self.last_error}

    def close(self) -> None:
        table = self._table
        if table is None:
            return
        # This worker's reservations go with it (best effort; else they lapse within the lease).
        with contextlib.suppress(Exception):
            for client, _, seq in self.ledger.snapshot():
                self._write_total(client, 0.0, seq, None)
        self.ledger.close()
        self._table = None
        with _tables_lock:
            table.users -= 1
            if table.users == 0:
                _tables.pop(self.path, None)
                table.close()
