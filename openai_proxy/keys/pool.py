"""The upstream key pool: which key a call goes out with, and what upstream's answers do to each key.

A call takes the usable key with the fewest calls in flight on the whole host, relative to its
weight. Ties (sequential calls always tie, at zero) go to the key whose turn comes first, as in
stride scheduling: a key chosen moves its turn on by 1/weight, so tied keys take turns in proportion to
their weights; a key that comes back from a rest or was left out joins at the rotation's current turn,
not with a backlog of turns to catch up. Turns are shared by every worker of the host. A key is not usable
while it rests (a 429) or once it is revoked (401, 403, 429 `insufficient_quota`), until the server
restarts or reloads. The state lives in `openai_proxy.keys.state.KeyTable`, exact across the workers of a host.

The pool is built from key specs (`openai_proxy.keys.specs.KeySpec`: name, key, weight, model allowlist), from
the environment today; a clients file can add its own and restrict a client to named keys through
`choose(allowed=...)`.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Collection, Sequence
from operator import add, truediv
from typing import Any

from openai_proxy.jsonio import iso
from openai_proxy.keys.specs import KeySpec
from openai_proxy.keys.state import KeyTable, state_path

# What one attempt with a key came to (completion records, metrics, the key's state).
OK = "ok"
RATE_LIMITED = "rate_limited"
INSUFFICIENT_QUOTA = "insufficient_quota"
UNAUTHORIZED = "unauthorized"
FORBIDDEN = "forbidden"
UNAVAILABLE = "unavailable"
CLIENT_ERROR = "client_error"
SERVER_ERROR = "server_error"
CONNECT_ERROR = "connect_error"
TIMEOUT = "timeout"
TRANSPORT_ERROR = "transport_error"
ABORTED = "aborted"
# Answers that take a key out until restart or reload, and the code kept for each in the table.
REVOKING = {UNAUTHORIZED: 1, FORBIDDEN: 2, INSUFFICIENT_QUOTA: 3}
_REVOKED_BECAUSE = {code: outcome for outcome, code in REVOKING.items()}
# Answers (not failures to get one) that are not a 429: they end a key's back-off.
ANSWERED = frozenset({OK, CLIENT_ERROR, SERVER_ERROR, UNAVAILABLE})
# A 429 without a usable rest time: 1 s, doubling on each one in a row, at most 60 s.
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0


class KeysUnavailable(Exception):
    """No key of the pool may take the call. `retry_after`: seconds until the first resting key is
    back; None when waiting will not help (every key revoked, or none serves the call)."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Lease:
    """One call in flight on one key; `release()` (idempotent) when the call has really ended."""

    __slots__ = ("_pool", "index", "key", "name")

    def __init__(self, pool: KeyPool, index: int, name: str, key: str) -> None:
        self.index, self.name, self.key = index, name, key
        self._pool: KeyPool | None = pool

    def release(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.release(self.index)


class KeyPool:
    """The keys of one server, shared by its workers through a file in the runtime dir."""

    def __init__(self, specs: Sequence[KeySpec], runtime_dir: str) -> None:
        if not specs:
            raise ValueError("a key pool needs at least one key")
        self.specs = tuple(specs)
        self.names = tuple(s.name for s in self.specs)
        self.table = KeyTable(state_path(runtime_dir, fingerprint(self.specs)), len(self.specs))
        weights = [s.weight for s in self.specs]
        self._weights = None if set(weights) == {1} else tuple(float(w) for w in weights)
        self._strides = tuple(1.0 / w for w in weights)
        self._restricted = any(s.models is not None for s in self.specs)
        # Attach now, so a runtime dir the worker cannot use stops it at start, not each call.
        self.table.acquire()
        self.table.release()

    def close(self) -> None:
        self.table.close()

    # -- choosing -----------------------------------------------------------------------------------
    def choose(
        self, model: str | None = None, allowed: Collection[str] | None = None, exclude: Collection[int] = ()
    ) -> Lease:
        """A lease on the usable key with the fewest calls in flight (weighted), or KeysUnavailable.

        `allowed`: names the call may use (None: any); `exclude`: indexes already tried for this call.
        """
        # This runs once per call under a host-wide lock: kept to plain loads and compares.
        eligible = None if allowed is None and not self._restricted else self._eligible(model, allowed)
        table = self.table
        best, best_load, soonest, revoked_seen = -1, math.inf, math.inf, False
        now = table.acquire()
        try:
            # Plain lists of the shared cells (a few C calls), then plain Python on them.
            n = table.keys
            revoked, rest_until, turns = (
                table.revoked.tolist(),
                table.rest_until.tolist(),
                table.turn.tolist(),
            )
            rows = table.rows_in_use().tolist()
            loads = rows[:n]
            for start in range(n, len(rows), n):  # one row per worker: add them up
                loads = list(map(add, loads, rows[start : start + n]))
            if self._weights is not None:
                loads = list(map(truediv, loads, self._weights))
            clock = turns[n]
            best_turn = math.inf
            for i in range(n):
                if (eligible is not None and not eligible[i]) or i in exclude:
                    continue
                if revoked[i]:
                    revoked_seen = True
                elif rest_until[i] > now:
                    soonest = min(soonest, rest_until[i])
                else:
                    load, turn = loads[i], max(turns[i], clock)
                    if load < best_load or (load == best_load and turn < best_turn):
                        best, best_load, best_turn = i, load, turn
            if best >= 0:
                table.own[best] += 1
                table.turn[n] = best_turn
                table.turn[best] = best_turn + self._strides[best]
        finally:
            table.release()
        if best >= 0:
            spec = self.specs[best]
            return Lease(self, best, spec.name, spec.key)
        if soonest < math.inf:
            raise KeysUnavailable("Every upstream API key of the proxy is resting after a 429", soonest - now)
        if revoked_seen:
            raise KeysUnavailable(
                "Every upstream API key of the proxy was refused by OpenAI (401, 403 or insufficient_quota) "
                "and is out of use until the proxy is restarted or reloaded",
                None,
            )
        raise KeysUnavailable(_no_key_message(model, allowed), None)

    def choose_named(
        self, name: str, model: str | None = None, allowed: Collection[str] | None = None
    ) -> Lease:
        """A lease on the key called `name` (it holds a stored object the call is about), or
        KeysUnavailable saying why that key cannot take the call, as `choose` says it for the pool:
        resting (with when it is back), revoked, no longer configured, or not for this call."""
        holds = f"The upstream API key {name!r}, which holds this object,"
        if name not in self.names:
            raise KeysUnavailable(f"{holds} is no longer configured", None)
        if allowed is not None and name not in allowed:
            raise KeysUnavailable(f"{holds} is not allowed for this client", None)
        try:
            return self.choose(model, (name,))
        except KeysUnavailable as exc:
            if exc.retry_after is not None:
                why = "is resting after a 429"
            elif not self.specs[self.names.index(name)].serves(model):
                why = f"does not serve model {model!r}"
            else:
                why = ("was refused by OpenAI (401, 403 or insufficient_quota) and is out of use until the"
                       " proxy is restarted or reloaded")  # fmt: skip
            raise KeysUnavailable(f"{holds} {why}", exc.retry_after) from None

    def _eligible(self, model: str | None, allowed: Collection[str] | None) -> tuple[bool, ...]:
        return tuple(s.serves(model) and (allowed is None or s.name in allowed) for s in self.specs)

    def release(self, index: int) -> None:
        self.table.done(index)

    # -- what answers do to keys --------------------------------------------------------------------
    def report(self, index: int, outcome: str, rest_s: float | None = None) -> None:
        """Apply an attempt's outcome to its key: a 429 rests it (for `rest_s`, else the back-off),
        a refusal revokes it, any other answer ends a back-off."""
        table = self.table
        if outcome == RATE_LIMITED:
            table.acquire()
            try:
                if rest_s is None:
                    step = table.step[index]
                    rest_s = min(BACKOFF_FIRST_S * 2 ** min(step, 16), BACKOFF_MAX_S)
                    table.step[index] = step + 1
                until = time.monotonic() + rest_s
                if until > table.rest_until[index]:
                    table.rest_until[index] = until
            finally:
                table.release()
        elif outcome in REVOKING:
            table.acquire()
            try:
                if not table.revoked[index]:
                    table.revoked[index] = REVOKING[outcome]
                    table.revoked_at[index] = time.time()
            finally:
                table.release()
        elif outcome in ANSWERED and table.attached and table.step[index]:
            # Read without the lock first: a back-off to end is rare, an answer is not.
            table.acquire()
            try:
                table.step[index] = 0
            finally:
                table.release()

    # -- what operators see -------------------------------------------------------------------------
    def describe(self) -> list[dict[str, Any]]:
        """Each key as `/health` shows it: name, last four characters, state, resting until."""
        table = self.table
        now = table.acquire()
        try:
            wall = time.time()
            rows = [
                (table.in_flight(i), table.revoked[i], table.rest_until[i], table.revoked_at[i])
                for i in range(len(self.specs))
            ]
        finally:
            table.release()
        out = []
        for spec, (in_flight, revoked, until, revoked_at) in zip(self.specs, rows, strict=True):
            entry: dict[str, Any] = {"name": spec.name, "last4": spec.last4, "weight": spec.weight,
                                     "inFlight": in_flight, "state": "active", "restingUntil": None}  # fmt: skip
            if revoked:
                entry.update(state="revoked", reason=_REVOKED_BECAUSE.get(revoked), revokedAt=iso(revoked_at))
            elif until > now:
                entry.update(
                    state="resting", restingUntil=iso(wall + until - now), restingForS=round(until - now, 3)
                )
            if spec.models is not None:
                entry["models"] = sorted(spec.models)
            out.append(entry)
        return out


def _no_key_message(model: str | None, allowed: Collection[str] | None) -> str:
    if allowed is not None:
        return f"No upstream API key of the proxy is both allowed for this client and serves model {model!r}"
    return f"No upstream API key of the proxy serves model {model!r}"


def fingerprint(specs: Sequence[KeySpec]) -> str:
    """Names the state file: another key list (a key replaced, say) never shares one with this one."""
    digest = hashlib.sha256()
    for spec in specs:
        digest.update(f"{spec.name}\0{spec.key}\0{spec.weight}\0".encode())
    return digest.hexdigest()[:16]
