"""The concurrency gate: at most N upstream calls in flight, per server or across a fleet.

`open_gate` picks the backend: this server's gate file (`local.Gate`, byte-range locks that the kernel
drops when a worker dies), or with `OPENAI_PROXY_GATE_URI` the fleet-wide gate of `shared.RedisGate`
(leases in Redis, the local gate as its fallback). Both have the `SlotGate` interface, so nothing above
the gate knows which one it uses. Stdlib-only imports: the backends are imported where they are opened.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from openai_proxy.config import Config

# What `try_acquire` hands out and `release` takes back: a slot number here, a lease id in Redis.
Slot = int | str


class SlotGate(Protocol):
    """A server-wide (or fleet-wide) non-blocking gate: what the pipeline, pages and metrics use."""

    limit: int
    # Highest `in_use()` seen; `on_new_peak` is told when it rises ("Max parallel requests").
    peak: int
    on_new_peak: Callable[[int], None] | None

    def try_acquire(self) -> Slot | None:
        """A slot, or None when all `limit` slots are in use (never waits)."""
        ...

    def release(self, slot: Slot) -> None:
        """Give a slot back; releasing twice is harmless."""
        ...

    def in_use(self) -> int:
        """Slots in use across everything that shares this gate."""
        ...

    def held_here(self) -> int:
        """Slots held by this worker."""
        ...

    def status(self) -> dict[str, Any]:
        """What `/health` shows besides the counts: the backend and whether it is reachable."""
        ...

    def close(self) -> None:
        """Stop background work (the app is going away)."""
        ...


def open_gate(config: Config, runtime_dir: str) -> SlotGate:
    """This server's gate file, or the fleet-wide gate in Redis (with that file as its fallback)."""
    from openai_proxy.gate.local import Gate

    # Without a configured runtime dir the directory is this process's own (see `runtime`): one
    # code path, whose limit then holds per process, as a process-wide semaphore would.
    scope = "host" if config.runtime_dir else "process"
    local = Gate(os.path.join(runtime_dir, "gate.slots"), config.max_parallel_requests, scope)
    if not config.gate_uri:
        return local
    from openai_proxy.gate.shared import RedisGate  # redis-py is imported only by servers that use it

    return RedisGate(
        config.gate_uri,
        config.max_parallel_requests,
        config.gate_lease_s,
        fallback=local,
        timeout_s=config.redis_timeout_s,
        retry_s=config.redis_retry_s,
    )


class SlotGuard:
    """A slot taken for one request; `release()` is idempotent so every exit path can call it."""

    __slots__ = ("_gate", "_slot")

    def __init__(self, gate: SlotGate, slot: Slot) -> None:
        self._gate = gate
        self._slot: Slot | None = slot

    def release(self) -> None:
        slot, self._slot = self._slot, None
        if slot is not None:
            self._gate.release(slot)
