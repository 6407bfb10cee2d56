"""A real Ray cluster on this machine: a head and worker nodes on 127.0.0.2 and up.

Each node is one `ray start --block` process started here, with its own environment (its own
simulated GPU ledger, FAKE_GPU_DIR) and its own ports: nodes on one host must not share the
dashboard agent's or the metrics ports. `stop` ends exactly what we started: the `ray start`
processes and every descendant they had (Ray's agents re-parent themselves to init when the
raylet dies, so the tree is collected before anything is signalled), never by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from modelyard.proctree import process_start_ticks, process_tree
from tests import fake_gpu

RAY = str(Path(sys.executable).with_name("ray"))
TESTS = Path(__file__).resolve().parents[1]
GIB = 1024**3

# The settings a modelyard cluster needs (docs/ray.md): engines die with
# their actor's worker, dead nodes are noticed in seconds, the object store stays small.
NODE_ENV = {
    "RAY_process_group_cleanup_enabled": "1",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_USAGE_STATS_ENABLED": "0",
    # A loaded 2-core machine registers nodes slowly; the default gives up after 30 s.
    "RAY_raylet_start_wait_time_s": "120",
}
OBJECT_STORE_BYTES = 80 * 1024 * 1024


def free_base_port() -> int:
    """A base port whose block (the ports the nodes use) is free on 127.0.0.2 now."""
    for base in random.sample(range(20000, 40000, 500), 40):
        if all(_port_free(port) for port in range(base, base + 460)):
            return base
    raise AssertionError("no free block of ports for a Ray cluster")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("", port))  # any address: a node binds some ports on all of them
        except OSError:
            return False
    return True


class NodeStartFailed(AssertionError):
    pass


@dataclass
class Node:
    ip: str
    process: subprocess.Popen[bytes]
    gpu_dir: Path
    log: Path
    # pid -> its kernel start time, so a pid reused by someone else is never signalled
    descendants: dict[int, int | None] = field(default_factory=dict)

    def remember_tree(self) -> None:
        """Note every process this node runs now (agents outlive a killed raylet)."""
        if self.process.poll() is None:
            for pid in process_tree(self.process.pid):
                self.descendants.setdefault(pid, process_start_ticks(pid))

    def kill(self) -> None:
        """Take the node down hard, as a machine that loses power (SIGKILL to all of it)."""
        self.remember_tree()
        for pid in self.alive_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)

    def alive_pids(self) -> list[int]:
        self.remember_tree()
        return [
            pid
            for pid, ticks in self.descendants.items()
            if _alive(pid) and process_start_ticks(pid) == ticks
        ]


@dataclass
class LocalCluster:
    base_port: int
    root: Path
    nodes: list[Node] = field(default_factory=list)
    failed: list[Node] = field(default_factory=list)  # nodes that did not start (cleaned up)

    @property
    def address(self) -> str:
        return f"127.0.0.2:{self.base_port}"

    def start_node(self, index: int, gpus: dict[int, int], slot: int | None = None) -> Node:
        """Node `index` (0 is the head) at 127.0.0.{index + 2} with simulated GPUs; `slot`
        picks its block of ports (default: `index`; a retry takes another)."""
        ip = f"127.0.0.{index + 2}"
        slot = index if slot is None else slot
        gpu_dir = self.root / f"gpu-{ip}"
        fake_gpu.create(gpu_dir, gpus)
        ports = self.base_port + 10 + slot * 10
        argv = [
            RAY,
            "start",
            "--block",
            f"--node-ip-address={ip}",
            "--num-cpus=1",
            "--num-gpus=0",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            f"--dashboard-agent-listen-port={ports}",
            f"--dashboard-agent-grpc-port={ports + 1}",
            f"--metrics-export-port={ports + 2}",
            f"--runtime-env-agent-port={ports + 3}",
            f"--node-manager-port={ports + 4}",
            f"--object-manager-port={ports + 5}",
            f"--min-worker-port={self.base_port + 100 + slot * 60}",
            f"--max-worker-port={self.base_port + 159 + slot * 60}",
            "--disable-usage-stats",
        ]
        if index == 0:
            argv += [
                "--head",
                f"--port={self.base_port}",
                "--include-dashboard=false",
                f"--dashboard-port={self.base_port + 1}",
                f"--temp-dir={self.root / 'ray'}",
            ]
        else:
            argv.append(f"--address={self.address}")
        env = {
            **os.environ,
            **NODE_ENV,
            "FAKE_GPU_DIR": str(gpu_dir),
            # The node agent reads the GPUs through this stand-in for pynvml (fake_nvml.py).
            "MODELYARD_NVML_MODULE": "tests.fake_nvml",
            "PYTHONPATH": str(TESTS.parent),
        }
        log = self.root / f"node-{ip}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        node = Node(ip, process, gpu_dir, log)
        self.nodes.append(node)
        return node

    def wait_started(self, node: Node, timeout: float = 150.0) -> None:
        """Until the node says it runs (workers that start before the head time out)."""
        deadline = time.monotonic() + timeout
        raylets: set[int] = set()
        while "Ray runtime started" not in node.log.read_text(errors="replace"):
            node.remember_tree()  # so a node that fails half-way is still cleaned up
            raylets.update(pid for pid in node.descendants if _command(pid) == "raylet")
            # A raylet that died (a port taken meanwhile) never registers: fail now, not
            # after Ray's registration timeout.
            raylet_died = bool(raylets) and not any(_alive(pid) for pid in raylets)
            if node.process.poll() is not None or raylet_died or time.monotonic() > deadline:
                node.kill()
                raise NodeStartFailed(
                    f"ray node {node.ip} did not start:\n{node.log.read_text()[-3000:]}\n"
                    + self._raylet_errors()
                )
            time.sleep(0.1)

    def start_worker(self, index: int, gpus: dict[int, int]) -> Node:
        """A worker node, tried twice: on a loaded machine a node may fail to register, and
        a port in its block may have been taken since we looked (the retry takes another)."""
        try:
            node = self.start_node(index, gpus)
            self.wait_started(node)
        except NodeStartFailed as first:
            print(f"retrying: {first}", file=sys.stderr)
            failed = self.nodes.pop()
            self.failed.append(failed)
            node = self.start_node(index, gpus, slot=index + 3)
            self.wait_started(node)
        return node

    def _raylet_errors(self) -> str:
        tails = []
        for path in sorted((self.root / "ray").glob("session_*/logs/raylet*.err")):
            tails.append(f"{path.name}: {path.read_text(errors='replace')[-1500:]}")
        return "\n".join(tails)

    def wait_nodes(self, count: int, timeout: float = 60.0) -> None:
        """Until `count` nodes are alive in the cluster (asked through a short driver)."""
        deadline = time.monotonic() + timeout
        script = (
            f"import json, ray; ray.init(address={self.address!r}, "
            "_node_ip_address='127.0.0.2', logging_level='ERROR'); "
            "print(json.dumps(sum(n['Alive'] for n in ray.nodes())))"
        )
        alive = 0
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.process.poll() is not None:
                    raise AssertionError(f"ray node {node.ip} exited:\n{node.log.read_text()}")
            try:
                result = subprocess.run(
                    [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
                )
            except subprocess.TimeoutExpired:
                continue
            if result.returncode == 0:
                alive = json.loads(result.stdout.strip().splitlines()[-1])
                if alive >= count:
                    for node in self.nodes:
                        node.remember_tree()
                    return
            time.sleep(0.5)
        raise AssertionError(f"only {alive} of {count} ray nodes came up")

    def stop(self) -> None:
        """SIGTERM every node we started (workers first), then SIGKILL what is left."""
        for node in reversed(self.nodes):
            node.remember_tree()
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        for node in reversed(self.nodes):
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.process.wait(timeout=15)
        for node in [*self.nodes, *self.failed]:
            for pid in node.alive_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
