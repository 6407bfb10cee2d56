"""LoRA adapters through the gateway, against the test engine's runtime LoRA endpoints.

The test engine stands in for vLLM's `--enable-lora` server with
VLLM_ALLOW_RUNTIME_LORA_UPDATING: `/v1/load_lora_adapter`, `/v1/unload_lora_adapter`, and
adapters listed in `/v1/models` with `parent`. tests/vllm/test_lora_real.py does the same
against real vLLM on CPU. The gateway runs in-process (tests/harness.py serves the app as
`modelyard serve` does) and its engines are the harness's, which answer vLLM's runtime LoRA
endpoints as tests/fake_engine.py does (400 "already been loaded", 404 for an unknown adapter,
adapters listed with `parent`): what is tested is the gateway's records and decisions.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import FAKE_ENGINE
from tests.harness import in_process_gateway

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
BASE_PATH = "/models/SmolLM2-135M-Instruct"


def write_adapter(folder: Path, rank: int = 8, base: str = BASE_PATH, weights: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {
                "r": rank,
                "lora_alpha": 16,
                "base_model_name_or_path": base,
                "target_modules": ["q_proj", "v_proj"],
                "peft_type": "LORA",
            }
        )
    )
    if weights:
        (folder / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    return folder


def lora_model(adapter_dir: Path, **lora: Any) -> dict[str, Any]:
    return {
        "engine": "vllm",
        "model": BASE_PATH,
        # The test engine parses vLLM's command line: for the process-level tests that share
        # this model (test_fuzz_requests, test_openapi); in-process nothing is run.
        "executable": [sys.executable, FAKE_ENGINE],
        "lora": {
            "max_loras": 2,
            "max_cpu_loras": 4,
            "max_rank": 8,
            "adapter_dirs": [str(adapter_dir)],
            "scan_interval": "0.2s",
            **lora,
        },
    }


async def ask(session: aiohttp.ClientSession, url: str, model: str) -> tuple[int, Any]:
    async with session.post(
        url + "/v1/chat/completions", json={"model": model, **CHAT}
    ) as response:
        return response.status, await response.json(content_type=None)


async def get(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as response:
        return await response.json(content_type=None)


async def test_twenty_adapters_cycled_concurrently_on_one_engine(tmp_path):
    adapters = tmp_path / "adapters"
    names = [f"task-{i:02d}" for i in range(20)]
    for name in names:
        write_adapter(adapters / name)
    async with (
        in_process_gateway(tmp_path, {"chat": lora_model(adapters)}) as gateway,
        aiohttp.ClientSession() as session,
    ):
        listing = await get(session, gateway.url + "/v1/models")
        parents = {m["id"]: m["parent"] for m in listing["data"]}
        assert all(parents[name] == "chat" for name in names)
        requests = [names[i % 20] for i in range(80)]
        results = await asyncio.gather(*(ask(session, gateway.url, n) for n in requests))
        for name, (status, body) in zip(requests, results, strict=True):
            assert status == 200, body
            assert body["choices"][0]["message"]["content"] == f"{name} says: hi"
            assert body["model"] == name
        status = gateway.status()["models"][0]
        assert status["starts"] == 1  # one engine, never restarted
        # The gateway's record of loaded adapters is what the engine itself lists.
        engine_models = await get(session, gateway.url + "/upstream/chat/v1/models")
        on_engine = {m["id"] for m in engine_models["data"] if m["parent"]}
        record = await get(session, gateway.url + "/admin/adapters")
        loaded = {a["name"] for a in record["adapters"] if a["state"] == "loaded"}
        assert loaded == on_engine
        assert len(loaded) <= 4  # max_cpu_loras


async def test_concurrent_first_requests_load_an_adapter_once(tmp_path):
    adapters = tmp_path / "adapters"
    write_adapter(adapters / "sql-adapter")
    async with (
        in_process_gateway(tmp_path, {"chat": lora_model(adapters)}) as gateway,
        aiohttp.ClientSession() as session,
    ):
        results = await asyncio.gather(
            *(ask(session, gateway.url, "sql-adapter") for _ in range(20))
        )
        assert [s for s, _ in results] == [200] * 20
        async with session.get(
            gateway.url + "/admin/events?recent=200", timeout=aiohttp.ClientTimeout(total=1.5)
        ) as response:
            text = ""
            try:
                async for line in response.content:
                    text += line.decode()
            except TimeoutError:
                pass
    assert text.count('"kind": "adapter_load"') == 1


async def test_adapter_folders_appear_and_disappear_without_restart(tmp_path):
    adapters = tmp_path / "adapters"
    write_adapter(adapters / "email-adapter")
    async with (
        in_process_gateway(tmp_path, {"chat": lora_model(adapters)}) as gateway,
        aiohttp.ClientSession() as session,
    ):
        assert (await ask(session, gateway.url, "email-adapter"))[0] == 200
        write_adapter(adapters / "new-adapter")
        for _ in range(50):
            ids = {m["id"] for m in (await get(session, gateway.url + "/v1/models"))["data"]}
            if "new-adapter" in ids:
                break
            await asyncio.sleep(0.1)
        assert "new-adapter" in ids
        status, body = await ask(session, gateway.url, "new-adapter")
        assert status == 200
        assert body["choices"][0]["message"]["content"] == "new-adapter says: hi"
        shutil.rmtree(adapters / "email-adapter")
        for _ in range(50):
            ids = {m["id"] for m in (await get(session, gateway.url + "/v1/models"))["data"]}
            if "email-adapter" not in ids:
                break
            await asyncio.sleep(0.1)
        assert "email-adapter" not in ids
        status, body = await ask(session, gateway.url, "email-adapter")
        assert status == 404
        # Unloaded from the engine too, so the gateway's record and the engine agree.
        for _ in range(50):
            engine = await get(session, gateway.url + "/upstream/chat/v1/models")
            if "email-adapter" not in {m["id"] for m in engine["data"]}:
                break
            await asyncio.sleep(0.1)
        assert {m["id"] for m in engine["data"] if m["parent"]} == {"new-adapter"}
    assert gateway.status()["models"][0]["starts"] == 1


async def test_bad_adapters_get_clear_errors_and_do_not_disturb_the_engine(tmp_path):
    adapters = tmp_path / "adapters"
    write_adapter(adapters / "good")
    write_adapter(adapters / "too-big", rank=16)
    write_adapter(adapters / "other-base", base="/models/Llama-3.1-8B")
    write_adapter(adapters / "no-weights", weights=False)
    async with (
        in_process_gateway(tmp_path, {"chat": lora_model(adapters)}) as gateway,
        aiohttp.ClientSession() as session,
    ):
        # Refused before anything starts.
        status, body = await ask(session, gateway.url, "too-big")
        assert status == 400
        assert "rank 16, above the base model's max_rank 8" in body["error"]["message"]
        assert gateway.model_state("chat") == "stopped"
        assert (await ask(session, gateway.url, "good"))[0] == 200
        pid = gateway.status()["models"][0]["pid"]
        status, body = await ask(session, gateway.url, "other-base")
        assert status == 400
        assert "was trained on '/models/Llama-3.1-8B'" in body["error"]["message"]
        status, body = await ask(session, gateway.url, "no-weights")
        assert status == 404
        assert "adapter_model.safetensors" in body["error"]["message"]
        for name in ("../etc/passwd", "good/../../x", "x\\y"):
            status, body = await ask(session, gateway.url, name)
            assert status == 404, name
            assert body["error"]["code"] == "model_not_found"
        # The engine kept serving: same process, other adapters fine.
        assert (await ask(session, gateway.url, "good"))[0] == 200
        assert gateway.status()["models"][0]["pid"] == pid
        listed = {m["id"] for m in (await get(session, gateway.url + "/v1/models"))["data"]}
        assert listed == {"chat", "good"}
        record = await get(session, gateway.url + "/admin/adapters")
        problems = {a["name"]: a["problem"] for a in record["adapters"]}
        assert problems["good"] is None
        assert all(problems[n] for n in ("too-big", "other-base", "no-weights"))


async def test_adapters_come_back_after_an_engine_restart(tmp_path):
    adapters = tmp_path / "adapters"
    write_adapter(adapters / "sql-adapter")
    async with (
        in_process_gateway(tmp_path, {"chat": lora_model(adapters)}) as gateway,
        aiohttp.ClientSession() as session,
    ):
        assert (await ask(session, gateway.url, "sql-adapter"))[0] == 200
        async with session.post(gateway.url + "/admin/models/chat/unload") as response:
            assert response.status == 200
        status, body = await ask(session, gateway.url, "sql-adapter")
        assert status == 200, body
        engine_models = await get(session, gateway.url + "/upstream/chat/v1/models")
        assert "sql-adapter" in {m["id"] for m in engine_models["data"]}
        # Manual unload and load through the admin API.
        async with session.post(gateway.url + "/admin/adapters/sql-adapter/unload") as response:
            assert response.status == 200
        engine_models = await get(session, gateway.url + "/upstream/chat/v1/models")
        assert "sql-adapter" not in {m["id"] for m in engine_models["data"]}
        async with session.post(gateway.url + "/admin/adapters/sql-adapter/load") as response:
            assert response.status == 200
        engine_models = await get(session, gateway.url + "/upstream/chat/v1/models")
        assert "sql-adapter" in {m["id"] for m in engine_models["data"]}
    assert gateway.status()["models"][0]["starts"] == 2


def test_adapter_may_not_shadow_a_model_name():
    import pytest

    from modelyard.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as error:
        parse_config(
            {
                "models": {
                    "chat": {"model": "/m", "lora": {"adapters": {"coder": "/a"}}},
                    "coder": {"model": "/c"},
                }
            }
        )
    assert "name 'coder' is used by both" in str(error.value)
