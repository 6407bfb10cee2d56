"""Requests per API key, kept across restarts (the key's name, never the key)."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from modelyard.state import StateDatabase
from modelyard.state.flushing import Changes, PeriodicallyFlushed

log = logging.getLogger("modelyard.auth")

MIGRATIONS = [
    """
    CREATE TABLE key_usage (
        name TEXT PRIMARY KEY,
        requests INTEGER NOT NULL DEFAULT 0,
        rate_limited INTEGER NOT NULL DEFAULT 0,
        forbidden INTEGER NOT NULL DEFAULT 0,
        last_used REAL
    )
    """,
]


@dataclass
class KeyUsage:
    requests: int = 0  # accepted by auth and the rate limit
    rate_limited: int = 0  # refused with 429
    forbidden: int = 0  # answered 403 (a model or admin route the key may not use)
    last_used: float | None = None  # wall-clock time

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class UsageCounters(PeriodicallyFlushed):
    """Counts in memory on the request path; written to SQLite every few seconds and at close,
    one transaction per flush (a write per request would cost more than the request)."""

    what = "key usage counters"

    def __init__(self, database: StateDatabase | None) -> None:
        self._database = database
        self._usage: dict[str, KeyUsage] = {}
        self._dirty: set[str] = set()
        if database is not None:
            for row in database.query("SELECT * FROM key_usage"):
                self._usage[row["name"]] = KeyUsage(
                    row["requests"], row["rate_limited"], row["forbidden"], row["last_used"]
                )

    def _entry(self, name: str) -> KeyUsage:
        self._dirty.add(name)
        return self._usage.setdefault(name, KeyUsage())

    def count_request(self, name: str) -> None:
        entry = self._entry(name)
        entry.requests += 1
        entry.last_used = time.time()

    def count_rate_limited(self, name: str) -> None:
        self._entry(name).rate_limited += 1

    def count_forbidden(self, name: str) -> None:
        self._entry(name).forbidden += 1

    def get(self, name: str) -> KeyUsage:
        return self._usage.get(name, KeyUsage())

    def take_changes(self) -> Changes | None:
        if not self._dirty:
            return None
        names, self._dirty = self._dirty, set()
        rows = [(name, *_row(self._usage[name])) for name in sorted(names)]

        def write(connection: Any) -> None:
            connection.executemany(
                "INSERT INTO key_usage (name, requests, rate_limited, forbidden, last_used) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                "requests = excluded.requests, rate_limited = excluded.rate_limited, "
                "forbidden = excluded.forbidden, last_used = excluded.last_used",
                rows,
            )

        def restore() -> None:
            self._dirty |= names

        return Changes(write, restore)


def _row(usage: KeyUsage) -> tuple[int, int, int, float | None]:
    return usage.requests, usage.rate_limited, usage.forbidden, usage.last_used
