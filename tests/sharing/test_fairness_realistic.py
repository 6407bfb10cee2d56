"""Fairness at realistic timings, through the whole gateway (in-process, tests/harness.py).

The test engine stands for a vLLM engine started with `--max-num-seqs 4`: it runs at most 4
sequences at once and queues the rest itself, first come first served whatever the key (as
vLLM's default scheduler does). Each chat stream lasts 10 s; each batch answer 1 s.

In one minute, at once:
- key A queues 200 chat streams (10 of them hang up after 3 s, while queued);
- key B sends one chat stream every 5 s: its wait must stay within one service time (10 s),
  not A's backlog (about 500 s in arrival order);
- keys H (weight 3) and L (weight 1) keep a second model's 4 slots busy: over the minute, H
  gets 3 times L's share, within 10 %.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from modelyard.auth.keys import generate_key
from tests.harness import engine_model, in_process_gateway
from tests.security.keys import bearer, key_config

pytestmark = pytest.mark.slow

KEYS = {name: generate_key() for name in ("A", "B", "H", "L")}
SERVICE_S = 10.0
MINUTE_S = 60.0


def _model(**settings: Any) -> dict[str, Any]:
    return engine_model(max_in_flight=4, max_queue=1000, args=["--max-num-seqs", "4"], **settings)


async def test_fair_shares_at_realistic_timings(tmp_path) -> None:
    keys = [
        key_config("A", KEYS["A"]),
        key_config("B", KEYS["B"]),
        key_config("H", KEYS["H"], weight=3),
        key_config("L", KEYS["L"], weight=1),
    ]
    async with (
        in_process_gateway(
            tmp_path,
            {"chat": _model(served_name="chat"), "batch": _model(served_name="batch")},
            auth={"keys": keys},
            limits={"max_queue": 2000},  # 650 wait at once, more than the default 512
        ) as harness,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
    ):
        url = harness.url + "/v1/chat/completions"

        async def chat(
            key: str, text: str, timeout: float | None = None, whole: bool = True
        ) -> float:
            """Send one 10 s stream; the seconds until its first byte (and read the rest)."""
            body = {
                "model": "chat",
                "stream": True,
                "messages": [{"role": "user", "content": text}],
                "fake_chunks": 10,
                "fake_chunk_delay": SERVICE_S / 10,
            }
            sent = time.monotonic()
            async with session.post(
                url,
                json=body,
                headers=bearer(KEYS[key]),
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                assert response.status == 200, await response.text()
                await response.content.readany()
                first = time.monotonic() - sent
                if whole:
                    await response.read()
            return first

        async def batch(key: str) -> None:
            body = {"model": "batch", "messages": [{"role": "user", "content": key}]}
            async with session.post(
                url, json={**body, "fake_delay": 1.0}, headers=bearer(KEYS[key])
            ) as response:
                assert response.status == 200, await response.text()

        began = time.monotonic()
        backlog = [asyncio.create_task(chat("A", f"a{i}")) for i in range(190)]
        leaving = [asyncio.create_task(chat("A", "leave", timeout=3.0)) for _ in range(10)]
        weighted = [asyncio.create_task(batch("H")) for _ in range(300)]
        weighted += [asyncio.create_task(batch("L")) for _ in range(150)]
        await asyncio.sleep(5.0)
        queues = harness.gateway.fair_queues
        # The 10 that hung up left the queue: 4 are served, 186 wait.
        assert queues.counts()["chat"]["A"].waiting == 186
        assert all(task.done() for task in leaving)

        person = []
        while time.monotonic() - began < MINUTE_S - 5.0:
            person.append(asyncio.create_task(chat("B", "b", whole=False)))
            await asyncio.sleep(5.0)
        waits = await asyncio.gather(*person)
        counts = queues.counts()
        elapsed = time.monotonic() - began
        for task in [*backlog, *weighted]:
            task.cancel()
        await asyncio.gather(*backlog, *weighted, *leaving, return_exceptions=True)

        assert max(waits) <= SERVICE_S + 1.0, waits  # 1 s for a machine shared with others
        share = counts["batch"]["H"].served / counts["batch"]["L"].served
        assert abs(share - 3.0) / 3.0 <= 0.10, (counts["batch"], elapsed)
        for engine in harness.runtime.engines:
            assert engine.state.peak_in_flight <= 4
            assert not any("leave" in r["body"] for r in engine.state.received)
        print(
            f"B's waits (s): {[round(w, 1) for w in waits]}; H:L served "
            f"{counts['batch']['H'].served}:{counts['batch']['L'].served} in {elapsed:.0f}s; "
            f"A served {counts['chat']['A'].served}, longest wait "
            f"{counts['chat']['A'].longest_wait_s:.0f}s"
        )
