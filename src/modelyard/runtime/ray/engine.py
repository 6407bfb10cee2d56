"""Engines on Ray nodes, behind the same interface as local processes (`EngineHandle`).

`RayRuntime.start` is an `EngineStarter`: the scheduler cannot tell it from the process
runtime. The GPUs placement chose name their node (cluster-wide indexes, see `cluster.py`);
the engine's actor is pinned there (`soft=False`: never silently elsewhere), picks a port on
the node's address, and starts the engine. The gateway then talks HTTP to `host:port`
directly, for health checks and for every request: Ray is never in the data path.

The engine's exit reaches the gateway through one long call (`wait_exit`) held open on the
actor. When the actor dies (killed, its worker SIGKILLed, its node gone, the gateway that owns
it gone) that call fails, and the engine counts as exited at once, so the scheduler marks the
model failed with a crash event like any other engine crash, and the next request starts it
again. An engine whose node is declared lost exits with `ExitInfo.node_lost`, and a start
whose node is lost under it fails with `EngineStartError.node_lost` (at the declaration, not
when Ray gives up on the actor): neither is the engine's failure, so neither counts toward
the crash-loop back-off, and such a start is tried once more elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from modelyard.engines.base import LaunchSpec
from modelyard.runtime.logs import EngineLog
from modelyard.runtime.ports import OFFERS, PortBook
from modelyard.runtime.process import EngineStartError, ExitInfo, redacted
from modelyard.runtime.ray.cluster import RayCluster, end_actor
from modelyard.runtime.ray.node_side import EngineActor
from modelyard.runtime.readiness import engine_answers, poll_until_ready

log = logging.getLogger("modelyard.ray")

ACTOR_START_TIMEOUT_S = 60.0
SPARE_CHECK_TIMEOUT_S = 2.0
LOG_POLL_S = 1.0
# 127.0.0.1 as a whole address ("--host 127.0.0.1", "--host=127.0.0.1", "127.0.0.1:8000").
_LOOPBACK = re.compile(r"(?<![\d.])127\.0\.0\.1(?![\d.])")


def bind_to(argv: list[str], host: str) -> list[str]:
    """The engine's argv with the loopback address it would bind replaced by `host`.

    Engine kinds bind engines to 127.0.0.1 on one machine; on a cluster the gateway reaches
    them on their node's address (`--host 127.0.0.1`, `--host=127.0.0.1`, or a command's
    `{host}`).
    """
    return [_LOOPBACK.sub(host, part.replace("{host}", host)) for part in argv]


class RayEngine:
    """One engine running under its actor on some node."""

    remote = False  # ours, on another machine

    def __init__(
        self,
        name: str,
        spec: LaunchSpec,
        actor: Any,
        where: dict[str, Any],
        pid: int,
        log: EngineLog,
        cluster: RayCluster,
        health_session: aiohttp.ClientSession,
    ) -> None:
        self.name = name
        self.spec = spec
        self.node_id = str(where["node_id"])
        self.node = str(where["ip"])
        self.host = str(where["ip"])
        self.port = int(where["port"])
        self.base_url = f"http://{self.host}:{self.port}"
        # The engine's own key (it is reachable from the cluster's network, not only here).
        self.upstream_headers = spec.upstream_headers
        self.pid = pid
        self.actor_name = ""
        # Told when the engine is ready: the runtime warms the node's next spare actor then,
        # not while this engine loads (a worker start costs a core for most of a second).
        self.on_ready: Callable[[str], None] | None = None
        self.started_at = time.monotonic()
        self.log = log
        self._actor = actor
        self._cluster = cluster
        self._health_session = health_session
        self._output_seen = asyncio.Event()
        self._unsubscribe = log.subscribe(lambda _line: self._output_seen.set())
        self.exited: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._lines_read = 0
        self._log_lock = asyncio.Lock()
        self._stopping = False
        self._mirror = asyncio.create_task(self._mirror_log())
        self._waiter = asyncio.create_task(self._wait_exit())
        cluster.engine_started(self.node_id, pid)

    async def _wait_exit(self) -> None:
        code: int | None = None
        try:
            code = await self._actor.wait_exit.remote()
            await self._catch_up_log()
            if not self._stopping:
                # It exited on its own: its actor has nothing left to do (a stop ends it).
                end_actor(self._actor)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            # The actor is gone: killed, its worker or node died, or Ray lost it. The engine
            # is lost now (its requests end, the model fails); asking the node's agent which
            # it was takes up to a report timeout, so that only words the cause, afterwards.
            self._gone(None)
            if self._stopping:
                return  # our own stop ended it
            node_ok = await self._cluster.check_after_actor_failure(self.node_id)
            cause = "its actor died" if node_ok else f"node {self.node} is lost"
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            self.log.append(f"[modelyard] engine lost: {cause} ({type(error).__name__}: {first})")
            return
        self._gone(code)

    def _gone(self, code: int | None, node_lost: bool = False) -> None:
        self._cluster.engine_gone(self.node_id, self.pid)
        if not self.exited.done():
            self.exited.set_result(ExitInfo(code, time.monotonic(), node_lost=node_lost))

    def node_lost(self, reason: str) -> None:
        """The cluster lost this engine's node: the engine is gone with it."""
        if not self.exited.done():
            self.log.append(f"[modelyard] engine lost: {reason}")
            self._gone(None, node_lost=True)
        # If the node was only unreachable for a while, its engine must not serve on unseen:
        # ending the actor ends the engine's process group (a no-op on a dead node).
        end_actor(self._actor)

    async def _mirror_log(self) -> None:
        # The engine's output lives on its node; a copy here serves errors, the log route and
        # the dashboard, and wakes readiness checks as soon as the engine prints.
        while not self.exited.done():
            try:
                await self._catch_up_log(wait=LOG_POLL_S)
            except asyncio.CancelledError:
                raise
            except Exception:
                return  # the actor is gone; _wait_exit reports it

    async def _catch_up_log(self, wait: float = 0.0) -> None:
        async with self._log_lock:  # one reader at a time, or lines would be copied twice
            await self._copy_new_lines(wait)

    async def _copy_new_lines(self, wait: float) -> None:
        count, lines = await self._actor.read_log.remote(self._lines_read, wait)
        skipped = count - self._lines_read - len(lines)
        if skipped > 0:
            self.log.append(f"[modelyard] {skipped} lines of engine output were dropped")
        for line in lines:
            self.log.append(line)
        self._lines_read = count

    @property
    def health_path(self) -> str:
        return self.spec.health_path

    def subscribe_log(self, on_line: Callable[[str], None]) -> Callable[[], None]:
        """Call `on_line` with each new output line (mirrored from the node)."""
        return self.log.subscribe(on_line)

    @property
    def alive(self) -> bool:
        return not self.exited.done()

    def exit_code(self) -> int | None:
        return self.exited.result().code if self.exited.done() else None

    def log_tail(self, count: int) -> list[str]:
        return self.log.tail(count)

    def process_gone(self) -> bool:
        return self.exited.done()

    async def wait_ready(self, deadline: float) -> float:
        started = time.monotonic()
        outcome = await poll_until_ready(
            lambda: engine_answers(self._health_session, self.base_url, self.spec),
            self.exited,
            self._output_seen,
            deadline,
        )
        if outcome != "ready":
            what = "exited while starting" if outcome == "exited" else "was not ready in time"
            code = self.exit_code()
            detail = f" (exit code {code})" if code is not None else ""
            with_node = self.exited.done() and self.exited.result().node_lost
            # Alive but not ready in time is not a crash (the scheduler tells them apart),
            # nor is an engine whose node was lost under it.
            raise EngineStartError(
                f"engine for {self.name!r} on node {self.node} {what}{detail}",
                code,
                self.log.tail(20),
                timed_out=outcome == "timeout",
                node_lost=with_node,
            )
        # Measure what the engine holds now: placement learns its footprint from this.
        await self._cluster.refresh(self.node_id)
        if self.on_ready is not None:
            self.on_ready(self.node_id)
        return time.monotonic() - started

    async def stop(self, grace: float) -> int | None:
        """TERM then KILL the engine's processes (on its node), then end its actor."""
        self._stopping = True
        self._mirror.cancel()  # its long poll would hold the last catch-up for a second
        if self.alive:
            call = asyncio.ensure_future(
                asyncio.wait_for(self._actor.stop.remote(grace), grace + 15.0)
            )
            # A node declared lost meanwhile (a frozen node never answers the call) ends the
            # stop: the engine is gone with it, or is ended with its actor if the node thaws.
            watched: set[asyncio.Future[Any]] = {call, self.exited}
            try:
                await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                call.cancel()
                raise
            code = None
            if call.done():
                try:
                    code = call.result()
                    await self._catch_up_log()
                except Exception as error:  # the actor or node is gone: so is the engine
                    self.log.append(f"[modelyard] stop: actor unreachable ({type(error).__name__})")
            else:
                call.cancel()
            self._gone(code)
        end_actor(self._actor)
        self._waiter.cancel()
        self._unsubscribe()
        self.log.close()
        # The memory placement waits for is on the node: look again now.
        await self._cluster.refresh(self.node_id)
        return self.exit_code()

    def kill_now(self) -> None:
        end_actor(self._actor)


class RayRuntime:
    """Starts each engine under its own actor, on the node of the GPUs placement chose."""

    def __init__(
        self, cluster: RayCluster, state_dir: Path, health_session: aiohttp.ClientSession
    ) -> None:
        self.cluster = cluster
        self.state_dir = state_dir
        self._health_session = health_session
        self.ports = PortBook()  # by node address: engines of ours on one node never share one
        self._engines: set[RayEngine] = set()
        self._count = 0
        self._spares: dict[str, tuple[Any, str]] = {}  # node id -> a warm, unused actor
        self._warming: set[str] = set()
        self._tasks: set[asyncio.Future[None]] = set()
        cluster.on_node_lost(self._node_lost)
        cluster.on_started(self.warm_all)
        cluster.on_close(self.close)

    def _node_lost(self, node_id: str, reason: str) -> None:
        spare = self._spares.pop(node_id, None)
        if spare is not None:
            end_actor(spare[0])
        for engine in list(self._engines):
            if engine.node_id == node_id:
                engine.node_lost(reason)

    def _choose_node(self, spec: LaunchSpec) -> tuple[str, str | None]:
        """The node of the planned GPUs (and CUDA_VISIBLE_DEVICES on it); without GPUs,
        the live node with the fewest of our engines."""
        visible = spec.env.get("CUDA_VISIBLE_DEVICES")
        if visible:
            pairs = [self.cluster.locate(int(index)) for index in visible.split(",") if index]
            nodes = {node for node, _ in pairs}
            if len(nodes) != 1:
                raise EngineStartError("one engine cannot span nodes", None, [])
            return nodes.pop(), ",".join(str(local) for _, local in pairs)
        live = self.cluster.live_nodes()
        if not live:
            raise EngineStartError("no live node in the Ray cluster", None, [])
        load = {node.node_id: 0 for node in live}
        for engine in self._engines:
            if engine.node_id in load:
                load[engine.node_id] += 1
        return min(load, key=lambda node_id: load[node_id]), None

    async def start(self, name: str, spec_for_port: Callable[[int], LaunchSpec]) -> RayEngine:
        log_name = spec_for_port(0).log_name or name
        log_file = EngineLog(self.state_dir / "logs" / f"{_file_safe(log_name)}.log")
        node_id = ""
        try:
            node_id, visible = self._choose_node(spec_for_port(0))
            if not self.cluster.node_alive(node_id):
                raise EngineStartError(
                    f"the node planned for {name!r} is lost", None, [], node_lost=True
                )
            launched = await _unless_lost(
                self._launch(name, spec_for_port, node_id, visible, log_file),
                self.cluster.lost_signal(node_id),
            )
        except EngineStartError as error:
            log_file.append(f"[modelyard] could not start: {error}")
            log_file.close()
            raise EngineStartError(
                f"engine for {name!r} could not be started: {error}",
                None,
                log_file.tail(5),
                node_lost=error.node_lost,
            ) from error
        except Exception as error:
            # Ray's own error when the node died under the start is not the engine's fault:
            # its agent is asked before the failure is counted.
            node_lost = bool(node_id) and not await self.cluster.check_after_actor_failure(node_id)
            log_file.append(f"[modelyard] could not start: {error}")
            log_file.close()
            raise EngineStartError(
                f"engine for {name!r} could not be started on the Ray cluster: {error}",
                None,
                log_file.tail(5),
                node_lost=node_lost,
            ) from error
        engine = RayEngine(
            name,
            launched.spec,
            launched.actor,
            launched.where,
            launched.pid,
            log_file,
            self.cluster,
            self._health_session,
        )
        engine.actor_name = launched.actor_name
        engine.on_ready = self._warm
        self._engines.add(engine)
        engine.exited.add_done_callback(lambda _f: self._engines.discard(engine))
        ip, port = str(launched.where["ip"]), int(launched.where["port"])
        engine.exited.add_done_callback(lambda _f: self.ports.release(ip, port))
        if not self.cluster.node_alive(node_id):  # lost in the moment since the launch
            engine.node_lost(f"node {engine.node} was lost as its engine started")
        return engine

    async def _launch(
        self,
        name: str,
        spec_for_port: Callable[[int], LaunchSpec],
        node_id: str,
        visible: str | None,
        log_file: EngineLog,
    ) -> _Launched:
        """An actor on the node, and the engine started under it."""
        began = time.monotonic()
        actor, actor_name, where = await self._take_actor(node_id)
        claimed = False
        try:
            where = await self._own_port(actor, where)
            claimed = True
            spec = spec_for_port(int(where["port"]))
            env = dict(spec.env)
            if visible is not None:
                env["CUDA_VISIBLE_DEVICES"] = visible  # the GPUs' numbers on that node
            argv = bind_to(spec.argv, str(where["ip"]))
            log_file.append(
                f"[modelyard] placed on node {where['ip']} ({node_id[:12]}), actor "
                f"{actor_name} ready in {(time.monotonic() - began) * 1000:.0f} ms"
            )
            pid = await asyncio.wait_for(
                actor.start.remote(name, argv, env, " ".join(redacted(argv))),
                ACTOR_START_TIMEOUT_S,
            )
        except BaseException:
            if claimed:
                self.ports.release(str(where["ip"]), int(where["port"]))
            end_actor(actor)
            raise
        return _Launched(actor, actor_name, where, int(pid), spec)

    async def _own_port(self, actor: Any, where: dict[str, Any]) -> dict[str, Any]:
        """`where` with a port that no engine of ours on that node holds or held lately (the
        actor's port is one the node's kernel calls free, as `PortBook.take` asks locally)."""
        for _ in range(OFFERS):
            if self.ports.claim(str(where["ip"]), int(where["port"])):
                return where
            where = await asyncio.wait_for(actor.where.remote(), SPARE_CHECK_TIMEOUT_S)
        raise EngineStartError(
            f"node {where['ip']} offered no port that is not in use by an engine", None, []
        )

    # ----- actors -----

    def _new_actor(self, node_id: str) -> tuple[Any, str]:
        self._count += 1
        actor_name = f"modelyard-engine:{os.getpid()}:{self._count}"
        actor: Any = (
            ray.remote(EngineActor)
            .options(
                name=actor_name,  # `ray list actors` finds it; status shows it per model
                num_cpus=0,
                max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            )
            .remote(self.cluster.config.namespace)
        )
        return actor, actor_name

    async def _take_actor(self, node_id: str) -> tuple[Any, str, dict[str, Any]]:
        """An actor on the node, ready: the node's warm spare if there is one (a new actor
        needs a new worker process, most of a second), then a new spare is warmed."""
        spare = self._spares.pop(node_id, None)
        if spare is not None:
            actor, actor_name = spare
            try:
                where = await asyncio.wait_for(actor.where.remote(), SPARE_CHECK_TIMEOUT_S)
                return actor, actor_name, where
            except Exception:
                end_actor(actor)
        actor, actor_name = self._new_actor(node_id)
        try:
            where = await asyncio.wait_for(actor.where.remote(), ACTOR_START_TIMEOUT_S)
        except BaseException:
            end_actor(actor)
            raise
        return actor, actor_name, where

    def _warm(self, node_id: str) -> None:
        if not self.cluster.config.warm_actors or node_id in self._warming:
            return
        self._warming.add(node_id)
        task = asyncio.ensure_future(self._warm_spare(node_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _warm_spare(self, node_id: str) -> None:
        try:
            actor, actor_name = self._new_actor(node_id)
            try:
                await asyncio.wait_for(actor.ping.remote(), ACTOR_START_TIMEOUT_S)
            except Exception:
                end_actor(actor)
                return
            if node_id in self._spares or not self.cluster.node_alive(node_id):
                end_actor(actor)
                return
            self._spares[node_id] = (actor, actor_name)
        finally:
            self._warming.discard(node_id)

    def warm_all(self) -> None:
        """A spare actor on every live node, so even the first start skips a worker start."""
        for node in self.cluster.live_nodes():
            self._warm(node.node_id)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for actor, _name in self._spares.values():
            end_actor(actor)
        self._spares.clear()
        for engine in list(self._engines):
            engine.kill_now()


@dataclass(frozen=True)
class _Launched:
    actor: Any
    actor_name: str
    where: dict[str, Any]
    pid: int
    spec: LaunchSpec


async def _unless_lost(
    launch: Coroutine[Any, Any, _Launched], lost: asyncio.Future[str]
) -> _Launched:
    """The launch's result, or `EngineStartError(node_lost=True)` as soon as its node is
    declared lost: Ray fails an actor call to a dead node only when it notices the node is
    dead itself (seconds later; a frozen node, much later)."""
    task = asyncio.ensure_future(launch)
    try:
        watched: set[asyncio.Future[Any]] = {task, lost}
        await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()  # its own cleanup ends the actor
        raise
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise EngineStartError(lost.result(), None, [], node_lost=True)


def _file_safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-#" else "_" for ch in name)
