"""Replicas on the process runtime: `modelyard serve` with two declared GPUs, test engines as
separate processes (tests/fake_engine.py run as `engine: vllm`).

Each engine serves at most 4 requests at a time (`--max-num-seqs 4`, vLLM's batch limit) for
a fixed time each, so one engine's throughput is bounded as a real one's is, and a second
engine on the other GPU is the only way to serve more. Each engine claims its memory on a
simulated GPU (tests/fake_gpu.py) and dies "out of memory" when it does not fit, as vLLM
does: a plan over a GPU's memory would show as a failed start, and the peak is checked.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests import fake_gpu
from tests.conftest import FAKE_ENGINE

GIB = 1024**3
SERVE_S = 0.4  # each request holds one of the engine's 4 slots this long: 10 requests/s
CLIENTS = 16  # four times what one engine serves at once: it saturates one, not two


def fake_vllm(gpu_dir: Path, **settings: Any) -> dict[str, Any]:
    return {
        "engine": "vllm",
        "model": "/models/coder",
        "executable": [sys.executable, FAKE_ENGINE],
        "args": ["--max-num-seqs", "4"],
        "env": {"FAKE_GPU_DIR": str(gpu_dir)},
        "memory": "10GiB",
        **settings,
    }


async def status_of(session: aiohttp.ClientSession, url: str, model: str) -> dict[str, Any]:
    async with session.get(url + "/gateway/status") as response:
        data = await response.json()
    found: dict[str, Any] = next(m for m in data["models"] if m["name"] == model)
    return found


async def saturate(
    session: aiohttp.ClientSession, url: str, model: str, seconds: float, counted_after: float
) -> tuple[int, list[int]]:
    """`CLIENTS` clients back to back for `seconds`; the answers completed after
    `counted_after` seconds, and every status."""
    began = time.monotonic()
    statuses: list[int] = []
    counted = 0

    async def client(number: int) -> None:
        nonlocal counted
        while time.monotonic() - began < seconds:
            body = {
                "model": model,
                "messages": [{"role": "user", "content": f"task {number}"}],
                "fake_delay": SERVE_S,
            }
            async with session.post(url + "/v1/chat/completions", json=body) as response:
                await response.read()
                statuses.append(response.status)
            if counted_after <= time.monotonic() - began <= seconds:  # in the window only
                counted += 1

    await asyncio.gather(*(client(n) for n in range(CLIENTS)))
    return counted, statuses


async def test_two_replicas_serve_more_keep_conversations_and_scale_down_cutting_nothing(
    tmp_path: Path, gateway_factory: Any
) -> None:
    gpu_dir = tmp_path / "fake-gpu"
    fake_gpu.create(gpu_dir, {0: 24 * GIB, 1: 24 * GIB})
    gateway = gateway_factory(
        {
            "one": fake_vllm(gpu_dir),
            "two": fake_vllm(gpu_dir, replicas={"max": 2, "target_in_flight": 4}, idle_timeout=1.5),
        },
        gpus=[{"index": 0, "memory": "24GiB"}, {"index": 1, "memory": "24GiB"}],
    )
    url = gateway.url
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        # The same load on each, one after the other; the last 3 s of each are counted (the
        # second engine of `two` starts in its first seconds).
        single, statuses_one = await saturate(session, url, "one", 7.0, 4.0)
        double, statuses_two = await saturate(session, url, "two", 7.0, 4.0)
        assert set(statuses_one) == {200}
        assert set(statuses_two) == {200}  # nothing refused or cut while a replica came
        assert double >= 1.4 * single, (single, double)  # bench/replicas.py measures the ratio
        two = await status_of(session, url, "two")
        assert two["replicas"]["running"] == 2
        assert sorted(e["gpus"][0] for e in two["replicas"]["engines"]) == [0, 1]
        # Each engine has a log of its own; the model's name is its own engine's, as before.
        logs = {}
        for key in ("two", "two#2"):
            number = key.partition("#")[2] or "1"
            async with session.get(url + f"/admin/logs/two?lines=50&replica={number}") as response:
                assert response.status == 200, await response.text()
                logs[key] = await response.json()
            assert logs[key]["model"] == "two"
            assert logs[key]["replica"] == key
            assert logs[key]["replicas"] == ["two", "two#2"]
            assert logs[key]["state"] == "ready"
        # Each file has its own engine's start (its argv names its port), not the other's.
        ports = {e["key"]: e["port"] for e in two["replicas"]["engines"]}
        for key, port in ports.items():
            text = (gateway.state_dir / "logs" / f"{key}.log").read_text()
            other = ports["two#2" if key == "two" else "two"]
            assert f"--port {port}" in text, (key, text[-500:])
            assert f"--port {other}" not in text, (key, text[-500:])

        # Conversations below the target keep their engine (vLLM's prefix cache stays warm).
        async def converse(number: int) -> None:
            messages = [
                {"role": "system", "content": "You review code. " * 30},
                {"role": "user", "content": f"review change {number}"},
            ]
            for turn in range(4):
                body = {"model": "two", "messages": messages, "fake_delay": 0.05}
                async with session.post(url + "/v1/chat/completions", json=body) as response:
                    assert response.status == 200
                messages = [*messages, {"role": "assistant", "content": f"ok {turn}"},
                            {"role": "user", "content": f"next {turn}"}]  # fmt: skip

        before = (await status_of(session, url, "two"))["replicas"]
        await asyncio.gather(*(converse(n) for n in range(6)))
        after = (await status_of(session, url, "two"))["replicas"]
        kept = after["affinity_kept"] - before["affinity_kept"]
        moved = after["affinity_moved"] - before["affinity_moved"]
        assert kept + moved == 6 * 3  # every later turn had a first one before it
        assert kept >= 0.9 * (kept + moved), (kept, moved)

        # A long stream on one engine; the other idles past its timeout and stops.
        stream_body = {
            "model": "two",
            "messages": [{"role": "user", "content": "a long answer"}],
            "stream": True,
            "fake_chunks": 40,
            "fake_chunk_delay": 0.15,
        }
        async with session.post(url + "/v1/chat/completions", json=stream_body) as stream:
            assert stream.status == 200
            deadline = time.monotonic() + 5.5
            while (await status_of(session, url, "two"))["replicas"]["running"] > 1:
                assert time.monotonic() < deadline, "the idle replica was not stopped"
                await asyncio.sleep(0.1)
            text = (await stream.read()).decode()
        assert text.rstrip().endswith("data: [DONE]")
        assert '"error"' not in text
        assert (await status_of(session, url, "two"))["replicas"]["running"] == 1
        async with session.get(url + "/admin/events?recent=500&follow=0") as response:
            raw = await response.text()
    assert '"scale_up"' in raw
    assert '"scale_down"' in raw
    assert max(fake_gpu.peak(gpu_dir).values()) <= 24 * GIB
