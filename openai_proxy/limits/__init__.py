"""Per-client limits: requests and tokens per minute, USD per UTC day and month (contract §11, §13).

Semantics:
- `rpm` is a sliding window, not fixed minute buckets (a fixed window lets 2 x rpm through at a
  minute boundary). GCRA: each admitted request adds 60/rpm seconds to the client's request debt,
  which drains at one second per second; a request is admitted while at least one whole request of
  allowance is left (debt <= 60 - 60/rpm). A burst of rpm is allowed, then one request every 60/rpm
  seconds. N+1 simultaneous requests for rpm=N give exactly one refusal.
- `tpm`: tokens are known only when usage arrives. A request is admitted while at least one token
  of the allowance is left; `charge` then takes the real tokens (60/tpm seconds of token debt each),
  even past zero, and the client waits until the allowance has refilled (tpm per minute,
  continuously). A request that starts under the limit and ends over it is served whole and charged
  in full; the next ones wait. remaining-tokens never shows below 0.
- Budgets: USD spent per client per UTC day and per UTC month. A request is admitted while spent +
  reserved < budget (a budget of 0 admits nothing), where reserved is what the client's calls in
  flight hold: each admitted call of a budgeted client reserves its estimated cost
  (`openai_proxy.limits.reservations`) until `charge` settles it, adding its real cost (None =
  unknown: adds nothing) and giving the reservation back in the same update. So N simultaneous calls
  overshoot the budget by at most about one call, not N. Retry-After for a spent budget = seconds
  until the next UTC day / month starts; for one only calls in flight hold, RESERVED_RETRY_S.
- When several limits refuse, the one with the longest wait is named (retrying sooner is useless).
- Headers: x-ratelimit-limit/remaining/reset-requests when the client has rpm, the -tokens trio
  when it has tpm, in OpenAI's formats (reset = time until the allowance is full again, "1s",
  "6m0s", "120ms"). Remaining counts are after this request.

Stores:
- Local (default): a memory-mapped file next to the request log database (budgets survive a
  restart; the runtime dir does not), exact across every process of the host (`local.py` says why
  it is exact and crash-safe).
- Redis (`OPENAI_PROXY_LIMITS_URI`, else a redis:// `OPENAI_PROXY_RATELIMIT_STORAGE_URI`): exact across
  hosts. When Redis is unreachable or slow, requests are counted in the host's local store (still
  exact per host, so the fleet is bounded per host) and Redis is tried again every
  `OPENAI_PROXY_REDIS_RETRY_S`: a limits outage must not take the API down. `status()` says which
  store counts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from openai_proxy.limits.local import LimitFileError, LocalLimitStore
from openai_proxy.limits.reservations import Reservation
from openai_proxy.limits.rules import ALLOWED, Admission, Limits

if TYPE_CHECKING:
    from openai_proxy.config import Config

__all__ = [
    "ALLOWED",
    "Admission",
    "LimitFileError",
    "LimitStore",
    "Limits",
    "LocalLimitStore",
    "Reservation",
    "local_state_path",
    "open_limit_store",
]


class LimitStore(Protocol):
    def admit(
        self, client: str, limits: Limits, now: float | None = None, *, reserve: Reservation | None = None
    ) -> Admission:
        """Atomically check every limit and, when all pass, count this request (one request unit) and,
        for a budgeted client, hold `reserve` until `charge(..., release=)` gives it back."""
        ...

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
        """After the answer: tokens against tpm, cost against both budgets, and the reservation of
        request `release` given back, whatever the client's limits are now. Never raises."""
        ...

    def release(self, request_id: str, now: float | None = None) -> None:
        """Give back a reservation without charging anything. Never raises."""
        ...

    def holds(self, request_id: str) -> bool:
        """Whether this worker holds a reservation for that request."""
        ...

    def forget_with(self, owner: object, request_id: str) -> None:
        """Drop that request's reservation should `owner` (its record) be garbage before it settles."""
        ...

    def reserved(self, client: str, now: float | None = None) -> float:
        """USD reserved for `client` by the calls in flight of every worker."""
        ...

    def status(self) -> dict[str, Any]:
        """For /health: backend, reachable, last error."""
        ...

    def close(self) -> None: ...


def local_state_path(config: Config) -> str:
    """The local limits file: beside the SQLite request log (`<log db>-limits`, like its -wal), so it
    survives restarts; with a database URL, beside where the default SQLite log would be."""
    from openai_proxy.config import DEFAULT_LOG_DB

    log_db = config.log_db if "://" not in config.log_db else DEFAULT_LOG_DB
    return f"{log_db}-limits"


def open_limit_store(config: Config) -> LimitStore:
    """The store for `config`: Redis when a shared URI is configured, else the host's local file.

    Raises LimitFileError when the local file cannot be used (the server should not start then).
    """
    # Opened even with Redis, so an unusable file stops the server at start, not in an outage.
    local = LocalLimitStore(local_state_path(config))
    uri = config.shared_limits_uri
    if uri is None:
        return local
    from openai_proxy.limits.shared import RedisLimitStore

    shown = config.public_view()["limits_uri" if config.limits_uri else "ratelimit_storage_uri"]
    return RedisLimitStore(
        uri, str(shown), local, timeout_s=config.redis_timeout_s, retry_s=config.redis_retry_s
    )
