"""A worker node that freezes or dies under load, on a real Ray cluster (head and two workers
on 127.0.0.2-4; a third joins for the second test).

The test engines stand for vLLM on the node's GPU: at most 4 requests at a time
(`--max-num-seqs 4`, the rest wait in the engine's queue) at a fixed token rate (a chunk each
50 ms; a non-streamed answer's headers come with the whole answer, as vLLM's do). A node is
taken down through every process it runs (raylet, workers, agents, engine), found by PID from
what the test started, never by name:
- SIGSTOP: a hung host, or a network partition. Sockets stay open and nothing answers.
- SIGKILL: a machine that loses power.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import RunningGateway, start_gateway
from tests.ray.cluster import GIB, LocalCluster, Node
from tests.ray.test_ray_cluster import (
    engine_model,
    events,
    model_status,
    node_at,
    ray_settings,
    wait_until,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

FIRST_BYTE_S = 3.0
LIMITS = {
    "upstream_first_byte_timeout": f"{FIRST_BYTE_S:g}s",
    "health_check_timeout": "1s",  # the liveness check a silent request asks for
}
PLAIN = {"fake_delay": 20}  # a long answer, not streamed: its headers come at the end
STREAM = {"stream": True, "fake_chunks": 400, "fake_chunk_delay": 0.05}  # 20 s at 20 tokens/s


def start(
    gateways: list[RunningGateway], tmp_path: Path, cluster: LocalCluster, namespace: str
) -> RunningGateway:
    directory = tmp_path / f"gw{len(gateways)}"
    directory.mkdir()
    model = engine_model("a", "16GiB", "--max-num-seqs", "4")  # one engine per 24 GiB GPU
    gateway = start_gateway(
        directory, {"a": model}, limits=LIMITS, **ray_settings(cluster, namespace)
    )
    gateways.append(gateway)
    return gateway


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "a", "messages": [{"role": "user", "content": "hello"}], **extra}


async def send(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], begun: asyncio.Event
) -> tuple[int, str, dict[str, str], float]:
    """One request to its end: (status, body, headers, when it ended)."""
    async with session.post(url, json=body) as response:
        text = b""
        async for chunk in response.content.iter_any():
            text += chunk
            begun.set()
        return response.status, text.decode(), dict(response.headers), time.monotonic()


async def load_and_take_down(
    gateway: RunningGateway, node: Node, sig: int
) -> tuple[list[tuple[int, str, dict[str, str], float]], float]:
    """Five long plain requests and a stream on the node's engine (four served, two waiting
    in its queue), then `sig` to every process of the node. Returns each request's outcome and
    when the node was taken down."""
    url = gateway.url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        stream_begun = asyncio.Event()
        work = [asyncio.ensure_future(send(session, url, chat(**STREAM), stream_begun))]
        await asyncio.wait_for(stream_begun.wait(), 30)
        work += [
            asyncio.ensure_future(send(session, url, chat(**PLAIN), asyncio.Event()))
            for _ in range(5)
        ]
        while model_status(gateway, "a")["in_flight"] < 6:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # all six reached the engine
        pids = node.alive_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        down = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*work), 60)
    return results, down


def served_elsewhere(gateway: RunningGateway, lost: str, since: float) -> tuple[float, list[int]]:
    """Plain requests (no retries) until one is answered; their statuses, and the time from
    `since` to that answer. The answer must come from another node."""
    statuses = []
    url = gateway.url + "/v1/chat/completions"

    async def one() -> tuple[int, dict[str, Any]]:
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, json=chat(), timeout=aiohttp.ClientTimeout(total=90)) as response,
        ):
            return response.status, await response.json(content_type=None)

    while time.monotonic() - since < 90:
        status, body = asyncio.run(one())
        statuses.append(status)
        if status == 200:
            assert model_status(gateway, "a")["node"] not in (lost, None)
            return time.monotonic() - since, statuses
        assert status == 503, body  # refused with Retry-After while it moves, never a 502
        assert body["error"]["code"] != "engine_crash_loop", body
        time.sleep(0.2)
    raise AssertionError(f"not served elsewhere within 90 s: {statuses}")


def last_event(text: str) -> dict[str, Any]:
    event: dict[str, Any] = json.loads(text.strip().split("\n\n")[-1].removeprefix("data: "))
    return event


def test_a_frozen_node_ends_its_requests_at_the_first_byte_bound(cluster, gateways, tmp_path):
    gateway = start(gateways, tmp_path, cluster, "t-freeze")
    node: Node | None = None
    try:

        async def run() -> tuple[list[tuple[int, str, dict[str, str], float]], float]:
            nonlocal node
            url = gateway.url + "/v1/chat/completions"
            async with aiohttp.ClientSession() as session:
                await send(session, url, chat(), asyncio.Event())
            node = node_at(cluster, model_status(gateway, "a")["node"])
            return await load_and_take_down(gateway, node, signal.SIGSTOP)

        results, frozen = asyncio.run(run())
        assert node is not None
        ends = sorted(end - frozen for *_, end in results)
        print(f"frozen node: statuses {[status for status, *_ in results]}")
        print("frozen node: requests ended after " + ", ".join(f"{t:.2f}s" for t in ends))
        assert ends[-1] < FIRST_BYTE_S + 2, ends  # the bound
        stream_status, stream_text, _, _ = results[0]
        assert stream_status == 200
        error = last_event(stream_text)["error"]
        assert error["code"] in ("upstream_timeout", "engine_lost"), error
        for status, text, headers, _ in results[1:]:
            code = json.loads(text)["error"]["code"]
            assert (status, code) in (
                (504, "upstream_first_byte_timeout"),
                (503, "engine_lost"),
            ), text
            if status == 503:
                assert int(headers["Retry-After"]) >= 1
        took, statuses = served_elsewhere(gateway, node.ip, frozen)
        print(f"frozen node: served elsewhere {took:.2f}s after the freeze ({statuses})")
        lost = [e for e in events(gateway) if e["kind"] == "node_lost"]
        assert lost
        assert lost[0]["data"]["node"] == node.ip
    finally:
        if node is not None:
            for pid in node.alive_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
    # Thawed, the node's engine answers no one: the gateway closed its connections, and it
    # is ended with its actor. What it serves from now on is the other node's engine.
    time.sleep(3)
    after = model_status(gateway, "a")
    assert after["node"] != node.ip
    url = gateway.url + "/v1/chat/completions"

    async def again() -> int:
        async with aiohttp.ClientSession() as session:
            status, _, _, _ = await send(session, url, chat(), asyncio.Event())
            return status

    assert asyncio.run(again()) == 200
    assert model_status(gateway, "a")["node"] == after["node"]


def test_a_killed_node_costs_only_its_requests_in_flight(cluster, gateways, tmp_path):
    """Last in the module: it takes a worker node down for good (a third joins first)."""
    spare = cluster.start_worker(3, {0: 24 * GIB})
    gateway = start(gateways, tmp_path, cluster, "t-nodekill")
    wait_until(
        lambda: any(g["node"] == spare.ip for g in gateway.status()["gpus"]),
        30,
        "the new node's GPU in the plan",
    )
    node: Node | None = None

    async def run() -> tuple[list[tuple[int, str, dict[str, str], float]], float]:
        nonlocal node
        url = gateway.url + "/v1/chat/completions"
        async with aiohttp.ClientSession() as session:
            await send(session, url, chat(), asyncio.Event())
        node = node_at(cluster, model_status(gateway, "a")["node"])
        return await load_and_take_down(gateway, node, signal.SIGKILL)

    results, killed = asyncio.run(run())
    assert node is not None
    # Its engine is declared lost as soon as Ray fails its actor's call (the node's agent is
    # asked only afterwards, to word the cause).
    wait_until(lambda: model_status(gateway, "a")["state"] != "ready", 15, "engine declared lost")
    print(f"killed node: engine no longer ready {time.monotonic() - killed:.2f}s after the kill")
    ends = sorted(end - killed for *_, end in results)
    print("killed node: requests in flight ended after " + ", ".join(f"{t:.2f}s" for t in ends))
    assert ends[-1] < FIRST_BYTE_S + 2, ends
    took, statuses = served_elsewhere(gateway, node.ip, killed)
    print(f"killed node: served elsewhere {took:.2f}s after the kill ({statuses})")
    kinds = [e["kind"] for e in events(gateway) if e["model"] in ("a", None)]
    assert "node_lost" in kinds
    # A start sent to the dead node before its loss was known is tried again elsewhere.
    assert kinds.count("start_failed") == kinds.count("node_lost_retry")
    codes = [json.loads(text)["error"]["code"] for status, text, *_ in results if status != 200]
    print(f"killed node: in flight {codes}, events {kinds}")
