"""Dozens of LoRA adapters behind one real vLLM engine (SmolLM2 on CPU), through the gateway.

The same scenarios as tests/lora/test_lora_gateway.py, against vLLM itself: adapters made with
peft (random weights, so each changes the output), loaded at run time through
`/v1/load_lora_adapter`. One gateway and one engine start serve the whole module; the tests
run in order and the last ones check that the engine was never restarted.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from modelyard.demo import DemoSetup
from tests.conftest import RunningGateway
from tests.vllm.support import (
    ProcessWatch,
    cached_adapters,
    copy_adapter,
    demo_document,
    engine_turn,
    start_demo_gateway,
    stop_gateway,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

COUNT = 20
NAMES = [f"lora-{index:02d}" for index in range(1, COUNT + 2)]  # lora-21 appears later
TIMEOUT = aiohttp.ClientTimeout(total=300)  # the first request waits for a cold start
QUESTION = [{"role": "user", "content": "Write a SQL query that lists all users."}]


class Yard:
    """What the tests share: the gateway, its adapter folder and the engine's first pid."""

    def __init__(self, gateway: RunningGateway, folder: Path, spare: Path) -> None:
        self.gateway = gateway
        self.folder = folder
        self.spare = spare  # lora-21, copied in by a test
        self.pid: int | None = None


@pytest.fixture(scope="module")
def yard(demo: DemoSetup, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Yard]:
    good = cached_adapters(demo, [*NAMES, "too-big"], rank_for={"too-big": 16})
    (gemma,) = cached_adapters(demo, ["for-gemma"], base=demo.coder_model).values()
    root = tmp_path_factory.mktemp("lora-real")
    folder = root / "adapters"
    folder.mkdir()
    for name in [*NAMES[:COUNT], "too-big"]:
        copy_adapter(good[name], folder)
    copy_adapter(gemma, folder)
    no_weights = folder / "no-weights"
    no_weights.mkdir()
    shutil.copy(good["lora-01"] / "adapter_config.json", no_weights)
    broken = folder / "broken-weights"  # passes the gateway's checks; the engine refuses it
    broken.mkdir()
    shutil.copy(good["lora-01"] / "adapter_config.json", broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")

    document = demo_document(demo)
    chat = document["models"]["chat"]
    chat.pop("idle_timeout", None)
    chat["lora"] = {
        "max_loras": 2,
        "max_cpu_loras": 4,
        "max_rank": 8,
        "adapter_dirs": [str(folder)],
        # The same files as lora-01, given on the engine's command line (--lora-modules).
        "adapters": {"twin-static": str(folder / "lora-01")},
        "scan_interval": "0.5s",
    }
    document["models"] = {"chat": chat}
    document.pop("groups", None)
    watch = ProcessWatch()
    with engine_turn():
        gateway = start_demo_gateway(root / "gateway", demo, document)
        try:
            yield Yard(gateway, folder, good["lora-21"])
        finally:
            stop_gateway(gateway, watch)


async def chat(
    session: aiohttp.ClientSession, url: str, model: str, max_tokens: int = 16
) -> tuple[int, Any]:
    body = {"model": model, "messages": QUESTION, "max_tokens": max_tokens, "temperature": 0}
    async with session.post(url + "/v1/chat/completions", json=body, timeout=TIMEOUT) as reply:
        return reply.status, await reply.json(content_type=None)


async def answer(session: aiohttp.ClientSession, url: str, model: str) -> str:
    status, body = await chat(session, url, model)
    assert status == 200, body
    assert body["model"] == model
    return str(body["choices"][0]["message"]["content"])


async def get(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url, timeout=TIMEOUT) as reply:
        assert reply.status == 200, await reply.text()
        return await reply.json(content_type=None)


async def listed(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    return {m["id"]: m for m in (await get(session, url + "/v1/models"))["data"]}


async def on_engine(session: aiohttp.ClientSession, url: str) -> set[str]:
    """The adapters the engine itself lists (its own /v1/models, through /upstream)."""
    engine = await get(session, url + "/upstream/chat/v1/models")
    return {m["id"] for m in engine["data"] if m.get("parent")}


async def adapter_record(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    return {a["name"]: a for a in (await get(session, url + "/admin/adapters"))["adapters"]}


def chat_status(yard: Yard) -> dict[str, Any]:
    return dict(yard.gateway.status()["models"][0])


async def assert_refused(session: aiohttp.ClientSession, url: str) -> None:
    """The bad adapters' answers: clear, and decided by the gateway's checks."""
    status, body = await chat(session, url, "too-big")
    assert status == 400, body
    assert "rank 16, above the base model's max_rank 8" in body["error"]["message"]
    status, body = await chat(session, url, "for-gemma")
    assert status == 400, body
    assert "was trained on" in body["error"]["message"]
    assert "gemma3-270m" in body["error"]["message"]
    status, body = await chat(session, url, "no-weights")
    assert status == 404, body
    assert "adapter_model.safetensors" in body["error"]["message"]


async def test_bad_adapters_are_refused_before_any_engine_starts(yard: Yard):
    url = yard.gateway.url
    async with aiohttp.ClientSession() as session:
        models = await listed(session, url)
        adapters = {name for name, m in models.items() if m["parent"] == "chat"}
        assert adapters == {*NAMES[:COUNT], "twin-static", "broken-weights"}
        await assert_refused(session, url)
        record = await adapter_record(session, url)
    assert all(record[name]["problem"] for name in ("too-big", "for-gemma", "no-weights"))
    assert (chat_status(yard)["state"], chat_status(yard)["starts"]) == ("stopped", 0)


async def test_an_adapter_answers_the_same_loaded_statically_or_at_run_time(yard: Yard):
    url = yard.gateway.url
    async with aiohttp.ClientSession() as session:
        base = await answer(session, url, "chat")
        yard.pid = chat_status(yard)["pid"]
        static = await answer(session, url, "twin-static")  # from --lora-modules
        assert "lora-01" not in await on_engine(session, url)
        runtime = await answer(session, url, "lora-01")  # /v1/load_lora_adapter, same files
        assert {"twin-static", "lora-01"} <= await on_engine(session, url)
        record = await adapter_record(session, url)
    assert base
    assert static
    assert static != base
    assert runtime == static
    assert record["twin-static"]["static"]
    assert not record["lora-01"]["static"]


async def test_twenty_adapters_cycled_concurrently_on_one_engine(yard: Yard):
    url = yard.gateway.url
    wanted = [NAMES[index % COUNT] for index in range(2 * COUNT)]
    limit = asyncio.Semaphore(8)

    async def one(session: aiohttp.ClientSession, name: str) -> tuple[int, Any]:
        async with limit:
            return await chat(session, url, name, max_tokens=6)

    async with aiohttp.ClientSession() as session:
        began = time.monotonic()
        results = await asyncio.gather(*(one(session, name) for name in wanted))
        took = time.monotonic() - began
        texts = {}
        for name, (status, body) in zip(wanted, results, strict=True):
            assert status == 200, (name, body)
            assert body["model"] == name
            texts[name] = body["choices"][0]["message"]["content"]
            assert texts[name]
        print(f"{len(wanted)} requests over {COUNT} adapters in {took:.1f} s")
    assert len(set(texts.values())) > 1  # different adapters, different answers
    status = chat_status(yard)
    assert (status["starts"], status["pid"], status["crashes"]) == (1, yard.pid, 0)


async def test_the_gateway_record_matches_the_engine(yard: Yard):
    url = yard.gateway.url
    async with aiohttp.ClientSession() as session:
        record = await adapter_record(session, url)
        loaded = {name for name, a in record.items() if a["state"] == "loaded"}
        assert loaded == await on_engine(session, url)
    assert 1 <= len(loaded) <= 4  # max_cpu_loras


async def wait_listing(session: aiohttp.ClientSession, url: str, name: str, present: bool) -> None:
    deadline = time.monotonic() + 15
    while (name in await listed(session, url)) != present:
        assert time.monotonic() < deadline, f"{name} {'never appeared' if present else 'stayed'}"
        await asyncio.sleep(0.2)


async def test_a_new_folder_is_served_and_a_removed_one_disappears(yard: Yard):
    url = yard.gateway.url
    async with aiohttp.ClientSession() as session:
        assert "lora-21" not in await listed(session, url)
        copy_adapter(yard.spare, yard.folder)
        await wait_listing(session, url, "lora-21", present=True)
        assert await answer(session, url, "lora-21")
        assert "lora-21" in await on_engine(session, url)

        shutil.rmtree(yard.folder / "lora-21")
        await wait_listing(session, url, "lora-21", present=False)
        status, body = await chat(session, url, "lora-21")
        assert status == 404, body
        # Gone from the engine too: the gateway's record and the engine still agree.
        record = await adapter_record(session, url)
        loaded = {name for name, a in record.items() if a["state"] == "loaded"}
        assert "lora-21" not in await on_engine(session, url)
        assert loaded == await on_engine(session, url)
    assert chat_status(yard)["starts"] == 1


async def test_bad_adapters_leave_the_engine_serving(yard: Yard):
    url = yard.gateway.url
    async with aiohttp.ClientSession() as session:
        await assert_refused(session, url)
        # Passes the gateway's checks; vLLM refuses the weights: a clear error, no crash.
        status, body = await chat(session, url, "broken-weights")
        assert status in (400, 502), body
        assert "the engine refused adapter 'broken-weights'" in body["error"]["message"]
        assert await answer(session, url, "lora-02")
        assert await answer(session, url, "chat")
        assert "broken-weights" not in await on_engine(session, url)
        events = await get(session, url + "/admin/events?follow=0&recent=500")
    status = chat_status(yard)
    assert (status["state"], status["pid"], status["starts"]) == ("ready", yard.pid, 1)
    failed = [e for e in events["events"] if e["kind"] == "adapter_load_failed"]
    assert [e["data"]["adapter"] for e in failed] == ["broken-weights"]
    print(json.dumps(failed[-1]["reason"])[:300])
