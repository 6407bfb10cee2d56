"""What runs on each Ray node: the node agent and one actor per engine.

These classes are plain Python; the gateway turns them into actors (`ray.remote`) and pins
each to its node. They import nothing of the gateway's web side, so a node needs only
`pip install 'modelyard[ray]'`.

Why engines stay in the actor's process group (measured, shared/facts/ray-here.md): Ray
starts each actor's worker as a process-group leader, and with
`RAY_process_group_cleanup_enabled=1` the raylet kills that whole group when the worker dies
(`ray.kill`, SIGKILL, or the gateway that owns the actor going away). A tree started in a new
session escaped that and kept serving. So an engine is *not* given its own session, and a
stop signals the group's members other than the worker itself (TERM, then KILL): that reaches
vLLM's EngineCore and workers even after they were re-parented.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from modelyard.placement.inventory import GpuInventoryError, NvmlInventory
from modelyard.proctree import (
    group_members,
    is_zombie,
    process_start_ticks,
    process_tree,
)
from modelyard.runtime.logs import pump_lines

# Engines carry these in their environment: the node agent finds orphans by them.
ENGINE_MARKER = "MODELYARD_RAY_ENGINE"
OWNER_MARKER = "MODELYARD_RAY_OWNER"
# Tests point this at a stand-in for pynvml that reads a simulated GPU ledger.
NVML_MODULE_ENV = "MODELYARD_NVML_MODULE"
ORPHAN_SWEEP_S = 2.0
LOG_LINES = 2000


def node_ip() -> str:
    import ray

    return str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]


def node_id() -> str:
    import ray

    return str(ray.get_runtime_context().get_node_id())


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    found = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key in (ENGINE_MARKER.encode(), OWNER_MARKER.encode()):
            found[key.decode()] = value.decode(errors="replace")
    return found


def find_orphans() -> list[tuple[int, str]]:
    """Engine processes on this node whose owning actor worker is gone: (pid, engine name)."""
    orphans = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        marks = _environ(int(entry.name))
        if ENGINE_MARKER not in marks:
            continue
        owner, _, ticks = marks.get(OWNER_MARKER, "").partition(":")
        alive = owner.isdigit() and str(process_start_ticks(int(owner))) == ticks
        if not alive:
            orphans.append((int(entry.name), marks[ENGINE_MARKER]))
    return orphans


def stop_pids(pids: list[int], grace: float) -> list[int]:
    """TERM these processes, KILL what is left after `grace`; returns those still alive."""
    ticks = {pid: process_start_ticks(pid) for pid in pids}

    def alive() -> list[int]:
        # A zombie has exited (its parent has not reaped it yet): it is gone for our purpose.
        return [
            pid
            for pid, t in ticks.items()
            if t is not None and process_start_ticks(pid) == t and not is_zombie(pid)
        ]

    for pid in alive():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in alive():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive()


class NodeAgent:
    """One per node: the node's GPUs and what our engines hold on them; stops orphans."""

    def __init__(self) -> None:
        module = os.environ.get(NVML_MODULE_ENV)
        self._inventory = NvmlInventory(importlib.import_module(module) if module else None)
        self._sweeper: asyncio.Task[None] | None = None
        self.stopped: list[dict[str, Any]] = []

    async def start(self) -> dict[str, Any]:
        """Stop engines orphaned on this node (by an earlier gateway), then describe it."""
        stopped = await asyncio.to_thread(self._sweep)
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever())
        return {**self.report([]), "orphans_stopped": stopped}

    def _sweep(self) -> list[dict[str, Any]]:
        orphans = find_orphans()
        if not orphans:
            return []
        left = set(stop_pids([pid for pid, _ in orphans], grace=5.0))
        return [{"pid": pid, "name": name, "stopped": pid not in left} for pid, name in orphans]

    async def _sweep_forever(self) -> None:
        # Process-group cleanup normally takes engines down with their actor; this catches a
        # raylet started without RAY_process_group_cleanup_enabled=1.
        while True:
            await asyncio.sleep(ORPHAN_SWEEP_S)
            with contextlib.suppress(Exception):
                self.stopped += await asyncio.to_thread(self._sweep)

    def report(self, roots: list[int]) -> dict[str, Any]:
        """GPUs (memory now) and the bytes each engine tree (by root pid) holds per GPU."""
        try:
            gpus = [
                {"index": g.index, "name": g.name, "total": g.total_bytes, "used": g.used_bytes}
                for g in self._inventory.gpus()
            ]
            held = {root: self._inventory.process_memory([root]) for root in roots}
            problem = None
        except GpuInventoryError as error:  # a node without GPUs (or NVML) serves CPU engines
            gpus, held, problem = [], {}, str(error)
        return {
            "node_id": node_id(),
            "ip": node_ip(),
            "hostname": socket.gethostname(),
            "gpus": gpus,
            "held": held,
            "problem": problem,
            "orphans_stopped_since": self._take_stopped(),
        }

    def _take_stopped(self) -> list[dict[str, Any]]:
        stopped, self.stopped = self.stopped, []
        return stopped


class EngineActor:
    """One per engine: runs its process tree on this node, reports it, stops it."""

    def __init__(self, namespace: str) -> None:
        self.name = ""  # the model, once an engine is started (a spare actor has none yet)
        self.namespace = namespace
        self._lines: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        self._count = 0  # lines ever written (the index after the last one)
        self._new_output = asyncio.Event()
        self._process: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None

    def where(self) -> dict[str, Any]:
        """This node, and a port free on its address for the engine to bind."""
        ip = node_ip()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((ip, 0))
            port = int(sock.getsockname()[1])
        return {"node_id": node_id(), "ip": ip, "port": port, "worker_pid": os.getpid()}

    def ping(self) -> bool:
        """Answers once the actor's worker runs (a spare is warmed up with this)."""
        return True

    async def start(self, name: str, argv: list[str], env: dict[str, str], shown: str) -> int:
        """Start the engine in this worker's process group (not a new session); its pid.

        `shown` is the command line as the log may show it (secrets masked by the gateway)."""
        self.name = name
        me = os.getpid()
        marks = {
            ENGINE_MARKER: f"{self.namespace}/{self.name}",
            OWNER_MARKER: f"{me}:{process_start_ticks(me)}",
        }
        self._append(f"[modelyard] starting on {node_ip()}: {shown}")
        try:
            self._process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, **env, **marks, "PYTHONUNBUFFERED": "1"},
                limit=1024 * 1024,
            )
        except OSError as error:
            self._append(f"[modelyard] could not start: {error}")
            raise
        self._pump = asyncio.create_task(self._copy_output())
        return int(self._process.pid)

    async def _copy_output(self) -> None:
        assert self._process is not None
        assert self._process.stdout is not None
        await pump_lines(self._process.stdout, self._append)

    def _append(self, line: str) -> None:
        self._lines.append(line)
        self._count += 1
        self._new_output.set()

    async def wait_exit(self) -> int | None:
        """Returns the engine's exit code once it has exited (a long call the gateway holds)."""
        assert self._process is not None
        code = await self._process.wait()
        if self._pump is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._pump), 1.0)
        return code

    async def read_log(self, after: int, wait: float) -> tuple[int, list[str]]:
        """Lines written after line number `after` (waits up to `wait` s for the first)."""
        if self._count <= after:
            self._new_output.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._new_output.wait(), wait)
        available = min(self._count - after, len(self._lines))
        lines = list(self._lines)[len(self._lines) - available :] if available > 0 else []
        return self._count, lines

    async def stop(self, grace: float) -> int | None:
        """TERM every process of the engine, KILL what is left after `grace`; verified gone."""
        me = os.getpid()
        if os.getpgid(0) == me:
            members = [pid for pid in group_members(me) if pid != me]
        elif self._process is not None:
            # Not a group leader (a raylet without process-group cleanup): the group may be
            # the raylet's own, so only the engine's tree is signalled.
            members = process_tree(self._process.pid)
        else:
            members = []
        left = await asyncio.to_thread(stop_pids, members, grace)
        if left:
            self._append(f"[modelyard] still running after SIGKILL: {left}")
        if self._process is None:
            return None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._process.wait(), 5.0)
        return self._process.returncode
