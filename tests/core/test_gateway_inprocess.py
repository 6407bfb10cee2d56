"""The gateway in-process (tests/harness.py): refusals, client hang-ups, waits on events."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import openai
import pytest

from modelyard.observability.requests import CLIENT_CLOSED_REQUEST
from tests.harness import Behaviour, Harness, engine_model, in_process_gateway

CHAT = {"messages": [{"role": "user", "content": "hello"}]}


def chat_body(model: str, **extra: object) -> dict[str, object]:
    return {"model": model, **CHAT, **extra}


async def post(url: str, body: object, **kwargs: object) -> tuple[int, dict[str, object]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, **kwargs) as response,
    ):
        return response.status, await response.json(content_type=None)


async def test_thirty_requests_to_an_engine_that_never_becomes_ready_all_get_503_retry_after(
    tmp_path: Path,
) -> None:
    # Issue 12's finding, the scheduler's part: the waiters once got 502 engine_start_failed
    # without Retry-After. An engine that is alive but never ready did not crash: it ran out
    # of time, and every waiter is told when to try again.
    models = {"stuck": engine_model(start_timeout="1s")}
    async with in_process_gateway(tmp_path, models, {"stuck": Behaviour(never_ready=True)}) as h:
        answers = await asyncio.gather(*(h.chat("stuck") for _ in range(30)))
        for status, body, headers in answers:
            assert status == 503, body
            assert int(headers["Retry-After"]) >= 1
            assert body["error"]["code"] == "start_timeout"
        assert len(h.runtime.of("stuck")) == 1  # one start for all thirty


async def test_a_crashing_start_is_502_with_retry_after(tmp_path: Path) -> None:
    models = {"bad": engine_model()}
    async with in_process_gateway(tmp_path, models, {"bad": Behaviour(crash_on_start=True)}) as h:
        status, body, headers = await h.chat("bad")
    assert status == 502
    assert body["error"]["code"] == "engine_start_failed"
    assert int(headers["Retry-After"]) >= 1


async def test_a_client_that_hangs_up_while_waiting_is_recorded_as_499_not_500(
    tmp_path: Path,
) -> None:
    models = {"slow": engine_model()}
    async with in_process_gateway(tmp_path, models, {"slow": Behaviour(ready_after=1.0)}) as h:
        payload = {"model": "slow", "messages": [{"role": "user", "content": "hi"}]}
        request = asyncio.ensure_future(h.client.post("/v1/chat/completions", json=payload))
        await asyncio.sleep(0.3)  # waiting for the cold start
        request.cancel()
        for _ in range(100):
            if h.records:
                break
            await asyncio.sleep(0.02)
        (record,) = h.records
        assert record.status == CLIENT_CLOSED_REQUEST
        assert record.client_gone
        exposition = h.gateway.metrics.exposition().decode()
        assert 'status="499"' in exposition
        assert 'status="500"' not in exposition


async def test_a_stream_the_client_stops_keeps_the_200_it_was_sent(tmp_path: Path) -> None:
    async with in_process_gateway(tmp_path, {"m": engine_model()}) as h:
        payload = {
            "model": "m",
            "stream": True,
            "fake_chunks": 50,
            "fake_chunk_delay": 0.05,
            "messages": [{"role": "user", "content": "hi"}],
        }
        response = await h.client.post("/v1/chat/completions", json=payload)
        assert response.status == 200
        await response.content.readline()  # the first chunk arrived: the 200 was sent
        response.close()  # the user pressed "stop"
        for _ in range(100):
            if h.records:
                break
            await asyncio.sleep(0.02)
        (record,) = h.records
        assert record.status == 200
        assert record.client_gone
        assert record.streamed
        (engine,) = h.runtime.of("m")
        for _ in range(50):
            if engine.state.disconnects:
                break
            await asyncio.sleep(0.02)
        assert engine.state.disconnects == 1  # the engine's work was cancelled too


async def test_two_cold_models_on_one_gpu_requested_together_are_both_served(
    tmp_path: Path,
) -> None:
    # Declared GPU: 24 GiB, two models of 10 GiB. The second waits for the first start (one
    # start per GPU) and is woken by its end, within its own start timeout.
    models = {
        "a": engine_model(memory="10GiB", start_timeout="10s"),
        "b": engine_model(memory="10GiB", start_timeout="10s"),
    }
    behaviours = {"a": Behaviour(ready_after=0.8), "b": Behaviour(ready_after=0.8)}
    async with in_process_gateway(
        tmp_path, models, behaviours, gpus=[{"index": 0, "memory": "24GiB"}]
    ) as h:
        (sa, ba, _), (sb, bb, _) = await asyncio.gather(h.chat("a"), h.chat("b"))
        assert (sa, sb) == (200, 200), (ba, bb)
        kinds = [(e.kind, e.model) for e in h.gateway.events.recent()]
        starts = [kinds.index(("start", m)) for m in ("a", "b")]
        first, second = sorted(starts)
        first_model = kinds[first][1]
        # One start per GPU: the second began only once the first was ready.
        assert kinds.index(("ready", first_model)) < second
        assert all(kind not in ("placement_refused", "start_failed") for kind, _ in kinds)


async def test_model_list_answers_while_everything_waits(tmp_path: Path) -> None:
    models = {"slow": engine_model()}
    async with in_process_gateway(tmp_path, models, {"slow": Behaviour(ready_after=1.0)}) as h:
        pending = asyncio.ensure_future(h.chat("slow"))
        await asyncio.sleep(0.1)
        async with h.client.get("/v1/models") as response:
            assert response.status == 200
            listed = await response.json()
        assert [m["id"] for m in listed["data"]] == ["slow"]
        assert (await pending)[0] == 200


async def test_hostile_model_names_are_refused_without_starting_anything(tmp_path: Path) -> None:
    async with in_process_gateway(tmp_path, {"m": engine_model()}) as h:
        for name in ["../m", "m\x00", "m" * 5000, "", "/etc/passwd"]:
            status, body, _ = await h.chat(name)
            assert status in (400, 404), (name, body)
        assert h.runtime.engines == []


# ----- moved from the process-level tests: nothing here needs a real process -----


async def test_cold_start_then_reuse(tmp_path: Path) -> None:
    async with in_process_gateway(tmp_path, {"chat": engine_model()}) as h:
        assert h.gateway.scheduler.state_of("chat").value == "stopped"
        status, body, _ = await h.chat("chat")
        assert status == 200
        assert body["choices"][0]["message"]["content"] == "chat says: hi"
        assert (await h.chat("chat"))[0] == 200
        assert len(h.runtime.of("chat")) == 1
        assert h.gateway.model_status("chat")["starts"] == 1


async def test_concurrent_first_requests_share_one_start(tmp_path: Path) -> None:
    models = {"chat": engine_model()}
    async with in_process_gateway(tmp_path, models, {"chat": Behaviour(ready_after=0.5)}) as h:
        results = await asyncio.gather(*(h.chat("chat") for _ in range(50)))
        assert [status for status, _, _ in results] == [200] * 50
        assert len(h.runtime.engines) == 1


async def test_models_listing_is_immediate_and_complete(tmp_path: Path) -> None:
    models = {"slow": engine_model(aliases=["slow-alias"])}
    async with in_process_gateway(tmp_path, models, {"slow": Behaviour(ready_after=30)}) as h:
        pending = asyncio.ensure_future(h.chat("slow"))
        await asyncio.sleep(0.3)
        loop = asyncio.get_running_loop()
        began = loop.time()
        async with h.client.get("/v1/models") as response:
            listing = await response.json()
        assert loop.time() - began < 5.0  # not held by the 30 s start
        states = {m["id"]: m["state"] for m in listing["data"]}
        assert states == {"slow": "starting", "slow-alias": "starting"}
        assert all(m["object"] == "model" and "created" in m for m in listing["data"])
        pending.cancel()


async def test_unknown_model_and_malformed_bodies(tmp_path: Path) -> None:
    async with in_process_gateway(tmp_path, {"chat": engine_model()}) as h:
        cases = [
            (b'{"model": "nope"}', 404, "model_not_found"),
            (b"{not json", 400, "invalid_json"),
            (b"[1, 2]", 400, "invalid_json"),
            (b"", 400, "invalid_json"),
            (b'{"messages": []}', 400, "missing_model"),
            (b'{"model": 7}', 400, "invalid_model"),
            (b'\xff\xfe{"model": "chat"}', 400, "invalid_json"),
            (b"[" * 100000, 400, "invalid_json"),
        ]
        # JSON routes take JSON only (a browser's "simple" text/plain requests are refused).
        json_type = {"Content-Type": "application/json"}
        for raw, status, code in cases:
            async with h.client.post(
                "/v1/chat/completions", data=raw, headers=json_type
            ) as response:
                body = await response.json()
                assert response.status == status, (raw[:20], body)
                assert body["error"]["code"] == code
                assert set(body["error"]) == {"message", "type", "param", "code"}
        async with h.client.post(
            "/v1/chat/completions", data=b'{"model": "nope"}', headers=json_type
        ) as response:
            message = (await response.json())["error"]["message"]
        assert "known models: chat" in message
        # Upstream error statuses are passed through unchanged.
        assert (await h.chat("chat", fake_status=422))[0] == 422
        async with h.client.get("/nowhere/at/all") as response:
            assert response.status == 404
            assert "error" in await response.json()
        assert h.gateway.scheduler.state_of("chat").value == "ready"


async def test_start_timeout_gives_503_with_retry_after(tmp_path: Path) -> None:
    models = {"slow": engine_model(start_timeout="1s")}
    async with in_process_gateway(tmp_path, models, {"slow": Behaviour(ready_after=30)}) as h:
        status, body, headers = await h.chat("slow")
    assert status == 503
    assert int(headers["Retry-After"]) >= 1
    assert body["error"]["code"] == "start_timeout"


async def test_alias_and_route_rewriting(tmp_path: Path) -> None:
    models = {
        "coder": engine_model(served_name="qwen-coder-7b", aliases=["coder-fast"], route="/coder"),
        "chat": engine_model(served_name="llama-8b", route="/chat"),
    }
    async with in_process_gateway(tmp_path, models) as gateway:
        await _alias_and_route_rewriting(gateway)


async def _alias_and_route_rewriting(gateway: Harness) -> None:
    # Alias: the engine sees its served name, the client sees the name it asked for.
    status, body = await post(gateway.url + "/v1/chat/completions", chat_body("coder-fast"))
    assert status == 200
    assert body["model"] == "coder-fast"
    assert body["choices"][0]["message"]["content"] == "qwen-coder-7b says: hello"
    # Streams too, chunk by chunk.
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gateway.url + "/v1/chat/completions", json=chat_body("coder-fast", stream=True)
        ) as response,
    ):
        text = (await response.read()).decode()
    assert '"model":"coder-fast"' in text
    assert 'qwen-coder-7b"' not in text
    # Route prefix: /chat/v1/... goes to the chat model whatever `model` says.
    status, body = await post(
        gateway.url + "/chat/v1/chat/completions", chat_body("something-else")
    )
    assert status == 200
    assert body["choices"][0]["message"]["content"] == "llama-8b says: hello"
    # /{route}/v1/models answers without starting anything.
    async with (
        aiohttp.ClientSession() as session,
        session.get(gateway.url + "/coder/v1/models") as response,
    ):
        listing = await response.json()
    assert {m["id"] for m in listing["data"]} == {"coder", "coder-fast"}
    # Other paths under a route pass through (the seed's /vision/generate shape).
    status, body = await post(gateway.url + "/chat/generate?x=1", {"prompt": "p"})
    assert body["path"] == "/generate"
    assert body["query"] == "x=1"


async def test_openai_sdk_streaming_and_not(tmp_path: Path) -> None:
    # The official SDK against the gateway's real loopback port (its async client: the
    # gateway runs in this test's event loop).
    models = {"chat": engine_model(served_name="chat-engine", aliases=["smol"])}
    async with in_process_gateway(tmp_path, models) as gateway:
        await _openai_sdk(gateway)


async def _openai_sdk(gateway: Harness) -> None:
    base_url = gateway.url + "/v1"
    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0) as client:
        reply = await client.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.model == "smol"
        assert reply.choices[0].message.content == "chat-engine says: hi"
        stream = await client.chat.completions.create(
            model="smol",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.startswith("chat-engine says: hi")
        assert chunks[-1].usage is not None  # the client asked for usage: it gets it
        models = await client.models.list()
        assert {m.id for m in models.data} == {"chat", "smol"}
        embedding = await client.embeddings.create(model="chat", input="x")
        assert embedding.data[0].embedding == [0.1, 0.2, 0.3]
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="missing", messages=[])
