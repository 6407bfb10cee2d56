"""A proxy worker: another process serving the gateway's port (SO_REUSEPORT) with the same
aiohttp server and connection limits. It decides nothing: each request goes to the gateway's
process (the owner) over its Unix socket, through the one pipeline of rules there, and comes
back as a full answer to pass on or as a channel of typed messages (`workers.messages`): then
the worker keeps its client informed while an engine starts (`api.loading.LoadingStream`) and
relays the request to the engine itself (`proxy.forward`, the same code as the owner's).

Started as `python -I -m modelyard.workers.worker SETTINGS` by `workers.pool`: `-I` keeps the
working directory (and PYTHON* variables) off `sys.path`.
"""

from __future__ import annotations

import signal

# First, before the imports that take a while: a SIGHUP to the process group (a closed
# terminal, a reload) while this worker starts must not kill it. `run` handles it later.
if __name__ == "__main__":
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

import asyncio
import contextlib
import itertools
import logging
import os
import sys
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from pydantic import BaseModel, ConfigDict
from yarl import URL

from modelyard.api.cors import CORS_ORIGIN_KEY, add_cors_headers
from modelyard.api.errors import error_response
from modelyard.api.http_layer import ConnectionLimits, listen
from modelyard.api.loading import LoadingStream
from modelyard.observability.log_format import configure_logging
from modelyard.proxy.forward import (
    EngineLost,
    ProxyOutcome,
    UpstreamClient,
    UpstreamError,
    UpstreamTimeout,
)
from modelyard.proxy.served import ServedTokens
from modelyard.proxy.sse import error_event, rewrite_model_in_json
from modelyard.proxy.usage_reader import usage_of
from modelyard.tls import ServerCertificate
from modelyard.workers.messages import (
    ADMISSION_HEADER,
    CHANNEL_TYPE,
    FINISH_PATH,
    PEER_HEADER,
    TARGET_HEADER,
    VERSION,
    Done,
    Finish,
    Lost,
    MessageError,
    Progress,
    Refused,
    Relay,
    Waiting,
    decode_channel,
    encode,
)

log = logging.getLogger("modelyard.worker")

# Headers of one hop, between the client and the worker; aiohttp frames the owner's hop.
_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "upgrade", "te", "trailer"}
    | {ADMISSION_HEADER.lower(), TARGET_HEADER.lower(), PEER_HEADER.lower()}
)
_ANSWER_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "upgrade", "trailer"})


class WorkerSettings(BaseModel):
    """What the owner tells a worker it starts (one JSON argument)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = VERSION
    name: str
    host: str
    port: int
    head_timeout: float
    admission_socket: str
    control_socket: str
    upstream_connect_timeout: float
    upstream_read_timeout: float
    shutdown_grace: float
    tls_cert: str | None = None
    tls_key: str | None = None
    log_level: str = "INFO"
    log_format: str = "text"


@dataclass
class _Told:
    """The start's progress as the owner last told it (for `LoadingStream.line`)."""

    text: str | None = None

    def describe(self) -> str:
        return self.text or ""


@dataclass
class _Channel:
    """The owner's messages for one request, read as they come: `Lost` ends the exchange in
    progress at once and `Progress` updates what the loading comments say; the others
    wait in `messages` (None: the owner's answer ended)."""

    answer: aiohttp.ClientResponse
    told: _Told = field(default_factory=_Told)
    messages: asyncio.Queue[Waiting | Relay | Refused | Done | None] = field(
        default_factory=asyncio.Queue
    )
    lost: asyncio.Future[str] | None = None

    async def read(self) -> None:
        try:
            async for line in self.answer.content:
                message = decode_channel(line)
                if isinstance(message, Progress):
                    self.told.text = message.progress
                elif isinstance(message, Lost):
                    if self.lost is not None and not self.lost.done():
                        self.lost.set_result(message.reason)
                else:
                    self.messages.put_nowait(message)
        except (aiohttp.ClientError, MessageError) as error:
            log.error("the gateway's process broke off a request: %s", error)
        finally:
            self.messages.put_nowait(None)


class Worker:
    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.owner = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(settings.admission_socket, limit=0),
            timeout=aiohttp.ClientTimeout(total=None, connect=10),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self.control = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(settings.control_socket),
            timeout=aiohttp.ClientTimeout(total=30),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self.upstream = UpstreamClient(
            settings.upstream_connect_timeout, settings.upstream_read_timeout
        )
        self._ids = itertools.count()
        self.in_flight = 0  # requests being handled, for the drain at shutdown

    async def close(self) -> None:
        await self.upstream.close()
        await self.owner.close()
        await self.control.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        try:
            return await self._handle(request)
        finally:
            self.in_flight -= 1

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        request_id = f"{self.settings.name}-{next(self._ids)}"
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP]
        if request.headers.get("Content-Encoding"):
            # aiohttp decoded the body as it read it: the owner gets it decoded.
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
            headers = [(k, v) for k, v in headers if k.lower() != "content-encoding"]
        headers += [
            (ADMISSION_HEADER, f"{VERSION} {self.settings.name} {request_id}"),
            (TARGET_HEADER, request.raw_path),
            (PEER_HEADER, request.remote or ""),
        ]
        # Sent as the client sent it; the fragment a client may add goes in TARGET_HEADER.
        url = URL("http://owner" + request.raw_path.split("#", 1)[0], encoded=True)
        body = request.content if request.body_exists else None
        left = Finish(request=request_id, client_gone=True)
        # Shielded: a client that leaves while the owner decides (a fair turn, a start) is
        # told to the owner before this connection to it closes, or it would read as lost.
        sending = asyncio.ensure_future(
            self.owner.request(
                request.method,
                url,
                headers=_multi(headers),
                data=body,
                allow_redirects=False,
                skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
            )
        )
        try:
            answer = await asyncio.shield(sending)
        except asyncio.CancelledError:
            await self._deliver(left)
            sending.cancel()
            if sending.done() and not sending.cancelled() and sending.exception() is None:
                sending.result().close()  # the answer came meanwhile: let its connection go
            raise
        except aiohttp.ClientError as error:
            log.error("the gateway's process could not be reached: %s", error)
            return error_response(
                502, "the gateway's process could not be reached; retry", "gateway_unreachable"
            )
        try:
            if not answer.headers.get("Content-Type", "").startswith(CHANNEL_TYPE):
                return await _pass_on(request, answer)
            try:
                return await self._converse(request, request_id, answer)
            except asyncio.CancelledError:
                await self._deliver(left)  # before the channel closes (below)
                raise
        finally:
            answer.close()

    async def _deliver(self, finish: Finish) -> None:
        """Post `finish`, and wait for it even if this task is cancelled meanwhile (its client
        left): the owner must have it before the channel closes, or it would take the request
        for one lost with its worker (502). A local socket: this takes a moment."""
        posting = asyncio.ensure_future(self._finish(finish))
        cancelled = False
        while not posting.done():
            try:
                await asyncio.shield(posting)
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError

    async def _converse(
        self, request: web.Request, request_id: str, answer: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        channel = _Channel(answer)
        reader = asyncio.ensure_future(channel.read())
        loading: LoadingStream | None = None
        response: web.StreamResponse | None = None
        try:
            message = await channel.messages.get()
            while True:
                if isinstance(message, Waiting):
                    request[CORS_ORIGIN_KEY] = message.cors_origin or ""
                    if not message.cors_origin:
                        request.pop(CORS_ORIGIN_KEY)
                    channel.told.text = message.progress
                    fresh = LoadingStream(
                        request,
                        message.model,
                        lambda: channel.told if channel.told.text else None,
                        content=message.content,
                        chat=message.chat,
                    )
                    if loading is not None:
                        fresh.response = loading.response  # a fallback's wait: the same stream
                    loading = fresh
                    message = await loading.hold(asyncio.ensure_future(channel.messages.get()))
                elif isinstance(message, Relay):
                    if message.cors_origin:
                        request[CORS_ORIGIN_KEY] = message.cors_origin
                    prepared = loading.response if loading is not None else None
                    response = await self._relay(request, request_id, channel, message, prepared)
                    message = await channel.messages.get()
                elif isinstance(message, Refused):
                    if loading is not None and loading.response is not None:
                        return await loading.fail(message.message, message.code)
                    return web.Response(  # as `api.errors.error_response` writes it
                        status=message.status,
                        text=message.body,
                        content_type="application/json",
                        headers=message.headers,
                    )
                elif isinstance(message, Done) and response is not None:
                    return response
                else:  # the owner's answer ended without one: it was lost
                    return await _owner_lost(request, loading, response)
        finally:
            reader.cancel()

    async def _relay(
        self,
        request: web.Request,
        request_id: str,
        channel: _Channel,
        relay: Relay,
        prepared: web.StreamResponse | None,
    ) -> web.StreamResponse | None:
        loop = asyncio.get_running_loop()
        channel.lost = loop.create_future()
        reading = relay.reading
        served = ServedTokens(reading.prompt_estimate)
        replacements = reading.replacement_bytes()
        outcome = ProxyOutcome()
        finish = Finish(request=request_id)
        try:
            response, outcome = await self.upstream.forward(
                request,
                URL(relay.url, encoded=True),  # as the owner built it: no re-encoding
                relay.body_bytes(),
                lambda: reading.transformer(served),
                (lambda data: rewrite_model_in_json(data, replacements)) if replacements else None,
                outcome,
                relay.headers,
                lost=channel.lost,
                prepared=prepared,
                answer_headers=relay.answer_headers or None,
            )
        except EngineLost as lost:
            await self._deliver(
                finish.model_copy(update={"failure": "lost", "failure_detail": str(lost)})
            )
            return None  # the gateway's process answers it next (an error, a fallback)
        except UpstreamTimeout as error:
            await self._deliver(
                finish.model_copy(update={"failure": "timeout", "failure_detail": str(error)})
            )
            return None  # the gateway's process answers it next (an error, a fallback)
        except UpstreamError as error:
            await self._deliver(
                finish.model_copy(update={"failure": "unreachable", "failure_detail": str(error)})
            )
            return None  # the gateway's process answers it next (an error, a fallback)
        except asyncio.CancelledError:
            await self._deliver(_finished(finish, outcome, served, client_gone=True))
            raise
        await self._deliver(_finished(finish, outcome, served))
        return response

    async def _finish(self, finish: Finish) -> None:
        try:
            async with self.control.post(
                "http://owner" + FINISH_PATH, data=encode(finish)
            ) as answer:
                if answer.status >= 400:
                    log.error("the gateway refused a finish: %s", await answer.text())
        except (aiohttp.ClientError, TimeoutError) as error:
            log.error("could not tell the gateway a request finished: %s", error)


def _finished(
    finish: Finish, outcome: ProxyOutcome, served: ServedTokens, client_gone: bool = False
) -> Finish:
    usage = served.served(outcome.usage or usage_of(outcome.body))
    return finish.model_copy(
        update={
            "status": outcome.status,
            "streamed": outcome.streamed,
            "first_byte_s": outcome.first_byte_s,
            "usage": usage,
            "client_gone": client_gone or outcome.client_gone,
            "upstream_broke": outcome.upstream_broke,
            "engine_lost": outcome.engine_lost,
            "cut_by_gateway": outcome.cut_by_gateway,
        }
    )


def _multi(headers: list[tuple[str, str]]) -> CIMultiDict[str]:
    return CIMultiDict(headers)


async def _pass_on(request: web.Request, answer: aiohttp.ClientResponse) -> web.StreamResponse:
    """An answer the owner gave in full (an error, a listing, metrics, an event stream)."""
    headers = [(k, v) for k, v in answer.headers.items() if k.lower() not in _ANSWER_HOP]
    response = web.StreamResponse(status=answer.status, reason=answer.reason)
    for name, value in headers:
        response.headers.add(name, value)
    if answer.headers.get("Connection", "").lower() == "close":
        response.force_close()
    await response.prepare(request)
    async for chunk in answer.content.iter_any():
        await response.write(chunk)
    await response.write_eof()
    return response


async def _owner_lost(
    request: web.Request, loading: LoadingStream | None, response: web.StreamResponse | None
) -> web.StreamResponse:
    message = "the gateway's process stopped answering this request; retry"
    opened = response if response is not None else (loading.response if loading else None)
    if opened is None:
        return error_response(502, message, "gateway_lost")
    with contextlib.suppress(ConnectionError, RuntimeError):
        await opened.write(error_event(message, "gateway_lost"))
        await opened.write_eof()
    return opened


async def run(settings: WorkerSettings) -> None:
    certificate = (
        ServerCertificate(settings.tls_cert, settings.tls_key)
        if settings.tls_cert and settings.tls_key
        else None
    )
    worker = Worker(settings)

    # Every request, whatever its target (one no route would match too), goes to the owner:
    # a middleware, not a route, so aiohttp's router answers nothing here.
    @web.middleware
    async def to_owner(request: web.Request, handler: object) -> web.StreamResponse:
        return await worker.handle(request)

    app = web.Application(middlewares=[to_owner])
    app.on_response_prepare.append(add_cors_headers)
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=settings.shutdown_grace
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # The same signals as the gateway's process: SIGTERM and SIGINT drain and stop, SIGHUP
    # reloads what this process holds (the certificate) and never kills it.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, certificate)
    limits = ConnectionLimits(head_timeout=settings.head_timeout)
    listener = await listen(
        runner,
        lambda: limits,
        settings.host,
        settings.port,
        ssl_context=certificate.context if certificate is not None else None,
        reuse_port=True,
    )
    orphan_watch = asyncio.ensure_future(_stop_when_orphaned(stop))
    try:
        async with worker.control.post(
            f"http://owner/ready/{settings.name}",
            params={"version": str(VERSION), "pid": str(os.getpid())},
        ) as answer:
            if answer.status != 204:
                log.error("the gateway refused this worker: %s", await answer.text())
                return
        await stop.wait()
    finally:
        orphan_watch.cancel()
        listener.close()  # requests in flight carry on for the grace period
        await _drain(worker, settings.shutdown_grace)
        await runner.cleanup()
        await worker.close()


async def _drain(worker: Worker, grace: float) -> None:
    """As the gateway's process does: one grace period for requests in flight, then streams
    still going end with an error event that says why, not silently."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while worker.in_flight and loop.time() < deadline:
        await asyncio.sleep(0.1)
    if not worker.in_flight:
        return
    worker.upstream.cut_streams(
        f"the gateway is shutting down; this stream was ended after {grace:g}s "
        "(limits.shutdown_grace)"
    )
    deadline = loop.time() + 5.0
    while worker.in_flight and loop.time() < deadline:
        await asyncio.sleep(0.1)


def _reload(certificate: ServerCertificate | None) -> None:
    log.info("SIGHUP: reloading")
    if certificate is not None:
        certificate.reload()


async def _stop_when_orphaned(stop: asyncio.Event) -> None:
    """The owner gone (killed outright): this worker stops too, leaving no orphan."""
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    log.error("the gateway's process is gone: stopping")
    stop.set()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    settings = WorkerSettings.model_validate_json(args[0])
    configure_logging(settings.log_level, settings.log_format)  # type: ignore[arg-type]
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(run(settings))
    else:
        uvloop.run(run(settings))


if __name__ == "__main__":
    main()
