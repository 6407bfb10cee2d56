"""Issue 11's two scenarios on a live gateway, at timings closer to a real GPU's: test engines
that take 8 s to become ready (vLLM on a GPU: 30-60 s) and streams of 10 s.

Before the scheduler, the second of two cold models requested together got `503
placement_stuck` after 3.2 s, and so did a model that had to wait for a drain.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from tests.placement.test_placement_gateway import CHAT, declared, events, gpu, vllm_like

pytestmark = pytest.mark.slow
__all__ = ["gpu"]  # the simulated-GPU fixture

READY = ("--ready-delay", "8")


async def ask(session: aiohttp.ClientSession, url: str, model: str, **extra: Any) -> int:
    async with session.post(
        url + "/v1/chat/completions", json={"model": model, **CHAT, **extra}
    ) as response:
        await response.read()
        return response.status


async def test_cold_pairs_and_waits_for_drains_are_served_not_refused(gateway_factory, gpu):
    gateway = gateway_factory(
        {name: vllm_like(name, gpu, "10GiB", *READY) for name in ("a", "b", "c")},
        **declared(gpu),
    )
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        # 1. Two cold models that fit together, asked for at the same moment: both served
        #    (one start at a time on the GPU, the second woken by the first's readiness).
        began = time.monotonic()
        assert await asyncio.gather(
            ask(session, gateway.url, "a"), ask(session, gateway.url, "b")
        ) == [200, 200]
        assert time.monotonic() - began >= 16
        # 2. Both stream for 10 s; a third model must wait for one of them to drain.
        streams = [
            asyncio.ensure_future(
                ask(session, gateway.url, name, stream=True, fake_chunks=10, fake_chunk_delay=1.0)
            )
            for name in ("a", "b")
        ]
        await asyncio.sleep(1.0)
        began = time.monotonic()
        assert await ask(session, gateway.url, "c") == 200
        waited = time.monotonic() - began
        assert await asyncio.gather(*streams) == [200, 200]  # no stream was cut
    assert waited >= 8 + 8  # the drain (about 9 s left), then its 8 s start
    kinds = [e["kind"] for e in await events(gateway.url)]
    assert "placement_refused" not in kinds
    assert "start_failed" not in kinds
    states = {m["name"]: m["state"] for m in gateway.status()["models"]}
    assert states["c"] == "ready"
    assert sorted(states.values()).count("stopped") == 1
