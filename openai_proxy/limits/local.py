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
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import mmap
import os
import struct
import threading
import time
from typing import Any

from openai_proxy.limits import rules
from openai_proxy.limits.rules import ALLOWED, Admission, Limits, State

log = logging.getLogger("openai_proxy.limits")

MAGIC = b"OPXLIMv1"
HEADER = struct.Struct("<8sII")  # magic, capacity, slot size
HEADER_BYTES = 4096
SLOT_BYTES = 128
DEFAULT_CAPACITY = 65_536  # 8 MiB, a sparse file: only the pages of slots in use take disk space
_STATE = struct.Struct("<5d2i")  # rules.State
_USED, _SELECTOR, _DIGEST, _COPIES = 0, 1, 8, 24  # offsets inside a slot


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
            self.map = mmap.mmap(self.fd, HEADER_BYTES + self.capacity * SLOT_BYTES)
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
                os.ftruncate(self.fd, HEADER_BYTES + capacity * SLOT_BYTES)
                os.pwrite(self.fd, HEADER.pack(MAGIC, capacity, SLOT_BYTES), 0)
                return capacity
            if len(head) < HEADER.size or HEADER.unpack(head)[0] != MAGIC:
                raise LimitFileError(f"{self.path} is not a client limits file; move it away")
            _, found, slot_bytes = HEADER.unpack(head)
            if slot_bytes != SLOT_BYTES or found < 1:
                raise LimitFileError(f"{self.path} has an unknown layout; move it away")
            size = HEADER_BYTES + found * SLOT_BYTES
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
            if idle is None and rules.is_idle(self.read(offset), now):
                idle = offset
        if idle is None:
            return None
        # Reset first (an idle state already means "fresh", so a crash here changes nothing), then
        # hand the slot over; another process's cached offset for the old name sees the new digest.
        self.write(idle, rules.FRESH)
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

    def _update(self, client: str, now: float | None, change: Any) -> Any:
        """Run `change(state, now) -> (state to store, result)` on `client` under the locks."""
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
                stored, result = change(table.read(offset), when)
                table.write(offset, stored)
                return result
            finally:
                fcntl.lockf(table.fd, fcntl.LOCK_UN, 1, 0)

    def admit(self, client: str, limits: Limits, now: float | None = None) -> Admission:
        """Check every limit of `client`; when all pass, count this request."""
        if not limits.any():
            return ALLOWED

        def change(state: State, when: float) -> tuple[State, tuple[list[str], State]]:
            refused, stored = rules.admit(limits, state, when)
            return stored, (refused, stored)

        decided = self._update(client, now, change)
        if decided is None:
            self._full(client)
            return ALLOWED
        return rules.admission(limits, decided[1], decided[0])

    def charge(
        self, client: str, limits: Limits, tokens: int, cost_usd: float | None, now: float | None = None
    ) -> None:
        """Count an answer's tokens against tpm and its cost against the budgets. Never raises."""
        if not limits.any() or (
            (limits.tpm is None or not rules.clean_tokens(tokens)) and not rules.clean_cost(cost_usd)
        ):
            return
        try:
            done = self._update(
                client, now, lambda state, when: (rules.charge(limits, state, when, tokens, cost_usd), True)
            )
        except Exception as exc:
            self.last_error = f"charge failed: {exc}"
            log.exception("client limits: could not charge client %r", client)
            return
        if done is None:
            self._full(client)

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
        table, self._table = self._table, None
        if table is None:
            return
        with _tables_lock:
            table.users -= 1
            if table.users == 0:
                _tables.pop(self.path, None)
                table.close()
