"""Engines on a real Ray cluster (head and two workers on 127.0.0.2-4), through the gateway.

Each worker has one simulated 24 GiB GPU (tests/fake_gpu.py), read by its node agent through
a stand-in for pynvml (tests/fake_nvml.py); the test engines run as `engine: vllm`, claim the
memory placement gave them on their node's GPU and fail with "CUDA out of memory" beyond it,
as vLLM does. They fork a child (`--spawn-child`), as vLLM's API server forks its EngineCore,
so the leak checks cover whole process trees.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests import fake_gpu
from tests.conftest import FAKE_ENGINE, RunningGateway, processes_with, start_gateway
from tests.ray.cluster import LocalCluster, Node

pytestmark = [pytest.mark.ray, pytest.mark.slow]

GIB = 1024**3


def engine_model(served: str, memory: str, *extra: str) -> dict[str, Any]:
    return {
        "engine": "vllm",
        "model": f"/models/{served}",
        "executable": [sys.executable, FAKE_ENGINE],
        "args": ["--spawn-child", *extra],
        "memory": memory,
        "stop_grace": "2s",
    }


def ray_settings(cluster: LocalCluster, namespace: str) -> dict[str, Any]:
    return {
        "runtime": "ray",
        "ray": {
            "address": cluster.address,
            "node_address": "127.0.0.2",
            "namespace": namespace,
            "node_check_interval": "0.5s",
        },
    }


def start(
    gateways: list[RunningGateway],
    tmp_path: Path,
    cluster: LocalCluster,
    models: dict[str, Any],
    namespace: str,
    marker: str | None = None,
) -> RunningGateway:
    directory = tmp_path / f"gw{len(gateways)}"
    directory.mkdir()
    gateway = start_gateway(directory, models, marker=marker, **ray_settings(cluster, namespace))
    gateways.append(gateway)
    return gateway


def chat(gateway: RunningGateway, model: str, retries: int = 0) -> str:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="none", max_retries=retries)
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello"}], timeout=60
    )
    return reply.choices[0].message.content or ""


def model_status(gateway: RunningGateway, name: str) -> dict[str, Any]:
    return next(m for m in gateway.status()["models"] if m["name"] == name)


def node_at(cluster: LocalCluster, ip: str) -> Node:
    return next(node for node in cluster.nodes if node.ip == ip)


def events(gateway: RunningGateway) -> list[dict[str, Any]]:
    import asyncio

    async def read() -> list[dict[str, Any]]:
        found = []
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                gateway.url + "/admin/events?recent=500", timeout=aiohttp.ClientTimeout(total=1.5)
            ) as response,
        ):
            try:
                async for line in response.content:
                    if line.startswith(b"data: "):
                        found.append(json.loads(line[6:]))
            except TimeoutError:
                pass
        return found

    return asyncio.run(read())


def scrape(gateway: RunningGateway) -> str:
    import urllib.request

    with urllib.request.urlopen(gateway.url + "/metrics", timeout=10) as response:
        return response.read().decode()


def wait_until(check: Any, timeout: float, what: str) -> float:
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if check():
            return time.monotonic() - began
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {what}")


def ray_driver(cluster: LocalCluster, namespace: str, code: str) -> None:
    """Run `code` in a short Ray driver (as an operator's `ray` session would)."""
    script = (
        "import ray\n"
        f"ray.init(address={cluster.address!r}, _node_ip_address='127.0.0.2', "
        f"namespace={namespace!r}, logging_level='ERROR')\n{code}\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_engine_lands_on_the_planned_node_and_answers_through_the_gateway(
    cluster, gateways, tmp_path
):
    # The engine listens on its node's address, so it gets a key of its own (vLLM's --api-key).
    model = {**engine_model("a", "10GiB"), "engine_api_key": "sk-engine-canary-7f3a"}
    gateway = start(gateways, tmp_path, cluster, {"a": model}, "t-land")
    status = gateway.status()
    assert sorted((n["node"], n["alive"]) for n in status["nodes"]) == [
        ("127.0.0.2", True),
        ("127.0.0.3", True),
        ("127.0.0.4", True),
    ]
    assert sorted((g["node"], g["node_gpu"]) for g in status["gpus"]) == [
        ("127.0.0.3", 0),
        ("127.0.0.4", 0),
    ]
    assert "hello" in chat(gateway, "a")
    a = model_status(gateway, "a")
    assert a["state"] == "ready"
    assert a["node"] in ("127.0.0.3", "127.0.0.4")
    node = node_at(cluster, a["node"])
    # The plan named the node, the engine runs under that node's raylet, claims its GPU there,
    # and listens on the node's address (the gateway proxies to it directly).
    placed = [e for e in events(gateway) if e["kind"] == "placed" and e["model"] == "a"]
    assert f"of node {a['node']}" in placed[-1]["reason"]
    assert a["pid"] in node.alive_pids()
    assert a["pid"] in fake_gpu.claims(node.gpu_dir)
    other = next(n for n in cluster.nodes[1:] if n is not node)
    assert not fake_gpu.claims(other.gpu_dir)
    assert a["footprint_measured"] is True  # measured by the node's agent through NVML
    gpu = next(g for g in gateway.status()["gpus"] if g["node"] == a["node"])
    assert gpu["used_bytes"] == pytest.approx(10 * GIB, rel=0.001)  # its share of the GPU
    assert gpu["models"] == ["a"]
    assert a["node_gpus"] == [0]
    with urllib.request.urlopen(gateway.url + "/admin/logs/a?lines=100", timeout=10) as reply:
        log_text = reply.read().decode()
    assert "starting on" in log_text
    assert "sk-engine-canary-7f3a" not in log_text
    metrics = scrape(gateway)
    assert f'modelyard_model_node{{model="a",node="{a["node"]}"}} 1.0' in metrics
    assert 'modelyard_node_up{node="127.0.0.3"} 1.0' in metrics
    assert f'modelyard_node_engines{{node="{a["node"]}"}} 1.0' in metrics
    # A graceful stop leaves nothing on the node: engine, its child, its claim.
    engine_tree = processes_with(gateway.marker)
    assert len(engine_tree) >= 2, "the engine and the child it forked"
    assert gateway.stop(signal.SIGTERM, timeout=60) == 0
    assert processes_with(gateway.marker) == []
    assert not fake_gpu.claims(node.gpu_dir)


def test_killed_engine_actor_or_worker_leaves_no_engine_process(cluster, gateways, tmp_path):
    gateway = start(gateways, tmp_path, cluster, {"a": engine_model("a", "10GiB")}, "t-kill")
    chat(gateway, "a")
    first = model_status(gateway, "a")
    assert len(processes_with(gateway.marker)) >= 2
    # ray.kill on the engine's actor (an operator, or Ray itself): the engine tree goes too.
    ray_driver(cluster, "t-kill", f"ray.kill(ray.get_actor({first['ray_actor']!r}))")
    wait_until(lambda: not processes_with(gateway.marker), 15, "engine tree gone after ray.kill")
    gateway.wait_state("a", "failed", timeout=15)
    crash = [e for e in events(gateway) if e["kind"] == "crash" and e["model"] == "a"]
    assert crash, "the lost engine is reported"
    # The next request starts it again; then SIGKILL the actor's worker process.
    assert "hello" in chat(gateway, "a")
    second = model_status(gateway, "a")
    assert second["pid"] != first["pid"]
    os.kill(parent_of(second["pid"]), signal.SIGKILL)
    wait_until(lambda: not processes_with(gateway.marker), 15, "engine tree gone after SIGKILL")
    gateway.wait_state("a", "failed", timeout=15)
    # Two losses in a row within 30 s count as a crash loop: the gateway answers 503 with
    # Retry-After (1 s), which the SDK honours.
    assert "hello" in chat(gateway, "a", retries=2)


def test_sigkilled_gateway_takes_its_engines_with_it(cluster, gateways, tmp_path):
    gateway = start(gateways, tmp_path, cluster, {"a": engine_model("a", "10GiB")}, "t-gwkill")
    chat(gateway, "a")
    assert len(processes_with(gateway.marker)) >= 2
    gateway.stop(signal.SIGKILL)
    # Ray ends the actors a dead driver owned; their process groups go with them.
    took = wait_until(
        lambda: not processes_with(gateway.marker), 30, "engines gone after the gateway died"
    )
    print(f"engines gone {took:.1f}s after the gateway was SIGKILLed")


def test_node_agents_stop_engines_left_by_an_earlier_gateway(cluster, gateways, tmp_path):
    """An engine whose actor is gone (here: never existed) is stopped by the node agents when
    a gateway starts, with an event (the belt to Ray's process-group braces)."""
    marker = f"orphan-{tmp_path.name}"
    env = {
        **os.environ,
        "MODELYARD_RAY_ENGINE": "t-orphan/ghost",
        "MODELYARD_RAY_OWNER": "999999999:1",  # an actor worker that is long gone
    }
    orphan = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", marker], env=env
    )
    try:
        gateway = start(gateways, tmp_path, cluster, {"a": engine_model("a", "10GiB")}, "t-orphan")
        assert orphan.wait(timeout=15) is not None
        stopped = [e for e in events(gateway) if e["kind"] == "orphan_stopped"]
        assert stopped
        assert stopped[0]["model"] == "ghost"
        assert f"engine pid {orphan.pid} on node 127.0.0." in stopped[0]["reason"]
    finally:
        if orphan.poll() is None:
            orphan.kill()
        orphan.wait()


def test_two_models_too_big_for_one_node_land_on_two_nodes(cluster, gateways, tmp_path):
    models = {"a": engine_model("a", "16GiB"), "b": engine_model("b", "16GiB")}
    gateway = start(gateways, tmp_path, cluster, models, "t-two")
    assert "hello" in chat(gateway, "a")
    assert "hello" in chat(gateway, "b")
    a, b = model_status(gateway, "a"), model_status(gateway, "b")
    assert (a["state"], b["state"]) == ("ready", "ready")
    assert {a["node"], b["node"]} == {"127.0.0.3", "127.0.0.4"}
    assert not [e for e in events(gateway) if e["kind"] == "evict"]
    for node in cluster.nodes[1:]:
        assert fake_gpu.peak(node.gpu_dir)[0] <= 24 * GIB


def test_sleep_and_wake_on_a_node_are_measured_there(cluster, gateways, tmp_path):
    """vLLM's sleep keeps a residual on the GPU (here 5 %): placement learns it from the
    node's agent right after the sleep, not from a report taken before."""
    model = {**engine_model("a", "10GiB"), "sleep": 1}
    gateway = start(gateways, tmp_path, cluster, {"a": model}, "t-sleep")
    chat(gateway, "a")
    awake = model_status(gateway, "a")
    request = urllib.request.Request(
        gateway.url + "/admin/models/a/sleep?level=1", data=b"", method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
    assert gateway.model_state("a") == "sleeping"
    gpu = next(g for g in gateway.status()["gpus"] if g["node"] == awake["node"])
    held = fake_gpu.used(node_at(cluster, awake["node"]).gpu_dir)[0]
    assert held == pytest.approx(0.05 * 10 * GIB, rel=0.01)
    assert gpu["planned_bytes"] == pytest.approx(held, rel=0.01)
    assert "hello" in chat(gateway, "a")  # woken on its node, not started again
    woke = model_status(gateway, "a")
    assert (woke["state"], woke["pid"], woke["node"]) == ("ready", awake["pid"], awake["node"])


def test_dead_node_fails_its_models_and_the_next_request_uses_the_other(
    cluster, gateways, tmp_path
):
    """Last in the module: it takes a worker node down for good."""
    gateway = start(gateways, tmp_path, cluster, {"a": engine_model("a", "16GiB")}, "t-node")
    chat(gateway, "a")
    lost = model_status(gateway, "a")["node"]
    node_at(cluster, lost).kill()  # the machine loses power: raylet, workers, engine
    took = wait_until(lambda: gateway.model_state("a") == "failed", 15, "model a failed")
    print(f"model failed {took:.1f}s after its node was killed")
    kinds = {(e["kind"], e["model"]) for e in events(gateway)}
    assert ("crash", "a") in kinds
    assert ("node_lost", None) in kinds
    assert "hello" in chat(gateway, "a")
    assert model_status(gateway, "a")["node"] not in (lost, None)
    nodes = {n["node"]: n["alive"] for n in gateway.status()["nodes"]}
    assert nodes[lost] is False
    assert f'modelyard_node_up{{node="{lost}"}} 0.0' in scrape(gateway)
    # A machine that joins later is found by the gateway's node scan and planned on.
    cluster.start_worker(3, {0: 24 * GIB})

    def joined() -> bool:
        in_plan = any(g["node"] == "127.0.0.5" for g in gateway.status()["gpus"])
        said = any(
            e["kind"] == "node_joined" and e["data"].get("node") == "127.0.0.5"
            for e in events(gateway)
        )
        return in_plan and said

    wait_until(joined, 30, "the new node 127.0.0.5 and its GPU in the plan")
    assert [g["node"] for g in gateway.status()["gpus"]] != [lost]
