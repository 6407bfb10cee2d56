"""Exclusive groups on a machine without managed GPUs (CPU engines, as in the demo),
in-process (tests/harness.py): the same scheduler path as GPUs, with an unlimited inventory."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.harness import Behaviour, Harness, engine_model, in_process_gateway

GROUP = {"cpu": {"members": ["a", "b"], "exclusive": True}}
SLOW_START = Behaviour(ready_after=0.2)


def states(h: Harness) -> dict[str, str]:
    return {name: h.gateway.scheduler.state_of(name).value for name in ("a", "b", "c")}


def running(h: Harness) -> list[str]:
    return sorted(e.name for e in h.runtime.engines if not e.exited.done())


async def test_starting_a_member_stops_the_running_one(tmp_path: Path) -> None:
    models = {name: engine_model() for name in ("a", "b", "c")}
    behaviours = {name: SLOW_START for name in models}
    async with in_process_gateway(tmp_path, models, behaviours, groups=GROUP) as h:
        assert (await h.chat("a"))[0] == 200
        assert (await h.chat("c"))[0] == 200  # not in the group
        assert states(h) == {"a": "ready", "b": "stopped", "c": "ready"}
        assert (await h.chat("b"))[0] == 200
        assert states(h) == {"a": "stopped", "b": "ready", "c": "ready"}
        stops = [e.reason for e in h.gateway.events.recent() if e.kind == "stop"]
        assert stops == ["exclusive group: 'b' is starting"]
        assert running(h) == ["b", "c"]


async def test_requests_in_flight_finish_before_their_engine_makes_room(tmp_path: Path) -> None:
    models = {name: engine_model() for name in ("a", "b")}
    behaviours = {name: SLOW_START for name in models}
    async with in_process_gateway(tmp_path, models, behaviours, groups=GROUP) as h:
        assert (await h.chat("a"))[0] == 200
        slow = asyncio.ensure_future(h.chat("a", fake_chunks=10, fake_chunk_delay=0.1))
        await asyncio.sleep(0.3)
        results = await asyncio.gather(slow, *(h.chat(name) for name in ("b", "a", "b", "a")))
        assert [status for status, _, _ in results] == [200] * 5
        ready = [n for n in ("a", "b") if h.gateway.scheduler.state_of(n).value == "ready"]
        assert len(ready) == 1
        assert len(running(h)) == 1
