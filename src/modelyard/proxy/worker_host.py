"""The gateway's side of its proxy workers (proxy/worker_lane.py): start them, answer them,
adopt the connections they hand over, restart one that dies, stop them at shutdown.

Everything a worker asks is decided here with the fast lane's own functions (the same Host
rule, model choice and admission as `FastLane`), and the engine is held with the scheduler's
`engine_for` from the admission until the worker says `done`: the scheduler's in-flight count
covers every worker's requests, so no engine is stopped or put to sleep under one. A worker
that dies gives its engines back at once (its requests are recorded as 502).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

from modelyard.api.accounting import TokenCount, finish, supports_running_usage
from modelyard.api.bodies import body_too_large
from modelyard.api.errors import ApiError, ErrorAnswer, unavailable
from modelyard.api.request_options import RequestOptions
from modelyard.auth.principal import Principal
from modelyard.config.schema import LimitsConfig
from modelyard.gateway import Gateway
from modelyard.observability.requests import CLIENT_CLOSED_REQUEST
from modelyard.proxy.fastpath import FAST_PATHS, FastLane, upstream_failure
from modelyard.proxy.worker_lane import HAND_OVER, Lease
from modelyard.proxy.worker_wire import ConnectionReceiver, Wire, open_wire
from modelyard.scheduler.names import Target
from modelyard.scheduler.supervisor import ModelUnavailable

log = logging.getLogger("modelyard.workers")

READY_TIMEOUT_S = 30.0
RESTART_DELAY_S = 1.0
STOP_TIMEOUT_S = 5.0


@dataclass
class Held:
    """A worker's request, admitted: the engine held for it and what `finish` needs."""

    engine: contextlib.AsyncExitStack
    tokens: TokenCount
    target: Target
    principal: Principal
    route: str
    started: float


class WorkerLink:
    """One worker process and its two socket pairs."""

    def __init__(self, host: ProxyWorkers, number: int) -> None:
        self.host = host
        self.number = number
        self.process: asyncio.subprocess.Process | None = None
        self.wire: Wire | None = None
        self.receiver: ConnectionReceiver | None = None
        self.ready = asyncio.Event()
        self.lost = asyncio.Event()
        self.admitting: dict[int, asyncio.Task[None]] = {}
        self.held: dict[int, Held] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.requests_metric = host.gateway.metrics.proxy_worker_requests.labels(str(number))

    async def start(self) -> None:
        control_here, control_there = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        handover_here, handover_there = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        host = self.host
        max_body, connect_timeout, read_timeout = lane_limits(host.gateway.config.limits)
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "modelyard.proxy.worker_lane",
                "--control-fd",
                str(control_there.fileno()),
                "--handover-fd",
                str(handover_there.fileno()),
                "--host",
                host.listen_host,
                "--port",
                str(host.port),
                "--max-body",
                str(max_body),
                "--connect-timeout",
                str(connect_timeout),
                "--read-timeout",
                str(read_timeout),
                "--log-level",
                host.log_level,
                "--log-format",
                host.gateway.config.log_format,
                pass_fds=(control_there.fileno(), handover_there.fileno()),
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            control_there.close()
            handover_there.close()
        self.wire = await open_wire(control_here, self.on_message, self.on_lost)
        self.receiver = ConnectionReceiver(handover_here, host.adopt)

    # -- messages --
    def on_message(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "admit":
            self._spawn_admission(message)
        elif kind == "done":
            self._spawn(self._done(*message[1:]))
        elif kind == "cancel":
            # The client left while its admission was pending. If the lease went out before
            # the worker heard of it, the request is over all the same: let go of the engine.
            # A finished admission stays in `admitting` until its done callback runs (the next
            # turn of the loop): cancelling it then does nothing, so look at `held` as well, or
            # the engine would stay held for good (found by the proxy benchmark: 43 holds left
            # after 50,000 requests, and a shutdown that waited its whole grace for them).
            task = self.admitting.get(message[1])
            if task is not None and not task.done():
                task.cancel()
            elif message[1] in self.held:
                self._spawn(self._done(message[1], CLIENT_CLOSED_REQUEST, None, False, {}, True))
        elif kind == "failed":
            self._spawn(self._failed(*message[1:]))
        elif kind == "ready":
            self.ready.set()
            self.host.gateway.metrics.proxy_workers_running.inc()

    def _spawn(self, coroutine: Any) -> asyncio.Task[Any]:
        task = self.host.lane.loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _spawn_admission(self, message: tuple[Any, ...]) -> None:
        request_id = message[1]
        task = self._spawn(self._admit(*message[1:]))
        self.admitting[request_id] = task
        task.add_done_callback(lambda _task: self.admitting.pop(request_id, None))

    def reply(self, request_id: int, answer: object) -> None:
        if self.wire is not None:
            self.wire.send(("reply", request_id, answer))

    async def _admit(
        self,
        request_id: int,
        path: str,
        model: str,
        host_header: bytes,
        key_headers: list[tuple[bytes, bytes]],
        remote: str | None,
        length: int,
        options: RequestOptions | None = None,
    ) -> None:
        lane = self.host.lane
        gateway = self.host.gateway
        route = FAST_PATHS.get(path.encode())
        target = lane.target_of(model) if lane.host_allowed(host_header) else None
        if route is None or target is None:
            self.reply(request_id, HAND_OVER)  # nothing counted: the web layer counts it
            return
        limit = gateway.config.limits.max_body_bytes
        if length > limit:
            # A reload lowered the limit and the worker has not heard yet: the limit in force
            # is this one, as the web layer would answer.
            self.reply(request_id, body_too_large(length, limit).answer())
            return
        admitted = lane.admission(path, key_headers, remote, target)
        if isinstance(admitted, ErrorAnswer):
            self.reply(request_id, admitted)
            return
        principal = admitted[0]
        lane.served()
        self.requests_metric.inc()
        # The worker read the body's options (`read_options`), as the web layer does.
        tokens = TokenCount(gateway, principal.name, target.model, options)
        try:
            tokens.reserve()
        except ApiError as refused:
            self.reply(request_id, refused.answer())
            return
        started = time.perf_counter()
        engine = contextlib.AsyncExitStack()
        try:
            handle = await engine.enter_async_context(gateway.scheduler.engine_for(target.model))
        except ModelUnavailable as error:
            refusal = unavailable(error, show_tail=principal.admin)
            self._finish(tokens, target, principal, route, started, refusal.status)
            self.reply(request_id, refusal.answer())
            return
        except asyncio.CancelledError:
            # The client left while waiting (the worker said `cancel`), or the worker died.
            self._finish(
                tokens, target, principal, route, started, CLIENT_CLOSED_REQUEST, gone=True
            )
            raise
        self.held[request_id] = Held(engine, tokens, target, principal, route, started)
        self.reply(
            request_id,
            Lease(
                handle.base_url,
                dict(handle.upstream_headers),
                target.upstream_name,
                target.public_name,
                supports_running_usage(gateway, target.model),
            ),
        )

    async def _failed(self, question_id: int, request_id: int, error: str, timed_out: bool) -> None:
        held = self.held.get(request_id)
        if held is None:
            return
        answer = await upstream_failure(
            self.host.gateway, held.target.model, error, timed_out, held.principal
        )
        self.reply(question_id, answer)

    async def _done(
        self,
        request_id: int,
        status: int,
        first_byte_s: float | None,
        streamed: bool,
        usage: dict[str, int],
        client_gone: bool,
    ) -> None:
        held = self.held.pop(request_id, None)
        if held is None:
            return
        self._finish(
            held.tokens,
            held.target,
            held.principal,
            held.route,
            held.started,
            status,
            first_byte_s,
            streamed,
            usage,
            client_gone,
        )
        await held.engine.aclose()  # the engine is free of this request

    def _finish(
        self,
        tokens: TokenCount,
        target: Target,
        principal: Principal,
        route: str,
        started: float,
        status: int,
        first_byte_s: float | None = None,
        streamed: bool = False,
        usage: dict[str, int] | None = None,
        gone: bool = False,
        served_unknown: bool = False,
    ) -> None:
        # The same call as the web layer's and the fast lane's: tokens, metrics, request log.
        # The duration is the owner's: from the admission (queue and start included) to done.
        finish(
            self.host.gateway,
            tokens,
            model=target.model,
            route=route,
            key_name=principal.name,
            status=status,
            duration_s=time.perf_counter() - started,
            first_byte_s=first_byte_s,
            streamed=streamed,
            usage=usage or {},
            client_gone=gone,
            served_unknown=served_unknown,
        )

    # -- the worker's end --
    def on_lost(self) -> None:
        """The worker is gone (it died, or stopped): its waiting requests leave their queues,
        and the engines it held are given back."""
        self.lost.set()
        if self.ready.is_set():
            self.host.gateway.metrics.proxy_workers_running.dec()
        for task in list(self.admitting.values()):
            task.cancel()
        held, self.held = self.held, {}
        if held:
            log.warning(
                "proxy worker %d ended with %d requests in flight; they are recorded as 502",
                self.number,
                len(held),
            )
        for item in held.values():
            # What the dead worker relayed is not known here: charged its whole reservation.
            self._finish(
                item.tokens,
                item.target,
                item.principal,
                item.route,
                item.started,
                502,
                served_unknown=True,
            )
            self._spawn(item.engine.aclose())
        if self.receiver is not None:
            self.receiver.close()
        self.host.worker_lost(self)

    def send(self, message: tuple[Any, ...]) -> None:
        if self.wire is not None:
            self.wire.send(message)

    async def stop(self) -> None:
        self.send(("stop",))
        process = self.process
        if process is None:
            return
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            await process.wait()
        if self.wire is not None:
            self.wire.close()


def lane_limits(limits: LimitsConfig) -> tuple[int, float, float]:
    """What a lane applies of the limits (`LaneCore.apply_limits`)."""
    return (
        limits.max_body_bytes,
        limits.upstream_connect_timeout,
        limits.upstream_read_timeout,
    )


class ProxyWorkers:
    """The gateway's proxy workers: `count` processes serving the fast lane on its port."""

    def __init__(
        self,
        gateway: Gateway,
        lane: FastLane,
        count: int,
        listen_host: str,
        port: int,
        log_level: str = "INFO",
    ) -> None:
        self.gateway = gateway
        self.lane = lane
        self.count = count
        self.listen_host = listen_host
        self.port = port
        self.log_level = log_level
        self.links: list[WorkerLink] = []
        self.closing = False
        self._restarts: set[asyncio.Task[None]] = set()
        self._adoptions: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        for number in range(self.count):
            await self._start_one(number)

    async def _start_one(self, number: int) -> WorkerLink:
        link = WorkerLink(self, number)
        self.links.append(link)
        await link.start()
        ready = asyncio.ensure_future(link.ready.wait())
        lost = asyncio.ensure_future(link.lost.wait())
        try:
            await asyncio.wait(
                {ready, lost}, timeout=READY_TIMEOUT_S, return_when="FIRST_COMPLETED"
            )
        finally:
            ready.cancel()
            lost.cancel()
        if not link.ready.is_set():
            raise RuntimeError(f"proxy worker {number} did not start; see the log above")
        log.info("proxy worker %d listening (pid %s)", number, link.process and link.process.pid)
        return link

    def worker_lost(self, link: WorkerLink) -> None:
        if link in self.links:
            self.links.remove(link)
        if self.closing or not link.ready.is_set():
            return
        log.error("proxy worker %d exited; starting another", link.number)
        task = asyncio.get_running_loop().create_task(self._restart(link.number))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _restart(self, number: int) -> None:
        await asyncio.sleep(RESTART_DELAY_S)
        if self.closing:
            return
        try:
            await self._start_one(number)
        except Exception:
            log.exception("proxy worker %d could not be restarted", number)

    def adopt(self, connection: socket.socket, data: bytes) -> None:
        """A connection a worker handed over: the web layer serves it from the first byte
        the worker had read, on the client's own socket."""
        self.lane.handed_over()
        task = asyncio.get_running_loop().create_task(self._adopt(connection, data))
        self._adoptions.add(task)
        task.add_done_callback(self._adoptions.discard)

    async def _adopt(self, connection: socket.socket, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(
                lambda: _Adopted(self.lane.fallback(), data), connection
            )
        except OSError:
            connection.close()  # the client left in the meantime

    def apply_limits(self, limits: LimitsConfig) -> None:
        """A reload: the body limit and upstream timeouts the workers apply."""
        for link in self.links:
            link.send(("limits", *lane_limits(limits)))

    def drain(self) -> None:
        """Shutdown begins: the workers stop accepting; their requests carry on."""
        self.closing = True
        for link in self.links:
            link.send(("drain",))

    def cut_streams(self, reason: str) -> int:
        """Shutdown past its grace: the workers end their streams with an error event."""
        for link in self.links:
            link.send(("cut", reason))
        return sum(len(link.held) for link in self.links)

    async def close(self) -> None:
        self.closing = True
        for task in list(self._restarts):
            task.cancel()
        await asyncio.gather(*(link.stop() for link in list(self.links)))


class _Adopted(asyncio.Protocol):
    """Hands a transport to the web layer's protocol with the bytes read before, in order:
    nothing the client sends later can arrive before them."""

    def __init__(self, handler: asyncio.Protocol, data: bytes) -> None:
        self.handler = handler
        self.data = data

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.set_protocol(self.handler)
        self.handler.connection_made(transport)
        if self.data:
            self.handler.data_received(self.data)
