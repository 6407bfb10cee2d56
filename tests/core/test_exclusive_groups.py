"""Exclusive groups on a machine without managed GPUs (CPU engines, as in the demo)."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import aiohttp

from tests.conftest import fake_model

GROUP = {"cpu": {"members": ["a", "b"], "exclusive": True}}


async def ask(session: aiohttp.ClientSession, url: str, model: str, delay: float = 0) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "fake_delay": delay}
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        await response.read()
        return response.status


def states(gateway) -> dict[str, str]:
    return {m["name"]: m["state"] for m in gateway.status()["models"]}


async def test_starting_a_member_stops_the_running_one(gateway_factory):
    models = {name: fake_model(name, "--ready-delay", "0.2") for name in ("a", "b", "c")}
    gateway = gateway_factory(models, groups=GROUP)
    async with aiohttp.ClientSession() as session:
        assert await ask(session, gateway.url, "a") == 200
        assert await ask(session, gateway.url, "c") == 200  # not in the group
        assert states(gateway) == {"a": "ready", "b": "stopped", "c": "ready"}
        assert await ask(session, gateway.url, "b") == 200
        assert states(gateway) == {"a": "stopped", "b": "ready", "c": "ready"}
    url = gateway.url + "/admin/events?follow=0&recent=100&model=a"
    with urllib.request.urlopen(url, timeout=5) as response:
        events = json.loads(response.read())["events"]
    stops = [e["reason"] for e in events if e["kind"] == "stop"]
    assert stops == ["exclusive group: 'b' is starting"]
    assert len(gateway.engine_pids()) == 2


async def test_requests_in_flight_finish_before_their_engine_makes_room(gateway_factory):
    models = {name: fake_model(name, "--ready-delay", "0.2") for name in ("a", "b")}
    gateway = gateway_factory(models, groups=GROUP)
    async with aiohttp.ClientSession() as session:
        assert await ask(session, gateway.url, "a") == 200
        slow = asyncio.ensure_future(ask(session, gateway.url, "a", delay=1.0))
        await asyncio.sleep(0.3)
        results = await asyncio.gather(
            slow, *(ask(session, gateway.url, name) for name in ("b", "a", "b", "a"))
        )
    assert results == [200] * 5
    running = [name for name, state in states(gateway).items() if state == "ready"]
    assert len(running) == 1
    assert len(gateway.engine_pids()) == 1
