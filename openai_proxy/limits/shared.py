"""Client limits shared by several hosts in Redis, falling back to the host's own store in an outage.

One hash per client (`openai-proxy:limits:<client>`) holds the same seven numbers as the local store,
and one field `w:<worker>` per worker holding budget reservations for the client ("<USD> <lease end>
<write number>", `openai_proxy.limits.reservations`). Each admit and each charge is one Lua script (one
round trip, atomic in Redis), which reads Redis's own clock, so hosts whose clocks disagree still count
one sliding window and one lease. Keys expire 35 days after their last use (longer while a token debt
is still owed): a month's spend is never needed after that.

Commands go through `openai_proxy.redis_link` (redis-py's connections without its costlier client
layer), whose breaker says whether Redis answers. Redis unreachable or slower than
`OPENAI_PROXY_REDIS_TIMEOUT_S`: the request is counted in the host's local store instead (still exact
for this host, so the fleet is bounded by hosts x limit), the outage is logged once, and one request
tries Redis again every `OPENAI_PROXY_REDIS_RETRY_S` while the others count locally. A limits outage
must not take the API down.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis

from openai_proxy.jsonio import iso_or_none
from openai_proxy.limits import rules
from openai_proxy.limits.local import LocalLimitStore
from openai_proxy.limits.reservations import Ledger, Reservation
from openai_proxy.limits.rules import ALLOWED, Admission, Limits
from openai_proxy.redact import redact_text
from openai_proxy.redis_link import RETRY_S, TIMEOUT_S, RedisLink

log = logging.getLogger("openai_proxy.limits")

KEY_PREFIX = "openai-proxy:limits:"

# Shared by both scripts: the clock, the calendar (Howard Hinnant's civil_from_days, the same UTC months
# as Python's time.gmtime), loading and settling the state exactly as rules.settle does.
_PRELUDE = """
local function floor(x) return math.floor(x) end
local function month_of(day)
  local z = day + 719468
  local era = floor(z / 146097)
  local doe = z - era * 146097
  local yoe = floor((doe - floor(doe / 1460) + floor(doe / 36524) - floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + floor(yoe / 4) - floor(yoe / 100))
  local mp = floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y * 12 + m - 1
end
local function num(x) return string.format('%.17g', x) end
local function available(debt, per_minute) return floor((60 - debt) * per_minute / 60 + 1e-6) end
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local day = floor(now / 86400)
local month = month_of(day)
local s = redis.call('HMGET', KEYS[1], 'at', 'r', 't', 'ds', 'ms', 'd', 'm')
local elapsed = now - (tonumber(s[1]) or 0)
local r, t = tonumber(s[2]) or 0, tonumber(s[3]) or 0
if elapsed > 0 then
  r = math.max(0, r - elapsed)
  t = math.max(0, t - elapsed)
end
local ds = tonumber(s[6]) == day and tonumber(s[4]) or 0
local ms = tonumber(s[7]) == month and tonumber(s[5]) or 0
local function store()
  redis.call('HSET', KEYS[1], 'at', num(now), 'r', num(r), 't', num(t), 'ds', num(ds), 'ms', num(ms),
             'd', day, 'm', month)
  redis.call('EXPIRE', KEYS[1], math.min(315360000, math.max(3024000, math.ceil(t) + 60)))
end
-- Budget reservations: the live `w:` entries of other workers (an entry never counts for longer than
-- a lease from now); entries a lease past their end are dropped.
local function reserved_by_others(me, lease)
  local sum = 0
  local fields = redis.call('HGETALL', KEYS[1])
  for i = 1, #fields, 2 do
    local f = fields[i]
    if f ~= me and string.sub(f, 1, 2) == 'w:' then
      local usd, untl = string.match(fields[i + 1], '^(%S+) (%S+)')
      usd, untl = tonumber(usd), tonumber(untl)
      if usd and untl and now < untl and untl <= now + lease + 1 and usd > 0 and usd < math.huge then
        sum = sum + usd
      elseif not untl or untl + lease < now then
        redis.call('HDEL', KEYS[1], f)
      end
    end
  end
  return sum
end
-- This worker's own total, unless a newer write of it is already there.
local function put_mine(me, usd, seq, lease)
  local old = redis.call('HGET', KEYS[1], me)
  local old_seq = old and tonumber(string.match(old, '(%S+)$')) or -1
  if seq > old_seq then
    local untl = usd > 0 and now + lease or now
    redis.call('HSET', KEYS[1], me, num(usd) .. ' ' .. num(untl) .. ' ' .. seq)
  end
end
"""
# ARGV: now ('' = Redis's clock), rpm, tpm (0 = none), daily_usd, monthly_usd ('' = none), then the
# reservation: this worker's field ('' = none), its total before this call, after it, write number,
# lease seconds. Returns the decision, the state after it and the USD other workers reserve.
ADMIT = (
    _PRELUDE
    + """
local rpm, tpm = tonumber(ARGV[2]), tonumber(ARGV[3])
local daily, monthly = tonumber(ARGV[4]), tonumber(ARGV[5])
local me, lease = ARGV[6], tonumber(ARGV[10])
local others = 0
if daily or monthly then others = reserved_by_others(me, lease) end
local held = others + tonumber(ARGV[7])
local ok = not ((rpm > 0 and available(r, rpm) < 1) or (tpm > 0 and available(t, tpm) < 1)
                or (daily and ds + held >= daily) or (monthly and ms + held >= monthly))
if ok and rpm > 0 then r = r + 60 / rpm end
if ok and me ~= '' then put_mine(me, tonumber(ARGV[8]), tonumber(ARGV[9]), lease) end
store()  -- even when refused: after a clock step back, 'at' must follow it (rules.admit)
return {ok and 1 or 0, num(now), num(r), num(t), num(ds), num(ms), day, month, num(held)}
"""
)
# ARGV: now ('' = Redis's clock), tpm (0 = none), tokens, cost_usd, then this worker's field ('' =
# none), its reservation total now, write number, lease seconds. Also what renews and releases.
CHARGE = (
    _PRELUDE
    + """
local tpm, tokens, cost = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if tpm > 0 and tokens > 0 then t = t + tokens * 60 / tpm end
if cost > 0 then
  ds = ds + cost
  ms = ms + cost
end
if ARGV[5] ~= '' then put_mine(ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])) end
store()
return 1
"""
)


def _arg(value: float | None) -> str:
    return "" if value is None else repr(float(value))


class RedisLimitStore:
    """Limits in Redis for a fleet of hosts; `local` counts during outages (and is closed with this)."""

    def __init__(
        self,
        uri: str,
        shown_uri: str,
        local: LocalLimitStore,
        *,
        timeout_s: float = TIMEOUT_S,
        retry_s: float = RETRY_S,
    ) -> None:
        self._link = RedisLink(uri, timeout_s, retry_s)
        self._breaker = self._link.breaker
        self.uri = shown_uri
        self._local = local
        self.ledger = Ledger(self._renew)

    def _failed(self, exc: Exception) -> None:
        if self._breaker.failed(exc):
            log.warning(
                "client limits: Redis at %s failed (%s); counting on this host until it answers "
                "(tried again every %gs)",
                self.uri,
                self._breaker.last_error,
                self._breaker.retry_s,
            )

    def _answered(self) -> None:
        since = self._breaker.answered()
        if since is not None:
            log.warning(
                "client limits: Redis at %s answers again after %.1fs; counting there again",
                self.uri,
                time.time() - since,
            )

    def admit(
        self, client: str, limits: Limits, now: float | None = None, *, reserve: Reservation | None = None
    ) -> Admission:
        """Check every limit of `client`; when all pass, count this request and hold `reserve` (one
        round trip). While Redis is out, the host's store decides (and holds the reservation)."""
        if not limits.any():
            return ALLOWED
        if self._breaker.may_try():
            reserving = reserve is not None and limits.budgeted()
            before, after, seq = self.ledger.add(reserve, client) if reserving else (0.0, 0.0, 0)  # type: ignore[arg-type]
            args = [
                _arg(now),
                limits.rpm or 0,
                limits.tpm or 0,
                _arg(limits.daily_usd),
                _arg(limits.monthly_usd),
                self._field if reserving else "",
                repr(before),
                repr(after),
                seq,
                repr(self.ledger.lease_s),
            ]
            try:
                reply = self._link.script(ADMIT, KEY_PREFIX + client, args)
            except (redis.RedisError, OSError) as exc:
                self._failed(exc)
                if reserving:
                    self.ledger.remove(reserve.request_id)  # type: ignore[union-attr]
            else:
                if self._breaker.down_since is not None:
                    self._answered()
                ok, when, requests, tokens, day_usd, month_usd, day, month, held = reply
                settled = (float(when), float(requests), float(tokens), float(day_usd), float(month_usd))
                state = (*settled, int(day), int(month))
                refused = [] if ok else rules.refusals(limits, *settled[1:], float(held)) or ["requests"]
                if refused and reserving:
                    self._give_back(reserve.request_id, now)  # type: ignore[union-attr]
                return rules.admission(limits, state, refused)  # type: ignore[arg-type]
        return self._local.admit(client, limits, now, reserve=reserve)

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
        """Count an answer's tokens and cost and give back the reservation of request `release` (one
        round trip, none when there is nothing to do). Never raises."""
        tokens, cost = rules.clean_tokens(tokens), rules.clean_cost(cost_usd)
        held = self.ledger.remove(release) if release is not None else None
        if held is None and release is not None and self._local.holds(release):
            self._local.release(release, now)  # admitted while Redis was out
        counts = limits.any() and ((limits.tpm is not None and tokens) or cost)
        if not counts and held is None:
            return
        if held is not None and held[0] != client:  # a bare release: settle it on its own
            self._write_total(*held, now)
            held = None
            if not counts:
                return
        if self._breaker.may_try():
            mine = [self._field, repr(held[1]), held[2]] if held else ["", 0, 0]
            args = [_arg(now), limits.tpm or 0, tokens if counts else 0, cost if counts else 0.0]
            try:
                self._link.script(CHARGE, KEY_PREFIX + client, [*args, *mine, repr(self.ledger.lease_s)])
            except (redis.RedisError, OSError) as exc:
                self._failed(exc)  # a reservation held there lapses within its lease
            except Exception as exc:  # never fail an answer that was already served
                self._breaker.last_error = redact_text(f"{type(exc).__name__}: {exc}")
                log.exception("client limits: could not charge client %r", client)
                return
            else:
                if self._breaker.down_since is not None:
                    self._answered()
                return
        if counts:
            self._local.charge(client, limits, tokens, cost_usd, now)

    def release(self, request_id: str, now: float | None = None) -> None:
        """Give back a reservation whose call cost nothing to count. Never raises."""
        self.charge("", Limits(), 0, None, now, release=request_id)

    def holds(self, request_id: str) -> bool:
        return self.ledger.holds(request_id) or self._local.holds(request_id)

    def forget_with(self, owner: object, request_id: str) -> None:
        """Drop the reservation should `owner` (the request's record) go away unsettled."""
        if self.ledger.holds(request_id):
            self.ledger.forget_with(owner, request_id)
        else:
            self._local.forget_with(owner, request_id)

    def reserved(self, client: str, now: float | None = None) -> float:
        """USD the calls in flight of `client` hold in Redis, every worker's (for tests and pages)."""
        args = [_arg(now), 0, 0, "0", "", "", "0", "0", 0, repr(self.ledger.lease_s)]
        reply = self._link.script(ADMIT, KEY_PREFIX + client, args)
        return float(reply[8])

    def _give_back(self, request_id: str, now: float | None) -> None:
        held = self.ledger.remove(request_id)
        if held is not None:
            self._write_total(*held, now)

    def _write_total(self, client: str, usd: float, seq: int, now: float | None) -> None:
        """This worker's reservation total for `client`, with a new lease; Redis errors are noted."""
        if not self._breaker.may_try():
            return  # it lapses within its lease
        args = [_arg(now), 0, 0, 0.0, self._field, repr(usd), seq, repr(self.ledger.lease_s)]
        try:
            self._link.script(CHARGE, KEY_PREFIX + client, args)
        except (redis.RedisError, OSError) as exc:
            self._failed(exc)
        else:
            self._answered()

    def _renew(self, clients: list[str]) -> None:
        for client, usd, seq in self.ledger.snapshot(also=tuple(clients)):
            self._write_total(client, usd, seq, None)

    @property
    def _field(self) -> str:
        return "w:" + self.ledger.worker

    def status(self) -> dict[str, Any]:
        since = self._breaker.down_since
        return {
            "backend": "redis",
            "uri": self.uri,
            "reachable": since is None,
            "usingFallback": since is not None,
            "downSince": iso_or_none(since),
            "lastError": self._breaker.last_error,
            "fallback": self._local.status(),
        }

    def close(self) -> None:
        # This worker's reservations go with it (best effort; else they lapse within the lease).
        for client, _, seq in self.ledger.snapshot():
            self._write_total(client, 0.0, seq, None)
        self.ledger.close()
        self._link.close()
        self._local.close()
