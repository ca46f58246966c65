"""This server's gate: at most N upstream calls in flight across every worker of the server.

Each slot is one byte of a shared file, held with a POSIX record lock (`fcntl`). The kernel drops a
process's locks when it dies, so a SIGKILLed worker can never leak a slot. POSIX locks belong to the
process, not the greenlet: a worker re-locking a byte it already holds would "succeed", so each
worker remembers the slots its own greenlets hold and never offers them twice. Taking a slot never
blocks or queues: either a slot is free now, or the caller answers 503.
"""

from __future__ import annotations

import fcntl
import os
import random
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

# struct flock on Linux: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid (+pad).
_FLOCK = struct.Struct("hhqqi4x")
PEAK_SCAN_INTERVAL_S = 0.5


class Gate:
    """Server-wide, non-blocking slot allocator backed by byte-range locks on one file."""

    def __init__(self, path: str, limit: int, scope: str = "host") -> None:
        self.path = path
        self.limit = limit
        # "host": every worker of the server shares the file; "process": a private runtime dir (a host's
        # own gunicorn without OPENAI_PROXY_RUNTIME_DIR, `flask run`), so the limit holds per process.
        self.scope = scope
        self._fd: int | None = None
        self._pid: int | None = None
        self._held: set[int] = set()
        # Greenlets never preempt inside acquire/release, but a plain thread (e.g. a dev server) could.
        self._lock = threading.Lock()
        # Server-wide high-water mark of `in_use()`, as far as this worker has seen it, and who is told
        # when it rises (the log store persists the peak for the "Max parallel requests" counter).
        self.peak = 0
        self.on_new_peak: Callable[[int], None] | None = None
        self._scanned_at = -PEAK_SCAN_INTERVAL_S

    def _file(self) -> int:
        # Opened lazily per process: a descriptor inherited over fork carries no locks, and closing
        # any descriptor of the file would drop all of this process's locks on it.
        pid = os.getpid()
        if self._fd is None or self._pid != pid:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            self._pid = pid
            self._held = set()
        return self._fd

    def try_acquire(self) -> int | None:
        """Take a free slot and return its number, or None when all `limit` slots are in use."""
        slot = self._take_free()
        if slot is not None:
            self._track_peak()
        return slot

    def _take_free(self) -> int | None:
        # Probing from a random slot finds a free one in ~1/(1 - load) tries, whatever the limit; a
        # scan from slot 0 would cost one failed probe per busy slot (quadratic in a burst).
        with self._lock:
            fd = self._file()
            if len(self._held) >= self.limit:
                return None
            start = random.randrange(self.limit)
            for i in range(self.limit):
                slot = (start + i) % self.limit
                if slot in self._held:
                    continue
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, slot, os.SEEK_SET)
                except OSError:
                    continue
                self._held.add(slot)
                return slot
            return None

    def _track_peak(self) -> None:
        """Keep the server-wide high-water mark of slots in use, cheaply.

        This worker's own count is a free lower bound; the exact server-wide count costs `limit`
        fcntl calls, so it is taken at most every PEAK_SCAN_INTERVAL_S, while slots are being taken.
        """
        self._raise_peak(len(self._held))
        now = time.monotonic()
        if now - self._scanned_at >= PEAK_SCAN_INTERVAL_S:
            self._scanned_at = now
            self._raise_peak(self.in_use())

    def _raise_peak(self, busy: int) -> None:
        if busy > self.peak:
            self.peak = busy
            if self.on_new_peak is not None:
                self.on_new_peak(busy)

    def release(self, slot: int) -> None:
        """Give a slot back; releasing a slot twice is harmless."""
        with self._lock:
            if slot not in self._held or self._pid != os.getpid():
                return
            self._held.discard(slot)
            fcntl.lockf(self._file(), fcntl.LOCK_UN, 1, slot, os.SEEK_SET)

    def held_here(self) -> int:
        """Slots held by this worker."""
        return len(self._held) if self._pid == os.getpid() else 0

    def in_use(self) -> int:
        """Slots held by every worker together (own slots plus those other processes lock).

        One F_GETLK asks about a whole range and names one lock of another process in it (the
        kernel merges a process's adjacent slots into one lock, and never reports our own); that
        lock's slots are counted and the ranges on either side asked again. So the cost is about two
        calls per lock other workers hold, not one per slot of the limit."""
        with self._lock:
            fd = self._file()
            busy = len(self._held)
            ranges = [(0, self.limit)]
            while ranges:
                low, high = ranges.pop()
                probe = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, low, high - low, 0)
                l_type, _, start, length, _ = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_GETLK, probe))
                if l_type == fcntl.F_UNLCK:
                    continue
                # Clipped to the range asked about (a lock's length 0 means "to the end of the file").
                start, end = max(start, low), high if length == 0 else min(start + length, high)
                busy += end - start
                if low < start:
                    ranges.append((low, start))
                if end < high:
                    ranges.append((end, high))
            return busy

    def status(self) -> dict[str, Any]:
        return {"backend": "local", "scope": self.scope}

    def close(self) -> None:
        """Nothing runs in the background; the file stays open while the process lives (closing any
        descriptor of it would drop this process's locks)."""
