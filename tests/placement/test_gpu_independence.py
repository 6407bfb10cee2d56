"""Issue 22: slow work for one GPU never holds a decision for another, end to end.

Two 24 GiB GPUs. `a` runs on GPU 0; a request for `b` (GPU 0, needs `a`'s room) starts an
eviction that takes seconds: `a`'s engine takes 4 s to exit (vLLM on a GPU takes seconds to
free its CUDA memory), or 4 s to go to sleep, or its memory takes 4 s to come back after it
exited. Half a second later a request for `c` comes, which fits on the free GPU 1 and starts
in 0.5 s. It must be served in about that, not after the eviction (the scheduler once carried
out evictions while it held its one decision lock: `c` took 11.1 s instead of 2 s).

The test engines stand for vLLM's slow exit, sleep, wake and memory return (tests/harness.py's
`Behaviour.exit_after` / `sleep_after`; a declared inventory that sees the process's memory
for seconds after it exited).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from modelyard.config import parse_config
from modelyard.observability.events import EventBus
from modelyard.placement.coordinator import PlacementCoordinator
from modelyard.placement.footprints import FootprintStore
from modelyard.placement.inventory import DeclaredGpu, DeclaredInventory
from modelyard.scheduler.scheduler import Scheduler
from tests.fakes import FakeRuntime, FakeSleep
from tests.harness import Behaviour, in_process_gateway, timed_chat, vllm_on_gpu

pytestmark = pytest.mark.slow

GIB = 1024**3
SLOW = 4.0  # the eviction's slow part
TWO_GPUS = {"gpus": [{"index": 0, "memory": "24GiB"}, {"index": 1, "memory": "24GiB"}]}


async def slow_eviction_then_other_gpu(
    tmp_path: Path, a: Behaviour, a_settings: dict[str, Any]
) -> tuple[tuple[int, float], tuple[int, float]]:
    """`b` evicts `a` on GPU 0 (slowly); `c` asks for GPU 1 half a second later."""
    async with (
        in_process_gateway(
            tmp_path,
            {
                "a": vllm_on_gpu("20GiB", 0, **a_settings),
                "b": vllm_on_gpu("20GiB", 0),
                "c": vllm_on_gpu("10GiB", 1),
            },
            {"a": a, "c": Behaviour(ready_after=0.5)},
            **TWO_GPUS,
        ) as gateway,
        aiohttp.ClientSession() as session,
    ):
        assert (await timed_chat(session, gateway.url, "a"))[0] == 200
        for_b = asyncio.ensure_future(timed_chat(session, gateway.url, "b"))
        await asyncio.sleep(0.5)
        c = await timed_chat(session, gateway.url, "c")
        b = await for_b
    return b, c


async def test_a_slow_stop_on_gpu_0_does_not_hold_a_start_on_gpu_1(tmp_path: Path) -> None:
    b, c = await slow_eviction_then_other_gpu(tmp_path, Behaviour(exit_after=SLOW), {})
    assert c[0] == 200, c
    assert c[1] < 2.0, c  # its own 0.5 s start, not the 4 s stop
    assert b[0] == 200, b
    assert b[1] >= SLOW, b  # b did wait for a's memory


async def test_a_slow_sleep_on_gpu_0_does_not_hold_a_start_on_gpu_1(tmp_path: Path) -> None:
    b, c = await slow_eviction_then_other_gpu(
        tmp_path, Behaviour(sleep_after=SLOW, sleep_mode=True), {"sleep": 1}
    )
    assert c[0] == 200, c
    assert c[1] < 2.0, c
    assert b[0] == 200, b
    assert b[1] >= SLOW, b


async def test_a_slow_memory_return_on_gpu_0_does_not_hold_a_start_on_gpu_1(
    tmp_path: Path,
) -> None:
    # The scheduler in-process, on a declared inventory that measures processes: `a`'s
    # memory shows as used until SLOW seconds after its process exited (NVML reports a dead
    # process's memory until the driver has freed it).
    gone_at: dict[int, float] = {}

    def alive(pid: int) -> bool:
        return time.monotonic() < gone_at.get(pid, float("inf"))

    config = parse_config(
        {
            "models": {
                "a": {
                    "engine": "command",
                    "command": ["x", "{port}"],
                    "memory": "20GiB",
                    "gpus": [0],
                },
                "b": {
                    "engine": "command",
                    "command": ["x", "{port}"],
                    "memory": "20GiB",
                    "gpus": [0],
                },
                "c": {
                    "engine": "command",
                    "command": ["x", "{port}"],
                    "memory": "10GiB",
                    "gpus": [1],
                },
            },
            **TWO_GPUS,
        }
    )
    inventory = DeclaredInventory(
        [DeclaredGpu(0, 24 * GIB), DeclaredGpu(1, 24 * GIB)],
        tree=lambda pid: [pid],
        alive=alive,
    )
    events = EventBus()
    placement = PlacementCoordinator(
        config, inventory, FootprintStore(tmp_path), events, measures_processes=True
    )
    runtime = FakeRuntime()
    scheduler = Scheduler(config, runtime, events, placement=placement, sleep_control=FakeSleep())
    async with scheduler.engine_for("a"):
        pass
    (engine_a,) = runtime.of("a")
    inventory.set_process_memory(engine_a.pid, {0: 20 * GIB})
    real_stop = engine_a.stop

    async def stop_and_linger(grace: float) -> int | None:
        code = await real_stop(grace)
        gone_at[engine_a.pid] = time.monotonic() + SLOW
        return code

    engine_a.stop = stop_and_linger  # type: ignore[method-assign]

    async def served(name: str) -> float:
        began = time.monotonic()
        async with scheduler.engine_for(name):
            return time.monotonic() - began

    for_b = asyncio.ensure_future(served("b"))
    await asyncio.sleep(0.5)
    c_took = await served("c")
    b_took = await for_b
    await scheduler.shutdown(1.0)
    # A fake start is instant: nothing but the decision (held behind the eviction: ~3.5 s).
    assert c_took < SLOW / 2, c_took
    assert b_took >= SLOW - 0.2, b_took  # b waited for the memory to come back


async def test_a_slow_wake_on_gpu_0_does_not_hold_a_start_on_gpu_1(tmp_path: Path) -> None:
    # The wake itself is the slow work (vLLM moves the weights back: 1-3 s, more for big ones).
    async with (
        in_process_gateway(
            tmp_path,
            {"a": vllm_on_gpu("20GiB", 0, sleep=1), "c": vllm_on_gpu("10GiB", 1)},
            {"a": Behaviour(wake_after=SLOW, sleep_mode=True), "c": Behaviour(ready_after=0.5)},
            **TWO_GPUS,
        ) as gateway,
        aiohttp.ClientSession() as session,
    ):
        assert (await timed_chat(session, gateway.url, "a"))[0] == 200
        await gateway.gateway.scheduler.sleep("a", 1, "test")
        for_a = asyncio.ensure_future(timed_chat(session, gateway.url, "a"))
        await asyncio.sleep(0.5)
        c = await timed_chat(session, gateway.url, "c")
        a = await for_a
    assert c[0] == 200, c
    assert c[1] < 2.0, c
    assert a[0] == 200, a
    assert a[1] >= SLOW, a
