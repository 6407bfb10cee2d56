"""Replicas through the real gateway, in-process (tests/harness.py): the scale-up timer, the
choice of engine per request, status, metrics and events.

The engines are the harness's in-process stand-ins for vLLM with `--max-num-seqs 4`: they
serve at most 4 requests at once and queue the rest, as vLLM's scheduler does with its
batch limit, and their LoRA routes answer as vLLM's do. Without managed GPUs each engine
gets a boundless GPU of its own (memory is the process-runtime test's part).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.harness import Harness, engine_model, in_process_gateway
from tests.lora.test_lora_gateway import BASE_PATH, write_adapter

BATCH_OF_4 = ["--max-num-seqs", "4"]


def coder(**settings: Any) -> dict[str, Any]:
    model = engine_model(replicas={"max": 2, "target_in_flight": 4}, **settings)
    model["command"] = [*model["command"], *BATCH_OF_4]
    return model


async def saturate_until_two(harness: Harness, model: str = "coder") -> None:
    """Twelve slow requests at once for one engine aiming at four: a second one comes."""
    load = [
        asyncio.ensure_future(harness.chat(model, fake_delay=1.6, user=f"load-{i}"))
        for i in range(12)
    ]
    deadline = time.monotonic() + 10
    while replicas(harness, model)["running"] < 2:
        assert time.monotonic() < deadline, replicas(harness, model)
        await asyncio.sleep(0.05)
    assert [status for status, _, _ in await asyncio.gather(*load)] == [200] * 12
    await wait_ready_engines(harness, model, 2)


def replicas(harness: Harness, model: str = "coder") -> dict[str, Any]:
    status = harness.gateway.model_status(model)["replicas"]
    assert isinstance(status, dict)
    return status


async def wait_ready_engines(harness: Harness, model: str, count: int) -> None:
    deadline = time.monotonic() + 10
    while sum(e["state"] == "ready" for e in replicas(harness, model)["engines"]) < count:
        assert time.monotonic() < deadline, replicas(harness, model)
        await asyncio.sleep(0.05)


def opening(conversation: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "You are a careful reviewer. " * 40},
        {"role": "user", "content": f"Review pull request {conversation}"},
    ]


async def test_overload_adds_a_replica_and_conversations_keep_theirs(tmp_path: Path) -> None:
    async with in_process_gateway(tmp_path, {"coder": coder()}) as harness:
        await saturate_until_two(harness)
        events = [e for e in harness.gateway.events.recent(200) if e.kind == "scale_up"]
        assert [(e.model, e.data["replica"]) for e in events] == [("coder", "coder#2")]
        assert "above 4 each" in events[0].reason

        # Six conversations of five turns each, below the target: each grows, its opening
        # (system prompt and first user message) stays, so its prefix is cached where it went.
        async def converse(number: int) -> None:
            messages = opening(number)
            for turn in range(5):
                status, data, _ = await harness.chat("coder", messages=messages, fake_delay=0.05)
                assert status == 200, data
                messages = [
                    *messages,
                    {"role": "assistant", "content": f"answer {turn}"},
                    {"role": "user", "content": f"and then {turn}?"},
                ]

        await asyncio.gather(*(converse(n) for n in range(6)))
        engines = harness.runtime.of("coder")
        assert len(engines) == 2
        # Each conversation's requests reached one engine (seen from the engines' side).
        where: dict[str, set[int]] = {}
        for engine in engines:
            for seen in engine.state.received:
                if seen["path"] != "/v1/chat/completions":
                    continue
                messages = json.loads(seen["body"]).get("messages") or []
                if len(messages) >= 2 and str(messages[1]["content"]).startswith("Review"):
                    where.setdefault(messages[1]["content"], set()).add(engine.number)
        assert len(where) == 6
        assert all(len(numbers) == 1 for numbers in where.values()), where
        # Both engines served some of them (least outstanding for a new conversation).
        assert len({n for numbers in where.values() for n in numbers}) == 2
        status = replicas(harness)
        assert status["affinity_kept"] >= 0.9 * (status["affinity_kept"] + status["affinity_moved"])
        assert status["affinity_kept"] >= 24  # 6 conversations x 4 later turns


async def test_status_metrics_and_least_outstanding(tmp_path: Path) -> None:
    async with in_process_gateway(tmp_path, {"coder": coder()}) as harness:
        await saturate_until_two(harness)
        # Eight requests with nothing tying them to an engine: four on each.
        slow = [
            asyncio.ensure_future(harness.chat("coder", fake_delay=0.8, messages=[]))
            for _ in range(8)
        ]
        await asyncio.sleep(0.4)
        status = replicas(harness)
        assert status["running"] == 2
        assert sorted(e["in_flight"] for e in status["engines"]) == [4, 4]
        assert sorted(e["key"] for e in status["engines"]) == ["coder", "coder#2"]
        async with (
            aiohttp.ClientSession() as session,
            session.get(harness.url + "/metrics") as response,
        ):
            text = await response.text()
        assert 'modelyard_model_replicas{model="coder"} 2.0' in text
        assert 'modelyard_replica_in_flight_requests{model="coder",replica="coder#2"} 4.0' in text
        # The engines' own metrics: every replica's, each labelled by its key.
        async with (
            aiohttp.ClientSession() as session,
            session.get(harness.url + "/metrics/engines") as response,
        ):
            engines = await response.text()
        for key in ("coder", "coder#2"):
            assert f'modelyard_engine_metrics_up{{model="coder",replica="{key}"}} 1.0' in engines
            own = [
                line
                for line in engines.splitlines()
                if line.startswith("vllm:")
                and 'model="coder"' in line
                and f'replica="{key}"' in line
            ]
            assert own, engines  # the engine's own samples, labelled by its key
        await asyncio.gather(*slow)


async def test_lora_requests_go_to_the_engine_that_has_the_adapter(tmp_path: Path) -> None:
    adapters = tmp_path / "adapters"
    write_adapter(adapters / "reviewer")
    base = {
        "engine": "vllm",
        "model": BASE_PATH,
        "executable": ["vllm"],
        "args": BATCH_OF_4,
        "replicas": {"max": 2, "target_in_flight": 4},
        "lora": {
            "max_loras": 1,
            "max_cpu_loras": 1,
            "max_rank": 8,
            "adapter_dirs": [str(adapters)],
        },
    }
    async with in_process_gateway(tmp_path, {"base": base}) as harness:
        await saturate_until_two(harness, "base")
        for _ in range(10):  # one at a time: the holder is never above the target
            status, data, _ = await harness.chat("reviewer", messages=[])
            assert status == 200, data
        holders = [e for e in harness.runtime.of("base") if "reviewer" in e.state.loras]
        assert len(holders) == 1  # loaded once, on one engine, and used there every time
        assert harness.gateway.lora is not None
        assert harness.gateway.lora.loaded_in("base") == ["reviewer"]


async def test_hostile_session_headers_are_served(tmp_path: Path) -> None:
    # One engine is enough: the key is read for every request of a model with replicas.
    async with (
        in_process_gateway(tmp_path, {"coder": coder()}) as harness,
        aiohttp.ClientSession() as session,
    ):
        for value in ["x" * 7000, "séance-😀-" * 50, "\t spaced \t", "null"]:
            async with session.post(
                harness.url + "/v1/chat/completions",
                json={"model": "coder", "messages": [{"role": "user", "content": "hi"}]},
                headers={"X-Session-Id": value},
            ) as response:
                assert response.status == 200, await response.text()
        # Raw bytes that are not UTF-8 in the header: still a plain answer.
        reader, writer = await asyncio.open_connection("127.0.0.1", harness.client.server.port)
        body = b'{"model":"coder","messages":[{"role":"user","content":"hi"}]}'
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nX-Session-Id: \xff\xfe\xc3\x28\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


async def test_a_reload_lowering_max_drains_the_extra_engine(tmp_path: Path) -> None:
    from modelyard.config import parse_config

    async with in_process_gateway(tmp_path, {"coder": coder()}) as harness:
        await saturate_until_two(harness)
        # One slow request on each engine (least outstanding: the second goes to coder#2).
        first = asyncio.ensure_future(harness.chat("coder", fake_delay=1.0, messages=[]))
        await asyncio.sleep(0.1)
        second = asyncio.ensure_future(harness.chat("coder", fake_delay=1.0, messages=[]))
        await asyncio.sleep(0.2)
        assert sorted(e["in_flight"] for e in replicas(harness)["engines"]) == [1, 1]
        lowered = coder()
        lowered["replicas"] = {"max": 1}
        config = parse_config(
            {"state_dir": str(tmp_path / "state"), "models": {"coder": lowered}}, "conf.yaml", {}
        )
        harness.gateway._apply(config)
        answers = await asyncio.gather(first, second)
        assert [status for status, _, _ in answers] == [200, 200]  # the drain cut nothing
        await harness.gateway.scheduler.reconfigured()
        assert [e["key"] for e in replicas(harness)["engines"]] == ["coder"]
        stopped = [e for e in harness.runtime.of("coder") if e.process_gone()]
        assert len(stopped) == 1


async def test_a_replica_that_refuses_connections_is_avoided_and_its_requests_resent(
    tmp_path: Path,
) -> None:
    """A replica whose connections are refused while its loss is not declared yet (a node
    that just died): the requests it refused go to the other engine, and the next ones too."""
    limits = {"health_check_interval": "60s", "health_check_failures": 3}
    async with in_process_gateway(tmp_path, {"coder": coder()}, limits=limits) as harness:
        await saturate_until_two(harness)
        second = next(e for e in replicas(harness)["engines"] if e["key"] == "coder#2")
        (dead,) = [e for e in harness.runtime.of("coder") if e.port == second["port"]]
        await dead._server.close()  # its port refuses connections; no exit is reported
        results = await asyncio.gather(
            *(harness.chat("coder", messages=[], fake_delay=0.05) for _ in range(8))
        )
        assert [status for status, _, _ in results] == [200] * 8, results
        later = [await harness.chat("coder", messages=[]) for _ in range(4)]
        assert [status for status, _, _ in later] == [200] * 4, later
        resent = [e for e in harness.gateway.events.recent(200) if e.kind == "resent"]
        # Only requests sent to it before it was avoided were refused, and each was resent.
        assert 1 <= len(resent) <= 8, resent
        assert "another of its engines serves" in resent[0].reason
