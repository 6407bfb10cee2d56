"""Token budgets and tokens per minute as pure logic, on a virtual clock."""

from __future__ import annotations

import calendar
from pathlib import Path

from modelyard.auth.budgets import MIGRATIONS, TokenLedger, period_of
from modelyard.auth.keys import ApiKey
from modelyard.state import StateDirectory

# 2026-01-31 23:59:30 UTC: thirty seconds before a day and a month end.
NEAR_MIDNIGHT = float(calendar.timegm((2026, 1, 31, 23, 59, 30)))


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def key(**limits: object) -> ApiKey:
    return ApiKey("k", b"\0" * 32, ("*",), None, False, **limits)  # type: ignore[arg-type]


def test_periods_follow_utc_days_and_months():
    assert period_of("day", NEAR_MIDNIGHT) == ("day:2026-01-31", NEAR_MIDNIGHT + 30)
    assert period_of("month", NEAR_MIDNIGHT) == ("month:2026-01", NEAR_MIDNIGHT + 30)
    december = float(calendar.timegm((2026, 12, 15, 12, 0, 0)))
    assert period_of("month", december)[1] == calendar.timegm((2027, 1, 1, 0, 0, 0))
    assert period_of("total", december) == ("total", None)


def test_daily_budget_refuses_until_the_day_ends_then_allows_again():
    clock = Clock(NEAR_MIDNIGHT)
    ledger = TokenLedger(None, wall_clock=clock)
    daily = key(token_budget=100, budget_period="day")
    ledger.record("k", "chat", 60, 39)
    assert ledger.refusal(daily) is None  # 99 of 100: one more request may start
    ledger.record("k", "chat", 1, 0)
    refusal = ledger.refusal(daily)
    assert refusal is not None
    assert refusal.code == "budget_exceeded"
    assert refusal.retry_after == 30.0
    assert "100 of 100 tokens per day" in refusal.message
    clock.now += 31  # a new UTC day (and month)
    assert ledger.refusal(daily) is None
    # The monthly and total counts went on across the day boundary.
    assert ledger.spent("k", "total")[0] == 100
    assert ledger.spent("k", "month")[0] == 0  # February


def test_tokens_per_minute_is_a_sliding_window():
    clock = Clock(1000.0)
    ledger = TokenLedger(None, wall_clock=clock)
    limited = key(tpm=50)
    ledger.record("k", "chat", 20, 10)
    clock.now += 30
    ledger.record("k", "chat", 10, 10)
    refusal = ledger.refusal(limited)
    assert refusal is not None
    assert refusal.code == "rate_limit_exceeded"
    assert refusal.retry_after == 30.0  # when the first request's tokens leave the window
    assert refusal.headers["x-ratelimit-limit-tokens"] == "50"
    clock.now += 30.001
    assert ledger.refusal(limited) is None
    # Requests that reported no usage count as requests, not tokens.
    ledger.record("k", "chat", 0, 0)
    assert ledger.usage("k")["chat"] == {
        "requests": 3,
        "prompt_tokens": 30,
        "completion_tokens": 20,
    }


async def test_usage_periods_and_the_last_minute_survive_a_restart(tmp_path: Path):
    clock = Clock(NEAR_MIDNIGHT)
    state = StateDirectory(tmp_path)
    ledger = TokenLedger(state.database("key_tokens", MIGRATIONS), wall_clock=clock)
    ledger.record("k", "chat", 5, 5)
    ledger.record("k", "coder", 7, 3)
    await ledger.close()
    again = TokenLedger(state.database("key_tokens", MIGRATIONS), wall_clock=clock)
    assert again.usage("k") == ledger.usage("k")
    assert again.spent("k", "day")[0] == 20
    assert again.refusal(key(tpm=20)) is not None  # the minute's tokens were kept
    clock.now += 61
    assert again.refusal(key(tpm=20)) is None
    await again.close()


def test_the_window_holds_at_most_a_minute_of_seconds_however_busy():
    clock = Clock(5000.0)
    ledger = TokenLedger(None, wall_clock=clock)
    for _ in range(120 * 50):  # 50 requests a second for two minutes
        ledger.record("k", "chat", 1, 1)
        clock.now += 0.02
    window = ledger._window["k"]
    assert len(window) <= 61
    # About 6,000 tokens in the last 60 s (one second's worth may already have left).
    assert ledger.refusal(key(tpm=5800)) is not None
    assert ledger.refusal(key(tpm=6001)) is None
