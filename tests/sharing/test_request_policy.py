"""A model's request policy as the engine receives it (params set/default/strip, variants
through the openai SDK, a key's priority for an engine that schedules by priority),
per-request keep_alive (hostile values refused), and the model metadata of /v1/models."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from typing import Any

import openai
import pytest

from modelyard.auth.keys import generate_key
from tests.harness import Harness, engine_model, in_process_gateway, in_process_gateway_thread
from tests.security.keys import ADMIN_KEY, key_config

BATCH_KEY = generate_key()  # priority 10, may not send keep_alive

CODER = engine_model(
    served_name="coder",
    # A vLLM started with priority scheduling (by `engine: command`, as the seeds start it).
    args=["--scheduling-policy", "priority"],
    params={
        "set": {"max_tokens": 512},
        "default": {"temperature": 0.7, "top_p": 0.9},
        "strip": ["logit_bias"],
    },
    variants={"coder-precise": {"set": {"temperature": 0}}},
    display_name="Qwen coder",
    description="code completion",
    context_length=32768,
    capabilities=["chat", "completion", "tools"],
    max_keep_alive="10m",
)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory):
    keys = [
        key_config("ops", ADMIN_KEY, admin=True, priority=-1),
        key_config("batch", BATCH_KEY, priority=10, keep_alive=False),
    ]
    models = {
        "coder": CODER,
        "hidden": engine_model(served_name="hidden", unlisted=True, max_model_len=8192),
    }
    with in_process_gateway_thread(
        tmp_path_factory.mktemp("policy"), models, auth={"keys": keys}
    ) as harness:
        yield harness


def _client(harness: Harness, key: str = ADMIN_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=harness.url + "/v1", api_key=key, max_retries=0)


def _received(harness: Harness, model: str = "coder") -> dict[str, Any]:
    last = harness.runtime.of(model)[-1].state.last
    assert last is not None
    body: dict[str, Any] = last["body"]
    return body


def test_params_as_the_engine_receives_them(gateway) -> None:
    _client(gateway).chat.completions.create(
        model="coder",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=100_000,
        top_p=0.5,
        logit_bias={"42": 100},
    )
    body = _received(gateway)
    assert body["max_tokens"] == 512  # set: the client's value replaced
    assert body["temperature"] == 0.7  # default: the client sent none
    assert body["top_p"] == 0.5  # default: the client's own kept
    assert "logit_bias" not in body  # stripped
    assert body["priority"] == -1  # the key's, on a priority-scheduling engine


def test_a_variant_is_the_same_engine_with_its_own_params(gateway) -> None:
    answer = _client(gateway).chat.completions.create(
        model="coder-precise", messages=[{"role": "user", "content": "hi"}], temperature=1.5
    )
    assert answer.model == "coder-precise"  # the client sees the name it asked for
    body = _received(gateway)
    assert body["model"] == "coder"
    assert body["temperature"] == 0
    assert body["max_tokens"] == 512  # the model's params apply under the variant's
    assert len(gateway.runtime.of("coder")) == 1  # one engine for both names


def test_a_client_cannot_choose_its_own_priority(gateway) -> None:
    _client(gateway, BATCH_KEY).chat.completions.create(
        model="coder", messages=[{"role": "user", "content": "hi"}], extra_body={"priority": -99}
    )
    assert _received(gateway)["priority"] == 10


def _chat(harness: Harness, key: str = ADMIN_KEY, **body: Any) -> tuple[int, dict[str, Any]]:
    payload = {"model": "coder", "messages": [{"role": "user", "content": "hi"}], **body}
    request = urllib.request.Request(
        harness.url + "/v1/chat/completions",
        data=json.dumps(payload).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize(
    "value",
    [
        -1,
        -0.5,
        "-5m",
        1e300,
        10**400,
        "forever",
        "5 minutes",
        "1y",
        "",
        True,
        [],
        {"s": 1},
        "9" * 40,
    ],
)
def test_hostile_keep_alive_values_get_a_clear_400(gateway, value) -> None:
    status, answer = _chat(gateway, keep_alive=value)
    assert status == 400, value
    assert answer["error"]["param"] == "keep_alive"
    assert "keep_alive" in answer["error"]["message"]


def test_a_key_may_be_forbidden_keep_alive(gateway) -> None:
    status, answer = _chat(gateway, BATCH_KEY, keep_alive="5m")
    assert status == 403
    assert answer["error"]["code"] == "keep_alive_forbidden"
    assert _chat(gateway, BATCH_KEY)[0] == 200


def test_keep_alive_is_capped_and_never_reaches_the_engine(gateway) -> None:
    assert _chat(gateway, keep_alive="1h")[0] == 200
    assert "keep_alive" not in _received(gateway)
    assert gateway.gateway.scheduler.kept_alive("coder") == 600.0  # max_keep_alive: 10m
    assert _chat(gateway, keep_alive=30)[0] == 200
    assert gateway.gateway.scheduler.kept_alive("coder") == 30.0
    assert _chat(gateway)[0] == 200  # none: the model's own idle timeout again
    assert gateway.gateway.scheduler.kept_alive("coder") is None


async def test_keep_alive_zero_stops_the_engine_after_the_request(tmp_path) -> None:
    async with in_process_gateway(tmp_path, {"m": engine_model(served_name="m")}) as harness:
        status, _, _ = await harness.chat("m", keep_alive=0)
        assert status == 200
        await harness.wait_state("m", "stopped", timeout=5)
        status, _, _ = await harness.chat("m")
        assert status == 200
        await asyncio.sleep(0.2)
        assert harness.model_state("m") == "ready"  # no keep_alive: the idle timeout


async def test_keep_alive_zero_waits_for_others_in_flight(tmp_path) -> None:
    async with in_process_gateway(tmp_path, {"m": engine_model(served_name="m")}) as harness:
        slow = asyncio.create_task(harness.chat("m", fake_delay=1.0))
        await asyncio.sleep(0.3)
        status, _, _ = await harness.chat("m", keep_alive=0)
        assert status == 200
        assert (await slow)[0] == 200  # not cut off
        assert harness.model_state("m") == "ready"


def test_model_metadata_in_the_listing(gateway) -> None:
    listing = _client(gateway).models.list()
    by_id = {model.id: model.model_dump() for model in listing.data}
    assert set(by_id) == {"coder", "coder-precise"}  # "hidden" is unlisted
    coder = by_id["coder"]
    assert coder["object"] == "model"
    assert coder["owned_by"] == "modelyard"
    assert coder["display_name"] == "Qwen coder"
    assert coder["description"] == "code completion"
    assert coder["context_length"] == 32768
    assert coder["capabilities"] == ["chat", "completion", "tools"]
    assert coder["state"] in ("ready", "stopped")
    assert by_id["coder-precise"]["variant_of"] == "coder"
    hidden = _client(gateway).models.retrieve("hidden").model_dump()
    assert hidden["unlisted"] is True
    assert hidden["context_length"] == 8192  # max_model_len when none is given
    answer = _client(gateway).chat.completions.create(
        model="hidden", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.model == "hidden"  # unlisted, still usable


async def test_context_length_from_the_engine_when_the_config_names_none(tmp_path) -> None:
    async with in_process_gateway(tmp_path, {"m": engine_model(served_name="m")}) as harness:
        listing = await (await harness.client.get("/v1/models")).json()
        assert listing["data"][0]["context_length"] is None  # stopped: nothing to ask
        assert (await harness.chat("m"))[0] == 200
        await (await harness.client.get("/v1/models")).json()  # asks the engine, not waiting
        await asyncio.sleep(0.3)
        listing = await (await harness.client.get("/v1/models")).json()
        assert listing["data"][0]["context_length"] == 4096  # the engine's max_model_len


async def test_a_variant_works_behind_the_models_route(tmp_path) -> None:
    model = engine_model(
        served_name="coder", route="/coder", variants={"coder-precise": {"set": {"temperature": 0}}}
    )
    async with in_process_gateway(tmp_path, {"coder": model}) as harness:
        body = {"model": "coder-precise", "messages": [{"role": "user", "content": "x"}]}
        answer = await harness.client.post("/coder/v1/chat/completions", json=body)
        assert answer.status == 200
        assert (await answer.json())["model"] == "coder-precise"
        received = harness.runtime.of("coder")[0].state.last
        assert received is not None
        assert received["body"]["temperature"] == 0


async def test_keep_alive_is_the_idle_timeout_until_the_next_request(tmp_path) -> None:
    """Ollama's meaning: longer or shorter than the model's own idle timeout."""
    model = engine_model(served_name="m", idle_timeout="1m", max_keep_alive="1h")
    async with in_process_gateway(tmp_path, {"m": model}) as harness:
        scheduler = harness.gateway.scheduler
        now = time.monotonic()
        assert (await harness.chat("m", keep_alive="10m"))[0] == 200
        assert await scheduler.reap_idle(now + 120) == []  # past the 1m idle timeout: kept
        assert await scheduler.reap_idle(now + 700) == ["m"]  # past the 10m it asked for
        await harness.wait_state("m", "stopped")
        assert (await harness.chat("m", keep_alive="5s"))[0] == 200
        now = time.monotonic()
        assert await scheduler.reap_idle(now + 10) == ["m"]  # shorter than the model's 1m
