"""The key pool's state, shared by every worker of one server: calls in flight, rests, revocations.

One small file in the runtime dir, mapped into each worker (`mmap`). Layout, in int32 cells: a header
(magic, version, key count, row count, rows in use so far), then per key why it was revoked (0: it is
not) and its back-off step, a used flag per row, and one row per worker process: that worker's calls
in flight per key. Then in float64, per key: the end of its rest (`time.monotonic()`, one clock for
every process of a host), when it was revoked (wall clock) and its turn in the rotation; and the
rotation's clock (`openai_proxy.keys.pool` says how turns work).

Who writes what: a worker's row is written by that worker only, so ending a call is one store in
its own row, with no host-wide lock. Everything else, and every decision that must see the whole
host (choosing a key counts the rows of all workers and adds to its own in one step), happens under
an `flock` on the file, held for microseconds and never across I/O, so no greenlet waits behind it.

Crash safety: a worker claims its row with an `fcntl` lock on one byte (past the end of the file,
independent of the `flock`) for its lifetime. The kernel drops that lock when the process dies,
however it dies, so a row whose byte is unlocked belongs to nobody: it is zeroed at the next sweep
(at most SWEEP_INTERVAL_S later) or when a new worker claims it.

Restart and reload: a file in which no live worker holds a row is reset when it is opened, so a
restarted server starts clean; on SIGHUP gunicorn.conf.py calls `forget`, which unlinks the files:
new workers start fresh ones (revoked keys are back), old workers finish their calls on the old.

Imports only the standard library: gunicorn.conf.py uses `forget` in the master.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import mmap
import os
import struct
import time
import weakref
from collections.abc import Callable

try:
    from gevent.monkey import get_original

    _allocate_lock = get_original("_thread", "allocate_lock")
except ImportError:  # pragma: no cover - gevent is a dependency; this only keeps the module standalone
    from _thread import allocate_lock as _allocate_lock

MAGIC = 0x4B505850  # "PXPK"
VERSION = 1
MAX_ROWS = 512  # worker processes at once, old and new ones of a reload together
SWEEP_INTERVAL_S = 1.0
# Row lock bytes lie past the end of the file (POSIX allows that): byte ROW_LOCKS + r is held by the
# worker that owns row r.
ROW_LOCKS = 1 << 30
# struct flock on Linux: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid (+pad).
_FLOCK = struct.Struct("hhqqi4x")
_HEADER = 8  # cells: magic, version, keys, rows, rows in use so far, 3 spare
_HIGH = 4


def state_path(runtime_dir: str, fingerprint: str) -> str:
    return os.path.join(runtime_dir, f"keys-{fingerprint}.state")


def forget(runtime_dir: str) -> None:
    """Drop the key state of a runtime dir (a reload): workers started from now on begin afresh."""
    for path in glob.glob(os.path.join(runtime_dir, "keys-*.state")):
        with contextlib.suppress(OSError):
            os.unlink(path)


class KeyTable:
    """The shared cells of one key pool. Read and change them between `acquire()` and `release()`,
    except this worker's own row (`own`), which `done` changes alone."""

    def __init__(self, path: str, keys: int, rows: int = MAX_ROWS) -> None:
        self.path = path
        self.keys = keys
        self.rows = rows
        self._revoked = _HEADER
        self._step = self._revoked + keys
        self._used = self._step + keys
        self._row0 = self._used + rows
        int_cells = self._row0 + rows * keys
        self._doubles = -(-int_cells * 4 // 8) * 8  # byte offset, 8-aligned
        self.size = self._doubles + (3 * keys + 1) * 8
        # Orders the threads of this process (a threaded dev server); the flock orders the processes.
        # The OS lock even under gevent: nothing waits or switches greenlets while it is held, and it
        # costs less than gevent's.
        self._lock = _allocate_lock()
        self._fd = -1  # this process's descriptor, once attached
        # A child process attaches anew: an inherited descriptor shares the parent's flock and
        # carries none of its row lock.
        os.register_at_fork(after_in_child=_forget_in_child(self))
        self._swept_at = 0.0
        self.row = -1
        # Views over the mapping, valid once attached in this process.
        self.cells: memoryview
        self.revoked: memoryview
        self.step: memoryview
        self.own: memoryview
        self.rest_until: memoryview
        self.revoked_at: memoryview
        self.turn: memoryview  # per key, then the rotation's clock at [keys]

    # -- the host-wide lock -------------------------------------------------------------------------
    def acquire(self) -> float:
        """Take the host-wide lock (and this process's); returns `time.monotonic()`."""
        self._lock.acquire()
        try:
            if self._fd < 0:
                self._attach()
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._lock.release()
            raise
        now = time.monotonic()
        if now - self._swept_at >= SWEEP_INTERVAL_S:
            self._swept_at = now
            self._sweep()
        return now

    def release(self) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._lock.release()

    @property
    def attached(self) -> bool:
        return self._fd >= 0

    def close(self) -> None:
        """Let go of the file (the app is closed): this worker's row is free, its calls no longer count."""
        with self._lock:
            if self._fd < 0:
                return
            fd, self._fd = self._fd, -1
            views = (
                self.cells,
                self.revoked,
                self.step,
                self.own,
                self.rest_until,
                self.revoked_at,
                self.turn,
            )
            for view in views:
                view.release()
            with contextlib.suppress(BufferError):  # a view still held somewhere: the GC unmaps it
                self._mapping.close()
            os.close(fd)  # drops the row's lock with it

    # -- calls in flight ----------------------------------------------------------------------------
    def rows_in_use(self) -> memoryview:
        """Every worker's row so far, one after another (under the lock): key k of row r is at
        `r * keys + k`, so `view[k::keys]` are key k's counts."""
        start = self._row0
        return self.cells[start : start + self.cells[_HIGH] * self.keys]

    def in_flight(self, key: int) -> int:
        """Calls in flight on `key` across every worker (under the lock)."""
        return sum(self.rows_in_use()[key :: self.keys])

    def done(self, key: int) -> None:
        """One of this worker's calls on `key` has ended: one store in its own row, no host-wide lock."""
        with self._lock:
            if self._fd >= 0:
                own = self.own
                if own[key] > 0:
                    own[key] -= 1

    # -- attaching ----------------------------------------------------------------------------------
    def _attach(self) -> None:
        """Open and map the file in this process (again after a fork), reset it if nobody lives in it,
        and claim a row."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                fresh = not self._in_use(fd)
                if fresh:
                    os.ftruncate(fd, self.size)
                    os.pwrite(fd, bytes(self.size), 0)
                mapping = self._mapping = mmap.mmap(fd, self.size)
                self._views(mapping)
                if fresh:
                    for cell, value in enumerate((MAGIC, VERSION, self.keys, self.rows)):
                        self.cells[cell] = value
                self._fd = fd
                self._claim_row()
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except BaseException:
            self._fd = -1
            os.close(fd)
            raise

    def _in_use(self, fd: int) -> bool:
        """Whether the file has our layout and a live worker holds a row in it."""
        if os.fstat(fd).st_size != self.size:
            return False
        if struct.unpack("4i", os.pread(fd, 16, 0)) != (MAGIC, VERSION, self.keys, self.rows):
            return False
        used = struct.unpack(f"{self.rows}i", os.pread(fd, 4 * self.rows, 4 * self._used))
        return any(flag and _locked_by_other(fd, ROW_LOCKS + r) for r, flag in enumerate(used))

    def _views(self, mapping: mmap.mmap) -> None:
        k = self.keys
        whole = memoryview(mapping)
        cells = whole[: self._doubles].cast("i")
        doubles = whole[self._doubles : self.size].cast("d")
        whole.release()
        self.cells = cells
        self.revoked = cells[self._revoked : self._revoked + k]
        self.step = cells[self._step : self._step + k]
        self.rest_until = doubles[:k]
        self.revoked_at = doubles[k : 2 * k]
        self.turn = doubles[2 * k : 3 * k + 1]

    def _row(self, r: int) -> memoryview:
        start = self._row0 + r * self.keys
        return self.cells[start : start + self.keys]

    def _claim_row(self) -> None:
        for r in range(self.rows):
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, ROW_LOCKS + r)
            except OSError:
                continue
            self._drop_row(r)  # left by a worker that died before a sweep noticed
            self.cells[self._used + r] = 1
            self.cells[_HIGH] = max(self.cells[_HIGH], r + 1)
            self.row, self.own = r, self._row(r)
            return
        raise RuntimeError(f"{self.path}: more than {self.rows} worker processes use the key pool")

    # -- dead workers -------------------------------------------------------------------------------
    def _sweep(self) -> None:
        """Zero the rows of dead workers (under the lock)."""
        used = self.cells[self._used : self._used + self.cells[_HIGH]]
        for r, flag in enumerate(used):
            if flag and r != self.row and not _locked_by_other(self._fd, ROW_LOCKS + r):
                self._drop_row(r)

    def _drop_row(self, r: int) -> None:
        row = self._row(r)
        for key in range(self.keys):
            row[key] = 0
        self.cells[self._used + r] = 0


def _forget_in_child(table: KeyTable) -> Callable[[], None]:
    ref = weakref.ref(table)

    def forget_in_child() -> None:
        alive = ref()
        if alive is not None:
            alive._fd = -1

    return forget_in_child


def _locked_by_other(fd: int, offset: int) -> bool:
    """Whether another process holds a lock on byte `offset` (a process never sees its own)."""
    probe = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
    return _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_GETLK, probe))[0] != fcntl.F_UNLCK
