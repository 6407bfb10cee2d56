"""Adapters loaded and unloaded in bursts: the gateway's view changes only when the engine's
answer has come back (issue 11, defect 3), in-process (tests/harness.py).

The engine takes its time to answer an unload, as a real vLLM busy with a batch does. Once,
the gateway dropped the adapter from its list before asking; a request reloaded it ("already
been loaded", taken as success), then the late unload removed it on the engine: the gateway
believed it loaded, the engine did not, and every request for it got the engine's 404.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from tests.harness import Behaviour, in_process_gateway
from tests.lora.test_lora_gateway import BASE_PATH, write_adapter

ADAPTERS = ["a1", "a2", "a3", "a4"]


def base_model(adapter_dir: Path) -> dict[str, object]:
    return {
        "engine": "vllm",
        "model": BASE_PATH,
        "executable": ["vllm"],
        "lora": {
            "max_loras": 2,
            "max_cpu_loras": 2,
            "max_rank": 8,
            "adapter_dirs": [str(adapter_dir)],
        },
    }


async def test_bursts_over_a_small_adapter_cache_are_all_served(tmp_path: Path) -> None:
    adapter_dir = tmp_path / "adapters"
    for name in ADAPTERS:
        write_adapter(adapter_dir / name)
    behaviours = {"base": Behaviour(unload_delay=0.15)}
    async with in_process_gateway(
        tmp_path, {"base": base_model(adapter_dir)}, behaviours
    ) as harness:
        rng = random.Random(3)
        for _burst in range(8):
            wanted = [rng.choice(ADAPTERS) for _ in range(rng.randint(2, 6))]
            answers = await asyncio.wait_for(
                asyncio.gather(*(harness.chat(name) for name in wanted)), 10
            )
            assert [status for status, _, _ in answers] == [200] * len(wanted), answers
        (engine,) = harness.runtime.of("base")
        manager = harness.gateway.lora
        assert manager is not None
        # The gateway's record is what the engine holds.
        assert set(manager.loaded_in("base")) == engine.state.loras
        assert len(engine.state.loras) <= 2


async def test_a_request_for_an_adapter_being_unloaded_waits_for_the_answer(
    tmp_path: Path,
) -> None:
    adapter_dir = tmp_path / "adapters"
    for name in ADAPTERS[:3]:
        write_adapter(adapter_dir / name)
    behaviours = {"base": Behaviour(unload_delay=0.3)}
    async with in_process_gateway(
        tmp_path, {"base": base_model(adapter_dir)}, behaviours
    ) as harness:
        assert (await harness.chat("a1"))[0] == 200
        assert (await harness.chat("a2"))[0] == 200
        third = asyncio.ensure_future(harness.chat("a3"))  # unloads a1, the least recent
        await asyncio.sleep(0.1)  # the unload of a1 is on its way
        again = asyncio.ensure_future(harness.chat("a1"))
        results = await asyncio.gather(third, again)
        assert [status for status, _, _ in results] == [200, 200], results
        (engine,) = harness.runtime.of("base")
        assert "a1" in engine.state.loras
        assert set(harness.gateway.lora.loaded_in("base")) == engine.state.loras  # type: ignore[union-attr]
        # And it keeps working: every later request for it is served.
        for _ in range(3):
            assert (await harness.chat("a1"))[0] == 200
