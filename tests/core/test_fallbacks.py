"""`fallbacks:` per model: when a model is refused (can never fit, start timeout, crash loop,
remote down), its first fallback that can serve now answers; the answer's `model` field and the
X-Modelyard-Served-By header say which; an event and a metric count it; a fallback evicts
nothing unless `fallback_may_evict` says it may."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp

from tests.harness import Behaviour, Harness, engine_model, in_process_gateway

ONE_GPU = {"gpus": [{"index": 0, "memory": "24GiB"}]}


async def ask(harness: Harness, model: str, **extra: Any) -> tuple[int, dict[str, Any], Any]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    async with (
        aiohttp.ClientSession() as session,
        session.post(harness.url + "/v1/chat/completions", json=body) as response,
    ):
        return response.status, await response.json(content_type=None), response.headers


def fallback_events(harness: Harness) -> list[dict[str, Any]]:
    return [
        event.to_json() for event in harness.gateway.events.recent(500) if event.kind == "fallback"
    ]


def fallback_count(harness: Harness, model: str, fallback: str, reason: str) -> float:
    value = harness.gateway.metrics.registry.get_sample_value(
        "modelyard_fallbacks_total", {"model": model, "fallback": fallback, "reason": reason}
    )
    return value or 0.0


async def test_a_model_that_can_never_fit_is_served_by_its_fallback(tmp_path: Path) -> None:
    models = {
        "big": engine_model(memory="40GiB", fallbacks=["small"]),
        "small": engine_model(memory="8GiB"),
    }
    async with in_process_gateway(tmp_path, models, **ONE_GPU) as harness:
        status, answer, headers = await ask(harness, "big")
        assert status == 200, answer
        assert answer["model"] == "small"
        assert headers["X-Modelyard-Served-By"] == "small"
        [event] = fallback_events(harness)
        assert event["model"] == "big"
        assert event["data"] == {"fallback": "small", "refusal": "model_cannot_fit"}
        assert fallback_count(harness, "big", "small", "model_cannot_fit") == 1


async def test_a_start_timeout_is_served_by_the_fallback(tmp_path: Path) -> None:
    models = {
        "slow": engine_model(start_timeout="1s", fallbacks=["quick"]),
        "quick": engine_model(),
    }
    behaviours = {"slow": Behaviour(never_ready=True)}
    async with in_process_gateway(tmp_path, models, behaviours) as harness:
        status, answer, headers = await ask(harness, "slow")
        assert status == 200, answer
        assert answer["model"] == "quick"
        assert headers["X-Modelyard-Served-By"] == "quick"
        assert fallback_count(harness, "slow", "quick", "start_timeout") == 1


async def test_a_crash_and_then_a_crash_loop_are_served_by_the_fallback(tmp_path: Path) -> None:
    models = {"broken": engine_model(fallbacks=["spare"]), "spare": engine_model()}
    behaviours = {"broken": Behaviour(crash_on_start=True)}
    async with in_process_gateway(tmp_path, models, behaviours) as harness:
        for _ in range(3):
            status, answer, _ = await ask(harness, "broken")
            assert status == 200, answer
            assert answer["model"] == "spare"
        reasons = {event["data"]["refusal"] for event in fallback_events(harness)}
        assert reasons == {"engine_start_failed", "engine_crash_loop"}


async def test_a_remote_that_is_down_is_served_by_the_fallback(tmp_path: Path) -> None:
    models = {
        "cloud": {"engine": "remote", "url": "http://127.0.0.1:9", "fallbacks": ["local"]},
        "local": engine_model(),
    }
    async with in_process_gateway(tmp_path, models) as harness:
        status, answer, headers = await ask(harness, "cloud")
        assert status == 200, answer
        assert answer["model"] == "local"
        assert headers["X-Modelyard-Served-By"] == "local"
        assert fallback_count(harness, "cloud", "local", "remote_unavailable") == 1


async def test_a_fallback_evicts_nothing_unless_allowed(tmp_path: Path) -> None:
    models = {
        "big": engine_model(memory="40GiB", fallbacks=["small"]),
        "small": engine_model(memory="8GiB"),
        "busy": engine_model(memory="20GiB"),
    }
    async with in_process_gateway(tmp_path, models, **ONE_GPU) as harness:
        status, _, _ = await ask(harness, "busy")
        assert status == 200
        status, answer, _ = await ask(harness, "big")
        # `small` would need `busy` evicted: the refusal stands, `busy` keeps running.
        assert status == 503, answer
        assert answer["error"]["code"] == "model_cannot_fit"
        assert harness.gateway.scheduler.state_of("busy").value == "ready"
        assert fallback_events(harness) == []


async def test_a_fallback_may_evict_when_configured_to(tmp_path: Path) -> None:
    models = {
        "big": engine_model(memory="40GiB", fallbacks=["small"], fallback_may_evict=True),
        "small": engine_model(memory="8GiB"),
        "busy": engine_model(memory="20GiB"),
    }
    async with in_process_gateway(tmp_path, models, **ONE_GPU) as harness:
        assert (await ask(harness, "busy"))[0] == 200
        status, answer, _ = await ask(harness, "big")
        assert status == 200, answer
        assert answer["model"] == "small"
        assert harness.gateway.scheduler.state_of("busy").value != "ready"


async def test_the_first_fallback_that_can_serve_now_is_chosen(tmp_path: Path) -> None:
    models = {
        "big": engine_model(memory="40GiB", fallbacks=["medium", "small"]),
        "medium": engine_model(memory="16GiB"),
        "small": engine_model(memory="4GiB"),
        "busy": engine_model(memory="12GiB"),
    }
    async with in_process_gateway(tmp_path, models, **ONE_GPU) as harness:
        assert (await ask(harness, "busy"))[0] == 200
        status, answer, _ = await ask(harness, "big")
        assert status == 200, answer
        assert answer["model"] == "small"  # medium would have evicted busy


async def test_a_streamed_request_is_served_by_the_fallback_in_the_same_stream(
    tmp_path: Path,
) -> None:
    models = {
        "slow": engine_model(start_timeout="1s", fallbacks=["quick"]),
        "quick": engine_model(),
    }
    behaviours = {"slow": Behaviour(never_ready=True)}
    async with in_process_gateway(tmp_path, models, behaviours) as harness:
        body = {"model": "slow", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with (
            aiohttp.ClientSession() as session,
            session.post(harness.url + "/v1/chat/completions", json=body) as response,
        ):
            assert response.status == 200
            lines = [line.decode().strip() async for line in response.content]
        assert lines[0].startswith(": loading slow")
        chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert chunks
        assert {chunk["model"] for chunk in chunks} == {"quick"}
        assert lines[-1] == "data: [DONE]" or lines[-2] == "data: [DONE]"


async def test_no_fallback_for_a_request_the_key_may_not_use(tmp_path: Path) -> None:
    from tests.security.keys import key_config

    models = {
        "big": engine_model(memory="40GiB", fallbacks=["small"]),
        "small": engine_model(memory="8GiB"),
    }
    keys = {"keys": [key_config("alice", "sk-alice-key-0123456789", models=["big"])]}
    async with in_process_gateway(tmp_path, models, auth=keys, **ONE_GPU) as harness:
        body = {"model": "big", "messages": [{"role": "user", "content": "hi"}]}
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                harness.url + "/v1/chat/completions",
                json=body,
                headers={"Authorization": "Bearer sk-alice-key-0123456789"},
            ) as response,
        ):
            assert response.status == 503
            assert (await response.json())["error"]["code"] == "model_cannot_fit"
