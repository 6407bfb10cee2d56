"""A proxy worker: one more process serving the fast lane on the gateway's port.

`proxy_workers: N` starts N of these beside the gateway's own process; all of them listen on
the same port (SO_REUSEPORT), so the kernel spreads client connections across the cores.
A worker owns no engine and decides nothing. For each request it parses and forwards on its
own (the hot part: reading the request, writing to the engine, relaying every streamed chunk
with alias rewriting and usage capture), and asks the gateway's process (the owner, over the
control pair of proxy/worker_wire.py) for everything else:

- `admit`: the key, its limits and scope, the model's name, and an engine held for the request
  (`scheduler.engine_for`: queues, back-pressure, idle timers, the in-flight count that keeps
  the engine from being stopped). The answer is a lease on the engine, a refusal to write
  as it is, or "hand over";
- `failed`: the engine broke the request; the owner checks whether it died and writes the 502;
- `done`: the status, timings and usage, for the key's tokens, the metrics and the request log;
  the owner then lets go of the engine.

A connection the worker does not serve (another route, an adapter, an unknown model, an odd
request) goes whole to the owner (proxy/worker_wire.py's hand-over pair), whose web layer
serves it with every middleware, on the client's own socket.

When the owner goes away (its end of the control pair closes) the worker stops at once: a
worker never outlives its gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import signal
import socket
from typing import Any

from modelyard.api.accounting import ServedTokens
from modelyard.api.errors import ErrorAnswer
from modelyard.api.request_options import read_options
from modelyard.observability.log_format import configure_logging
from modelyard.process_heap import keep_startup_heap
from modelyard.proxy.fastpath import (
    KEY_HEADERS,
    FastProtocol,
    FastRequest,
    LaneCore,
    Outcome,
    shape_ok,
    start_server,
)
from modelyard.proxy.forward import UpstreamError, UpstreamTimeout
from modelyard.proxy.worker_wire import Wire, open_wire, send_connection

log = logging.getLogger("modelyard.worker")


class Lease:
    """The owner's yes: the engine to send the request to, and the names to use."""

    __slots__ = ("base_url", "continuous_usage", "engine_headers", "public_name", "upstream_name")

    def __init__(
        self,
        base_url: str,
        engine_headers: dict[str, str],
        upstream_name: str,
        public_name: str,
        continuous_usage: bool = False,
    ) -> None:
        self.base_url = base_url
        self.engine_headers = engine_headers
        self.upstream_name = upstream_name
        self.public_name = public_name
        self.continuous_usage = continuous_usage  # the engine answers continuous_usage_stats


# The owner's "not for the lane": the connection goes to its web layer.
HAND_OVER = "hand_over"


class UsageSeen:
    """A stream's usage as it passes, and what it served (the owner counts it for the key
    with `done`: a stream cut early is charged what it relayed)."""

    __slots__ = ("served", "usage")

    def __init__(self, prompt_estimate: int = 0) -> None:
        self.usage: dict[str, int] = {}
        self.served = ServedTokens(prompt_estimate)

    def count(self, usage: dict[str, int]) -> None:
        self.usage = usage


class WorkerLane(LaneCore):
    def __init__(
        self,
        max_body: int,
        connect_timeout: float,
        read_timeout: float,
        handover: socket.socket,
    ) -> None:
        super().__init__(self._no_fallback, max_body, connect_timeout, read_timeout)
        self.link: Wire | None = None
        self.handover = handover
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._handing_over = asyncio.Lock()
        self._handovers: set[asyncio.Task[None]] = set()
        self.listener: asyncio.AbstractServer | None = None
        self.stopped = asyncio.Event()  # the owner is gone, or told the worker to stop

    @staticmethod
    def _no_fallback() -> asyncio.Protocol:
        raise AssertionError("a worker hands connections to the owner, never to aiohttp")

    def make_protocol(self) -> FastProtocol:
        return WorkerProtocol(self)

    def eligible(self, request: FastRequest) -> bool:
        return shape_ok(request)  # the owner decides the rest (Host, model) in `admit`

    # -- the owner --
    def on_message(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "reply":
            future = self._waiting.pop(message[1], None)
            if future is not None and not future.done():
                future.set_result(message[2])
        elif kind == "limits":
            self.apply_limits(*message[1:])
        elif kind == "cut":
            self.cut_streams(message[1])
        elif kind == "drain" and self.listener is not None:
            self.listener.close()  # the owner is shutting down: no new connections here
        elif kind == "stop":
            self.stopped.set()

    def ask(self, message: tuple[Any, ...]) -> tuple[int, asyncio.Future[Any]]:
        """Send a question (its id goes second); the future gets the owner's reply."""
        request_id = next(self._ids)
        future: asyncio.Future[Any] = self.loop.create_future()
        self._waiting[request_id] = future
        assert self.link is not None
        self.link.send((message[0], request_id, *message[1:]))
        return request_id, future

    def forget(self, request_id: int) -> None:
        self._waiting.pop(request_id, None)

    def tell(self, message: tuple[Any, ...]) -> None:
        if self.link is not None:
            self.link.send(message)

    def owner_lost(self) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.cancel()
        self._waiting.clear()
        self.stopped.set()

    # -- hand-overs --
    def hand_over(self, connection_fd: int, data: bytes) -> None:
        task = asyncio.get_running_loop().create_task(self._send_connection(connection_fd, data))
        self._handovers.add(task)
        task.add_done_callback(self._handovers.discard)

    async def _send_connection(self, connection_fd: int, data: bytes) -> None:
        try:
            async with self._handing_over:  # one at a time: its pieces must not interleave
                await asyncio.to_thread(send_connection, self.handover, connection_fd, data)
        except OSError as error:
            log.warning("could not hand a connection to the gateway: %s", error)
        finally:
            os.close(connection_fd)


class WorkerProtocol(FastProtocol):
    lane: WorkerLane
    ticket = 0  # the request's id with the gateway's process, while it is served

    def _hand_over(self) -> None:
        """The connection goes to the owner's web layer, with the bytes read so far."""
        transport = self.transport
        if transport is None or self.gone:
            return
        sock = transport.get_extra_info("socket")
        if sock is None:
            transport.close()
            return
        transport.pause_reading()  # what the client sends next stays in the socket
        if transport.get_write_buffer_size():
            # A slow reader still has part of the last answer here: the gateway's answer must
            # not overtake it on the same socket. Look again once it has drained.
            asyncio.get_running_loop().call_later(0.005, self._hand_over)
            return
        connection_fd = os.dup(sock.fileno())
        data, self.buffer = self.buffer, b""
        self.gone = True
        self.lane.connections.discard(self)
        transport.close()  # this process's descriptor; the owner has its own
        self.lane.hand_over(connection_fd, data)

    async def _serve_one(self, request: FastRequest) -> bool:
        lane = self.lane
        path = request.path.decode()
        remote = self.remote()
        # The owner needs only the headers a key may come in, for admission.
        key_headers = [(n, v) for n, v in request.headers if n.lower() in KEY_HEADERS]
        # One reading of the body, here; the owner reserves the key's tokens from it.
        options = read_options(path, request.payload, len(request.body))
        request_id, answer = lane.ask(
            (
                "admit",
                path,
                request.payload["model"],
                request.host,
                key_headers,
                remote,
                len(request.body),
                options,
            )
        )
        try:
            decision = await answer
        except asyncio.CancelledError:
            lane.forget(request_id)
            lane.tell(("cancel", request_id))  # the client left while the engine started
            raise
        if decision == HAND_OVER:
            self.buffer = request.raw[: request.raw_end] + self.buffer
            self._hand_over()
            return False
        if isinstance(decision, ErrorAnswer):
            self._answer(decision)
            return True
        lease: Lease = decision
        self.ticket = request_id
        outcome = Outcome()
        seen = UsageSeen(options.prompt_estimate)
        try:
            return await self._relay(
                request,
                lease.base_url,
                lease.engine_headers,
                lease.upstream_name,
                lease.public_name,
                seen,
                outcome,
                lease.continuous_usage,
            )
        finally:
            lane.tell(
                (
                    "done",
                    request_id,
                    outcome.status,
                    outcome.first_byte,
                    outcome.streamed,
                    seen.served.served(outcome.usage or seen.usage),
                    outcome.client_gone,
                )
            )

    async def _upstream_failed(self, request: FastRequest, error: UpstreamError) -> ErrorAnswer:
        """The gateway's process sees whether the engine died and writes the answer."""
        timed_out = isinstance(error, UpstreamTimeout)
        _, reply = self.lane.ask(("failed", self.ticket, str(error), timed_out))
        answer: ErrorAnswer = await reply
        return answer


async def run_worker(args: argparse.Namespace) -> None:
    control = socket.socket(fileno=args.control_fd)
    handover = socket.socket(fileno=args.handover_fd)
    handover.setblocking(True)
    lane = WorkerLane(args.max_body, args.connect_timeout, args.read_timeout, handover)
    lane.link = await open_wire(control, lane.on_message, lane.owner_lost)
    loop = asyncio.get_running_loop()
    # The owner decides when workers stop: SIGTERM and SIGINT (a terminal's ^C reaches the
    # whole process group) wait for its word, or for its end of the pair to close.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: None)
    lane.listener = await start_server(lane, args.host, args.port, reuse_port=True)
    keep_startup_heap()
    lane.tell(("ready", os.getpid()))
    await lane.stopped.wait()
    lane.listener.close()
    await lane.close(0)


def main() -> None:
    parser = argparse.ArgumentParser(prog="modelyard-proxy-worker")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--handover-fd", type=int, required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-body", type=int, required=True)
    parser.add_argument("--connect-timeout", type=float, required=True)
    parser.add_argument("--read-timeout", type=float, required=True)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", choices=["text", "json"], default="text")
    args = parser.parse_args()
    configure_logging(args.log_level, args.log_format)  # the gateway's own format
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        asyncio.run(run_worker(args))
    else:
        uvloop.run(run_worker(args))


if __name__ == "__main__":
    main()
