"""Sharing a real vLLM engine (CPU, the demo's SmolLM2): what only the real engine can say.

- vLLM started with `--scheduling-policy priority` accepts the key's priority the gateway
  writes into each request (an engine without it would answer 400 to a non-zero priority);
- a variant's params reach it (temperature 0 answers are the same twice);
- vLLM's `/tokenize` and Anthropic-shaped `/v1/messages` are routed to it by model, through
  the official clients;
- `keep_alive: 0` stops the engine once the request is answered.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator

import anthropic
import pytest
from openai import OpenAI

from modelyard.auth.keys import generate_key
from modelyard.demo import DemoSetup
from tests.conftest import RunningGateway
from tests.security.keys import key_config
from tests.vllm.support import (
    ProcessWatch,
    demo_document,
    engine_turn,
    start_demo_gateway,
    stop_gateway,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

KEY = generate_key()
TIMEOUT_S = 300.0  # a cold start takes 30-110 s on 2 busy cores


@pytest.fixture(scope="module")
def gateway(demo: DemoSetup, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    document = demo_document(demo)
    chat = document["models"]["chat"]
    chat["args"] = [*chat["args"], "--scheduling-policy", "priority"]
    chat["max_in_flight"] = 2
    chat["variants"] = {"chat-precise": {"set": {"temperature": 0, "max_tokens": 8}}}
    document["models"] = {"chat": chat}
    document.pop("groups", None)
    document["auth"] = {"keys": [key_config("batch", KEY, admin=True, priority=3)]}
    watch = ProcessWatch()
    with engine_turn():
        running = start_demo_gateway(tmp_path_factory.mktemp("sharing-real"), demo, document)
        running.admin_key = KEY  # for gateway.status()
        try:
            yield running
        finally:
            stop_gateway(running, watch)


def test_a_priority_engine_takes_the_keys_priority_and_a_variants_params(gateway) -> None:
    client = OpenAI(base_url=gateway.url + "/v1", api_key=KEY, timeout=TIMEOUT_S, max_retries=0)
    question = [{"role": "user", "content": "Name a colour."}]
    answers = [
        client.chat.completions.create(model="chat-precise", messages=question, temperature=1.5)
        for _ in range(2)
    ]
    assert answers[0].model == "chat-precise"
    texts = [answer.choices[0].message.content for answer in answers]
    assert texts[0] == texts[1]  # temperature 0 was forced, whatever the client sent
    assert answers[0].usage is not None
    assert answers[0].usage.completion_tokens <= 8  # max_tokens set by the variant


def test_tokenize_and_messages_reach_the_real_engine(gateway) -> None:
    request = urllib.request.Request(
        gateway.url + "/tokenize",
        data=json.dumps({"model": "chat", "prompt": "hello world"}).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as answer:
        tokens = json.loads(answer.read())
    assert tokens["count"] == len(tokens["tokens"]) > 0
    assert tokens["max_model_len"] == 2048
    messages = anthropic.Anthropic(
        base_url=gateway.url, api_key=KEY, timeout=TIMEOUT_S, max_retries=0
    ).messages.create(model="chat", max_tokens=8, messages=[{"role": "user", "content": "Hi"}])
    assert messages.content[0].type == "text"
    assert messages.usage.output_tokens > 0


def test_keep_alive_zero_stops_the_real_engine(gateway) -> None:
    client = OpenAI(base_url=gateway.url + "/v1", api_key=KEY, timeout=TIMEOUT_S, max_retries=0)
    client.chat.completions.create(
        model="chat",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        extra_body={"keep_alive": 0},
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = next(m for m in gateway.status()["models"] if m["name"] == "chat")["state"]
        if state == "stopped":
            return
        time.sleep(0.5)
    raise AssertionError(f"chat is still {state} after keep_alive 0")
