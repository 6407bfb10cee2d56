"""An engine declared lost ends its requests at once, at realistic timings.

A lost engine's socket may never say so: a remote host that froze (or a network that drops
everything) keeps its connections open and answers nothing, and a hung engine that ignores
SIGTERM keeps them open until its stop grace ends with SIGKILL. Its requests must not wait
for `upstream_read_timeout` (600 s by default) or the stop: a request that had no answer yet
gets 503 with Retry-After (OpenAI's SDKs retry it), a stream already begun gets an error event
in OpenAI's shape and ends.

The test engine (tests/fake_engine.py) stands for vLLM's OpenAI server: as a remote server
started by the test and frozen with SIGSTOP (a host gone silent: the kernel still accepts
connections, nothing answers), and as an engine of the gateway's own that hangs and ignores
SIGTERM (a wedged vLLM whose stop takes the whole grace).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import fake_model, free_port
from tests.core.test_remote_engine import SEED_003_NAME, UPSTREAM_KEY, RemoteServer
from tests.harness import Harness, in_process_gateway
from tests.reliability.test_engine_faults import post_with_headers


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], **extra}


async def stream_until_first_chunk(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[asyncio.Future[tuple[int, str, float]], asyncio.Event]:
    """Start a stream; the event is set once its first chunk came (the stream has begun)."""
    begun = asyncio.Event()

    async def run() -> tuple[int, str, float]:
        async with session.post(url, json=body, headers=headers) as response:
            text = b""
            async for chunk in response.content.iter_any():
                text += chunk
                begun.set()
            return response.status, text.decode(), time.monotonic()

    return asyncio.ensure_future(run()), begun


async def timed(work: Any) -> tuple[Any, float]:
    result = await work
    return result, time.monotonic()


@pytest.fixture
async def silent_remote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    server = RemoteServer(free_port())
    server.start()
    monkeypatch.setenv("REMOTE_KEY", UPSTREAM_KEY)
    try:
        async with in_process_gateway(
            tmp_path,
            {
                "far": {
                    "engine": "remote",
                    "url": server.url,
                    "api_key": "${env:REMOTE_KEY}",
                    "served_name": SEED_003_NAME,
                }
            },
            # The defaults' timings: checked every second, a check slower than a second
            # failed, two failures in a row mean down. The read timeout stays 600 s.
            limits={
                "health_check_interval": "1s",
                "health_check_timeout": "1s",
                "health_check_failures": 2,
            },
        ) as gateway:
            yield gateway, server
    finally:
        if server.process is not None and server.process.poll() is None:
            os.kill(server.process.pid, signal.SIGCONT)
        server.kill()


async def test_a_remote_gone_silent_ends_its_requests_when_declared_down(silent_remote):
    gateway, server = silent_remote
    gateway_h: Harness = gateway
    await gateway_h.wait_state("far", "ready")
    url = gateway_h.url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        plain = asyncio.ensure_future(
            timed(post_with_headers(session, url, chat("far", fake_delay=60)))
        )
        stream, begun = await stream_until_first_chunk(
            session,
            url,
            chat("far", stream=True, fake_chunks=10_000, fake_chunk_delay=0.05),
            {},
        )
        await asyncio.wait_for(begun.wait(), 10)
        while gateway_h.status()["models"][0]["in_flight"] < 2:
            await asyncio.sleep(0.02)
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGSTOP)  # the host goes silent
        frozen = time.monotonic()
        while gateway_h.model_state("far") != "failed":
            assert time.monotonic() - frozen < 10, "the remote was not declared down"
            await asyncio.sleep(0.02)
        declared = time.monotonic()
        (status, body, _, answer_headers), plain_end = await asyncio.wait_for(plain, 10)
        stream_status, stream_text, stream_end = await asyncio.wait_for(stream, 10)
    print(
        f"remote declared down {declared - frozen:.2f}s after it froze; plain ended "
        f"{plain_end - declared:.3f}s and stream {stream_end - declared:.3f}s after that"
    )
    assert 1.5 < declared - frozen < 6, declared - frozen  # two failed checks of 1 s
    # Both ended with the verdict, not at the read timeout (600 s).
    assert plain_end - declared < 1.5, plain_end - declared
    assert stream_end - declared < 1.5, stream_end - declared
    assert status == 503, body
    assert body["error"]["code"] == "engine_lost"
    assert "not answering" in body["error"]["message"]
    assert int(answer_headers["Retry-After"]) >= 1
    assert stream_status == 200
    last = stream_text.strip().split("\n\n")[-1]
    error = json.loads(last.removeprefix("data: "))["error"]
    assert error["code"] == "engine_lost"
    assert error["type"] == "server_error"
    # Requests from now on are refused at once with Retry-After (the gateway does not start
    # remote engines), not held.
    async with aiohttp.ClientSession() as session:
        began = time.monotonic()
        status, body, _, answer_headers = await post_with_headers(session, url, chat("far"))
    assert status == 503, body
    assert int(answer_headers["Retry-After"]) >= 1
    assert time.monotonic() - began < 5


async def test_a_hung_engine_that_ignores_sigterm_ends_its_requests_at_the_verdict(
    gateway_factory,
):
    # A wedged engine whose stop takes the whole grace (10 s, then SIGKILL): its requests end
    # when the watchdog declares it hung, not when the process is finally gone.
    gateway = gateway_factory(
        {"chat": fake_model("chat", "--ignore-sigterm", stop_grace="10s")},
        limits={
            "health_check_interval": "500ms",
            "health_check_timeout": "500ms",
            "health_check_failures": 2,
        },
    )
    url = gateway.url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        assert (await post_with_headers(session, url, chat("chat")))[0] == 200
        plain = asyncio.ensure_future(
            timed(post_with_headers(session, url, chat("chat", fake_delay=60)))
        )
        stream, begun = await stream_until_first_chunk(
            session, url, chat("chat", stream=True, fake_chunks=10_000, fake_chunk_delay=0.05), {}
        )
        await asyncio.wait_for(begun.wait(), 10)
        hang = asyncio.ensure_future(
            timed(post_with_headers(session, url, chat("chat", fake_hang=1)))
        )
        hung_at = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(plain, hang, stream), 30)
    ((status, body, _, answer_headers), plain_end), _, (stream_status, text, stream_end) = results
    print(f"hung: plain ended {plain_end - hung_at:.2f}s, stream {stream_end - hung_at:.2f}s")
    # Two failed checks of 0.5 s, then the verdict; the stop's 10 s grace is not waited for.
    assert plain_end - hung_at < 5, plain_end - hung_at
    assert stream_end - hung_at < 5, stream_end - hung_at
    assert status == 503, body
    assert body["error"]["code"] == "engine_lost"
    assert int(answer_headers["Retry-After"]) >= 1
    assert stream_status == 200
    assert '"code": "engine_lost"' in text
