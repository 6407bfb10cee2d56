"""The demo through the gateway: real vLLM engines on CPU, driven with the official openai SDK.

One gateway on examples/demo.yaml serves the whole module. `chat` and `coder` share an
exclusive group (one engine at a time on 2 cores), so the tests run in the order that starts
the fewest engines: coder once, then chat, which idles out and is brought back: three starts.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from openai import OpenAI

from modelyard.demo import DemoSetup
from tests.conftest import RunningGateway
from tests.vllm.support import (
    ProcessWatch,
    demo_document,
    engine_turn,
    start_demo_gateway,
    stop_gateway,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

CHAT_IDLE_S = 15.0  # long enough for the tests between chat's start and the idle test
REQUEST_TIMEOUT_S = 300.0  # a cold start takes 30-110 s on 2 busy cores
QUESTION = [{"role": "user", "content": "Write a SQL query that lists all users."}]


@pytest.fixture(scope="module")
def watch() -> ProcessWatch:
    return ProcessWatch()


@pytest.fixture(scope="module")
def gateway(
    demo: DemoSetup, watch: ProcessWatch, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    document = demo_document(demo)
    document["models"]["chat"]["idle_timeout"] = CHAT_IDLE_S
    with engine_turn():
        running = start_demo_gateway(tmp_path_factory.mktemp("gateway-real"), demo, document)
        try:
            yield running
        finally:
            stop_gateway(running, watch)


def client(gateway: RunningGateway, prefix: str = "") -> OpenAI:
    return OpenAI(
        base_url=f"{gateway.url}{prefix}/v1",
        api_key="not-needed",
        timeout=REQUEST_TIMEOUT_S,
        max_retries=0,
    )


def model_status(gateway: RunningGateway, name: str) -> dict[str, Any]:
    return next(m for m in gateway.status()["models"] if m["name"] == name)


def ask(gateway: RunningGateway, model: str, max_tokens: int = 16) -> str:
    reply = client(gateway).chat.completions.create(
        model=model, messages=QUESTION, max_tokens=max_tokens, temperature=0
    )
    assert reply.model == model
    return reply.choices[0].message.content or ""


def logprobs(gateway: RunningGateway, model: str) -> list[float]:
    reply = client(gateway).chat.completions.create(
        model=model, messages=QUESTION, max_tokens=4, temperature=0, logprobs=True
    )
    assert reply.choices[0].logprobs is not None
    return [token.logprob for token in reply.choices[0].logprobs.content or []]


def events(gateway: RunningGateway, model: str) -> list[dict[str, Any]]:
    url = f"{gateway.url}/admin/events?follow=0&recent=200&model={model}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return list(json.loads(response.read())["events"])


def test_models_are_listed_at_once_while_every_engine_is_stopped(gateway: RunningGateway):
    began = time.perf_counter()
    listed = {m.id: m.to_dict() for m in client(gateway).models.list()}
    assert time.perf_counter() - began < 1.0  # never waits for an engine
    assert {"chat", "coder", "smollm2", "gemma3", "sql-adapter", "email-adapter"} <= set(listed)
    assert listed["chat"]["state"] == listed["coder"]["state"] == "stopped"
    assert listed["sql-adapter"]["parent"] == listed["email-adapter"]["parent"] == "chat"
    assert listed["smollm2"]["alias_of"] == "chat"
    assert all(m["starts"] == 0 for m in gateway.status()["models"])


def test_a_completion_from_coder_by_its_route_prefix(gateway: RunningGateway, watch: ProcessWatch):
    coder = client(gateway, "/coder")  # base_url .../coder/v1
    result = coder.completions.create(
        model="coder", prompt="def fibonacci(n):", max_tokens=12, temperature=0
    )
    assert result.model == "coder"
    assert result.choices[0].text.strip()
    assert result.usage is not None
    assert result.usage.completion_tokens > 0
    status = model_status(gateway, "coder")
    assert (status["state"], status["starts"]) == ("ready", 1)
    tree = watch.note(status["pid"])
    assert len(tree) >= 2  # vLLM's API server and its EngineCore process
    assert model_status(gateway, "chat")["state"] == "stopped"


def test_a_chat_completion_from_chat_stops_coder_first(
    gateway: RunningGateway, watch: ProcessWatch
):
    coder_processes = [pid for pid in watch.seen]  # all of coder's, noted by the last test
    reply = client(gateway).chat.completions.create(
        model="chat", messages=QUESTION, max_tokens=16, temperature=0
    )
    assert reply.model == "chat"
    assert reply.choices[0].message.content
    assert reply.usage is not None
    assert reply.usage.completion_tokens > 0
    # The exclusive group: coder was stopped to make room, and all of its processes are gone.
    assert model_status(gateway, "coder")["state"] == "stopped"
    assert not watch.wait_gone(coder_processes, timeout=10)
    status = model_status(gateway, "chat")
    assert (status["state"], status["starts"]) == ("ready", 1)
    watch.note(status["pid"])


def test_a_streamed_chat_completion_matches_the_plain_one(gateway: RunningGateway):
    plain = ask(gateway, "chat")
    stream = client(gateway).chat.completions.create(
        model="chat", messages=QUESTION, max_tokens=16, temperature=0, stream=True
    )
    chunks = list(stream)
    assert len(chunks) > 2  # really streamed, not one blob
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain  # greedy: the same tokens either way
    assert all(c.model == "chat" for c in chunks)
    finished = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finished[-1] in ("length", "stop")


def test_a_static_lora_adapter_answers_differently_from_the_base(gateway: RunningGateway):
    base = ask(gateway, "chat")
    sql = ask(gateway, "sql-adapter")
    assert base
    assert sql
    assert sql != base  # the adapter's weights were applied
    assert ask(gateway, "sql-adapter") == sql  # greedy and reproducible
    # The other adapter may pick the same greedy tokens for this prompt (random weights);
    # its token probabilities show that it was applied all the same.
    assert logprobs(gateway, "email-adapter") != logprobs(gateway, "chat")
    assert model_status(gateway, "chat")["starts"] == 1  # adapters did not restart the engine


def test_models_after_show_the_states(gateway: RunningGateway):
    listed = {m.id: m.to_dict() for m in client(gateway).models.list()}
    assert listed["chat"]["state"] == "ready"
    assert listed["smollm2"]["state"] == "ready"  # an alias shows its model's state
    assert listed["sql-adapter"]["state"] == "ready"  # so does an adapter
    assert listed["coder"]["state"] == "stopped"
    # Through a route, only that route's model (and its adapters) are listed.
    on_route = {m.id for m in client(gateway, "/chat").models.list()}
    assert "chat" in on_route
    assert "coder" not in on_route


def test_the_idle_timeout_stops_a_real_engine_and_a_request_brings_it_back(
    gateway: RunningGateway, watch: ProcessWatch
):
    status = model_status(gateway, "chat")
    assert status["state"] == "ready"
    tree = watch.note(status["pid"])
    assert len(tree) >= 2
    gateway.wait_state("chat", "stopped", timeout=CHAT_IDLE_S + 90)
    assert not watch.wait_gone(tree, timeout=30), "the engine's processes outlived its stop"
    stops = [e for e in events(gateway, "chat") if e["kind"] == "stop"]
    assert stops[-1]["reason"].startswith("idle for")

    assert ask(gateway, "chat")  # a cold start again
    again = model_status(gateway, "chat")
    assert again["state"] == "ready"
    assert again["starts"] == 2
    assert again["pid"] != status["pid"]
    watch.note(again["pid"])
