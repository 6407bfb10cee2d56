"""Tokens per API key: usage per key and model, tokens-per-minute limits, token budgets.

A request with a budget or `tpm` to respect *reserves* tokens at admission (its prompt's
estimate and its `max_tokens`, see `api.request_options`) and *settles* them at its finish to
what it was served (`api.accounting`). Admission refuses when what is spent plus what requests
in flight hold plus this reservation would pass the limit; a key with nothing in flight may
always send one request while any budget is left. So 50 concurrent requests cannot overshoot
by more than one reservation (issue 23: before, all 50 were admitted at 144x the budget).

Totals live in memory on the request path and are written to `<state_dir>/key_tokens.sqlite3`
every `FLUSH_INTERVAL_S` seconds and at shutdown, one transaction per flush: a gateway killed
with SIGKILL loses at most the tokens settled in that window (reservations are not saved:
they end with the requests that held them).
"""

from __future__ import annotations

import calendar
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from modelyard.auth.keys import ApiKey
from modelyard.state import StateDatabase
from modelyard.state.flushing import Changes, PeriodicallyFlushed

log = logging.getLogger("modelyard.auth")

MIGRATIONS = [
    """
    CREATE TABLE key_model_usage (
        name TEXT NOT NULL,
        model TEXT NOT NULL,
        requests INTEGER NOT NULL DEFAULT 0,
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (name, model)
    );
    CREATE TABLE key_period_tokens (
        name TEXT NOT NULL,
        period TEXT NOT NULL,
        tokens INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (name, period)
    );
    CREATE TABLE key_recent_tokens (
        name TEXT NOT NULL,
        at REAL NOT NULL,
        tokens INTEGER NOT NULL
    )
    """,
]
WINDOW_S = 60.0


@dataclass
class ModelUsage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_json(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class Reservation:
    """Tokens held for one request in flight, given back at its settle (exactly once)."""

    name: str
    tokens: int
    held: bool = False  # counted in the ledger's reservations (a key with limits)
    open: bool = True


# Reserved tokens are held, not spent: a refusal because of them lasts as long as the
# requests that hold them, which is not known; one second is a polite retry.
RESERVED_RETRY_S = 1.0


@dataclass(frozen=True)
class Refusal:
    """Why a key may not send a request now: a 429 with this message."""

    message: str
    code: str
    retry_after: float | None
    headers: dict[str, str]


def period_of(kind: str, now: float) -> tuple[str, float | None]:
    """The budget period `now` falls in (`day:2026-11-30`, `month:2026-11`, `total`) and when it
    ends (Unix time; None for `total`). Periods follow UTC, like the usage reports of OpenAI."""
    moment = time.gmtime(now)
    if kind == "day":
        start = calendar.timegm((moment.tm_year, moment.tm_mon, moment.tm_mday, 0, 0, 0))
        return time.strftime("day:%Y-%m-%d", moment), float(start + 86400)
    if kind == "month":
        year, month = moment.tm_year + moment.tm_mon // 12, moment.tm_mon % 12 + 1
        return time.strftime("month:%Y-%m", moment), float(
            calendar.timegm((year, month, 1, 0, 0, 0))
        )
    return "total", None


class TokenLedger(PeriodicallyFlushed):
    """Usage per key and model, tokens per period, and the sliding tokens-per-minute window
    (at one-second resolution)."""

    what = "token usage"

    def __init__(
        self,
        database: StateDatabase | None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._database = database
        # Wall-clock time for the tokens-per-minute window too: it is saved, so a restart
        # does not hand a key a fresh minute.
        self._wall_clock = wall_clock
        self._clock = wall_clock
        self._window_dirty = False
        self._usage: dict[str, dict[str, ModelUsage]] = {}
        self._periods: dict[tuple[str, str], int] = {}
        self._window: dict[str, collections.deque[tuple[float, int]]] = {}
        self._window_sums: dict[str, int] = {}
        self._periods_second = -1
        self._periods_now: tuple[str, ...] = ()
        self._period_cache: dict[str, tuple[int, str, float | None]] = {}
        self._dirty_usage: set[tuple[str, str]] = set()
        self._dirty_periods: set[tuple[str, str]] = set()
        self._reserved: dict[str, int] = {}  # key name -> tokens held by requests in flight
        self._holders: dict[str, int] = {}  # key name -> requests in flight holding them
        if database is not None:
            for row in database.query("SELECT * FROM key_model_usage"):
                self._usage.setdefault(row["name"], {})[row["model"]] = ModelUsage(
                    row["requests"], row["prompt_tokens"], row["completion_tokens"]
                )
            for row in database.query("SELECT * FROM key_period_tokens"):
                self._periods[(row["name"], row["period"])] = row["tokens"]
            for row in database.query("SELECT * FROM key_recent_tokens ORDER BY at"):
                self._window.setdefault(row["name"], collections.deque()).append(
                    (row["at"], row["tokens"])
                )
                self._window_sums[row["name"]] = (
                    self._window_sums.get(row["name"], 0) + row["tokens"]
                )

    # ----- the request path -----

    def record(self, name: str, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        """One answered request of key `name` to `model`, with the tokens the engine reported."""
        usage = self._usage.setdefault(name, {}).setdefault(model, ModelUsage())
        usage.requests += 1
        usage.prompt_tokens += prompt_tokens
        usage.completion_tokens += completion_tokens
        self._dirty_usage.add((name, model))
        tokens = prompt_tokens + completion_tokens
        if tokens <= 0:
            return
        now = self._wall_clock()
        for period in self._current_periods(now):
            self._periods[(name, period)] = self._periods.get((name, period), 0) + tokens
            self._dirty_periods.add((name, period))
        window = self._window.setdefault(name, collections.deque())
        if window and int(window[-1][0]) == int(now):
            # One entry per second: the window holds at most 60 entries per key, however
            # busy (an entry leaves the window with its second's first request).
            window[-1] = (window[-1][0], window[-1][1] + tokens)
        else:
            window.append((now, tokens))
        self._window_sums[name] = self._window_sums.get(name, 0) + tokens
        self._last_minute(name)  # drops what left the window: memory stays one minute's worth
        self._window_dirty = True

    def _current_periods(self, now: float) -> tuple[str, ...]:
        # Formatting dates costs more than the rest of a record: once a second is enough.
        second = int(now)
        if second != self._periods_second:
            self._periods_second = second
            self._periods_now = tuple(period_of(kind, now)[0] for kind in ("day", "month", "total"))
        return self._periods_now

    def reserve(self, key: ApiKey, tokens: int) -> Reservation | Refusal:
        """Hold `tokens` for a request of `key` that is about to start, or say why not."""
        if key.token_budget is None and key.tpm is None:
            return Reservation(key.name, 0)  # nothing to respect: nothing held
        refusal = self.refusal(key, tokens)
        if refusal is not None:
            return refusal
        self._reserved[key.name] = self._reserved.get(key.name, 0) + tokens
        self._holders[key.name] = self._holders.get(key.name, 0) + 1
        return Reservation(key.name, tokens, held=True)

    def settle(
        self, reservation: Reservation, model: str, prompt_tokens: int, completion_tokens: int
    ) -> None:
        """The request is over (or its usage is known): what it holds is given back and what
        it was served is recorded. Only the first call counts."""
        if not reservation.open:
            return
        reservation.open = False
        self.release(reservation)
        self.record(reservation.name, model, prompt_tokens, completion_tokens)

    def release(self, reservation: Reservation) -> None:
        if not reservation.held:
            return
        reservation.held = False
        name = reservation.name
        left = self._holders.get(name, 0) - 1
        if left <= 0:
            self._holders.pop(name, None)
            self._reserved.pop(name, None)
        else:
            self._holders[name] = left
            self._reserved[name] = max(self._reserved.get(name, 0) - reservation.tokens, 0)
        reservation.tokens = 0

    def reserved(self, name: str) -> int:
        """Tokens held now by `name`'s requests in flight."""
        return self._reserved.get(name, 0)

    def refusal(self, key: ApiKey, tokens: int = 0) -> Refusal | None:
        """Why `key` may not send a request now (budget spent, tokens per minute, or not
        room for `tokens` more beside what its requests in flight hold), or None."""
        # Alone, a request may start while anything is left; beside others, only if all
        # their reservations and its own fit.
        held = self._reserved.get(key.name, 0)
        pending = held + tokens if self._holders.get(key.name) else 0
        if key.token_budget is not None:
            spent, ends = self.spent(key.name, key.budget_period)
            if spent < key.token_budget and spent + pending > key.token_budget:
                return self._held_refusal(key, "token budget", key.token_budget, spent, held)
            if spent >= key.token_budget:
                when = (
                    " until the budget period ends (UTC)"
                    if ends is not None
                    else "; ask an admin to raise it (`modelyard keys change`)"
                )
                period = "in total" if key.budget_period == "total" else f"per {key.budget_period}"
                return Refusal(
                    f"token budget of API key {key.name!r} is spent: {spent} of "
                    f"{key.token_budget} tokens {period}; requests are refused{when}",
                    "budget_exceeded",
                    None if ends is None else max(ends - self._wall_clock(), 1.0),
                    {
                        "x-budget-limit-tokens": str(key.token_budget),
                        "x-budget-spent-tokens": str(spent),
                    },
                )
        if key.tpm is not None:
            used, wait = self._last_minute(key.name)
            if used < key.tpm and used + pending > key.tpm:
                return self._held_refusal(key, "tokens per minute", key.tpm, used, held)
            if used >= key.tpm:
                return Refusal(
                    f"rate limit reached for API key {key.name!r}: {key.tpm} tokens per minute "
                    f"({used} used in the last 60s); retry in {wait:.0f}s",
                    "rate_limit_exceeded",
                    wait,
                    {
                        "x-ratelimit-limit-tokens": str(key.tpm),
                        "x-ratelimit-remaining-tokens": "0",
                        "x-ratelimit-reset-tokens": f"{wait:.3f}s",
                    },
                )
        return None

    def _held_refusal(self, key: ApiKey, limit: str, of: int, used: int, held: int) -> Refusal:
        code = "budget_exceeded" if limit == "token budget" else "rate_limit_exceeded"
        return Refusal(
            f"{limit} of API key {key.name!r}: {used} of {of} tokens used and {held} reserved "
            "by its requests in flight; this request's reservation (its prompt and "
            "max_tokens) does not fit beside them; retry when they finish",
            code,
            RESERVED_RETRY_S,
            {"x-budget-reserved-tokens": str(held)},
        )

    def _last_minute(self, name: str) -> tuple[int, float]:
        """Tokens in the last 60 s, and seconds until enough of them leave the window."""
        window = self._window.get(name)
        if not window:
            return 0, 0.0
        now = self._clock()
        used = self._window_sums.get(name, 0)
        while window and window[0][0] <= now - WINDOW_S:
            used -= window.popleft()[1]
        self._window_sums[name] = used  # a running sum: no pass over the window per request
        wait = max(window[0][0] + WINDOW_S - now, 0.001) if window else 0.0
        return used, wait

    # ----- reports -----

    def spent(self, name: str, kind: str) -> tuple[int, float | None]:
        """Tokens `name` spent in the current `kind` period, and when the period ends."""
        now = self._wall_clock()
        second = int(now)
        known = self._period_cache.get(kind)
        if known is None or known[0] != second:  # dates change by the second at most
            known = (second, *period_of(kind, now))
            self._period_cache[kind] = known
        return self._periods.get((name, known[1]), 0), known[2]

    def usage(self, name: str) -> dict[str, dict[str, int]]:
        """Requests and tokens per model for key `name`."""
        return {model: usage.to_json() for model, usage in self._usage.get(name, {}).items()}

    def all_usage(self) -> dict[str, dict[str, ModelUsage]]:
        return self._usage

    def budget_report(self, key: ApiKey) -> dict[str, Any] | None:
        if key.token_budget is None:
            return None
        spent, ends = self.spent(key.name, key.budget_period)
        return {
            "tokens": key.token_budget,
            "period": key.budget_period,
            "spent": spent,
            "remaining": max(key.token_budget - spent, 0),
            "resets_at": ends,
        }

    # ----- persistence -----

    def take_changes(self) -> Changes | None:
        if not (self._dirty_usage or self._dirty_periods or self._window_dirty):
            return None
        self._window_dirty = False
        cutoff = self._clock() - WINDOW_S
        recent_rows = [  # at most 60 per key (one entry per second)
            (name, at, tokens)
            for name, window in self._window.items()
            for at, tokens in window
            if at > cutoff
        ]
        usage_keys, self._dirty_usage = self._dirty_usage, set()
        period_keys, self._dirty_periods = self._dirty_periods, set()
        usage_rows = [
            (name, model, *_usage_row(self._usage[name][model])) for name, model in usage_keys
        ]
        period_rows = [
            (name, period, self._periods[(name, period)]) for name, period in period_keys
        ]

        def write(connection: Any) -> None:
            connection.executemany(
                "INSERT INTO key_model_usage (name, model, requests, prompt_tokens, "
                "completion_tokens) VALUES (?, ?, ?, ?, ?) ON CONFLICT(name, model) DO UPDATE "
                "SET requests = excluded.requests, prompt_tokens = excluded.prompt_tokens, "
                "completion_tokens = excluded.completion_tokens",
                usage_rows,
            )
            connection.executemany(
                "INSERT INTO key_period_tokens (name, period, tokens) VALUES (?, ?, ?) "
                "ON CONFLICT(name, period) DO UPDATE SET tokens = excluded.tokens",
                period_rows,
            )
            connection.execute("DELETE FROM key_recent_tokens")
            connection.executemany(
                "INSERT INTO key_recent_tokens (name, at, tokens) VALUES (?, ?, ?)", recent_rows
            )

        def restore() -> None:
            self._dirty_usage |= usage_keys
            self._dirty_periods |= period_keys
            self._window_dirty = True

        return Changes(write, restore)


def _usage_row(usage: ModelUsage) -> tuple[int, int, int]:
    return usage.requests, usage.prompt_tokens, usage.completion_tokens
