"""A proxy worker's part in a request: send it to the gateway's process (the owner), then
pass the owner's answer on, or follow its channel of messages (`proxy.worker_messages`): keep the
client informed while an engine starts (`api.loading.LoadingStream`), relay the request to
the engine (`proxy.forward`, the same code as the owner's) and tell the owner how it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from modelyard.api.cors import CORS_ORIGIN_KEY
from modelyard.api.errors import error_response
from modelyard.api.loading import LoadingStream
from modelyard.proxy.forward import (
    EngineLost,
    FirstByteGuard,
    FirstByteTimeout,
    ProxyOutcome,
    UpstreamClient,
    UpstreamError,
    UpstreamTimeout,
)
from modelyard.proxy.served import ServedTokens
from modelyard.proxy.sse import error_event, rewrite_model_in_json
from modelyard.proxy.usage_reader import usage_of
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
    Silent,
    Waiting,
    decode_channel,
    decode_verdict,
    encode,
)
from modelyard.workers.settings import WorkerSettings

log = logging.getLogger("modelyard.worker")

# Headers of one hop, between the client and the worker; aiohttp frames the owner's hop.
_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "upgrade", "te", "trailer"}
    | {ADMISSION_HEADER.lower(), TARGET_HEADER.lower(), PEER_HEADER.lower()}
)
_ANSWER_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "upgrade", "trailer"})


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
                first_byte=self._first_byte_guard(request_id, relay),
            )
        except EngineLost as lost:
            await self._deliver(
                finish.model_copy(update={"failure": "lost", "failure_detail": str(lost)})
            )
            return None  # the gateway's process answers it next (an error, a fallback)
        except UpstreamTimeout as error:
            failure = "first_byte_timeout" if isinstance(error, FirstByteTimeout) else "timeout"
            await self._deliver(
                finish.model_copy(update={"failure": failure, "failure_detail": str(error)})
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

    def _first_byte_guard(self, request_id: str, relay: Relay) -> FirstByteGuard | None:
        """The request's bound on its engine's silences, as the owner sent it; the liveness
        verdict when it passes is the owner's (`Silent`, answered by a `Verdict`)."""
        if relay.first_byte_timeout is None:
            return None

        async def check() -> bool:
            return await self._ask_alive(request_id)

        return FirstByteGuard(relay.first_byte_timeout, check)

    async def _ask_alive(self, request_id: str) -> bool:
        """Whether the owner finds this request's engine alive. An owner that cannot be asked
        keeps the request: it ends its requests itself (`Lost`) when it declares one lost."""
        try:
            async with self.control.post(
                "http://owner" + SILENT_PATH, data=encode(Silent(request=request_id))
            ) as answer:
                if answer.status >= 400:
                    log.error("the gateway refused a silent report: %s", await answer.text())
                    return True
                return decode_verdict(await answer.read()).alive
        except (aiohttp.ClientError, TimeoutError, MessageError) as error:
            log.error("could not ask the gateway whether an engine is alive: %s", error)
            return True

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
            "first_byte_timed_out": outcome.first_byte_timed_out,
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
