"""Token budgets against a client who tries (issue 23), on the one request path, spelled two
ways (a plain POST, the same POST with a query string), and `/v1/responses`.

The gateway runs in-process (tests/harness.py, served as `modelyard serve` serves it); its
engines answer as vLLM does (tests/vllm_shapes.py): 5 prompt tokens, one completion token per
chunk, running usage in every chunk when asked for `continuous_usage_stats` (only the
`engine: vllm` model is asked: other servers may refuse the field). Streams here last 10-20 s
and are cut at random points by the client.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import openai
import pytest

from modelyard.api.request_options import BYTES_PER_TOKEN
from modelyard.auth.keys import generate_key
from tests.harness import Harness, engine_model, in_process_gateway
from tests.security.keys import ADMIN_KEY, key_config

STUDENT_KEY = generate_key()  # a large budget: what each request is charged is measured
TINY_KEY = generate_key()  # a budget of 8 tokens
BIG = 10**9
PATHS = {"fast": "/v1/chat/completions", "web": "/v1/chat/completions?via=web"}


async def until(condition: Callable[[], bool], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.05)


def settings(**more: Any) -> dict[str, Any]:
    return {
        "auth": {
            "keys": [
                key_config("ops", ADMIN_KEY, admin=True),
                key_config("student", STUDENT_KEY, models=["chat", "vchat"], token_budget=BIG),
                key_config("tiny", TINY_KEY, models=["chat"], token_budget=8, budget_period="day"),
            ]
        },
        **more,
    }


def models() -> dict[str, Any]:
    return {
        "chat": engine_model(served_name="chat", reserve_tokens=64),
        # An `engine: vllm` model (the harness runs it in-process): asked for running usage.
        "vchat": {"engine": "vllm", "model": "/models/vchat", "served_name": "vchat"},
    }


@pytest.fixture
async def gateway(tmp_path) -> AsyncIterator[Harness]:
    async with in_process_gateway(tmp_path, models(), **settings()) as harness:
        yield harness


def port_of(gateway: Harness) -> int:
    port = gateway.client.server.port
    assert port is not None
    return port


def spent_today(gateway: Harness, name: str) -> int:
    auth = gateway.gateway.auth
    assert auth is not None
    return auth.ledger.spent(name, "day")[0]


def charged(gateway: Harness, name: str, model: str) -> dict[str, int]:
    auth = gateway.gateway.auth
    assert auth is not None
    return auth.ledger.usage(name).get(
        model, {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
    )


async def open_stream(
    port: int, path: str, body: dict[str, Any], key: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A request on its own connection (so the kernel picks the process that serves it), with
    the answer's head read."""
    data = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n"
        b"Content-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
        % (path.encode(), key.encode(), len(data), data)
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    return reader, writer, head


async def read_events(reader: asyncio.StreamReader, count: int) -> int:
    """Read until `count` data events have come (or the stream ended); how many came."""
    seen = 0
    while seen < count:
        line = await asyncio.wait_for(reader.readline(), 30)
        if not line:
            break
        if b"data: {" in line:  # chunked encoding puts sizes on their own lines
            seen += 1
    return seen


async def settled(gateway: Harness, name: str, model: str, requests: int) -> dict[str, int]:
    await until(lambda: charged(gateway, name, model)["requests"] >= requests, timeout=30)
    await until(lambda: gateway.gateway.auth.ledger.reserved(name) == 0, timeout=30)  # type: ignore[union-attr]
    return charged(gateway, name, model)


def stream_body(model: str, chunks: int, delay: float, **more: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hello"}],
        "stream": True,
        "fake_chunks": chunks,
        "fake_chunk_delay": delay,
        **more,
    }


@pytest.mark.parametrize("value", [1, "true", "yes", "on"])
@pytest.mark.parametrize("lane", ["fast", "web"])
async def test_a_stream_value_the_engine_reads_as_true_is_charged(gateway, lane, value):
    body = {**stream_body("chat", 6, 0.0), "stream": value}
    reader, writer, head = await open_stream(port_of(gateway), PATHS[lane], body, STUDENT_KEY)
    assert head.startswith(b"HTTP/1.1 200"), head
    rest = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    assert rest.count(b"data: {") == 6  # the client's stream: no usage chunk it did not ask for
    assert b'"usage"' not in rest
    usage = await settled(gateway, "student", "chat", 1)
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (5, 6)


async def test_responses_plain_and_streamed_are_charged(gateway):
    sdk = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=STUDENT_KEY, max_retries=0)
    answer = await sdk.responses.create(model="chat", input="one two three")
    assert answer.usage is not None
    assert answer.usage.output_tokens == 5  # "chat says: one two three"
    usage = await settled(gateway, "student", "chat", 1)
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (5, 5)
    stream = await sdk.responses.create(
        model="chat", input="hello", stream=True, extra_body={"fake_chunks": 7}
    )
    kinds = [event.type async for event in stream]
    assert kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 7
    usage = await settled(gateway, "student", "chat", 2)
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (10, 12)
    await sdk.close()


async def cut_streams(
    gateway: Harness, paths: list[str], model: str, rng: random.Random
) -> tuple[list[int], int]:
    """Streams of 10-20 s (one per path), each cut by its client after a random number of
    events; the events each client read, and the prompt estimate of each."""
    chunks = [rng.randrange(70, 130) for _ in paths]

    async def one(path: str, total: int) -> int:
        body = stream_body(model, total, 0.15)
        reader, writer, head = await open_stream(port_of(gateway), path, body, STUDENT_KEY)
        assert head.startswith(b"HTTP/1.1 200"), head
        read = await read_events(reader, rng.randrange(5, total - 5))
        writer.transport.abort()  # the client hangs up, mid-stream
        return read

    reads = await asyncio.gather(*(one(p, n) for p, n in zip(paths, chunks, strict=True)))
    size = len(json.dumps(stream_body(model, 100, 0.15)))
    return list(reads), size // BYTES_PER_TOKEN


@pytest.mark.slow
@pytest.mark.parametrize("model", ["chat", "vchat"])
async def test_streams_cut_by_their_clients_are_charged_what_was_relayed(gateway, model):
    rng = random.Random(f"23-{model}")
    paths = [PATHS["fast"], PATHS["web"]] * 2
    reads, prompt_estimate = await cut_streams(gateway, paths, model, rng)
    usage = await settled(gateway, "student", model, len(paths))
    relayed = sum(reads)
    # Each stream is charged the events it relayed: the ones its client read, and at most a
    # couple more that were on their way when it hung up. Before: nothing at all.
    assert relayed <= usage["completion_tokens"] <= relayed + 3 * len(paths), (reads, usage)
    # The prompt: the engine's count where it sends running usage, else the estimate.
    expected_prompt = 5 if model == "vchat" else prompt_estimate
    assert abs(usage["prompt_tokens"] - expected_prompt * len(paths)) <= len(paths) * 2


@pytest.mark.parametrize("lane", ["fast", "web"])
async def test_fifty_concurrent_requests_overshoot_a_small_budget_by_one_reservation(
    tmp_path, lane
):
    path = PATHS[lane]
    async with in_process_gateway(tmp_path, models(), **settings()) as gateway:
        body = stream_body("chat", 20, 0.05, max_tokens=20)
        reservation = len(json.dumps(body)) // BYTES_PER_TOKEN + 20

        async def one() -> tuple[int, str | None]:
            connector = aiohttp.TCPConnector(force_close=True)
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                session.post(
                    gateway.url + path, json=body, headers={"Authorization": f"Bearer {TINY_KEY}"}
                ) as response,
            ):
                await response.read()
                return response.status, response.headers.get("Retry-After")

        answers = await asyncio.gather(*(one() for _ in range(50)))
        statuses = [status for status, _ in answers]
        assert set(statuses) <= {200, 429}, statuses
        assert all(after is not None for status, after in answers if status == 429)
        served = statuses.count(200)
        assert served >= 1
        await until(lambda: gateway.gateway.auth.ledger.reserved("tiny") == 0, timeout=30)  # type: ignore[union-attr]
        overshoot = spent_today(gateway, "tiny") - 8
        # Before issue 23: all 50 admitted, 1,250 tokens for a budget of 8.
        assert overshoot <= reservation, (overshoot, reservation, served)
        again = await one()
        assert again[0] == 429  # spent: refused, with Retry-After
        assert again[1] is not None
