"""The arithmetic of client limits, shared by both stores (the Redis scripts mirror it in Lua).

A client's state is seven numbers: `at` (when it was last settled), the request and token debts in
seconds (how long until that allowance is full again), and the UTC day and month with the USD spent
in each. Debts drain at one second per second, so both allowances refill continuously. Next to it, the
USD its calls in flight have reserved (`openai_proxy.limits.reservations`): a budget admits a call
while spent + reserved is below it.
"""

from __future__ import annotations

import calendar
import math
import time
from dataclasses import dataclass
from functools import lru_cache

WINDOW_S = 60.0  # rpm and tpm are per minute
DAY_S = 86_400
# Sums of floats are not exact: a client at exactly its limit must not lose (or gain) a unit to
# rounding. Debts are at most a few minutes, where a double is exact to ~1e-14 s.
EPS = 1e-6
# A budget that only calls in flight hold (spent + reserved >= budget > spent) frees up as they settle:
# the client is told to retry this soon rather than at the next UTC day.
RESERVED_RETRY_S = 1
# Which limit to name when several refuse at once and their waits tie: the one that lasts longest.
_ORDER = {"requests": 0, "tokens": 1, "daily_usd": 2, "monthly_usd": 3}

# at, request debt, token debt, USD spent today, USD spent this month, day, month
State = tuple[float, float, float, float, float, int, int]
FRESH: State = (0.0, 0.0, 0.0, 0.0, 0.0, 0, 0)


def _count(value: object, name: str) -> None:
    if value is not None and (type(value) is not int or value < 1):
        raise ValueError(f"{name} must be an integer >= 1 or None, not {value!r}")


def _usd(value: object, name: str) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if value is not None and not (ok and value >= 0):  # type: ignore[operator]
        raise ValueError(f"{name} must be a finite number >= 0 or None, not {value!r}")


@dataclass(frozen=True)
class Limits:
    """One client's configured limits; None = no such limit."""

    rpm: int | None = None
    tpm: int | None = None
    daily_usd: float | None = None
    monthly_usd: float | None = None

    def __post_init__(self) -> None:
        _count(self.rpm, "rpm")
        _count(self.tpm, "tpm")
        _usd(self.daily_usd, "daily_usd")
        _usd(self.monthly_usd, "monthly_usd")

    def any(self) -> bool:
        return not (
            self.rpm is None and self.tpm is None and self.daily_usd is None and self.monthly_usd is None
        )

    def budgeted(self) -> bool:
        """Whether a USD budget applies (then calls reserve their estimated cost, and an unpriced model
        is refused)."""
        return self.daily_usd is not None or self.monthly_usd is not None


@dataclass(frozen=True)
class Admission:
    """The answer to one request: allowed, or which limit refused it and for how long."""

    allowed: bool
    limit: str | None  # "requests" | "tokens" | "daily_usd" | "monthly_usd" when refused
    retry_after_s: int  # whole seconds (>= 1) until that limit admits again; 0 when allowed
    headers: list[tuple[str, str]]  # OpenAI's x-ratelimit-* headers (empty without rpm and tpm)


ALLOWED = Admission(True, None, 0, [])


def available(debt: float, per_minute: int) -> int:
    """Whole units (requests or tokens) left in an allowance of `per_minute` with `debt` seconds owed."""
    return math.floor((WINDOW_S - debt) * per_minute / WINDOW_S + EPS)


def day_of(now: float) -> int:
    return int(now // DAY_S)


@lru_cache(maxsize=8)
def month_of(day: int) -> int:
    """Months since year 0 (year * 12 + month - 1) of the UTC day `day` (days since 1970-01-01)."""
    t = time.gmtime(day * DAY_S)
    return t.tm_year * 12 + t.tm_mon - 1


def month_start(month: int) -> int:
    year, index = divmod(month, 12)
    return calendar.timegm((year, index + 1, 1, 0, 0, 0))


def settle(state: State, now: float, day: int, month: int) -> tuple[float, float, float, float]:
    """The debts and spend of `state` as of `now`: debts drained, a past day's or month's spend gone."""
    at, requests, tokens, day_usd, month_usd, state_day, state_month = state
    elapsed = now - at
    if elapsed > 0:  # a clock that went back refills nothing, and takes nothing back
        requests = max(0.0, requests - elapsed)
        tokens = max(0.0, tokens - elapsed)
    return requests, tokens, day_usd if state_day == day else 0.0, month_usd if state_month == month else 0.0


def refusals(
    limits: Limits, requests: float, tokens: float, day_usd: float, month_usd: float, reserved: float = 0.0
) -> list[str]:
    """The limits that refuse a request now (empty: admit it); `reserved`: USD held by calls in flight."""
    out = []
    if limits.rpm is not None and available(requests, limits.rpm) < 1:
        out.append("requests")
    if limits.tpm is not None and available(tokens, limits.tpm) < 1:
        out.append("tokens")
    if limits.daily_usd is not None and day_usd + reserved >= limits.daily_usd:
        out.append("daily_usd")
    if limits.monthly_usd is not None and month_usd + reserved >= limits.monthly_usd:
        out.append("monthly_usd")
    return out


def admit(limits: Limits, state: State, now: float, reserved: float = 0.0) -> tuple[list[str], State]:
    """Decide one request: the refusals (empty: admitted and counted) and the state to store."""
    day = day_of(now)
    month = month_of(day)
    requests, tokens, day_usd, month_usd = settle(state, now, day, month)
    refused = refusals(limits, requests, tokens, day_usd, month_usd, reserved)
    if not refused and limits.rpm is not None:
        requests += WINDOW_S / limits.rpm
    # Stored even when refused: after a clock step back, `at` must follow it or nothing would refill
    # until the clock caught up again.
    return refused, (now, requests, tokens, day_usd, month_usd, day, month)


def clean_tokens(tokens: object) -> int:
    """Tokens to charge: a count >= 0 (anything else counts nothing rather than fail an answer)."""
    return tokens if type(tokens) is int and tokens > 0 else 0


def clean_cost(cost_usd: object) -> float:
    """USD to charge: a finite amount > 0; None (unknown cost) and anything odd add nothing."""
    ok = isinstance(cost_usd, int | float) and not isinstance(cost_usd, bool) and math.isfinite(cost_usd)
    return float(cost_usd) if ok and cost_usd > 0 else 0.0  # type: ignore[arg-type, operator]


def charge(limits: Limits, state: State, now: float, tokens: object, cost_usd: object) -> State:
    """The state after an answer used `tokens` and cost `cost_usd` (None: unknown, adds nothing)."""
    day = day_of(now)
    month = month_of(day)
    requests, debt, day_usd, month_usd = settle(state, now, day, month)
    tokens, cost = clean_tokens(tokens), clean_cost(cost_usd)
    if limits.tpm is not None and tokens:
        debt += tokens * WINDOW_S / limits.tpm
    day_usd += cost
    month_usd += cost
    return (now, requests, debt, day_usd, month_usd, day, month)


def is_idle(state: State, now: float) -> bool:
    """Whether `state` means no more than a fresh one at `now` (its slot may go to another client)."""
    at, requests, tokens, day_usd, month_usd, day, month = state
    current = day_of(now)
    return (
        at + max(requests, tokens) <= now
        and (day_usd == 0 or day != current)
        and (month_usd == 0 or month != month_of(current))
    )


def reset_text(seconds: float) -> str:
    """A duration the way OpenAI's x-ratelimit-reset-* headers write it: "120ms", "1s", "6m0s"."""
    ms = max(0, math.ceil(seconds * 1000 - 1e-3))  # a microsecond of rounding is not a millisecond more
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    whole, frac = divmod(ms, 1000)
    text = f"{whole}.{frac:03d}".rstrip("0") if frac else str(whole)
    if hours:
        return f"{hours}h{minutes}m{text}s"
    return f"{minutes}m{text}s" if minutes else f"{text}s"


def _wait(seconds: float) -> int:
    return max(1, math.ceil(seconds - EPS))


def admission(limits: Limits, settled: State, refused: list[str]) -> Admission:
    """The Admission for a decision: headers from the state after it, Retry-After from what refused
    (a budget that only calls in flight hold: RESERVED_RETRY_S)."""
    now, requests, tokens, day_usd, month_usd, day, month = settled
    headers: list[tuple[str, str]] = []
    if limits.rpm is not None:
        headers += [
            ("x-ratelimit-limit-requests", str(limits.rpm)),
            ("x-ratelimit-remaining-requests", str(max(0, available(requests, limits.rpm)))),
            ("x-ratelimit-reset-requests", reset_text(requests)),
        ]
    if limits.tpm is not None:
        headers += [
            ("x-ratelimit-limit-tokens", str(limits.tpm)),
            ("x-ratelimit-remaining-tokens", str(max(0, available(tokens, limits.tpm)))),
            ("x-ratelimit-reset-tokens", reset_text(tokens)),
        ]
    if not refused:
        return Admission(True, None, 0, headers)
    waits = {}
    for name in refused:
        if name == "requests":
            waits[name] = _wait(requests - WINDOW_S + WINDOW_S / limits.rpm)  # type: ignore[operator]
        elif name == "tokens":
            waits[name] = _wait(tokens - WINDOW_S + WINDOW_S / limits.tpm)  # type: ignore[operator]
        elif name == "daily_usd":
            spent = day_usd >= limits.daily_usd  # type: ignore[operator]
            waits[name] = _wait((day + 1) * DAY_S - now) if spent else RESERVED_RETRY_S
        else:
            spent = month_usd >= limits.monthly_usd  # type: ignore[operator]
            waits[name] = _wait(month_start(month + 1) - now) if spent else RESERVED_RETRY_S
    limit = max(refused, key=lambda name: (waits[name], _ORDER[name]))
    return Admission(False, limit, waits[limit], headers)
