"""A cold start as clients meet it, against `modelyard serve` and a test engine that prints
vLLM's own download and loading lines at a real start's pace (tests/vllm_log.py).

A streamed request gets its headers at once and SSE comments until the first real event;
progress, not the clock alone, decides when a start is a hang; a start that goes silent is
killed; a log that never stops claiming progress is capped by start_timeout_max.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from openai import OpenAI, Timeout

from tests.conftest import FAKE_ENGINE, RunningGateway, fake_model

pytestmark = pytest.mark.slow

# The test engine streams its answer's words, one a chunk ("chat says: hi ").
CHAT = {
    "model": "chat",
    "messages": [{"role": "user", "content": "hi"}],
    "stream": True,
    "fake_chunks": 3,
}


def vllm_like(*extra: str, **settings: Any) -> dict[str, Any]:
    return fake_model("chat", *extra, **settings)


async def read_events(
    response: aiohttp.ClientResponse, opened_at: float
) -> list[tuple[float, str]]:
    """Every SSE line with the second it arrived, until the stream ends."""
    lines: list[tuple[float, str]] = []
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line:
            lines.append((time.monotonic() - opened_at, line))
    return lines


def comment_gaps(lines: list[tuple[float, str]]) -> list[float]:
    times = [0.0] + [at for at, line in lines if line.startswith(":")]
    return [later - earlier for earlier, later in itertools.pairwise(times)]


def test_the_openai_sdk_streams_through_a_45_s_start(
    gateway_factory: Callable[..., RunningGateway],
) -> None:
    gateway = gateway_factory({"chat": vllm_like("--vllm-start", "45", "--download")})
    # A read timeout of 10 s, below the start's 45: only the comments keep the stream open.
    client = OpenAI(
        base_url=gateway.url + "/v1",
        api_key="unused",
        timeout=Timeout(30.0, read=10.0),
        max_retries=0,
    )
    began = time.monotonic()
    stream = client.chat.completions.create(
        model="chat",
        messages=[{"role": "user", "content": "hello"}],
        stream=True,
        extra_body={"fake_chunks": 3},
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    took = time.monotonic() - began
    assert text.strip() == "chat says: hello"
    assert 44 <= took < 60, took
    status = gateway.status()["models"][0]
    assert status["state"] == "ready"
    assert status["progress"] is None  # only while starting


async def test_a_raw_client_sees_headers_and_comments_at_once(
    gateway_factory: Callable[..., RunningGateway],
) -> None:
    gateway = gateway_factory({"chat": vllm_like("--vllm-start", "14", "--download")})
    async with aiohttp.ClientSession() as session:
        opened_at = time.monotonic()
        async with session.post(gateway.url + "/v1/chat/completions", json=CHAT) as response:
            headers_after = time.monotonic() - opened_at
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            lines = await read_events(response, opened_at)
    assert headers_after < 0.5, headers_after
    comments = [line for _, line in lines if line.startswith(":")]
    assert lines[0][0] < 0.5
    assert lines[0][1].startswith(": loading chat: 0 s")
    assert max(comment_gaps(lines)) <= 5.0, comment_gaps(lines)
    assert any("downloading" in line for line in comments), comments
    assert any("loading weights" in line or "compiling" in line for line in comments), comments
    data = [line for _, line in lines if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]"
    first_real = next(i for i, (_, line) in enumerate(lines) if line.startswith("data: "))
    assert all(line.startswith("data: ") for _, line in lines[first_real:])  # no comment after


async def test_loading_progress_as_visible_content_when_asked(
    gateway_factory: Callable[..., RunningGateway],
) -> None:
    gateway = gateway_factory({"chat": vllm_like("--vllm-start", "5")})
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gateway.url + "/v1/chat/completions",
            json=CHAT,
            headers={"X-Modelyard-Loading": "content"},
        ) as response,
    ):
        lines = await read_events(response, time.monotonic())
    chunks = [json.loads(line[6:]) for _, line in lines if line.startswith("data: {")]
    shown = [c["choices"][0]["delta"].get("reasoning_content") for c in chunks]
    assert shown[0].startswith("loading chat: 0 s")
    answer = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert answer.strip() == "chat says: hi"  # the answer itself is untouched


async def test_non_streamed_requests_wait_as_before(
    gateway_factory: Callable[..., RunningGateway],
) -> None:
    gateway = gateway_factory({"chat": vllm_like("--vllm-start", "4")})
    async with aiohttp.ClientSession() as session:
        began = time.monotonic()
        body = {**CHAT, "stream": False}
        async with session.post(gateway.url + "/v1/chat/completions", json=body) as response:
            assert time.monotonic() - began >= 3.5  # no early headers
            assert response.headers["Content-Type"].startswith("application/json")
            answer = await response.json()
    assert answer["choices"][0]["message"]["content"] == "chat says: hi"


async def test_a_progressing_start_is_not_killed_at_start_timeout(
    gateway_factory: Callable[..., RunningGateway],
) -> None:
    """Scaled down: start_timeout 3 s against a 10 s start that keeps progressing."""
    gateway = gateway_factory(
        {"chat": vllm_like("--vllm-start", "10", "--download", start_timeout="3s")}
    )
    phases: set[str] = set()
    async with aiohttp.ClientSession() as session:
        request = asyncio.ensure_future(
            session.post(gateway.url + "/v1/chat/completions", json={**CHAT, "stream": False})
        )
        while not request.done():
            model = (await asyncio.to_thread(gateway.status))["models"][0]
            if model["progress"] is not None:
                phases.add(model["progress"]["phase"])
            await asyncio.sleep(0.3)
        response = await request
        assert response.status == 200, await response.text()
        assert (await response.json())["choices"][0]["message"]["content"] == "chat says: hi"
    assert {"downloading", "loading weights", "compiling"} <= phases, phases


async def test_a_start_that_goes_silent_is_killed_as_a_hang(
    gateway_factory: Callable[..., RunningGateway],
) -> None:
    gateway = gateway_factory(
        {"chat": vllm_like("--vllm-start", "60", "--silent-after", "2", start_timeout="3s")}
    )
    async with aiohttp.ClientSession() as session:
        began = time.monotonic()
        body = {**CHAT, "stream": False}
        async with session.post(gateway.url + "/v1/chat/completions", json=body) as response:
            took = time.monotonic() - began
            assert response.status == 503
            error = (await response.json())["error"]
    assert error["code"] == "start_timeout"
    assert "no progress for 3s" in error["message"], error
    assert 3 <= took < 10, took
    await asyncio.to_thread(gateway.wait_state, "chat", "failed", 10)
    assert gateway.engine_pids() == []  # killed, not left hanging


async def test_an_error_after_the_headers_is_an_sse_error_event(
    gateway_factory: Callable[..., RunningGateway],
) -> None:
    gateway = gateway_factory(
        {"chat": vllm_like("--vllm-start", "60", "--silent-after", "1", start_timeout="2s")}
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(gateway.url + "/v1/chat/completions", json=CHAT) as response,
    ):
        assert response.status == 200
        lines = await read_events(response, time.monotonic())
    assert lines[0][1].startswith(": loading chat")
    last = lines[-1][1]
    assert last.startswith("data: ")
    error = json.loads(last[6:])["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "start_timeout"


async def test_a_log_that_lies_about_progress_is_capped_by_start_timeout_max(
    gateway_factory: Callable[..., RunningGateway],
) -> None:
    gateway = gateway_factory(
        {"chat": vllm_like("--lying-log", start_timeout="2s", start_timeout_max="5s")}
    )
    async with aiohttp.ClientSession() as session:
        began = time.monotonic()
        body = {**CHAT, "stream": False}
        async with session.post(gateway.url + "/v1/chat/completions", json=body) as response:
            took = time.monotonic() - began
            assert response.status == 503
            error = (await response.json())["error"]
    assert "start_timeout_max 5s" in error["message"], error
    assert 5 <= took < 10, took
    await asyncio.to_thread(gateway.wait_state, "chat", "failed", 10)


async def test_a_client_that_hangs_up_while_loading_leaves_and_cancels_nothing(
    gateway_factory: Callable[..., RunningGateway],
) -> None:
    gateway = gateway_factory({"chat": vllm_like("--vllm-start", "8")})
    async with aiohttp.ClientSession() as staying, aiohttp.ClientSession() as leaving:
        kept = asyncio.ensure_future(staying.post(gateway.url + "/v1/chat/completions", json=CHAT))
        gone = await leaving.post(gateway.url + "/v1/chat/completions", json=CHAT)
        assert (await gone.content.readline()).startswith(b": loading chat")
        await asyncio.sleep(0.5)
        assert (await asyncio.to_thread(gateway.status))["models"][0]["queued"] == 2
        gone.close()  # hangs up during the comments
        deadline = time.monotonic() + 5
        while (await asyncio.to_thread(gateway.status))["models"][0]["queued"] != 1:
            assert time.monotonic() < deadline, "the client that left is still queued"
            await asyncio.sleep(0.1)
        model = (await asyncio.to_thread(gateway.status))["models"][0]
        assert model["state"] == "starting"  # the start goes on
        response = await kept
        lines = await read_events(response, time.monotonic())
    data = [line for _, line in lines if line.startswith("data: {")]
    text = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content") or "" for line in data
    )
    assert text.strip() == "chat says: hi"


def test_modelyard_load_shows_the_phases_and_status_the_progress(
    gateway_factory: Callable[..., RunningGateway],
) -> None:
    # A start of 12 s: its weights load for 2.4 s and it compiles for 3.6 s, several of the
    # command's polls (0.5 s) each even on a loaded machine (CI ran 8 s once with phases of
    # 1.6 s, and the command saw neither between two polls).
    gateway = gateway_factory({"chat": vllm_like("--vllm-start", "12", "--download")})
    load = subprocess.Popen(
        [sys.executable, "-m", "modelyard", "load", "chat", "--url", gateway.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen_status = ""
    while load.poll() is None:
        status = subprocess.run(
            [sys.executable, "-m", "modelyard", "status", "--url", gateway.url],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        if "loading weights" in status.stdout or "downloading" in status.stdout:
            seen_status = status.stdout
        time.sleep(0.5)
    output = load.communicate(timeout=30)[0]
    assert load.returncode == 0, output
    lines = output.splitlines()
    assert any(line.startswith("chat: starting, downloading") for line in lines), output
    assert any(line.startswith("chat: starting, loading weights") for line in lines), output
    assert any("compiling" in line for line in lines), output
    assert lines[-1] == "chat: ready"
    assert seen_status, "modelyard status never showed the start's phase"


async def test_a_download_that_logs_nothing_lives_while_its_cache_folder_grows(
    gateway_factory: Callable[..., RunningGateway], tmp_path: Path
) -> None:
    hf_home = tmp_path / "hf"
    folder = hf_home / "hub" / "models--org--quiet"
    model = {
        "engine": "vllm",
        "model": "org/quiet",
        "executable": [sys.executable, FAKE_ENGINE],
        "args": ["--quiet-download", "8", "--download-to", str(folder), "--vllm-start", "1"],
        "env": {"HF_HOME": str(hf_home)},
        "start_timeout": "3s",
    }
    gateway = gateway_factory({"chat": model})
    phases: set[str] = set()
    async with aiohttp.ClientSession() as session:
        body = {**CHAT, "stream": False}
        request = asyncio.ensure_future(
            session.post(gateway.url + "/v1/chat/completions", json=body)
        )
        while not request.done():
            progress = (await asyncio.to_thread(gateway.status))["models"][0]["progress"]
            if progress is not None:
                phases.add(progress["phase"])
            await asyncio.sleep(0.3)
        response = await request
        assert response.status == 200, await response.text()
    assert "downloading" in phases, phases
