"""What Ray adds: placing and starting an engine on a remote node vs locally, and the time
from a node's death to the model serving again on another node.

    python -m bench.ray_placement [--rounds 5]

Runs a real local Ray cluster (head and two workers on 127.0.0.2-4, as tests/ray does) and
the test engine (tests/fake_engine.py, ready at once), so the figures are the gateway's and
Ray's own overhead, not an engine's load time. Each cold start is one request to a stopped
model, measured at the client: placement, actor creation on the node, process start,
readiness, the answer. The node's death is a SIGKILL of everything the node runs (raylet,
workers, the engine): a machine that loses power, with health checks every 1 s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import FAKE_ENGINE, RunningGateway, start_gateway
from tests.ray.cluster import GIB, LocalCluster, free_base_port


def model() -> dict[str, Any]:
    return {
        "engine": "vllm",
        "model": "/models/a",
        "executable": [sys.executable, FAKE_ENGINE],
        "args": ["--spawn-child"],
        "memory": "16GiB",
        "stop_grace": "2s",
    }


def request(gateway: RunningGateway, path: str, body: dict[str, Any] | None) -> int:
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(
        gateway.url + path, data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}


def cold_starts(gateway: RunningGateway, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        assert request(gateway, "/v1/chat/completions", CHAT) == 200
        times.append(time.perf_counter() - began)
        with urllib.request.urlopen(gateway.url + "/admin/logs/a?lines=50", timeout=10) as reply:
            placed = [line for line in json.load(reply)["lines"] if "placed on node" in line]
        if placed:
            print(f"  {times[-1] * 1000:.0f} ms; {placed[-1].split('), ')[-1]}")
        assert request(gateway, "/admin/models/a/unload", {}) == 200
        gateway.wait_state("a", "stopped")
    return times


def describe(times: list[float]) -> str:
    return (
        f"median {statistics.median(times) * 1000:.0f} ms, "
        f"min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f} ms over {len(times)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="modelyard-raybench-"))
    base = free_base_port()
    cluster = LocalCluster(base, root)
    gateways: list[RunningGateway] = []
    try:
        local_dir = root / "gw-local"
        local_dir.mkdir()
        local = start_gateway(local_dir, {"a": model()}, gpus=[{"index": 0, "memory": "24GiB"}])
        gateways.append(local)
        request(local, "/v1/chat/completions", CHAT)  # warm the Python caches once
        request(local, "/admin/models/a/unload", {})
        local.wait_state("a", "stopped")
        local_times = cold_starts(local, options.rounds)
        local.stop()
        print(f"local process runtime, cold request: {describe(local_times)}")

        began = time.perf_counter()
        cluster.wait_started(cluster.start_node(0, {}))
        cluster.start_worker(1, {0: 24 * GIB})
        cluster.start_worker(2, {0: 24 * GIB})
        cluster.wait_nodes(3)
        print(f"cluster up (head + 2 workers) in {time.perf_counter() - began:.1f} s")
        ray_dir = root / "gw-ray"
        ray_dir.mkdir()
        settings = {
            "runtime": "ray",
            "ray": {"address": cluster.address, "node_address": "127.0.0.2", "namespace": "b"},
        }
        began = time.perf_counter()
        remote = start_gateway(ray_dir, {"a": model()}, **settings)
        gateways.append(remote)
        print(f"gateway with runtime: ray listening in {time.perf_counter() - began:.1f} s")
        request(remote, "/v1/chat/completions", CHAT)  # first actor: Ray starts a worker
        request(remote, "/admin/models/a/unload", {})
        remote.wait_state("a", "stopped")
        remote_times = cold_starts(remote, options.rounds)
        print(f"ray runtime (engine on a worker node), cold request: {describe(remote_times)}")
        added = statistics.median(remote_times) - statistics.median(local_times)
        print(f"added by Ray: {added * 1000:.0f} ms (median against median)")

        assert request(remote, "/v1/chat/completions", CHAT) == 200
        status = next(m for m in remote.status()["models"] if m["name"] == "a")
        victim = next(node for node in cluster.nodes if node.ip == status["node"])
        killed = time.perf_counter()
        victim.kill()
        failed_at = None
        while True:
            if failed_at is None and remote.model_state("a") == "failed":
                failed_at = time.perf_counter() - killed
            code = request(remote, "/v1/chat/completions", CHAT)
            if code == 200:
                break
            if time.perf_counter() - killed > 60:
                raise SystemExit("the model did not come back within 60 s")
            time.sleep(0.05)
        back = time.perf_counter() - killed
        now = next(m for m in remote.status()["models"] if m["name"] == "a")["node"]
        seen = f"{failed_at:.2f} s" if failed_at is not None else "before the first poll"
        print(
            f"node {victim.ip} SIGKILLed: model failed after {seen}, "
            f"serving again on {now} after {back:.2f} s"
        )
    finally:
        for gateway in gateways:
            if gateway.process.poll() is None:
                gateway.stop(timeout=60)
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
