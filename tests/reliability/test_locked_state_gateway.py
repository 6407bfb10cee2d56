"""A gateway whose event history is locked by another process keeps serving.

Every start, ready and request event is written to `events.sqlite3`. Another connection (a
`modelyard events` reader in a long transaction, a backup, a second gateway on the same state
dir) holds the file's write lock for longer than SQLite's busy timeout while the gateway
cold-starts an engine and answers requests: the event loop must never stall, and once the lock
is gone every event is on disk, in order.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import aiohttp

from tests.harness import engine_model, in_process_gateway
from tests.reliability.locked_state import BUSY_TIMEOUT_S, STALL_LIMIT_S, LoopStalls, exclusive_lock

HELLO = {"model": "chat", "messages": [{"role": "user", "content": "hello"}]}


async def test_a_locked_event_history_stalls_nothing_and_loses_nothing(tmp_path: Path) -> None:
    models = {"chat": engine_model(served_name="chat")}
    async with in_process_gateway(tmp_path, models) as harness, aiohttp.ClientSession() as session:
        gateway = harness.gateway
        assert gateway.event_store is not None
        path = gateway.event_store.database.path
        first = gateway.events.last_id() + 1
        health_answers = 0
        async with LoopStalls().watching() as stalls:
            with exclusive_lock(path):
                # A cold start (start, ready events) while the lock is held.
                async with session.post(harness.url + "/v1/chat/completions", json=HELLO) as r:
                    assert r.status == 200
                deadline = time.monotonic() + BUSY_TIMEOUT_S + 1
                while time.monotonic() < deadline:
                    gateway.events.emit("probe", "chat", f"n{health_answers}")
                    async with session.get(harness.url + "/health") as r:
                        assert r.status == 200
                    health_answers += 1
                    await asyncio.sleep(0.1)
                # The events API answers from the queue while the file is locked.
                async with session.get(harness.url + "/admin/events?follow=0&recent=5") as r:
                    assert r.status == 200
                    answered = (await r.json())["events"]
                assert answered[-1]["reason"] == f"n{health_answers - 1}"
        assert stalls.worst < STALL_LIMIT_S
        assert health_answers > 1
        expected = [e.id for e in gateway.events.after(first - 1, 100_000)]
        kinds = [e.kind for e in gateway.events.after(first - 1, 100_000)]
        assert {"start", "ready"} <= set(kinds)
        assert await asyncio.to_thread(gateway.event_store.flush, 60)
        with sqlite3.connect(path) as reader:
            rows = reader.execute(
                "SELECT id, kind, reason FROM events WHERE id >= ? ORDER BY rowid", (first,)
            ).fetchall()
        assert [row[0] for row in rows] == expected  # none lost, written in order
        probes = [reason for _, kind, reason in rows if kind == "probe"]
        assert probes == [f"n{n}" for n in range(health_answers)]
