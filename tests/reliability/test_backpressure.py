"""Back-pressure: bounded waiting, clients that leave, body limits, upstream timeouts.

All of it is the gateway's HTTP and scheduler behaviour, so it runs in-process
(tests/harness.py serves the app as `modelyard serve` does, on a real loopback port). The
engines' slow starts are `Behaviour(ready_after=...)`: /health answers 503 until then, as
vLLM's does while it loads; `fake_delay` and a long `fake_chunk_delay` stand for an engine that
sends nothing in time."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.harness import Behaviour, Harness, engine_model, in_process_gateway

CHAT = {"messages": [{"role": "user", "content": "hello"}]}


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, **CHAT, **extra}


async def timed_post(
    session: aiohttp.ClientSession, url: str, body: Any, began: float
) -> tuple[int, dict[str, Any], dict[str, str], float]:
    async with session.post(url, json=body) as response:
        payload = await response.json(content_type=None)
        return response.status, payload, dict(response.headers), time.monotonic() - began


async def test_500_clients_against_a_queue_bound_of_100(tmp_path: Path) -> None:
    """The excess get 503 + Retry-After at once; the 100 that wait are all served."""
    async with in_process_gateway(
        tmp_path,
        {"chat": engine_model(served_name="chat", start_timeout="60s")},
        {"chat": Behaviour(ready_after=6)},
        limits={"max_queue": 100, "max_queue_per_model": 100},
    ) as gateway:
        url = gateway.url + "/v1/chat/completions"
        connector = aiohttp.TCPConnector(limit=0)  # 500 connections at once, no client-side queue
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=90)
        ) as session:
            began = time.monotonic()
            results = await asyncio.wait_for(
                asyncio.gather(
                    *(timed_post(session, url, chat("chat"), began) for _ in range(500))
                ),
                timeout=90,  # nothing hangs
            )
        served = [r for r in results if r[0] == 200]
        refused = [r for r in results if r[0] == 503]
        assert len(served) == 100
        assert len(refused) == 400
        for _status, body, headers, _elapsed in refused:
            assert body["error"]["code"] == "queue_full"
            assert body["error"]["type"] == "server_error"
            assert int(headers["Retry-After"]) >= 1
        # "At once": every refusal came back before the engine was ready to serve anyone.
        assert max(r[3] for r in refused) < min(r[3] for r in served)
        model = gateway.status()["models"][0]
        assert (model["queued"], model["in_flight"], model["starts"]) == (0, 0, 1)


async def test_per_model_and_global_bounds_are_separate(tmp_path: Path) -> None:
    async with in_process_gateway(
        tmp_path,
        {"a": engine_model(served_name="a"), "b": engine_model(served_name="b")},
        {"a": Behaviour(ready_after=4), "b": Behaviour(ready_after=4)},
        limits={"max_queue": 15, "max_queue_per_model": 10},
    ) as gateway:
        url = gateway.url + "/v1/chat/completions"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            began = time.monotonic()
            first = [
                asyncio.ensure_future(timed_post(session, url, chat("a"), began)) for _ in range(12)
            ]
            await wait_queued(gateway, 10)
            second = [
                asyncio.ensure_future(timed_post(session, url, chat("b"), began)) for _ in range(8)
            ]
            results = await asyncio.gather(*first, *second)
        a_statuses = sorted(r[0] for r in results[:12])
        b_statuses = sorted(r[0] for r in results[12:])
        assert a_statuses == [200] * 10 + [503] * 2  # the per-model bound
        assert b_statuses == [200] * 5 + [503] * 3  # the global bound (15 - 10 waiting for a)


async def wait_queued(gateway: Harness, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gateway.status()["queued"] == count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"queued is {gateway.status()['queued']}, not {count}")


async def test_clients_that_disconnect_while_waiting_leave_the_queue(tmp_path: Path) -> None:
    async with in_process_gateway(
        tmp_path, {"slow": engine_model(served_name="slow")}, {"slow": Behaviour(ready_after=30)}
    ) as gateway:
        url = gateway.url + "/v1/chat/completions"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            waiting = [
                asyncio.ensure_future(session.post(url, json=chat("slow"))) for _ in range(20)
            ]
            await wait_queued(gateway, 20)
            for task in waiting:
                task.cancel()  # the client goes away: its connection is closed
            await asyncio.gather(*waiting, return_exceptions=True)
        await wait_queued(gateway, 0)
        assert gateway.model_state("slow") == "starting"  # the start itself goes on


async def test_bodies_over_the_limit_get_413(tmp_path: Path) -> None:
    async with in_process_gateway(
        tmp_path,
        {"chat": engine_model(served_name="chat", route="/chat")},
        limits={"max_body_bytes": "64KiB"},
    ) as gateway:
        filler = "x" * (100 * 1024)
        big = json.dumps(chat("chat", filler=filler)).encode()

        async def chunked() -> Any:
            for start in range(0, len(big), 8192):
                yield big[start : start + 8192]

        async with aiohttp.ClientSession() as session:
            for path in ("/v1/chat/completions", "/chat/v1/chat/completions", "/upstream/chat/x"):
                for data in (big, chunked()):
                    async with session.post(gateway.url + path, data=data) as response:
                        body = await response.json()
                        assert response.status == 413, (path, body)
                        assert body["error"]["code"] == "body_too_large"
                        assert set(body["error"]) == {"message", "type", "param", "code"}
            # Just under the limit is fine.
            fits = chat("chat", filler="x" * (60 * 1024))
            async with session.post(gateway.url + "/v1/chat/completions", json=fits) as response:
                assert response.status == 200


async def test_an_engine_that_sends_nothing_gets_a_504_in_time(tmp_path: Path) -> None:
    async with in_process_gateway(
        tmp_path,
        {"chat": engine_model(served_name="chat")},
        limits={"upstream_read_timeout": "1s", "health_check_failures": 100},
    ) as gateway:
        url = gateway.url + "/v1/chat/completions"
        async with aiohttp.ClientSession() as session:
            began = time.monotonic()
            async with session.post(url, json=chat("chat", fake_delay=30)) as response:
                body = await response.json()
            took = time.monotonic() - began
            assert response.status == 504
            assert body["error"]["code"] == "upstream_timeout"
            assert "upstream_read_timeout" in body["error"]["message"]
            assert took < 15  # the 1 s timeout, plus the cold start, generously
            # A stream that stalls midway ends with an SSE error event, not a silent cut.
            stalled = chat("chat", stream=True, fake_chunks=3, fake_chunk_delay=30)
            async with session.post(url, json=stalled) as response:
                assert response.status == 200
                text = (await response.read()).decode()
            assert '"code": "upstream_stream_broken"' in text
            assert "[DONE]" not in text
