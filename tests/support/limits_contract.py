"""What every client limit store must do (openai_proxy/limits docstring), run against each backend.

Subclasses provide `open_store`: a callable opening a store on the same backing state each time (a
second call is a restart, or another worker). Time moves through the `now` argument, never by sleeping.
"""

from __future__ import annotations

import calendar
import math

import pytest

from openai_proxy.limits import Admission, Limits, Reservation
from openai_proxy.limits.reservations import LEASE_S

NOW = float(calendar.timegm((2025, 1, 15, 12, 0, 0)))  # a Wednesday noon, UTC


def utc(*args: int) -> float:
    return float(calendar.timegm((*args, 0, 0, 0)[:6]))


def trio(kind: str, limit: int, remaining: int, reset: str) -> list[tuple[str, str]]:
    return [
        (f"x-ratelimit-limit-{kind}", str(limit)),
        (f"x-ratelimit-remaining-{kind}", str(remaining)),
        (f"x-ratelimit-reset-{kind}", reset),
    ]


def allowed(headers: list[tuple[str, str]]) -> Admission:
    return Admission(True, None, 0, headers)


def refused(limit: str, retry_after_s: int, headers: list[tuple[str, str]]) -> Admission:
    return Admission(False, limit, retry_after_s, headers)


class StoreContract:
    @pytest.fixture
    def store(self, open_store):
        return open_store()

    def test_rpm_burst_then_exact_refusal_with_headers(self, store):
        lim = Limits(rpm=5)
        got = [store.admit("alice", lim, NOW) for _ in range(6)]
        assert got[:5] == [
            allowed(trio("requests", 5, 4, "12s")),
            allowed(trio("requests", 5, 3, "24s")),
            allowed(trio("requests", 5, 2, "36s")),
            allowed(trio("requests", 5, 1, "48s")),
            allowed(trio("requests", 5, 0, "1m0s")),
        ]
        assert got[5] == refused("requests", 12, trio("requests", 5, 0, "1m0s"))
        # Refusals are not counted: one more request fits exactly 60/rpm seconds later, not before.
        assert store.admit("alice", lim, NOW + 11.5) == refused(
            "requests", 1, trio("requests", 5, 0, "48.5s")
        )
        assert store.admit("alice", lim, NOW + 12) == allowed(trio("requests", 5, 0, "1m0s"))
        assert store.admit("alice", lim, NOW + 12).allowed is False

    @pytest.mark.parametrize("rpm", [1, 3, 7, 60, 1000])
    def test_rpm_plus_one_simultaneous_requests_give_exactly_one_refusal(self, store, rpm):
        lim = Limits(rpm=rpm)
        results = [store.admit("c", lim, NOW).allowed for _ in range(rpm + 1)]
        assert results == [True] * rpm + [False]

    def test_rpm_is_a_sliding_window_not_minute_buckets(self, store):
        lim = Limits(rpm=60)
        assert all(store.admit("c", lim, utc(2025, 1, 15, 12, 0, 59)).allowed for _ in range(60))
        # A fixed window would let another 60 through right after the minute boundary.
        after_boundary = [store.admit("c", lim, utc(2025, 1, 15, 12, 1, 1)).allowed for _ in range(60)]
        assert after_boundary.count(True) == 2
        # Refilled at one request per second, fully after a minute.
        assert [store.admit("c", lim, utc(2025, 1, 15, 12, 2, 0)).allowed for _ in range(61)].count(
            True
        ) == 59

    def test_fractional_resets_are_written_like_openai(self, store):
        assert store.admit("c", Limits(rpm=100), NOW).headers == trio("requests", 100, 99, "600ms")
        assert store.admit("d", Limits(rpm=7), NOW).headers == trio("requests", 7, 6, "8.572s")
        assert store.admit("e", Limits(rpm=1), NOW).headers == trio("requests", 1, 0, "1m0s")

    def test_tpm_overdraw_then_continuous_refill(self, store):
        lim = Limits(tpm=100)
        assert store.admit("t", lim, NOW) == allowed(trio("tokens", 100, 100, "0s"))
        # Started under the limit, ended over it: charged in full (150 tokens = 90 s of refill).
        store.charge("t", lim, 150, None, NOW)
        assert store.admit("t", lim, NOW) == refused("tokens", 31, trio("tokens", 100, 0, "1m30s"))
        # Remaining never shows below 0; one whole token back after 30.6 s.
        assert store.admit("t", lim, NOW + 30.5) == refused("tokens", 1, trio("tokens", 100, 0, "59.5s"))
        assert store.admit("t", lim, NOW + 31) == allowed(trio("tokens", 100, 1, "59s"))
        assert store.admit("t", lim, NOW + 60) == allowed(trio("tokens", 100, 50, "30s"))
        assert store.admit("t", lim, NOW + 90) == allowed(trio("tokens", 100, 100, "0s"))
        assert store.admit("t", lim, NOW + 900) == allowed(trio("tokens", 100, 100, "0s"))

    def test_tpm_admits_while_one_token_is_left(self, store):
        lim = Limits(tpm=1000)
        store.charge("t", lim, 999, None, NOW)
        assert store.admit("t", lim, NOW) == allowed(trio("tokens", 1000, 1, "59.94s"))
        store.charge("t", lim, 5000, None, NOW)  # the one admitted request used far more
        assert store.admit("t", lim, NOW) == refused("tokens", 300, trio("tokens", 1000, 0, "5m59.94s"))

    def test_rpm_and_tpm_together_name_the_longer_wait(self, store):
        lim = Limits(rpm=2, tpm=10)
        assert store.admit("b", lim, NOW) == allowed(
            trio("requests", 2, 1, "30s") + trio("tokens", 10, 10, "0s")
        )
        store.charge("b", lim, 20, None, NOW)  # 120 s of token refill
        got = store.admit("b", lim, NOW)
        assert got == refused("tokens", 66, trio("requests", 2, 1, "30s") + trio("tokens", 10, 0, "2m0s"))
        store.charge("b", lim, -5, None, NOW)  # nonsense charges count nothing
        store.charge("b", lim, 2.5, None, NOW)  # type: ignore[arg-type]
        assert store.admit("b", lim, NOW + 66) == allowed(
            trio("requests", 2, 1, "30s") + trio("tokens", 10, 1, "54s")
        )
        assert store.admit("b", lim, NOW + 66) == allowed(
            trio("requests", 2, 0, "1m0s") + trio("tokens", 10, 1, "54s")
        )
        got = store.admit("b", lim, NOW + 66)
        assert got == refused("requests", 30, trio("requests", 2, 0, "1m0s") + trio("tokens", 10, 1, "54s"))

    def test_daily_budget_and_utc_midnight(self, store):
        lim = Limits(daily_usd=1.0)
        assert store.admit("d", lim, NOW) == allowed([])  # budgets alone bring no headers
        store.charge("d", lim, 10, 0.5, NOW)
        store.charge("d", lim, 10, None, NOW)  # unknown cost adds nothing
        store.charge("d", lim, 10, 0.25, NOW)
        assert store.admit("d", lim, NOW).allowed  # 0.75 < 1.0
        store.charge("d", lim, 10, 0.25, NOW)
        assert store.admit("d", lim, NOW) == refused("daily_usd", 12 * 3600, [])
        assert store.admit("d", lim, utc(2025, 1, 15, 23, 59, 59)) == refused("daily_usd", 1, [])
        assert store.admit("d", lim, utc(2025, 1, 15, 23, 59, 59) + 0.5) == refused("daily_usd", 1, [])
        assert store.admit("d", lim, utc(2025, 1, 16)) == allowed([])

    @pytest.mark.parametrize(
        ("spend_at", "last_second", "next_month"),
        [
            ((2025, 1, 15), (2025, 1, 31, 23, 59, 59), (2025, 2, 1)),
            ((2024, 12, 3), (2024, 12, 31, 23, 59, 59), (2025, 1, 1)),
            ((2024, 2, 1), (2024, 2, 29, 23, 59, 59), (2024, 3, 1)),  # leap year
            ((2023, 2, 10), (2023, 2, 28, 23, 59, 59), (2023, 3, 1)),
            ((2100, 2, 10), (2100, 2, 28, 23, 59, 59), (2100, 3, 1)),  # not a leap year
        ],
    )
    def test_monthly_budget_and_utc_month_start(self, store, spend_at, last_second, next_month):
        lim = Limits(daily_usd=5.0, monthly_usd=2.0)
        start = utc(*spend_at)
        store.charge("m", lim, 0, 1.5, start)
        store.charge("m", lim, 0, 0.5, start + 86400)  # spent on another day of the same month
        end = utc(*next_month)
        assert store.admit("m", lim, start + 86400) == refused(
            "monthly_usd", math.ceil(end - start - 86400), []
        )
        assert store.admit("m", lim, utc(*last_second)) == refused("monthly_usd", 1, [])
        assert store.admit("m", lim, end) == allowed([])

    def test_a_spent_budget_outranks_a_shorter_limit(self, store):
        lim = Limits(rpm=1, daily_usd=1.0, monthly_usd=1.0)
        assert store.admit("x", lim, NOW).allowed
        store.charge("x", lim, 5, 1.0, NOW)
        # rpm (60 s), daily (12 h) and monthly (16.5 days) all refuse: the longest wait is the one to say.
        assert store.admit("x", lim, NOW) == refused(
            "monthly_usd", 16 * 86400 + 12 * 3600, trio("requests", 1, 0, "1m0s")
        )
        assert store.admit("x", Limits(rpm=1, daily_usd=1.0), NOW) == refused(
            "daily_usd", 12 * 3600, trio("requests", 1, 0, "1m0s")
        )

    def test_a_zero_budget_admits_nothing(self, store):
        assert store.admit("z", Limits(daily_usd=0), NOW) == refused("daily_usd", 12 * 3600, [])

    def test_bad_costs_count_nothing_and_never_raise(self, store):
        lim = Limits(daily_usd=1.0)
        for cost in (float("nan"), float("inf"), -3.0, "0.5", True, None):
            store.charge("k", lim, 0, cost, NOW)  # type: ignore[arg-type]
        for tokens in (None, "7", -1, 1.5):
            store.charge("k", Limits(tpm=1), tokens, None, NOW)  # type: ignore[arg-type]
        assert store.admit("k", lim, NOW).allowed
        assert store.admit("k", Limits(tpm=1), NOW) == allowed(trio("tokens", 1, 1, "0s"))

    def test_clients_are_counted_apart(self, store):
        lim = Limits(rpm=1, daily_usd=1.0)
        assert store.admit("one", lim, NOW).allowed
        store.charge("one", lim, 0, 1.0, NOW)
        assert not store.admit("one", lim, NOW).allowed
        assert store.admit("two", lim, NOW).allowed
        assert store.admit("tw\u00f6 with spaces/and:colons", lim, NOW).allowed
        assert not store.admit("tw\u00f6 with spaces/and:colons", lim, NOW).allowed

    def test_no_limits_touch_nothing(self, store):
        none = Limits()
        assert not none.any()
        assert store.admit("free", none, NOW) == allowed([])
        store.charge("free", none, 10**9, 10**6, NOW)
        # Nothing was recorded: the same client with a budget starts from zero.
        assert store.admit("free", Limits(daily_usd=1.0), NOW).allowed

    def test_a_restart_keeps_todays_spend_and_the_window(self, open_store, store):
        lim = Limits(rpm=2, tpm=100, daily_usd=1.0)
        assert store.admit("r", lim, NOW).allowed
        store.charge("r", lim, 50, 1.0, NOW)
        store.close()
        again = open_store()
        assert again.admit("r", lim, NOW + 1) == refused(
            "daily_usd", 12 * 3600 - 1, trio("requests", 2, 1, "29s") + trio("tokens", 100, 51, "29s")
        )
        assert again.admit("r", lim, utc(2025, 1, 16)).allowed

    def test_a_clock_that_goes_back_refills_nothing(self, store):
        lim = Limits(rpm=1)
        assert store.admit("c", lim, NOW).allowed
        assert store.admit("c", lim, NOW - 3600) == refused("requests", 60, trio("requests", 1, 0, "1m0s"))
        assert store.admit("c", lim, NOW - 3600 + 60).allowed

    def test_real_clock_when_now_is_not_given(self, store):
        lim = Limits(rpm=1, daily_usd=1.0)
        assert store.admit("clock", lim).allowed
        store.charge("clock", lim, 3, 0.5)
        got = store.admit("clock", lim)
        assert (got.allowed, got.limit) == (False, "requests")
        assert 1 <= got.retry_after_s <= 60

    def test_status_says_it_is_reachable(self, store):
        status = store.status()
        assert status["reachable"] is True and status["lastError"] is None

    # -- budget reservations (openai_proxy/limits/reservations.py) -----------------------------------
    def test_calls_in_flight_hold_the_budget_until_they_settle(self, store):
        lim = Limits(daily_usd=1.0)
        got = [store.admit("b", lim, NOW, reserve=Reservation(f"r{i}", 0.25)).allowed for i in range(5)]
        # Admitted while spent + reserved < budget: 0, 0.25, 0.5 and 0.75 are; 1.0 is not.
        assert got == [True, True, True, True, False]
        assert store.reserved("b", NOW) == 1.0
        # A budget only calls in flight hold frees up as they settle: retry soon, not tomorrow.
        assert store.admit("b", lim, NOW, reserve=Reservation("r9", 0.25)) == refused("daily_usd", 1, [])
        # r0 settles for less than it reserved: 0.1 spent + 0.75 reserved < 1.0.
        store.charge("b", lim, 10, 0.1, NOW, release="r0")
        assert store.reserved("b", NOW) == 0.75
        assert store.admit("b", lim, NOW, reserve=Reservation("r10", 0.25)).allowed
        assert not store.admit("b", lim, NOW, reserve=Reservation("r11", 0.25)).allowed
        for rid in ("r1", "r2", "r3", "r10"):
            store.charge("b", lim, 10, 0.2, NOW, release=rid)
        # Nothing held any more, 0.9 spent: one more call, then the day is spent.
        assert store.reserved("b", NOW) == 0.0
        assert not store.holds("r1")
        assert store.admit("b", lim, NOW, reserve=Reservation("r12", 0.25)).allowed
        store.charge("b", lim, 10, 0.2, NOW, release="r12")
        assert store.admit("b", lim, NOW, reserve=Reservation("r13", 0.25)) == refused(
            "daily_usd", 12 * 3600, []
        )
        assert store.reserved("b", NOW) == 0.0  # a refused call holds nothing

    def test_a_call_without_a_reservation_still_sees_the_others(self, store):
        lim = Limits(monthly_usd=1.0)
        assert store.admit("m", lim, NOW, reserve=Reservation("big", 1.5)).allowed  # its own size: no matter
        assert store.admit("m", lim, NOW) == refused("monthly_usd", 1, [])  # names no model, reserves 0
        store.release("big", NOW)
        assert store.admit("m", lim, NOW).allowed
        assert store.reserved("m", NOW) == 0.0

    def test_every_worker_sees_every_workers_reservations(self, open_store):
        one, two = open_store(), open_store()
        lim = Limits(daily_usd=1.0)
        assert one.admit("w", lim, NOW, reserve=Reservation("a", 0.625)).allowed
        assert two.admit("w", lim, NOW, reserve=Reservation("b", 0.375)).allowed
        assert one.reserved("w", NOW) == two.reserved("w", NOW) == 1.0
        assert not two.admit("w", lim, NOW, reserve=Reservation("c", 0.25)).allowed
        assert not one.admit("w", lim, NOW, reserve=Reservation("c", 0.25)).allowed
        # Only the worker that holds a reservation gives it back; the other's release is a no-op.
        two.release("a", NOW)
        assert two.reserved("w", NOW) == 1.0
        one.charge("w", lim, 0, 0.125, NOW, release="a")
        assert two.reserved("w", NOW) == 0.375
        assert two.admit("w", lim, NOW, reserve=Reservation("c", 0.25)).allowed

    def test_a_dead_workers_reservations_lapse_with_their_lease(self, open_store):
        dead, alive = open_store(), open_store()
        lim = Limits(daily_usd=1.0)
        assert dead.admit("d", lim, NOW, reserve=Reservation("a", 0.9)).allowed
        assert alive.admit("d", lim, NOW, reserve=Reservation("b", 0.2)).allowed
        # `dead` never renews nor settles (its process is gone): its entry counts for one lease.
        assert alive.reserved("d", NOW + LEASE_S - 1) == pytest.approx(1.1)
        assert not alive.admit("d", lim, NOW + LEASE_S - 1, reserve=Reservation("c", 0.1)).allowed
        # Past the lease only the live worker's own reservation is left (it wrote its entry again
        # when its refused call gave its reservation back).
        assert alive.reserved("d", NOW + LEASE_S + 1) == pytest.approx(0.2)
        assert alive.admit("d", lim, NOW + LEASE_S + 1, reserve=Reservation("c", 0.1)).allowed
        assert alive.reserved("d", NOW + LEASE_S + 1) == pytest.approx(0.3)

    def test_a_closed_store_gives_its_reservations_back(self, open_store):
        one, two = open_store(), open_store()
        lim = Limits(daily_usd=1.0)
        assert one.admit("c", lim, reserve=Reservation("a", 0.7)).allowed
        assert two.reserved("c") == 0.7
        one.close()
        assert two.reserved("c") == 0.0

    def test_a_reservation_is_given_back_whatever_the_clients_limits_are_now(self, store):
        assert store.admit("r", Limits(daily_usd=1.0), NOW, reserve=Reservation("a", 0.5)).allowed
        store.charge("r", Limits(), 10, 0.3, NOW, release="a")  # the client lost its budget in a reload
        assert store.reserved("r", NOW) == 0.0 and not store.holds("a")
        # Nothing was spent against a budget it no longer has.
        assert store.admit("r", Limits(daily_usd=0.2), NOW).allowed

    def test_a_bare_release_touches_no_other_client(self, store):
        assert store.admit("x", Limits(daily_usd=1.0), NOW, reserve=Reservation("a", 0.5)).allowed
        store.release("a", NOW)
        store.release("never-held", NOW)
        assert store.reserved("x", NOW) == 0.0 and not store.holds("a")

    def test_clients_without_a_budget_reserve_nothing(self, store):
        assert store.admit("n", Limits(rpm=5), NOW, reserve=Reservation("a", 5.0)).allowed
        assert not store.holds("a")
        assert store.reserved("n", NOW) == 0.0
