"""`/metrics` of a real gateway after a scripted set of requests: exact values.

The metrics run in-process (tests/harness.py: the app served as `modelyard serve` serves it,
in-process engines answering with tests/fake_engine.py's text, token counts and `vllm:`
metrics). The JSON request log, which `modelyard serve` writes, stays on a real process."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from tests.conftest import fake_model
from tests.harness import Harness, engine_model, in_process_gateway
from tests.observability.scrape import get, scrape
from tests.security.keys import ADMIN_KEY, USER_KEY, auth_settings, bearer

HELLO = [{"role": "user", "content": "hello"}]


async def post(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], key: str = USER_KEY
) -> tuple[int, str]:
    async with session.post(url, json=body, headers=bearer(key)) as response:
        return response.status, await response.text()


def data_events(stream_text: str) -> list[Any]:
    return [
        json.loads(line[5:])
        for line in stream_text.splitlines()
        if line.startswith("data:") and line != "data: [DONE]"
    ]


async def scripted_requests(url: str) -> None:
    chat = url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        for _ in range(2):  # 5 prompt + 3 completion tokens each ("chat-engine says: hello")
            status, _ = await post(session, chat, {"model": "chat", "messages": HELLO})
            assert status == 200
        # A stream whose client did not ask for usage: the gateway asks, counts, and drops
        # the usage-only chunk, so the client sees exactly the stream it asked for.
        status, text = await post(
            session,
            chat,
            {"model": "smol", "messages": HELLO, "stream": True, "fake_chunks": 4},
        )
        assert status == 200
        chunks = data_events(text)
        assert len(chunks) == 4
        assert all(chunk["choices"] and "usage" not in chunk for chunk in chunks)
        assert all(chunk["model"] == "smol" for chunk in chunks)
        async with session.get(
            url + "/upstream/chat/fake/seen", headers=bearer(ADMIN_KEY)
        ) as response:
            sent = (await response.json())["last"]["body"]
        assert sent["stream_options"] == {"include_usage": True}
        # A client that asked for usage still gets it (5 prompt + 3 completion tokens).
        status, text = await post(
            session,
            chat,
            {
                "model": "chat",
                "messages": HELLO,
                "stream": True,
                "fake_chunks": 3,
                "stream_options": {"include_usage": True},
            },
        )
        assert data_events(text)[-1]["usage"]["completion_tokens"] == 3
        status, _ = await post(session, chat, {"model": "chat", "messages": HELLO,
                                               "fake_status": 422})  # fmt: skip
        assert status == 422
        status, _ = await post(session, url + "/v1/embeddings", {"model": "chat", "input": "x"})
        assert status == 200

        async with session.get(url + "/metrics") as response:
            assert response.status == 401  # metrics need a key like everything else
        async with session.get(url + "/metrics", headers=bearer(USER_KEY)) as response:
            assert response.status == 403  # ... an admin key


async def test_counters_histograms_and_tokens_after_scripted_requests(tmp_path):
    models = {
        "chat": engine_model(served_name="chat-engine", aliases=["smol"]),
        "idle": engine_model(served_name="idle"),
    }
    async with in_process_gateway(tmp_path, models, **auth_settings()) as gateway:
        await scripted_requests(gateway.url)
        samples, _ = await scrape(gateway.url + "/metrics", bearer(ADMIN_KEY))

    def requests(route: str, status: str, key: str = "alice") -> float | None:
        return get(samples, "modelyard_requests_total", model="chat", route=route, key=key,
                   status=status)  # fmt: skip

    assert requests("/v1/chat", "200") == 4
    assert requests("/v1/chat", "422") == 1
    assert requests("/v1/embeddings", "200") == 1
    assert requests("/upstream", "200", key="ops") == 1
    chat_labels = {"model": "chat", "route": "/v1/chat"}
    assert get(samples, "modelyard_request_duration_seconds_count", **chat_labels) == 5
    assert get(samples, "modelyard_request_duration_seconds_bucket", le="+Inf", **chat_labels) == 5
    assert get(samples, "modelyard_time_to_first_token_seconds_count", **chat_labels) == 2
    assert get(samples, "modelyard_prompt_tokens_total", model="chat") == 5 * 4 + 3
    assert get(samples, "modelyard_completion_tokens_total", model="chat") == 3 * 2 + 4 + 3
    assert get(samples, "modelyard_cold_starts_total", model="chat") == 1
    assert get(samples, "modelyard_cold_starts_total", model="idle") == 0
    assert get(samples, "modelyard_crashes_total", model="chat") == 0
    assert get(samples, "modelyard_start_duration_seconds_count", model="chat") == 1
    assert get(samples, "modelyard_engine_state", model="chat", state="ready") == 1
    assert get(samples, "modelyard_engine_state", model="idle", state="stopped") == 1
    assert get(samples, "modelyard_in_flight_requests", model="chat") == 0
    assert get(samples, "modelyard_queue_depth", model="chat") == 0
    assert get(samples, "modelyard_events_total", kind="ready") == 1


async def test_request_log_lines_after_scripted_requests(gateway_factory):
    # Process-level: the JSON log `modelyard serve` writes.
    gateway = gateway_factory(
        {"chat": fake_model("chat-engine", aliases=["smol"]), "idle": fake_model("idle")},
        log_format="json",
        **auth_settings(),
    )
    gateway.admin_key = ADMIN_KEY
    await scripted_requests(gateway.url)
    # Every proxied request is one JSON log line with its fields; no key ever reaches the log.
    log = gateway.log_text()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    requests_logged = [line for line in lines if line["logger"] == "modelyard.requests"]
    assert len(requests_logged) == 7
    assert {line["key"] for line in requests_logged} == {"alice", "ops"}
    assert sorted(line["status"] for line in requests_logged) == [200] * 6 + [422]
    engine_lines = [line for line in lines if line["logger"] == "modelyard.engines"]
    assert [line["event"] for line in engine_lines] == ["start", "ready"]
    assert ADMIN_KEY not in log
    assert USER_KEY not in log
    assert "hello" not in log  # no request body either


async def test_engine_metrics_target_never_starts_an_engine(tmp_path):
    models = {"chat": engine_model(served_name="chat"), "idle": engine_model(served_name="idle")}
    async with in_process_gateway(tmp_path, models) as gateway:
        await _engine_metrics_target(gateway)


async def _engine_metrics_target(gateway: Harness) -> None:
    async with aiohttp.ClientSession() as session:
        status, _ = await post(session, gateway.url + "/v1/chat/completions",
                               {"model": "chat", "messages": HELLO})  # fmt: skip
        assert status == 200
    used_before = gateway.status()["models"][0]["last_used_ago_s"]
    await asyncio.sleep(0.3)
    samples, families = await scrape(gateway.url + "/metrics/engines")
    assert get(samples, "vllm:num_requests_running", model="chat", replica="chat",
               model_name="chat", engine="0") == 0  # fmt: skip
    assert get(samples, "modelyard_engine_metrics_up", model="chat", replica="chat") == 1
    assert {s.labels["model"] for f in families for s in f.samples} == {"chat"}
    assert gateway.model_state("idle") == "stopped"
    # A scrape is not a use: it must not keep an idle engine alive.
    assert gateway.status()["models"][0]["last_used_ago_s"] >= used_before + 0.3
