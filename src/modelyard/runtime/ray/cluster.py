"""The gateway's view of a Ray cluster: its nodes, their agents, their GPUs.

`RayCluster` is also the placement inventory (`GpuInventory`) on a cluster. A GPU is the
pair (node, GPU on that node); the placement policy keys GPUs by an int, so each pair gets
a cluster-wide number the first time it is seen, kept for the gateway's life (a node that
comes back keeps its numbers). `GpuInfo.node` says which node a number is on, and the
policy never spreads one engine over two nodes.

Reads never wait for the cluster: each agent's report (GPUs, memory each engine tree holds)
is fetched in the background every `node_check_interval` and after each start and stop, so
planning and `/gateway/status` answer from the last report. An agent that does not answer
marks its node lost: its GPUs leave the inventory, its engines are reported gone (their
models fail with an event), and the next request places them on a node that is there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from modelyard.config.schema import RayConfig
from modelyard.observability.events import EventBus
from modelyard.placement.inventory import GpuInfo
from modelyard.runtime.ray.node_side import NodeAgent

log = logging.getLogger("modelyard.ray")

AGENT_START_TIMEOUT_S = 60.0
REPORT_TIMEOUT_S = 2.0
REPORTS_MISSED_FOR_LOSS = 2
NODE_SCAN_EVERY_S = 2.0


def end_actor(actor: Any) -> None:
    """`ray.kill`, never raising, and never on a Ray that is not connected (any Ray call
    there would start a local Ray instance of its own)."""
    if actor is None or not ray.is_initialized():
        return
    with contextlib.suppress(Exception):
        ray.kill(actor)


class RayUnavailable(Exception):
    """The cluster cannot be reached or has no node to run on."""


@dataclass
class NodeView:
    node_id: str
    ip: str
    agent: Any = None  # the agent's actor handle
    hostname: str = ""
    alive: bool = True
    gpus: list[dict[str, Any]] = field(default_factory=list)
    held: dict[int, dict[int, int]] = field(default_factory=dict)  # root pid -> gpu -> bytes
    problem: str | None = None
    reported_at: float | None = None
    lost_reason: str | None = None
    missed: int = 0  # reports in a row that did not come in time

    @property
    def label(self) -> str:
        return self.ip


NodeLostListener = Callable[[str, str], None]  # (node_id, reason)


class RayCluster:
    def __init__(self, config: RayConfig, events: EventBus) -> None:
        self.config = config
        self.events = events
        self.nodes: dict[str, NodeView] = {}
        self._keys: dict[tuple[str, int], int] = {}  # (node_id, gpu) -> cluster-wide index
        self._engine_roots: dict[str, set[int]] = {}  # node_id -> engine root pids
        self._node_lost_listeners: list[NodeLostListener] = []
        self._started_listeners: list[Callable[[], None]] = []
        self._close_listeners: list[Callable[[], None]] = []
        self._monitor: asyncio.Task[None] | None = None
        # Per node, completed (with the reason) when it is declared lost: a start under way
        # there gives up at once instead of waiting for Ray to fail its actor.
        self._lost_signals: dict[str, asyncio.Future[str]] = {}

    # ----- connecting -----

    def connect(self) -> None:
        """`ray.init` to the configured cluster (blocking, well under a second)."""
        self._check_reachable()
        try:
            ray.init(
                address=self.config.address,
                namespace=self.config.namespace,
                _node_ip_address=self.config.node_address,
                logging_level=logging.WARNING,
                log_to_driver=False,
                configure_logging=False,
            )
        except Exception as error:  # ConnectionError, RuntimeError, ValueError alike
            raise RayUnavailable(
                f"cannot connect to the Ray cluster at {self.config.address!r}: {error}"
            ) from error

    def _check_reachable(self) -> None:
        # Ray's core retries an unreachable GCS for about a minute and then ends the process
        # from C++ ("The program will terminate"): look first, and fail with a clear message.
        host, sep, port = self.config.address.rpartition(":")
        if not sep or not port.isdigit():
            return  # "auto", or a form Ray resolves itself
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        except OSError as error:
            raise RayUnavailable(
                f"cannot connect to the Ray cluster at {self.config.address!r}: {error} "
                "(is the head started with `ray start --head`?)"
            ) from error

    async def start(self) -> None:
        """Agents on nodes that joined since `discover`, then the reports in the background."""
        await self._add_new_nodes()
        if not any(node.alive for node in self.nodes.values()):
            raise RayUnavailable("the Ray cluster has no live node")
        self._monitor = asyncio.create_task(self._monitor_forever())
        for listener in self._started_listeners:
            listener()

    async def close(self) -> None:
        for listener in self._close_listeners:
            with contextlib.suppress(Exception):
                listener()
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        for node in self.nodes.values():
            if node.agent is not None:
                end_actor(node.agent)
        with contextlib.suppress(Exception):
            ray.shutdown()

    def discover(self) -> None:
        """Start an agent on every live node and wait for their first reports (blocking: at
        gateway start, so that placement knows from the outset whether there are GPUs)."""
        listed = ray.nodes()  # type: ignore[no-untyped-call]
        fresh = [self._new_agent(entry) for entry in self._fresh_nodes(listed)]
        for entry, agent in fresh:
            try:
                report = ray.get(agent.start.remote(), timeout=AGENT_START_TIMEOUT_S)
            except Exception as error:
                self._no_agent(entry, agent, error)
                continue
            self._joined(entry, agent, report)

    async def _add_new_nodes(self) -> None:
        listed = await asyncio.to_thread(ray.nodes)
        fresh = [self._new_agent(entry) for entry in self._fresh_nodes(listed)]
        await asyncio.gather(*(self._start_agent(entry, agent) for entry, agent in fresh))

    def _fresh_nodes(self, listed: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            entry
            for entry in listed
            if entry.get("Alive")
            and (entry["NodeID"] not in self.nodes or not self.nodes[entry["NodeID"]].alive)
        ]

    def _new_agent(self, entry: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        # Actor handles are typed as Any: Ray's stubs do not follow `.options(...).remote()`.
        agent: Any = (
            ray.remote(NodeAgent)
            .options(
                num_cpus=0,  # agents must not queue behind engines on 1-CPU nodes
                max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(
                    str(entry["NodeID"]), soft=False
                ),
            )
            .remote()
        )
        return entry, agent

    async def _start_agent(self, entry: dict[str, Any], agent: Any) -> None:
        try:
            report = await asyncio.wait_for(agent.start.remote(), AGENT_START_TIMEOUT_S)
        except Exception as error:
            self._no_agent(entry, agent, error)
            return
        self._joined(entry, agent, report)

    def _no_agent(self, entry: dict[str, Any], agent: Any, error: Exception) -> None:
        log.warning("no agent on node %s: %s", entry["NodeManagerAddress"], error)
        end_actor(agent)

    def _joined(self, entry: dict[str, Any], agent: Any, report: dict[str, Any]) -> None:
        node_id, ip = str(entry["NodeID"]), str(entry["NodeManagerAddress"])
        node = NodeView(node_id, ip, agent)
        self.nodes[node_id] = node
        self._lost_signals.pop(node_id, None)  # back after a loss: a new life, a new signal
        self._take_report(node, report)
        gpus = ", ".join(f"{g['name']} ({g['total'] / 1024**3:.0f} GiB)" for g in node.gpus)
        self.events.emit(
            "node_joined",
            None,
            f"node {ip}: {gpus or 'no GPUs'}",
            node=ip,
            node_id=node_id,
            gpus=len(node.gpus),
        )
        for orphan in report.get("orphans_stopped", []):
            self._orphan_event(node, orphan)

    def _orphan_event(self, node: NodeView, orphan: dict[str, Any]) -> None:
        name = str(orphan.get("name", "")).rpartition("/")[2] or None
        self.events.emit(
            "orphan_stopped",
            name,
            f"engine pid {orphan.get('pid')} on node {node.ip}, left by an earlier gateway, was "
            + ("stopped" if orphan.get("stopped") else "still running after SIGKILL"),
            node=node.ip,
        )

    # ----- reports and failures -----

    async def _monitor_forever(self) -> None:
        last_scan = time.monotonic()
        while True:
            await asyncio.sleep(self.config.node_check_interval)
            await asyncio.gather(
                *(self.refresh(node_id) for node_id, n in self.nodes.items() if n.alive),
                return_exceptions=True,
            )
            if time.monotonic() - last_scan >= NODE_SCAN_EVERY_S:
                last_scan = time.monotonic()
                with contextlib.suppress(Exception):
                    await self._add_new_nodes()

    async def refresh(self, node_id: str) -> bool:
        """Fetch one node's report now; False if the node is lost.

        Never joins a fetch already under way: that one may predate what the caller needs
        to see (an engine that just claimed its memory, or just gave it back).
        """
        await self._fetch(node_id)
        node = self.nodes.get(node_id)
        return node is not None and node.alive

    async def _fetch(self, node_id: str) -> None:
        node = self.nodes.get(node_id)
        if node is None or not node.alive:
            return
        roots = sorted(self._engine_roots.get(node_id, set()))
        try:
            report = await asyncio.wait_for(node.agent.report.remote(roots), REPORT_TIMEOUT_S)
        except TimeoutError:
            # A slow answer may be a busy machine: lost only at the second one in a row. An
            # agent that Ray reports dead (the raylet is gone) is lost at once, below.
            node.missed += 1
            if node.missed >= REPORTS_MISSED_FOR_LOSS:
                self.mark_lost(node_id, f"its agent did not answer {node.missed} times in a row")
            return
        except Exception as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            self.mark_lost(node_id, f"its agent is gone ({type(error).__name__}: {first})")
            return
        node.missed = 0
        self._take_report(node, report)

    def _take_report(self, node: NodeView, report: dict[str, Any]) -> None:
        node.hostname = str(report.get("hostname", ""))
        node.gpus = list(report.get("gpus", []))
        node.held = {
            int(root): {int(gpu): int(size) for gpu, size in held.items()}
            for root, held in report.get("held", {}).items()
        }
        node.problem = report.get("problem")
        node.reported_at = time.time()
        for gpu in node.gpus:
            self._key(node.node_id, int(gpu["index"]))
        for orphan in report.get("orphans_stopped_since", []):
            self._orphan_event(node, orphan)

    def mark_lost(self, node_id: str, reason: str) -> None:
        """The node is gone: drop its GPUs, fail its engines, say so once."""
        node = self.nodes.get(node_id)
        if node is None or not node.alive:
            return
        node.alive = False  # out of `gpus()` and `live_nodes()`: out of every plan, now
        node.lost_reason = reason
        lost = self._lost_signals.get(node_id)
        if lost is not None and not lost.done():
            lost.set_result(f"node {node.ip} is lost: {reason}")
        self.events.emit(
            "node_lost", None, f"node {node.ip} is lost: {reason}", node=node.ip, node_id=node_id
        )
        for listener in list(self._node_lost_listeners):
            listener(node_id, f"node {node.ip} is lost: {reason}")
        end_actor(node.agent)

    def on_node_lost(self, listener: NodeLostListener) -> None:
        self._node_lost_listeners.append(listener)

    def on_started(self, listener: Callable[[], None]) -> None:
        self._started_listeners.append(listener)

    def on_close(self, listener: Callable[[], None]) -> None:
        self._close_listeners.append(listener)

    def lost_signal(self, node_id: str) -> asyncio.Future[str]:
        """Completes (with the reason) when the node is declared lost; done already if it
        is lost or unknown."""
        lost = self._lost_signals.get(node_id)
        if lost is None:
            lost = self._lost_signals[node_id] = asyncio.get_running_loop().create_future()
            node = self.nodes.get(node_id)
            if node is None or not node.alive:
                lost.set_result(f"node {node.ip if node else node_id} is lost")
        return lost

    async def check_after_actor_failure(self, node_id: str) -> bool:
        """An engine's actor on the node died, or could not be started there: ask the node's
        agent now. An agent that does not answer either (a timeout, not only an error) means
        the node is lost: two signs at once, so it is not given the second report in a row a
        merely slow node gets. Returns whether the node is alive."""
        node = self.nodes.get(node_id)
        if node is None or not node.alive:
            return False
        missed = node.missed
        await self._fetch(node_id)
        if node.alive and node.missed > missed:
            self.mark_lost(node_id, "an engine's actor there failed and its agent did not answer")
        return node.alive

    def node_alive(self, node_id: str) -> bool:
        node = self.nodes.get(node_id)
        return node is not None and node.alive

    # ----- engines (told by the runtime) -----

    def engine_started(self, node_id: str, pid: int) -> None:
        self._engine_roots.setdefault(node_id, set()).add(pid)

    def engine_gone(self, node_id: str, pid: int) -> None:
        self._engine_roots.get(node_id, set()).discard(pid)

    # ----- the placement inventory -----

    def _key(self, node_id: str, local: int) -> int:
        key = self._keys.get((node_id, local))
        if key is None:
            key = self._keys[(node_id, local)] = len(self._keys)
        return key

    def locate(self, index: int) -> tuple[str, int]:
        """The (node id, GPU on that node) behind a cluster-wide GPU index."""
        for pair, key in self._keys.items():
            if key == index:
                return pair
        raise KeyError(index)

    def node_gpus(self, indexes: object) -> list[int]:
        """The GPUs' numbers on their node, for cluster-wide `indexes` (for status)."""
        found = []
        for index in indexes if isinstance(indexes, list) else []:
            with contextlib.suppress(KeyError, ValueError, TypeError):
                found.append(self.locate(int(index))[1])
        return found

    def gpus(self) -> list[GpuInfo]:
        """Every GPU of every live node, as last reported."""
        found = []
        for node in self.nodes.values():
            if not node.alive:
                continue
            for gpu in node.gpus:
                total, used = int(gpu["total"]), int(gpu["used"])
                found.append(
                    GpuInfo(
                        index=self._key(node.node_id, int(gpu["index"])),
                        name=str(gpu["name"]),
                        total_bytes=total,
                        used_bytes=used,
                        free_bytes=max(total - used, 0),
                        node=node.label,
                        local_index=int(gpu["index"]),
                    )
                )
        return sorted(found, key=lambda gpu: gpu.index)

    def process_memory(self, pids: Iterable[int]) -> dict[int, int]:
        """Bytes the engine trees rooted at `pids` hold per cluster-wide GPU (last report).

        Engine pids are node-local; each is looked up on the node the runtime started it on.
        """
        wanted = set(pids)
        held: dict[int, int] = {}
        for node_id, roots in self._engine_roots.items():
            node = self.nodes.get(node_id)
            if node is None or not node.alive:
                continue
            for root in roots & wanted:
                for local, size in node.held.get(root, {}).items():
                    index = self._key(node_id, local)
                    held[index] = held.get(index, 0) + size
        return held

    # ----- status -----

    def node_status(self) -> list[dict[str, Any]]:
        return [
            {
                "node": node.label,
                "node_id": node.node_id,
                "hostname": node.hostname,
                "alive": node.alive,
                "gpus": [self._key(node.node_id, int(g["index"])) for g in node.gpus],
                "engines": len(self._engine_roots.get(node.node_id, ())),
                "reported_ago_s": None
                if node.reported_at is None
                else round(time.time() - node.reported_at, 3),
                "problem": node.problem,
                "lost_reason": node.lost_reason,
            }
            for node in self.nodes.values()
        ]

    def live_nodes(self) -> list[NodeView]:
        return [node for node in self.nodes.values() if node.alive]
