"""Shutdown and the idle reaper with a real `modelyard serve` process: what only a process
shows (signals, exit codes, engines left behind, the request log)."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import aiohttp

from tests.conftest import FAKE_ENGINE, fake_model


async def test_shutdown_ends_a_long_stream_after_one_grace_with_a_final_error_event(
    gateway_factory,
):
    # Issue 11, defect 7: streams were cut at twice shutdown_grace, with no final event, and
    # logged as 500.
    gateway = gateway_factory({"m": fake_model("m")}, limits={"shutdown_grace": "3s"})
    body = {
        "model": "m",
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
        "fake_chunks": 300,
        "fake_chunk_delay": 0.1,
    }
    lines: list[str] = []
    async with (
        aiohttp.ClientSession() as session,
        session.post(gateway.url + "/v1/chat/completions", json=body) as response,
    ):
        assert response.status == 200
        # Loading comments while the engine starts, then its first chunk.
        while not (await response.content.readline()).startswith(b"data:"):
            pass
        began = time.monotonic()
        gateway.process.send_signal(15)
        async for raw in response.content:
            lines.append(raw.decode().strip())
    ended = time.monotonic() - began
    assert 2.5 < ended < 5.5  # one grace (3 s), not two (6 s)
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert events[-1]["error"]["code"] == "shutting_down"
    assert gateway.process.wait(timeout=15) == 0
    log = gateway.log_text()
    request_lines = [line for line in log.splitlines() if "request " in line and "model=m" in line]
    assert request_lines
    assert "status=200" in request_lines[-1]
    assert "status=500" not in log
    assert gateway.engine_pids() == []


async def test_a_sleep_that_fails_does_not_end_idle_stops_nor_spoil_shutdown(gateway_factory):
    # Issue 11, defect 2: an engine whose /sleep answers 404 (vLLM without sleep mode) ended
    # the idle reaper; SIGTERM then exited 1 with a traceback and left every engine running.
    models = {
        "s": {
            "engine": "vllm",
            "model": "/models/s",
            "executable": [sys.executable, FAKE_ENGINE],
            "args": ["--sleep-404"],
            "sleep": 1,
            "idle_timeout": "1s",
        },
        "t": fake_model("t", idle_timeout="3s"),
    }
    gateway = gateway_factory(models)
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as session:
        for name in ("s", "t"):
            async with session.post(
                gateway.url + "/v1/chat/completions", json={"model": name, **chat}
            ) as response:
                assert response.status == 200
    gateway.wait_state("s", "stopped", timeout=10)  # the failed sleep became a stop
    gateway.wait_state("t", "stopped", timeout=10)  # and the reaper lived on
    await asyncio.sleep(0)
    assert gateway.stop() == 0
    assert "Traceback" not in gateway.log_text()
    assert gateway.engine_pids() == []
