"""GPU placement end to end: the gateway in-process (tests/harness.py) on a declared GPU, test
engines on a simulated one.

The test engines run as `engine: vllm` (they accept vLLM's command line), so the gateway sets
`--gpu-memory-utilization` and CUDA_VISIBLE_DEVICES itself. Each engine claims that memory on
a simulated GPU (tests/fake_gpu.py) and dies with "CUDA out of memory" when it does not fit,
as a real one does: if the gateway's accounting were wrong, the engines would fail.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests import fake_gpu
from tests.conftest import FAKE_ENGINE
from tests.harness import in_process_gateway

GIB = 1024**3
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def gpu(tmp_path: Path) -> Path:
    directory = tmp_path / "fake-gpu"
    fake_gpu.create(directory, {0: 24 * GIB})
    return directory


def vllm_like(
    served: str, gpu_dir: Path, memory: str, *extra: str, **settings: Any
) -> dict[str, Any]:
    return {
        "engine": "vllm",
        "model": f"/models/{served}",
        "executable": [sys.executable, FAKE_ENGINE],
        "args": list(extra),
        "env": {"FAKE_GPU_DIR": str(gpu_dir)},
        "memory": memory,
        **settings,
    }


def declared(gpu_dir: Path) -> dict[str, Any]:
    return {"gpus": [{"index": 0, "memory": "24GiB"}]}


async def ask(
    session: aiohttp.ClientSession, url: str, model: str, **extra: Any
) -> tuple[int, Any]:
    async with session.post(
        url + "/v1/chat/completions", json={"model": model, **CHAT, **extra}
    ) as response:
        return response.status, await response.json(content_type=None)


async def events(url: str) -> list[dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            url + "/admin/events?recent=500", timeout=aiohttp.ClientTimeout(total=2)
        ) as response,
    ):
        found = []
        try:
            async for line in response.content:
                if line.startswith(b"data: "):
                    import json

                    found.append(json.loads(line[6:]))
        except TimeoutError:
            pass
        return found


async def test_three_models_that_do_not_fit_evict_the_right_one(tmp_path: Path, gpu: Path) -> None:
    async with in_process_gateway(
        tmp_path,
        {
            # a takes long to start; b is quick to bring back.
            "a": vllm_like("a", gpu, "10GiB", "--ready-delay", "1.5"),
            "b": vllm_like("b", gpu, "10GiB"),
            "c": vllm_like("c", gpu, "10GiB"),
        },
        **declared(gpu),
    ) as gateway:
        async with aiohttp.ClientSession() as session:
            assert (await ask(session, gateway.url, "a"))[0] == 200
            assert (await ask(session, gateway.url, "b"))[0] == 200
            assert fake_gpu.used(gpu)[0] == pytest.approx(20 * GIB, rel=0.001)  # side by side
            assert (await ask(session, gateway.url, "c"))[0] == 200
        # Least-recently-used would stop a; both were used seconds ago, so the cost to bring each
        # back decides, and b restarts in a fraction of a's time.
        states = {m["name"]: m["state"] for m in gateway.status()["models"]}
        assert states == {"a": "ready", "b": "stopped", "c": "ready"}
        assert fake_gpu.peak(gpu)[0] <= 24 * GIB  # never over-committed
        evictions = [e for e in await events(gateway.url) if e["kind"] == "evict"]
        assert [(e["model"], e["data"]["for_model"]) for e in evictions] == [("b", "c")]
        gpus = gateway.status()["gpus"]
        assert gpus[0]["planned_bytes"] == 20 * GIB
        assert gpus[0]["models"] == ["a", "c"]


async def test_busy_engine_is_never_evicted_and_its_stream_is_not_cut(
    tmp_path: Path, gpu: Path
) -> None:
    async with in_process_gateway(
        tmp_path,
        {
            "a": vllm_like("a", gpu, "10GiB"),
            "b": vllm_like("b", gpu, "10GiB"),
            "c": vllm_like("c", gpu, "10GiB"),
        },
        **declared(gpu),
    ) as gateway:
        async with aiohttp.ClientSession() as session:
            assert (await ask(session, gateway.url, "b"))[0] == 200
            assert (await ask(session, gateway.url, "a"))[0] == 200
            # b is the least recently used, but it is busy with a long stream.
            body = {
                "model": "b",
                **CHAT,
                "stream": True,
                "fake_chunks": 60,
                "fake_chunk_delay": 0.03,
            }
            async with session.post(gateway.url + "/v1/chat/completions", json=body) as stream:
                while not (await stream.content.readline()).startswith(b"data:"):
                    pass  # past any loading comments: the engine is streaming
                status, _ = await ask(session, gateway.url, "c")
                assert status == 200
                text = (await stream.read()).decode()
            assert text.rstrip().endswith("data: [DONE]")
            assert "error" not in text
        states = {m["name"]: m["state"] for m in gateway.status()["models"]}
        assert states == {"a": "stopped", "b": "ready", "c": "ready"}
        assert fake_gpu.peak(gpu)[0] <= 24 * GIB


async def test_interleaved_requests_lose_nothing(tmp_path: Path, gpu: Path) -> None:
    async with in_process_gateway(
        tmp_path,
        {name: vllm_like(name, gpu, "10GiB", "--ready-delay", "0.2") for name in "abc"},
        **declared(gpu),
    ) as gateway:
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(
                *(ask(session, gateway.url, "abc"[i % 3], fake_delay=0.05) for i in range(30))
            )
        assert [status for status, _ in results] == [200] * 30
        for index, (_, body) in enumerate(results):
            assert body["choices"][0]["message"]["content"] == f"{'abc'[index % 3]} says: hi"
        assert fake_gpu.peak(gpu)[0] <= 24 * GIB


async def test_cold_models_requested_together_start_one_after_the_other(
    tmp_path: Path, gpu: Path
) -> None:
    async with in_process_gateway(
        tmp_path,
        {
            "a": vllm_like("a", gpu, "8GiB", "--ready-delay", "0.5"),
            "b": vllm_like("b", gpu, "8GiB", "--ready-delay", "0.5"),
        },
        **declared(gpu),
    ) as gateway:
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(
                ask(session, gateway.url, "a"), ask(session, gateway.url, "b")
            )
        assert [status for status, _ in results] == [200, 200]
        timeline = [
            (e["kind"], e["model"], e["time"])
            for e in await events(gateway.url)
            if e["kind"] in ("placed", "ready")
        ]
        kinds = [(kind, model) for kind, model, _ in timeline]
        first = kinds[0][1]
        second = "b" if first == "a" else "a"
        # The second engine is placed (and so started) only after the first one is ready.
        assert kinds == [("placed", first), ("ready", first), ("placed", second), ("ready", second)]


async def test_sleep_then_wake_and_first_request_after_wake_succeeds(
    tmp_path: Path, gpu: Path
) -> None:
    async with in_process_gateway(
        tmp_path,
        {
            "s": vllm_like("s", gpu, "12GiB", sleep=1, idle_timeout="1s"),
        },
        **declared(gpu),
    ) as gateway:
        async with aiohttp.ClientSession() as session:
            assert (await ask(session, gateway.url, "s"))[0] == 200
            assert fake_gpu.used(gpu)[0] == pytest.approx(12 * GIB, rel=0.001)
            await gateway.wait_state("s", "sleeping", timeout=10)
            # A sleeping engine keeps a little memory (here 5 %), not its whole footprint.
            assert fake_gpu.used(gpu)[0] < 1 * GIB
            status, body = await ask(session, gateway.url, "s")
            assert status == 200
            assert body["choices"][0]["message"]["content"] == "s says: hi"
        kinds = [e["kind"] for e in await events(gateway.url) if e["model"] == "s"]
        # (It may fall asleep again after its idle timeout once the test is done with it.)
        assert kinds[:5] == ["placed", "start", "ready", "sleep", "wake"]
        assert gateway.status()["models"][0]["starts"] == 1  # woken, not restarted


async def test_sleeping_engine_makes_room_for_another(tmp_path: Path, gpu: Path) -> None:
    async with in_process_gateway(
        tmp_path,
        {
            "s": vllm_like("s", gpu, "14GiB", sleep=1),
            "t": vllm_like("t", gpu, "14GiB"),
        },
        **declared(gpu),
    ) as gateway:
        async with aiohttp.ClientSession() as session:
            assert (await ask(session, gateway.url, "s"))[0] == 200
            assert (await ask(session, gateway.url, "t"))[0] == 200  # s is put to sleep for t
            states = {m["name"]: m["state"] for m in gateway.status()["models"]}
            assert states == {"s": "sleeping", "t": "ready"}
            assert (await ask(session, gateway.url, "s"))[0] == 200  # t makes room, s wakes
        assert fake_gpu.peak(gpu)[0] <= 24 * GIB


async def test_out_of_memory_start_evicts_more_and_retries_once(tmp_path: Path, gpu: Path) -> None:
    async with in_process_gateway(
        tmp_path,
        {
            "big": vllm_like("big", gpu, "12GiB"),
            # Its hint says 4 GiB, but its weights need 14 GiB whatever budget it gets.
            "liar": vllm_like("liar", gpu, "4GiB", "--fake-min-bytes", str(14 * GIB)),
        },
        **declared(gpu),
    ) as gateway:
        async with aiohttp.ClientSession() as session:
            assert (await ask(session, gateway.url, "big"))[0] == 200
            status, body = await ask(session, gateway.url, "liar")
            assert status == 200, body
        kinds = [e["kind"] for e in await events(gateway.url)]
        assert "oom_retry" in kinds
        assert {m["name"]: m["state"] for m in gateway.status()["models"]}["big"] == "stopped"


async def test_model_larger_than_the_gpu_is_refused_clearly(tmp_path: Path, gpu: Path) -> None:
    async with in_process_gateway(
        tmp_path, {"huge": vllm_like("huge", gpu, "40GiB")}, **declared(gpu)
    ) as gateway:
        async with aiohttp.ClientSession() as session:
            status, body = await ask(session, gateway.url, "huge")
        # Refused at once (no start, no wait), as a refusal, not as an engine failure.
        assert status == 503
        assert body["error"]["code"] == "model_cannot_fit"
        assert "can never be placed" in body["error"]["message"]
        assert "24.0 GiB" in body["error"]["message"]
        state = {m["name"]: m for m in gateway.status()["models"]}["huge"]
        assert state["state"] == "stopped"
        assert state["failure"] is None
        assert state["starts"] == 0


async def test_engine_gets_its_budget_and_gpu(tmp_path: Path, gpu: Path) -> None:
    async with in_process_gateway(
        tmp_path, {"a": vllm_like("a", gpu, "6GiB")}, **declared(gpu)
    ) as gateway:
        async with aiohttp.ClientSession() as session:
            assert (await ask(session, gateway.url, "a"))[0] == 200
            port = gateway.status()["models"][0]["port"]
            async with session.get(f"http://127.0.0.1:{port}/fake/seen") as response:
                seen = await response.json()
        argv = seen["argv"]
        assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.2500"
        assert seen["cuda_visible_devices"] == "0"
        assert fake_gpu.used(gpu)[0] == pytest.approx(6 * GIB, rel=0.01)
