"""A real vLLM start (the demo's engine, on CPU) as a streaming client meets it: headers at
once, loading comments with the phases vLLM's own log shows, then the answer."""

from __future__ import annotations

import itertools
import time

import aiohttp
import pytest

from modelyard.demo import DemoSetup
from tests.vllm.support import (
    ProcessWatch,
    demo_document,
    engine_turn,
    start_demo_gateway,
    stop_gateway,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


async def test_a_streamed_request_through_a_real_vllm_start(
    demo: DemoSetup, tmp_path_factory: pytest.TempPathFactory
) -> None:
    document = demo_document(demo)
    document["models"] = {"chat": document["models"]["chat"]}
    document["groups"] = {}
    watch = ProcessWatch()
    body = {
        "model": "chat",
        "messages": [{"role": "user", "content": "Say hello"}],
        "max_tokens": 8,
        "stream": True,
    }
    with engine_turn():
        gateway = start_demo_gateway(tmp_path_factory.mktemp("cold-real"), demo, document)
        try:
            lines: list[tuple[float, str]] = []
            async with aiohttp.ClientSession() as session:
                began = time.monotonic()
                async with session.post(
                    gateway.url + "/v1/chat/completions",
                    json=body,
                    timeout=aiohttp.ClientTimeout(total=300, sock_read=10),
                ) as response:
                    headers_after = time.monotonic() - began
                    assert response.status == 200
                    async for raw in response.content:
                        line = raw.decode().strip()
                        if line:
                            lines.append((time.monotonic() - began, line))
        finally:
            stop_gateway(gateway, watch)
    comments = [(at, line) for at, line in lines if line.startswith(":")]
    print(f"headers after {headers_after:.3f} s; comments:")
    for at, line in comments:
        print(f"  {at:6.1f} s  {line}")
    assert headers_after < 0.5
    assert comments
    assert comments[0][0] < 0.5
    times = [0.0] + [at for at, _ in comments]
    assert max(b - a for a, b in itertools.pairwise(times)) <= 5.0
    assert any("loading weights" in line or "compiling" in line for _, line in comments)
    assert lines[-1][1] == "data: [DONE]"
