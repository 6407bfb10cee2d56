"""State writes never wait on the event loop, and none is lost: a file locked by another
connection delays them, shutdown writes what is queued, and order is kept."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

from modelyard.auth.usage import MIGRATIONS as USAGE_MIGRATIONS
from modelyard.auth.usage import UsageCounters
from modelyard.observability.event_store import open_event_store
from modelyard.observability.events import EventBus
from modelyard.state import StateDatabase
from modelyard.state.writer import QueuedWriter
from tests.reliability.locked_state import BUSY_TIMEOUT_S, STALL_LIMIT_S, LoopStalls, exclusive_lock

SCHEMA = ["CREATE TABLE items (n INTEGER NOT NULL)"]


def stored_ids(path: Path) -> list[int]:
    with sqlite3.connect(path) as connection:
        return [row[0] for row in connection.execute("SELECT id FROM events ORDER BY rowid")]


async def test_events_wait_out_a_lock_off_the_loop_and_none_is_lost(tmp_path: Path) -> None:
    store = open_event_store(tmp_path)
    assert store is not None
    bus = EventBus(archive=store)
    emitted: list[int] = []
    async with LoopStalls().watching() as stalls:
        with exclusive_lock(tmp_path / "events.sqlite3"):
            # Longer than one busy timeout: the writer meets SQLITE_BUSY and tries again.
            deadline = time.monotonic() + BUSY_TIMEOUT_S + 1
            while time.monotonic() < deadline:
                emitted.append(bus.emit("start", "chat", f"request {len(emitted)}").id)
                await asyncio.sleep(0.05)
            # Not yet on disk, yet every read sees them, in order.
            assert [e.id for e in await bus.recent_off_loop(len(emitted))] == emitted
            assert [e.id for e in await bus.after_off_loop(0, 10_000)] == emitted
            assert bus.last_id() == emitted[-1]
    assert stalls.worst < STALL_LIMIT_S
    assert await asyncio.to_thread(store.flush, 30)
    assert stored_ids(tmp_path / "events.sqlite3") == emitted
    assert store.dropped == 0
    store.close()


def test_close_writes_every_queued_event_once_the_lock_is_released(tmp_path: Path) -> None:
    store = open_event_store(tmp_path)
    assert store is not None
    bus = EventBus(archive=store)
    path = tmp_path / "events.sqlite3"
    with exclusive_lock(path) as holder:
        emitted = [bus.emit("stop", f"m{n}").id for n in range(300)]
        # The lock goes away while close() waits for the queue to drain.
        threading.Timer(1.0, holder.execute, ("ROLLBACK",)).start()
        store.close()
    assert stored_ids(path) == emitted
    again = open_event_store(tmp_path)
    assert again is not None
    assert [e.model for e in again.recent(3)] == ["m297", "m298", "m299"]
    again.close()


def test_close_gives_up_on_a_file_locked_past_its_grace(tmp_path: Path) -> None:
    database = StateDatabase(tmp_path / "s.sqlite3", SCHEMA)
    writer = QueuedWriter(database)
    with exclusive_lock(tmp_path / "s.sqlite3"):
        for n in range(1000):
            writer.submit(lambda c, n=n: c.execute("INSERT INTO items VALUES (?)", (n,)))
        started = time.monotonic()
        writer.close(grace=0.5)
        # The batch in flight waits out one busy timeout; the rest is given up at once, not
        # one busy timeout per batch.
        assert time.monotonic() - started < 3 * BUSY_TIMEOUT_S
    assert writer.dropped == 1000
    database.close()


def test_a_full_queue_drops_and_counts_new_writes_never_blocks(tmp_path: Path) -> None:
    database = StateDatabase(tmp_path / "s.sqlite3", SCHEMA)
    writer = QueuedWriter(database, capacity=3, batch=1)
    with exclusive_lock(tmp_path / "s.sqlite3") as holder:
        accepted = [
            writer.submit(lambda c, n=n: c.execute("INSERT INTO items VALUES (?)", (n,)))
            for n in range(10)
        ]
        # One batch may be taken off the queue already; at most 4 are accepted.
        assert accepted[:3] == [True] * 3
        assert accepted.count(True) <= 4
        assert writer.dropped == accepted.count(False)
        holder.execute("ROLLBACK")
        assert writer.flush(30)
    written = [row["n"] for row in database.query("SELECT n FROM items ORDER BY rowid")]
    assert written == [n for n, ok in enumerate(accepted) if ok]
    writer.close()
    database.close()


async def test_counters_flush_off_the_loop_and_are_kept_until_written(tmp_path: Path) -> None:
    path = tmp_path / "key_usage.sqlite3"
    usage = UsageCounters(StateDatabase(path, USAGE_MIGRATIONS))
    usage.count_request("alice")
    async with LoopStalls().watching() as stalls:
        with exclusive_lock(path):
            assert not await usage.flush()  # busy: kept for the next flush
            usage.count_request("alice")
    assert stalls.worst < STALL_LIMIT_S
    await usage.close()
    reopened = UsageCounters(StateDatabase(path, USAGE_MIGRATIONS))
    assert reopened.get("alice").requests == 2
    await reopened.close()
