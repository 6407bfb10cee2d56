"""Counters kept in memory on the request path and written to SQLite in batches.

A write per request would cost more than the request itself, so stores that count per request
(key usage, token ledgers) mark what changed and write it in one transaction every few seconds,
and once more at close. What changed is taken on the event loop (where the counts change), and
written in a worker thread: SQLite may wait seconds for a lock another process holds, and that
wait must never stall the gateway. The rows written are totals, not increments, so a write that
failed is repaired by marking its rows changed again (`Changes.restore`); nothing is lost while
the gateway lives. One flush at a time: an older snapshot must never land after a newer one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from modelyard.state.database import StateDatabase, in_use

log = logging.getLogger("modelyard.state")

FLUSH_INTERVAL_S = 5.0
# How long the last flush at close keeps trying a file another process holds locked.
CLOSE_GRACE_S = 10.0
RETRY_AT_CLOSE_S = 0.2


@dataclass(frozen=True)
class Changes:
    """What changed since the last flush: the transaction that saves it, and how to mark it
    changed again if that transaction fails."""

    write: Callable[[Any], None]  # given the connection, inside one transaction
    restore: Callable[[], None]  # on the event loop


class PeriodicallyFlushed:
    """Base for a store that flushes its changes every `interval` seconds and at close."""

    _database: StateDatabase | None
    _flusher: asyncio.Task[None] | None = None
    _stopping: asyncio.Event | None = None
    _flushing: asyncio.Lock | None = None
    what = "counters"  # for the log

    def take_changes(self) -> Changes | None:
        """What changed since the last flush, now marked clean (None when nothing did)."""
        raise NotImplementedError

    async def flush(self) -> bool:
        """Write what changed (never raises): True when saved, False when kept for a retry."""
        if self._flushing is None:
            self._flushing = asyncio.Lock()
        async with self._flushing:
            if self._database is None:
                return True
            changes = self.take_changes()
            if changes is None:
                return True
            try:
                await asyncio.to_thread(self._database.write, changes.write)
                return True
            except asyncio.CancelledError:
                # The write may yet fail in its thread. Rows are totals: marking them changed
                # again is harmless even if it commits.
                changes.restore()
                raise
            except Exception as error:
                changes.restore()  # try again at the next flush
                if in_use(error):
                    log.warning("could not save %s yet (%s); will try again", self.what, error)
                else:
                    log.exception("could not save %s", self.what)
                return False

    def start(self, interval: float = FLUSH_INTERVAL_S) -> None:
        self._stopping = asyncio.Event()
        self._flusher = asyncio.create_task(self._flush_forever(interval, self._stopping))

    async def _flush_forever(self, interval: float, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), interval)
            await self.flush()

    async def close(self, grace: float = CLOSE_GRACE_S) -> None:
        """Stop the periodic flush after its write, then write the rest (trying a locked file
        for up to `grace` seconds) and close the file."""
        if self._flusher is not None and self._stopping is not None:
            self._stopping.set()
            await self._flusher
        give_up_at = time.monotonic() + grace
        while not await self.flush():
            if time.monotonic() >= give_up_at:
                log.error("could not save %s before closing; the last changes are lost", self.what)
                break
            await asyncio.sleep(RETRY_AT_CLOSE_S)
        if self._database is not None:
            await asyncio.to_thread(self._database.close)
