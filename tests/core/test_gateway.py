"""The gateway end to end. What needs a real process (`modelyard serve` with test engines as
processes) stays process-level here: an engine's crash with its own log lines, engines killed
by signal, SIGTERM, orphans after a SIGKILL. The rest runs in-process (tests/harness.py; more
in tests/core/test_gateway_inprocess.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp

from tests.conftest import fake_model, processes_with, start_gateway
from tests.harness import engine_model, in_process_gateway

CHAT = {"messages": [{"role": "user", "content": "hello"}]}


def chat_body(model: str, **extra: object) -> dict[str, object]:
    return {"model": model, **CHAT, **extra}


async def post(url: str, body: object, **kwargs: object) -> tuple[int, dict[str, object]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, **kwargs) as response,
    ):
        return response.status, await response.json(content_type=None)


async def test_idle_engine_is_stopped_but_never_while_busy(tmp_path: Path) -> None:
    models = {"chat": engine_model(served_name="chat", idle_timeout="1s")}
    async with in_process_gateway(tmp_path, models) as gateway:
        # A request that lasts longer than the idle timeout keeps the engine alive.
        status, _ = await post(
            gateway.url + "/v1/chat/completions", chat_body("chat", fake_delay=2.0)
        )
        assert status == 200
        assert gateway.model_state("chat") == "ready"
        await gateway.wait_state("chat", "stopped", timeout=5)
        assert gateway.engine_pids() == []


async def test_crash_during_start_fails_fast_with_log_tail(gateway_factory):
    gateway = gateway_factory({"bad": fake_model("bad", "--crash-on-start", "3")})
    started = time.monotonic()
    status, body = await post(gateway.url + "/v1/chat/completions", chat_body("bad"))
    assert time.monotonic() - started < 5  # the exit is noticed at once, not at a timeout
    assert status == 502
    message = body["error"]["message"]
    assert "exit code 3" in message
    assert "CUDA out of memory (fake)" in message  # the engine's own last log lines
    assert body["error"]["type"] == "server_error"
    assert gateway.model_state("bad") == "failed"


async def test_engine_killed_mid_stream_then_restarted(gateway_factory):
    gateway = gateway_factory({"chat": fake_model("chat")})
    async with aiohttp.ClientSession() as session:
        body = chat_body("chat", stream=True, fake_chunks=200, fake_chunk_delay=0.02)
        async with session.post(gateway.url + "/v1/chat/completions", json=body) as response:
            assert response.status == 200
            # Loading comments while the engine starts, then its first chunk.
            while not (await response.content.readline()).startswith(b"data:"):
                pass
            pid = gateway.status()["models"][0]["pid"]
            os.killpg(pid, signal.SIGKILL)
            rest = (await response.read()).decode()
        assert '"code": "upstream_stream_broken"' in rest
        assert "[DONE]" not in rest
        gateway.wait_state("chat", "failed")
        assert gateway.status()["models"][0]["failure"]["exit_code"] == -9
        # The gateway keeps working; the next request starts a new engine.
        async with session.post(
            gateway.url + "/v1/chat/completions", json=chat_body("chat")
        ) as response:
            assert response.status == 200
    assert gateway.status()["models"][0]["pid"] != pid


async def test_client_disconnect_closes_upstream_request(tmp_path: Path) -> None:
    async with in_process_gateway(tmp_path, {"chat": engine_model(served_name="chat")}) as gateway:
        async with aiohttp.ClientSession() as session:
            body = chat_body("chat", stream=True, fake_chunks=500, fake_chunk_delay=0.02)
            response = await session.post(gateway.url + "/v1/chat/completions", json=body)
            # Loading comments while the engine starts (if it is slow), then its first chunk.
            while not (await response.content.readline()).startswith(b"data:"):
                pass
            response.close()  # the client goes away mid-stream
        # The engine's own count of requests whose client went away (tests/fake_engine.py's
        # --report file, kept in memory by the in-process engine).
        [engine] = gateway.runtime.of("chat")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if engine.state.disconnects == 1:
                break
            await asyncio.sleep(0.05)
        assert engine.state.disconnects == 1
        # And the in-flight count went back to zero.
        assert gateway.status()["models"][0]["in_flight"] == 0


def test_sigterm_leaves_no_process_behind(gateway_factory):
    gateway = gateway_factory(
        {
            "a": fake_model("a", "--spawn-child"),
            "b": fake_model("b", "--ignore-sigterm"),
        },
        defaults={"stop_grace": "1s"},
    )
    for name in ("a", "b"):
        asyncio.run(post(gateway.url + "/v1/chat/completions", chat_body(name)))
    assert len(gateway.engine_pids()) >= 2

    def children() -> set[int]:
        """The engine's child (it carries the gateway's marker: another test's may run beside)."""
        return set(processes_with("time.sleep(3600)")) & set(gateway.engine_pids())

    spawned = children()
    assert spawned, "engine 'a' should have started a child process"
    assert gateway.stop(signal.SIGTERM) == 0
    assert gateway.engine_pids() == []
    assert not spawned & children()


def test_sigkilled_gateway_orphans_are_stopped_on_restart(tmp_path: Path):
    models = {"chat": fake_model("chat")}
    first = start_gateway(tmp_path, models, marker=f"orphan-{tmp_path.name}")
    try:
        asyncio.run(post(first.url + "/v1/chat/completions", chat_body("chat")))
        orphans = first.engine_pids()
        assert len(orphans) == 1
        first.stop(signal.SIGKILL)
        assert first.engine_pids() == orphans  # SIGKILL gave the gateway no chance to clean up
        models = {"chat": fake_model("chat")}
        second = start_gateway(tmp_path, models, marker=f"orphan-{tmp_path.name}")
        try:
            assert first.engine_pids() == []  # stopped before the new gateway listened
            events = second.log_text()
            assert "stopped orphaned engine chat" in events
        finally:
            second.stop()
    finally:
        for pid in processes_with(f"orphan-{tmp_path.name}"):
            os.kill(pid, signal.SIGKILL)
