"""Counters kept in memory on the request path and written to SQLite in batches.

A write per request would cost more than the request itself, so stores that count per request
(key usage, token ledgers) mark what changed and write it in one transaction every few seconds,
and once more at close. A failed write is the store's to retry: `flush` must not raise, or the
periodic task would end and every later count would be lost silently.
"""

from __future__ import annotations

import asyncio
import contextlib

from modelyard.state.database import StateDatabase

FLUSH_INTERVAL_S = 5.0


class PeriodicallyFlushed:
    """Base for a store that `flush()`es its changes every `interval` seconds and at close."""

    _database: StateDatabase | None
    _flusher: asyncio.Task[None] | None = None

    def flush(self) -> None:
        """Write what changed since the last flush (never raises; keeps it for a retry)."""
        raise NotImplementedError

    def start(self, interval: float = FLUSH_INTERVAL_S) -> None:
        self._flusher = asyncio.create_task(self._flush_forever(interval))

    async def _flush_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.flush()

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        self.flush()
        if self._database is not None:
            self._database.close()
