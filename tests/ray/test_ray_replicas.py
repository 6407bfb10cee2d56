"""Replicas on a real Ray cluster (head without GPUs on 127.0.0.2, two workers with one 24 GiB
GPU each): a model with `replicas: {max: 2}` under load that saturates one engine gets a second
one on the other worker; both serve; then one replica's node loses power (SIGKILL to every
process it runs, found by PID from what the test started, never by name).

The test engines stand for vLLM: at most 4 requests at a time (`--max-num-seqs 4`, the rest
wait in the engine's queue), each held for a fixed time, so one engine's throughput is bounded
and only a second one serves more. One cluster for the whole module (it costs most of the time).
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
from tests.ray.cluster import LocalCluster, Node
from tests.ray.test_ray_cluster import engine_model, events, model_status, node_at, ray_settings

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SERVE_S = 0.4  # each request holds one of its engine's 4 slots this long
CLIENTS = 16  # four times what one engine serves at once: it saturates one engine, not two
LIMITS = {"upstream_first_byte_timeout": "3s", "health_check_timeout": "1s"}


def start(gateways: list[RunningGateway], tmp_path: Path, cluster: LocalCluster) -> RunningGateway:
    model = {
        **engine_model("a", "16GiB", "--max-num-seqs", "4"),  # one engine per 24 GiB GPU
        "replicas": {"max": 2, "target_in_flight": 4},
        "idle_timeout": "10m",  # no scale-down in this test
    }
    gateway = start_gateway(
        tmp_path, {"a": model}, limits=LIMITS, **ray_settings(cluster, "t-replicas")
    )
    gateways.append(gateway)
    return gateway


def replicas(gateway: RunningGateway) -> dict[str, Any]:
    found: dict[str, Any] = model_status(gateway, "a")["replicas"]
    return found


async def per_replica_metrics(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """`modelyard_replica_in_flight_requests` for model a, by replica."""
    async with session.get(url + "/metrics") as response:
        text = await response.text()
    found = {}
    for line in text.splitlines():
        if line.startswith("modelyard_replica_in_flight_requests{") and 'model="a"' in line:
            labels, value = line.rsplit(" ", 1)
            replica = labels.split('replica="', 1)[1].split('"', 1)[0]
            found[replica] = float(value)
    return found


class Load:
    """`CLIENTS` clients back to back until stopped; each answer's status, error code and the
    time it ended."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url + "/v1/chat/completions"
        self.running = True
        self.outcomes: list[tuple[int, str | None, float]] = []

    async def client(self, number: int) -> None:
        while self.running:
            body = {
                "model": "a",
                "messages": [{"role": "user", "content": f"task {number}"}],
                "fake_delay": SERVE_S,
            }
            async with self.session.post(self.url, json=body) as response:
                text = await response.text()
                code = None
                if response.status != 200:
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        code = json.loads(text)["error"]["code"]
                self.outcomes.append((response.status, code, time.monotonic()))

    def ok_between(self, begin: float, end: float) -> int:
        return sum(1 for status, _, at in self.outcomes if status == 200 and begin <= at < end)


def test_a_second_replica_on_the_other_node_serves_and_survives_its_peer_node_dying(
    cluster: LocalCluster, gateways: list[RunningGateway], tmp_path: Path
) -> None:
    gateway = start(gateways, tmp_path, cluster)
    url = gateway.url
    killed: Node | None = None

    async def run() -> dict[str, Any]:
        nonlocal killed
        timeout = aiohttp.ClientTimeout(total=90)
        connector = aiohttp.TCPConnector(limit=CLIENTS + 4)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            load = Load(session, url)
            clients = [asyncio.ensure_future(load.client(n)) for n in range(CLIENTS)]
            try:
                # The second replica starts on the other worker (the head has no GPU).
                began = time.monotonic()
                while replicas(gateway)["running"] < 2:
                    assert time.monotonic() - began < 60, replicas(gateway)
                    assert all(not c.done() for c in clients), [c for c in clients if c.done()]
                    await asyncio.sleep(0.2)
                up_after = time.monotonic() - began
                # Both serve: each replica has requests in flight, in status and in metrics.
                both_busy: dict[str, Any] | None = None
                seen_metrics: dict[str, float] = {}
                while time.monotonic() - began < up_after + 15:
                    engines = replicas(gateway)["engines"]
                    metrics = await per_replica_metrics(session, url)
                    for key, value in metrics.items():
                        seen_metrics[key] = max(seen_metrics.get(key, 0.0), value)
                    if (
                        len(engines) == 2
                        and all(e["state"] == "ready" and e["in_flight"] > 0 for e in engines)
                        and len(seen_metrics) == 2
                        and all(v > 0 for v in seen_metrics.values())
                    ):
                        both_busy = {"engines": engines, "metrics": seen_metrics}
                        break
                    await asyncio.sleep(0.2)
                assert both_busy is not None, (replicas(gateway), seen_metrics)
                nodes = sorted(e["node"] for e in both_busy["engines"])
                assert nodes == ["127.0.0.3", "127.0.0.4"], nodes
                steady = time.monotonic()
                await asyncio.sleep(3)
                before_kill = load.ok_between(steady, time.monotonic())

                # One replica's node loses power under load. Its outstanding requests (in
                # flight on the engine and in its queue) are noted just before.
                victim = next(e for e in replicas(gateway)["engines"] if e["node"] == "127.0.0.4")
                outstanding = victim["in_flight"] + victim["queued"]
                killed = node_at(cluster, victim["node"])
                failed_before = sum(1 for status, _, _ in load.outcomes if status != 200)
                pids = killed.alive_pids()
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                down = time.monotonic()
                # The survivor serves on while the load goes on.
                await asyncio.sleep(12)
                load.running = False
                await asyncio.wait_for(asyncio.gather(*clients), 60)
            finally:
                load.running = False
                for client in clients:
                    client.cancel()
            ended = time.monotonic()
            return {
                "up_after": up_after,
                "before_kill_per_s": before_kill / 3,
                "outstanding": outstanding,
                "failed_before": failed_before,
                "failures": [(s, c, at - down) for s, c, at in load.outcomes if s != 200],
                "after_per_s": load.ok_between(down + 4, ended) / (ended - down - 4),
                "survivor": next(e for e in both_busy["engines"] if e["node"] == "127.0.0.3"),
            }

    outcome = asyncio.run(run())
    failures = outcome["failures"]
    print(
        f"replicas on ray: second replica running {outcome['up_after']:.1f}s into the load; "
        f"{outcome['before_kill_per_s']:.1f} answers/s on two; node killed with "
        f"{outcome['outstanding']} outstanding on it; failures {failures}; "
        f"{outcome['after_per_s']:.1f} answers/s on the survivor"
    )
    assert outcome["failed_before"] == 0  # nothing refused or cut while the replica came
    # No error beyond the requests that were on the killed node: a request it refused
    # before its loss was declared goes to the survivor.
    assert len(failures) <= outcome["outstanding"], failures
    for status, code, _ in failures:
        assert (status, code) in (
            (503, "engine_unreachable"),  # dropped mid-answer, before its loss was known
            (503, "engine_lost"),
            (502, "upstream_error"),
        ), failures
    assert all(code != "engine_crash_loop" for _, code, _ in failures), failures
    # The survivor serves on: at least its own rate (4 slots / SERVE_S) less noise.
    assert outcome["after_per_s"] >= 0.6 * 4 / SERVE_S, outcome
    status = replicas(gateway)
    survivor = outcome["survivor"]
    assert any(
        e["key"] == survivor["key"] and e["state"] == "ready" and e["node"] == "127.0.0.3"
        for e in status["engines"]
    ), status
    kinds = [e["kind"] for e in events(gateway) if e["model"] in ("a", None)]
    assert "scale_up" in kinds
    assert "crash_loop" not in " ".join(kinds), kinds
    # A start sent to the dead node before its loss was known is tried again elsewhere, never
    # counted toward a crash loop.
    assert kinds.count("start_failed") == kinds.count("node_lost_retry"), kinds
    # The killed node's processes are gone for good; the cluster fixture checks the rest.
    assert killed is not None
    assert not killed.alive_pids()
