"""What the fair queue shows and answers through the gateway: per-key metrics and status
while requests wait, a 503 with Retry-After when the queue is full, the engine never sent
more than `max_in_flight` at once, and a hang-up while queued never reaching the engine."""

from __future__ import annotations

import asyncio

from modelyard.auth.keys import generate_key
from tests.harness import engine_model, in_process_gateway
from tests.security.keys import bearer, key_config

A, B = generate_key(), generate_key()


async def test_waiting_is_shown_per_key_and_a_full_queue_says_when_to_retry(tmp_path) -> None:
    keys = {"keys": [key_config("alice", A, admin=True), key_config("bob", B)]}
    models = {"m": engine_model(served_name="m", max_in_flight=1, max_queue=2)}
    async with in_process_gateway(tmp_path, models, auth=keys) as harness:
        client = harness.client
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "fake_delay": 1.0}

        async def send(key: str, **extra: object):
            return await client.post(
                "/v1/chat/completions", json={**body, **extra}, headers=bearer(key)
            )

        first = asyncio.create_task(send(A))
        await asyncio.sleep(0.3)
        queued = [asyncio.create_task(send(B)), asyncio.create_task(send(A))]
        await asyncio.sleep(0.2)
        refused = await send(B)
        assert refused.status == 503
        assert (await refused.json())["error"]["code"] == "queue_full"
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert harness.records[-1].status == 503  # counted as what the client got

        status = await (await client.get("/gateway/status", headers=bearer(A))).json()
        assert status["waiting_turn"] == 2
        model = status["models"][0]
        assert model["max_in_flight"] == 1
        assert model["waiting_turn"] == 2
        assert model["keys"]["bob"]["waiting"] == 1
        metrics = await (await client.get("/metrics", headers=bearer(A))).text()
        assert 'modelyard_key_queue_waiting{key="bob",model="m"} 1.0' in metrics

        answers = [await first, *await asyncio.gather(*queued)]
        assert [answer.status for answer in answers] == [200, 200, 200]
        assert harness.runtime.of("m")[0].state.peak_in_flight == 1
        metrics = await (await client.get("/metrics", headers=bearer(A))).text()
        assert 'modelyard_key_queue_served_total{key="bob",model="m"} 1.0' in metrics
        assert 'modelyard_key_queue_waited_total{key="alice",model="m"} 1.0' in metrics


async def test_a_hang_up_while_queued_never_reaches_the_engine(tmp_path) -> None:
    models = {"m": engine_model(served_name="m", max_in_flight=1)}
    async with in_process_gateway(tmp_path, models) as harness:
        slow = asyncio.create_task(harness.chat("m", fake_delay=1.0))
        await asyncio.sleep(0.2)
        leaving = asyncio.create_task(
            harness.chat("m", messages=[{"role": "user", "content": "gone"}])
        )
        await asyncio.sleep(0.2)
        assert harness.gateway.fair_queues.waiting("m") == 1
        leaving.cancel()
        await asyncio.sleep(0.2)
        assert harness.gateway.fair_queues.waiting("m") == 0
        assert (await slow)[0] == 200
        received = harness.runtime.of("m")[0].state.received
        assert not any("gone" in request["body"] for request in received)
