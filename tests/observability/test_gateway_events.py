"""Events and engine logs over SSE from a real gateway: order, restarts, resuming, shutdown.

The order of lifecycle events runs in-process (tests/harness.py: the app served as
`modelyard serve` serves it; the engine's crash is its exit code reported, as a process's
would be). History across restarts, shutdown with open streams, an engine's own log lines and
a damaged history file on disk stay on real processes."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import fake_model, start_gateway
from tests.harness import Harness, engine_model, in_process_gateway
from tests.observability.sse_client import SseReader

HELLO = {"messages": [{"role": "user", "content": "hello"}]}
LIFECYCLE = {"start", "ready", "stop", "crash", "start_failed", "sleep", "wake"}


async def chat(session: aiohttp.ClientSession, url: str, **extra: Any) -> int:
    body = {"model": "chat", **HELLO, **extra}
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        await response.read()
        return response.status


def lifecycle(events: list[dict[str, Any]]) -> list[str]:
    return [e["kind"] for e in events if e["model"] == "chat" and e["kind"] in LIFECYCLE]


async def test_start_idle_stop_and_crash_arrive_in_order(tmp_path: Path) -> None:
    models = {"chat": engine_model(served_name="chat", idle_timeout="1s")}
    async with in_process_gateway(tmp_path, models) as gateway:
        await _lifecycle_in_order(gateway)


async def _lifecycle_in_order(gateway: Harness) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(gateway.url + "/admin/events?recent=0") as stream,
    ):
        assert stream.headers["Content-Type"] == "text/event-stream"
        reader = SseReader(stream)
        assert await chat(session, gateway.url) == 200
        events = await reader.events_until(lambda seen: "ready" in lifecycle(seen))
        # Nothing is sent while the engine is busy past its idle timeout; then it stops.
        events += await reader.events_until(lambda seen: "stop" in lifecycle(seen))
        assert await chat(session, gateway.url) == 200
        # Its engine died under it before answering: 503 engine_lost, to be retried.
        assert await chat(session, gateway.url, fake_crash=3) == 503
        events += await reader.events_until(lambda seen: "crash" in lifecycle(seen))
    assert lifecycle(events) == ["start", "ready", "stop", "start", "ready", "crash"]
    ids = [e["id"] for e in events]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    by_kind = {e["kind"]: e for e in events if e["model"] == "chat"}
    assert by_kind["start"]["reason"] == "request"
    assert by_kind["ready"]["duration_s"] > 0
    assert by_kind["stop"]["reason"].startswith("idle for")
    assert by_kind["crash"]["data"]["exit_code"] == 3
    assert "exit code 3" in by_kind["crash"]["reason"]


async def test_history_survives_a_restart_and_streams_resume_by_id(tmp_path: Path):
    models = {"chat": fake_model("chat")}
    first = start_gateway(tmp_path, models, marker=f"events-{tmp_path.name}")
    try:
        async with aiohttp.ClientSession() as session:
            assert await chat(session, first.url) == 200
    finally:
        assert first.stop() == 0
    second = start_gateway(tmp_path, {"chat": fake_model("chat")}, marker=f"events-{tmp_path.name}")
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(second.url + "/admin/events?follow=0&recent=10") as response:
                past = await response.json()
            assert lifecycle(past["events"]) == ["start", "ready", "stop"]
            assert past["events"][-1]["reason"] == "gateway shutdown"
            ids = [e["id"] for e in past["events"]]
            assert past["last_id"] == ids[-1]
            # A client that saw the first event resumes after it, across the restart.
            headers = {"Last-Event-ID": str(ids[0])}
            async with session.get(second.url + "/admin/events", headers=headers) as stream:
                reader = SseReader(stream)
                replayed = await reader.events_until(lambda seen: len(seen) == len(ids) - 1)
                assert [e["id"] for e in replayed] == ids[1:]
                assert await chat(session, second.url) == 200
                live = await reader.events_until(lambda seen: "ready" in lifecycle(seen))
            assert lifecycle(live) == ["start", "ready"]
            assert min(e["id"] for e in live) > ids[-1]  # ids are never reused
            # `after` and `model` work as query parameters too.
            query = f"/admin/events?follow=0&after={ids[0]}&model=nobody"
            async with session.get(second.url + query) as response:
                assert (await response.json())["events"] == []
            async with session.get(second.url + "/admin/events?after=x") as response:
                assert response.status == 400
    finally:
        second.stop()


async def test_open_streams_do_not_hold_up_shutdown(gateway_factory):
    gateway = gateway_factory({"chat": fake_model("chat")}, limits={"shutdown_grace": "20s"})
    async with aiohttp.ClientSession() as session:
        assert await chat(session, gateway.url) == 200
        events = await session.get(gateway.url + "/admin/events")
        logs = await session.get(gateway.url + "/admin/logs/chat?follow=1")
        await SseReader(events).next(5)
        await SseReader(logs).next(5)
        started = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(gateway.process.wait, 20)
        assert time.monotonic() - started < 5
        events.close()
        logs.close()


async def test_following_a_log_shows_a_cold_start_from_its_first_line(gateway_factory):
    gateway = gateway_factory({"chat": fake_model("chat", "--ready-delay", "0.3")})
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + "/admin/logs/chat") as response:
            assert await response.json() == {"model": "chat", "state": "stopped", "lines": []}
        async with session.get(gateway.url + "/admin/logs/chat?follow=1") as stream:
            reader = SseReader(stream)
            load = asyncio.ensure_future(session.post(gateway.url + "/admin/models/chat/load"))
            lines = []
            while not any("Application startup complete" in line for line in lines):
                _, data = await reader.next(10)
                lines.append(data)
            assert lines[0].startswith('"[modelyard] starting: ')
            (await load).close()
        async with session.get(gateway.url + "/admin/logs/chat?lines=1") as response:
            body = await response.json()
        assert body["state"] == "ready"
        assert len(body["lines"]) == 1
        async with session.get(gateway.url + "/admin/logs/chat?lines=x") as response:
            assert response.status == 400


async def test_a_damaged_event_history_is_set_aside_and_reported(gateway_factory):
    from tests.reliability.running import restart

    gateway = gateway_factory({"chat": fake_model("chat")})
    gateway.stop()
    history = gateway.state_dir / "events.sqlite3"
    for companion in gateway.state_dir.glob("events.sqlite3-*"):
        companion.unlink()
    history.write_bytes(b"garbage" * 1000)
    again = restart(gateway)
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(again.url + "/admin/events?follow=0") as response,
        ):
            events = (await response.json())["events"]
        # The new history starts with the report of what happened to the old one.
        assert events[0]["kind"] == "state_file_corrupt"
        assert events[0]["id"] == 1
        assert Path(events[0]["data"]["moved_to"]).read_bytes() == b"garbage" * 1000
    finally:
        again.stop()
