"""A state file locked by another connection, and a probe of how long the event loop stalls.

The lock is what `modelyard events`, a backup or a second gateway on the same state dir can
hold: `BEGIN EXCLUSIVE` on a connection of its own, so every write of the gateway meets
SQLITE_BUSY and SQLite's busy timeout (5 s). Stalls are measured, not request latencies: a probe
task asks to wake every few milliseconds and records its worst lateness. On a noisy machine that
is a fraction of a second; a write waiting out the busy timeout on the loop makes it 5 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from modelyard.state.database import BUSY_TIMEOUT_MS

BUSY_TIMEOUT_S = BUSY_TIMEOUT_MS / 1000
# Worst loop stall accepted while the file is locked: half the busy timeout, so a single write
# on the loop fails the test, while a loaded CI machine's scheduling hiccups do not.
STALL_LIMIT_S = BUSY_TIMEOUT_S / 2


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[sqlite3.Connection]:
    """Hold the write lock on `path` until the block ends (no other connection may write)."""
    holder = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        yield holder
        if holder.in_transaction:  # the test may have released it early
            holder.execute("ROLLBACK")
    finally:
        holder.close()


class LoopStalls:
    """The worst lateness of a task that asks to wake every `tick` seconds."""

    def __init__(self, tick: float = 0.01) -> None:
        self.tick = tick
        self.worst = 0.0

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[LoopStalls]:
        task = asyncio.create_task(self._probe())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _probe(self) -> None:
        while True:
            asked = time.monotonic()
            await asyncio.sleep(self.tick)
            self.worst = max(self.worst, time.monotonic() - asked - self.tick)
