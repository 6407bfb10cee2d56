"""The gateway's process (the owner) serving its proxy workers: each worker request is run
through the same application and pipeline of rules as a request from a client, and what it
sends to an engine is relayed by the worker (`proxy.worker_messages` says how they talk).

The owner keeps every decision: keys, budgets, fair turns, engine holds, metrics, the request
log. A worker that dies leaves its requests' channels closed without a `Finish` saying their
clients left: each is logged as 502 and its hold and turn are let go (`Admission.worker_lost`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web
from aiohttp.typedefs import Middleware

from modelyard.api.errors import error_response
from modelyard.proxy.forward import (
    EngineLost,
    FirstByteTimeout,
    ProxyOutcome,
    UpstreamError,
    UpstreamTimeout,
)
from modelyard.proxy.worker_messages import (
    ADMISSION_HEADER,
    CHANNEL_TYPE,
    FINISH_PATH,
    PEER_HEADER,
    SILENT_PATH,
    TARGET_HEADER,
    VERSION,
    Done,
    Finish,
    Lost,
    MessageError,
    Progress,
    Refused,
    Relay,
    Verdict,
    Waiting,
    decode_finish,
    decode_silent,
    encode,
)

log = logging.getLogger("modelyard.workers")

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# How often a waiting worker is told the start's progress (it comments every 3 s).
PROGRESS_INTERVAL_S = 1.0
# Requests whose client left before they reached the desk, remembered for a while.
LEFT_EARLY_KEPT = 10_000


class Admission:
    """One worker's request at the owner: the channel its answers go on, once opened."""

    def __init__(self, request_id: str, worker: str, target: str) -> None:
        self.id = request_id
        self.worker = worker
        self.target = target  # the request target as the client sent it
        self.request: web.Request | None = None
        self.response: web.StreamResponse | None = None
        self.client_left = False
        self._finish: asyncio.Future[Finish] | None = None
        # The held engine's liveness check, while the worker relays to it (`Silent`).
        self._check: Callable[[], Awaitable[bool]] | None = None
        self._telling: set[asyncio.Future[None]] = set()

    @property
    def worker_lost(self) -> bool:
        """The channel ended with no word from the worker that its client left: the worker
        is gone, and the request with it (a 502, served tokens unknown)."""
        return not self.client_left

    async def send(self, message: Waiting | Progress | Relay | Refused | Done) -> None:
        assert self.request is not None
        if self.response is None:
            response = web.StreamResponse(status=200, headers={"Content-Type": CHANNEL_TYPE})
            response.headers[ADMISSION_HEADER] = str(VERSION)
            await response.prepare(self.request)
            self.response = response
        await self.response.write(encode(message))

    async def wait_for_engine(
        self, waiting: Waiting, progress: Callable[[], str | None], task: asyncio.Future[T]
    ) -> T:
        """`task` (the engine being readied) with the worker told as it goes, so it keeps its
        client informed as one process does (`api.loading`)."""
        try:
            await self.send(waiting)
            while True:
                done, _ = await asyncio.wait({task}, timeout=PROGRESS_INTERVAL_S)
                if done:
                    return task.result()
                await self.send(Progress(progress=progress()))
        except BaseException:
            task.cancel()
            raise

    async def relay(
        self,
        relay: Relay,
        lost: asyncio.Future[str] | None,
        check: Callable[[], Awaitable[bool]] | None = None,
    ) -> ProxyOutcome:
        """The worker sends the request to the held engine; its `Finish` is the outcome.
        Failures before anything reached the client raise as `UpstreamClient.forward` does,
        so the pipeline answers them (or falls back) the same way. `check` is the engine's
        liveness check, run here when the worker reports the engine silent (`Silent`)."""
        self._finish = asyncio.get_running_loop().create_future()
        self._check = check
        outcome = ProxyOutcome()
        watch: Callable[[asyncio.Future[str]], None] | None = None
        if lost is not None:
            if lost.done():
                outcome.engine_lost = True
                raise EngineLost(lost.result())

            def watch(future: asyncio.Future[str]) -> None:
                # The worker's exchange ends at once (its task is told, not this one).
                telling = asyncio.ensure_future(self._tell_lost(future.result()))
                self._telling.add(telling)
                telling.add_done_callback(self._telling.discard)

            lost.add_done_callback(watch)
        try:
            await self.send(relay)
            finish = await self._finish
        finally:
            self._finish = None
            self._check = None
            if lost is not None and watch is not None:
                lost.remove_done_callback(watch)
        outcome.status = finish.status
        outcome.streamed = finish.streamed
        outcome.first_byte_s = finish.first_byte_s
        outcome.usage = finish.usage
        outcome.client_gone = finish.client_gone
        outcome.upstream_broke = finish.upstream_broke
        outcome.engine_lost = finish.engine_lost
        outcome.cut_by_gateway = finish.cut_by_gateway
        outcome.first_byte_timed_out = finish.first_byte_timed_out
        if finish.failure == "lost":
            outcome.engine_lost = True
            raise EngineLost(finish.failure_detail)
        if finish.failure == "first_byte_timeout":
            raise FirstByteTimeout(finish.failure_detail)
        if finish.failure == "timeout":
            raise UpstreamTimeout(finish.failure_detail)
        if finish.failure == "unreachable":
            raise UpstreamError(finish.failure_detail)
        if finish.client_gone:
            self.client_left = True
        return outcome

    async def _tell_lost(self, reason: str) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            assert self.response is not None
            await self.response.write(encode(Lost(reason=reason)))

    async def alive(self) -> bool:
        """The verdict on the held engine, which its worker found silent: its liveness check
        (kept when there is none, or no exchange is in progress)."""
        check = self._check
        return check is None or await check()

    def told(self, finish: Finish) -> None:
        if finish.client_gone:
            self.client_left = True
        if self._finish is not None and not self._finish.done():
            self._finish.set_result(finish)


ADMISSION_KEY = web.RequestKey("modelyard.admission", Admission)


def admission_of(request: web.Request) -> Admission | None:
    return request.get(ADMISSION_KEY)


def raw_target(request: web.Request) -> str:
    """The request target as the client sent it (to the worker, for a worker's request)."""
    admission = request.get(ADMISSION_KEY)
    return admission.target if admission is not None else request.raw_path


def _from_unix_socket(request: web.Request) -> bool:
    transport = request.transport
    return transport is not None and isinstance(transport.get_extra_info("sockname"), str)


class AdmissionDesk:
    """The owner's register of worker requests in progress, and the two places workers
    reach it: the admission middleware (on the Unix socket of the one application) and the
    `Finish` route (on a control socket of its own)."""

    def __init__(self) -> None:
        self._open: dict[str, Admission] = {}
        self._left_early: dict[str, None] = {}  # request ids, oldest first
        self.ready: dict[str, asyncio.Future[int]] = {}

    def middleware(self) -> Middleware:
        @web.middleware
        async def admit(request: web.Request, handler: Handler) -> web.StreamResponse:
            # Only a connection on the owner's own socket (mode 0600, in a private folder)
            # is a worker: the same headers from a client over TCP mean nothing.
            if not _from_unix_socket(request):
                return await handler(request)
            return await self._admit(request, handler)

        return admit

    async def _admit(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        admission, problem = _read_admission(request)
        if admission is None:
            log.error("refused a worker's request: %s", problem)
            return error_response(400, problem, "worker_protocol")
        peer = request.headers.get(PEER_HEADER)
        request = request.clone(remote=peer) if peer else request
        admission.request = request
        if admission.id in self._left_early:
            del self._left_early[admission.id]
            admission.client_left = True
        request[ADMISSION_KEY] = admission
        self._open[admission.id] = admission
        try:
            response = await handler(request)
            if admission.response is None:
                return response  # answered in full: the worker passes it on
            if response is not admission.response:
                # An error once the channel was open (a refused start, a fallback that
                # failed): its last message.
                await admission.send(_refused(response))
            await admission.send(Done())
            await admission.response.write_eof()
        except (ConnectionError, RuntimeError) as error:
            if admission.response is None:
                raise
            log.debug("worker channel closed: %s", error)
        finally:
            self._open.pop(admission.id, None)
        return admission.response

    def control_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(FINISH_PATH, self._finish)
        app.router.add_post(SILENT_PATH, self._silent)
        app.router.add_post("/ready/{worker}", self._ready)
        return app

    async def _finish(self, request: web.Request) -> web.Response:
        try:
            finish = decode_finish(await request.read())
        except MessageError as error:
            log.error("refused a worker's finish: %s", error)
            return error_response(400, str(error), "worker_protocol")
        admission = self._open.get(finish.request)
        if admission is None:
            if finish.client_gone:
                # Its client left before the request reached this desk: it must not be
                # taken for one lost with its worker when it does.
                self._left_early[finish.request] = None
                while len(self._left_early) > LEFT_EARLY_KEPT:
                    self._left_early.pop(next(iter(self._left_early)))
            return web.Response(status=204)
        admission.told(finish)
        return web.Response(status=204)

    async def _silent(self, request: web.Request) -> web.Response:
        try:
            silent = decode_silent(await request.read())
        except MessageError as error:
            log.error("refused a worker's silent report: %s", error)
            return error_response(400, str(error), "worker_protocol")
        admission = self._open.get(silent.request)
        alive = True if admission is None else await admission.alive()
        return web.Response(body=encode(Verdict(alive=alive)), content_type="application/json")

    async def _ready(self, request: web.Request) -> web.Response:
        version = request.query.get("version")
        if version != str(VERSION):
            problem = f"worker message version {version!r} is not this gateway's ({VERSION})"
            log.error("refused a worker: %s", problem)
            return error_response(400, problem, "worker_protocol")
        ready = self.ready.get(request.match_info["worker"])
        if ready is not None and not ready.done():
            ready.set_result(int(request.query.get("pid", "0")))
        return web.Response(status=204)


def _read_admission(request: web.Request) -> tuple[Admission | None, str]:
    values = request.headers.getall(ADMISSION_HEADER, [])
    targets = request.headers.getall(TARGET_HEADER, [])
    if len(values) != 1 or len(targets) != 1:
        return None, f"a worker's request needs one {ADMISSION_HEADER} and one {TARGET_HEADER}"
    parts = values[0].split(" ")
    if len(parts) != 3:
        return None, f"{ADMISSION_HEADER} is '<version> <worker> <request id>'"
    version, worker, request_id = parts
    if version != str(VERSION):
        return None, (
            f"worker message version {version!r} is not this gateway's ({VERSION}): the "
            "gateway and its workers must run the same modelyard"
        )
    return Admission(request_id, worker, targets[0]), ""


def _refused(response: web.StreamResponse) -> Refused:
    body = response.body if isinstance(response, web.Response) else None
    text = body.decode(errors="replace") if isinstance(body, bytes) else ""
    message, code = text, None
    with contextlib.suppress(ValueError, AttributeError, TypeError, KeyError):
        error = json.loads(text)["error"]
        message, code = str(error["message"]), error.get("code")
    headers = {
        name: value
        for name, value in response.headers.items()
        if name.lower() not in ("content-length", "content-type")
    }
    return Refused(status=response.status, message=message, code=code, headers=headers, body=text)
