"""Forwarding one request to an engine: no buffering of streams, upstream closed on disconnect."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from yarl import URL

from modelyard.auth.credentials import CREDENTIAL_HEADERS, is_credential_header, presented_key
from modelyard.proxy.sse import StreamTransformer, error_event

# Headers that describe one hop, not the message (RFC 9110 7.6.1), plus ones we recompute.
_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-encoding",
        "accept-encoding",
    }
)


# The named credential headers, for code that matches exact names; `forward_headers` also drops
# any header named like a credential or carrying the presented key (auth/credentials.py).
_PRIVATE_HEADERS = CREDENTIAL_HEADERS

# Below uvicorn's (and so vLLM's) 5 s keep-alive: a pooled connection is never reused just as
# the engine closes it, which would fail a POST that cannot be retried.
KEEPALIVE_S = 4.0


class UpstreamError(Exception):
    """The engine could not be reached or broke off; becomes a 502 for the client."""


class UpstreamTimeout(UpstreamError):
    """The engine sent nothing within the read timeout; a 504, and a sign it may be hung."""


class FirstByteTimeout(UpstreamTimeout):
    """The engine sent no byte of its answer within the first-byte timeout, and did not pass
    the liveness check that followed: a frozen engine (a stopped process, a node gone
    silent) ends the request now, not at the read timeout."""


class EngineUnreachable(UpstreamError):
    """The engine refused the connection (`refused`: it never saw the request, which may be
    sent again), or dropped it before any byte of an answer (it may have begun it)."""

    def __init__(self, message: str, refused: bool) -> None:
        super().__init__(message)
        self.refused = refused


class EngineLost(UpstreamError):
    """The engine was declared lost (it crashed, was stopped as hung, a remote engine was
    declared down, its node was lost) before anything of its answer reached the client: the
    caller may still refuse the request cleanly (503 with Retry-After)."""


@dataclass(frozen=True)
class FirstByteGuard:
    """A request's bound on the wait for its engine's first byte (the answer's headers, a
    stream's first chunk, and any later silence of a stream as long). When it passes,
    `check` asks whether the engine is alive (its liveness check, shared by the requests
    that wait on it); a live engine keeps the request (a long prefill, a long answer that is
    not streamed), one that does not answer ends it."""

    timeout: float
    check: Callable[[], Awaitable[bool]]


@dataclass
class ProxyOutcome:
    """What happened, for metrics and logs."""

    status: int = 0
    streamed: bool = False
    first_byte_s: float | None = None
    upstream_broke: bool = False
    client_gone: bool = False
    # Ended by the gateway at shutdown (with a final error event): neither side failed.
    cut_by_gateway: bool = False
    # The engine was declared lost while this request was on it (see `EngineLost`); a
    # stream already begun got a final error event.
    engine_lost: bool = False
    # A stream whose engine went silent for the first-byte timeout and then failed its
    # liveness check: the client had its 200, and got a final error event.
    first_byte_timed_out: bool = False
    body: bytes | None = None  # the non-streamed response body, for usage accounting
    usage: dict[str, int] = field(default_factory=dict)


def forward_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers an engine gets: no hop-by-hop ones, and no credential of any kind (keys
    for the gateway must never reach an engine or its logs; see `auth.credentials`)."""
    # A client may also copy its key into a header of any name: such a header stays too.
    key = presented_key(headers)
    return {
        name: value
        for name, value in headers.items()
        if not _dropped_header(name) and (key is None or key not in value)
    }


@functools.lru_cache(maxsize=1024)  # on every forwarded header: names repeat, so look once
def _dropped_header(name: str) -> bool:
    return name.lower() in _HOP_HEADERS or is_credential_header(name)


def response_headers(upstream: aiohttp.ClientResponse) -> dict[str, str]:
    return {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS}


class UpstreamClient:
    """One pooled HTTP client for all engines (aiohttp: several times httpx's speed)."""

    def __init__(self, connect_timeout: float, read_timeout: float) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._client_timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_read=read_timeout
        )
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S),
            timeout=aiohttp.ClientTimeout(
                total=None, connect=connect_timeout, sock_read=read_timeout
            ),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._streams: set[aiohttp.ClientResponse] = set()
        self._cut: set[aiohttp.ClientResponse] = set()
        self._cut_reason: str | None = None

    def cut_streams(self, reason: str) -> int:
        """End every stream in progress with a final SSE error event carrying `reason`
        (shutdown past its grace: a clear end, not a silent truncation). Returns how many."""
        self._cut_reason = reason
        streams = list(self._streams)
        self._cut.update(streams)
        for upstream in streams:
            upstream.close()  # the stream loop sees the engine connection end and says why
        return len(streams)

    def set_timeouts(self, connect_timeout: float, read_timeout: float) -> None:
        """New timeouts (a config reload), for requests from now on."""
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._client_timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_read=read_timeout
        )

    async def close(self) -> None:
        await self.session.close()

    async def forward(
        self,
        request: web.Request,
        url: str | URL,
        body: bytes | None,
        transformer_for: Callable[[], StreamTransformer | None],
        rewrite_body: Callable[[bytes], bytes] | None = None,
        outcome: ProxyOutcome | None = None,
        engine_headers: Mapping[str, str] | None = None,
        lost: asyncio.Future[str] | None = None,
        prepared: web.StreamResponse | None = None,
        answer_headers: Mapping[str, str] | None = None,
        first_byte: FirstByteGuard | None = None,
    ) -> tuple[web.StreamResponse, ProxyOutcome]:
        """Send the request to `url`; stream the answer back as it comes.

        `outcome` (filled in as it goes) tells a caller whose request was cancelled what
        had been sent already. `engine_headers` (the engine's own key) are added after the
        client's credentials were stripped, so a client never sees or sets them. `prepared` is
        an SSE response whose headers already went out (loading comments): the engine's
        stream continues it, and an answer that is not a stream becomes its last event.
        `answer_headers` are added to the answer (which model served it).

        `lost` (the held engine's loss signal, its result the reason) ends the exchange as
        soon as it completes: the engine is gone or declared gone, and its socket may never
        say so (a remote host gone silent, a lost node, a hung engine). Before anything
        reached the client that is `EngineLost`; a stream already begun gets a final error
        event. The cost is one callback on the future, no task and no timer.

        `first_byte` bounds the engine's silences (see `FirstByteGuard`): `FirstByteTimeout`
        before anything reached the client, a final error event in a stream.
        """
        outcome = outcome if outcome is not None else ProxyOutcome()
        watch: _LossWatch | None = None
        if lost is not None:
            if lost.done():
                outcome.engine_lost = True
                raise EngineLost(lost.result())
            watch = _LossWatch(outcome)
            lost.add_done_callback(watch.fire)
        # One coroutine from here to the engine's answer (no wrapper in between): every
        # suspension of a request passes through each frame of its chain, twice.
        silence: _SilenceWatch | None = None
        try:
            started = time.perf_counter()
            headers = forward_headers(request.headers)
            if engine_headers:
                headers.update(engine_headers)
            if first_byte is not None:
                silence = _SilenceWatch(first_byte)
            return await self._exchange_watched(
                request,
                url,
                body,
                headers,
                transformer_for,
                rewrite_body,
                outcome,
                started,
                watch,
                prepared,
                answer_headers,
                silence,
            )
        except asyncio.CancelledError:
            if lost is not None and watch is not None and watch.fired and watch.take_cancel():
                raise EngineLost(lost.result()) from None
            raise
        finally:
            if silence is not None:
                silence.close()
            if lost is not None and watch is not None:
                watch.live = False  # a callback already scheduled must not cancel what follows
                lost.remove_done_callback(watch.fire)

    async def _exchange_watched(
        self,
        request: web.Request,
        url: str | URL,
        body: bytes | None,
        headers: dict[str, str],
        transformer_for: Callable[[], StreamTransformer | None],
        rewrite_body: Callable[[bytes], bytes] | None,
        outcome: ProxyOutcome,
        started: float,
        watch: _LossWatch | None,
        prepared: web.StreamResponse | None,
        answer_headers: Mapping[str, str] | None,
        silence: _SilenceWatch | None,
    ) -> tuple[web.StreamResponse, ProxyOutcome]:
        try:
            upstream = await self.session.request(
                request.method,
                url,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=self._client_timeout,
            )
        except asyncio.CancelledError:
            if silence is not None and silence.fired and silence.take_cancel():
                # Cancelling the request closed its connection: a frozen engine that thaws
                # later answers no one.
                raise FirstByteTimeout(silence.message()) from None
            raise
        except TimeoutError as error:
            raise self._timeout(error) from error
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as error:
            # Refused, or closed before a byte of the answer: nothing reached the client.
            raise EngineUnreachable(
                f"engine unreachable: {describe(error)}",
                refused=isinstance(error, aiohttp.ClientConnectorError),
            ) from error
        except aiohttp.ClientError as error:
            raise UpstreamError(f"engine unreachable: {describe(error)}") from error
        try:
            content_type = upstream.headers.get("Content-Type", "")
            streamed = content_type.startswith("text/event-stream")
            if silence is not None:
                # The headers came: a stream's chunks stay watched; the body of any other
                # answer follows its headers and has the read timeout.
                if streamed:
                    silence.heard()
                else:
                    silence.close()
            if streamed:
                response = await self._stream(
                    request,
                    upstream,
                    transformer_for(),
                    outcome,
                    started,
                    watch,
                    prepared,
                    answer_headers,
                    silence,
                )
            elif prepared is not None:
                response = await self._answer_as_event(prepared, upstream, outcome, started)
            else:
                try:
                    data = await upstream.read()
                except TimeoutError as error:
                    raise self._timeout(error) from error
                except aiohttp.ClientError as error:
                    raise UpstreamError(
                        f"engine broke off its answer: {describe(error)}"
                    ) from error
                outcome.first_byte_s = time.perf_counter() - started
                if rewrite_body is not None and upstream.status < 400:
                    data = rewrite_body(data)
                outcome.body = data
                response = web.Response(
                    body=data,
                    status=upstream.status,
                    headers={**response_headers(upstream), **(answer_headers or {})},
                )
            outcome.status = upstream.status
            return response, outcome
        finally:
            if (
                outcome.client_gone
                or outcome.upstream_broke
                or outcome.cut_by_gateway
                or outcome.engine_lost
                or outcome.first_byte_timed_out
            ):
                upstream.close()  # drop the connection so the engine stops generating
            else:
                upstream.release()

    def _timeout(self, error: TimeoutError) -> UpstreamTimeout:
        if isinstance(error, aiohttp.ConnectionTimeoutError):
            return UpstreamTimeout(
                f"engine did not accept a connection within {self._connect_timeout:g}s "
                "(limits.upstream_connect_timeout)"
            )
        return UpstreamTimeout(
            f"engine sent nothing for {self._read_timeout:g}s (limits.upstream_read_timeout)"
        )

    async def _answer_as_event(
        self,
        prepared: web.StreamResponse,
        upstream: aiohttp.ClientResponse,
        outcome: ProxyOutcome,
        started: float,
    ) -> web.StreamResponse:
        """An engine's JSON answer (an error, mostly) to a stream whose 200 went out already."""
        try:
            data = await upstream.read()
        except (aiohttp.ClientError, TimeoutError) as error:
            data = json.dumps({"error": {"message": describe(error)}}).encode()
        outcome.first_byte_s = time.perf_counter() - started
        outcome.body = data
        outcome.streamed = True
        if upstream.status < 400:
            event = b"data: " + data.replace(b"\n", b"") + b"\n\ndata: [DONE]\n\n"
        else:
            message, code = _error_of(data, upstream.status)
            event = error_event(message, code)
        try:
            await prepared.write(event)
            await prepared.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            outcome.client_gone = True
        return prepared

    async def _stream(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        transformer: StreamTransformer | None,
        outcome: ProxyOutcome,
        started: float,
        watch: _LossWatch | None = None,
        prepared: web.StreamResponse | None = None,
        answer_headers: Mapping[str, str] | None = None,
        stall: _SilenceWatch | None = None,
    ) -> web.StreamResponse:
        outcome.streamed = True
        if prepared is not None:
            response = prepared  # its headers (200, SSE) went out with the loading comments
        else:
            response = web.StreamResponse(
                status=upstream.status,
                headers={**response_headers(upstream), **(answer_headers or {})},
            )
            response.headers["Cache-Control"] = "no-cache"
            response.headers["X-Accel-Buffering"] = "no"  # tell nginx in front not to buffer
        self._streams.add(upstream)
        try:
            if prepared is None:
                await response.prepare(request)
            outcome.status = upstream.status  # sent: a later hang-up does not change it
            async for chunk in upstream.content.iter_any():
                if stall is not None:
                    stall.heard()
                if outcome.first_byte_s is None:
                    outcome.first_byte_s = time.perf_counter() - started
                if transformer is not None:
                    chunk = transformer.feed(chunk)
                    if not chunk:
                        continue
                await response.write(chunk)
            if upstream in self._cut:  # closing may read as a clean end: say why it ended
                raise aiohttp.ClientConnectionError("cut by the gateway")
            if transformer is not None:
                tail = transformer.flush()
                if tail:
                    await response.write(tail)
        except asyncio.CancelledError:
            if stall is not None and stall.fired and stall.take_cancel():
                # Silent past the bound, and its engine failed its liveness check.
                outcome.first_byte_timed_out = True
                try:
                    await response.write(error_event(stall.message(), "upstream_timeout"))
                except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                    outcome.client_gone = True
                return response
            if watch is None or not watch.fired or not watch.take_cancel():
                outcome.client_gone = True
                raise
            # The engine was declared lost mid-stream: the client has its 200 already, so
            # the stream ends with an error event in OpenAI's shape, now, not at the read
            # timeout.
            if transformer is not None:
                transformer.flush()
            try:
                await response.write(
                    error_event(
                        f"the engine serving this stream was lost: {watch.reason}", "engine_lost"
                    )
                )
            except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                outcome.client_gone = True
                return response
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            outcome.client_gone = True
            raise
        except (aiohttp.ClientError, TimeoutError) as error:
            # The engine died or hung mid-stream: end the stream with an error event so the
            # client sees a clear failure instead of a silent truncation.
            if transformer is not None:
                transformer.flush()
            message = f"the engine broke off the stream: {describe(error)}"
            code = "upstream_stream_broken"
            if upstream in self._cut and self._cut_reason is not None:
                # The gateway ended it (shutdown past its grace), not the engine.
                message, code = self._cut_reason, "shutting_down"
                outcome.cut_by_gateway = True
            else:
                outcome.upstream_broke = True
            try:
                await response.write(error_event(message, code))
            except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                outcome.client_gone = True
                return response
        finally:
            if stall is not None:
                stall.close()  # what follows (the end of the stream) is not watched
            self._streams.discard(upstream)
            self._cut.discard(upstream)
        if transformer is not None:
            outcome.usage = transformer.usage
        try:
            await response.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            outcome.client_gone = True
        return response


class _SilenceWatch:
    """The first-byte bound of one exchange: the wait for the answer's headers, a stream's
    first chunk, and any later silence of the stream as long (a node frozen mid-stream) get
    the engine's liveness check; a failed check cancels the request's task, told apart by
    `fired` as `_LossWatch` does (its connection is closed with it).

    One timer per bound's length, not per chunk, and no task unless the bound passes: each
    chunk only notes the time."""

    __slots__ = (
        "_check",
        "_guard",
        "_handle",
        "_loop",
        "_task",
        "alone",
        "fired",
        "last",
        "live",
    )

    def __init__(self, guard: FirstByteGuard) -> None:
        self._guard = guard
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self.last = self._loop.time()
        self.fired = False
        self.live = True
        self.alone: bool | None = None
        self._check: asyncio.Future[None] | None = None
        self._handle = self._loop.call_at(self.last + guard.timeout, self._due)

    def heard(self) -> None:
        self.last = self._loop.time()

    def _due(self) -> None:
        if not self.live:
            return
        quiet_until = self.last + self._guard.timeout
        if self._loop.time() < quiet_until:
            self._handle = self._loop.call_at(quiet_until, self._due)
            return
        self._check = asyncio.ensure_future(self._ask())

    async def _ask(self) -> None:
        alive = await self._guard.check()
        if not self.live:
            return
        if alive or self._loop.time() - self.last < self._guard.timeout:
            self._handle = self._loop.call_later(self._guard.timeout, self._due)
            return
        if self._task is not None:
            self.fired = True
            self._task.cancel()

    def message(self) -> str:
        return (
            f"the engine sent nothing for {self._guard.timeout:g}s "
            "(limits.upstream_first_byte_timeout) and did not answer its liveness check"
        )

    def take_cancel(self) -> bool:
        """Undo our cancellation; False when the task was also cancelled for another reason."""
        if self.alone is None:
            self.alone = self._task is None or self._task.uncancel() == 0
        return self.alone

    def close(self) -> None:
        self.live = False
        self._handle.cancel()
        if self._check is not None and not self._check.done():
            self._check.cancel()


class _LossWatch:
    """The one registration a request makes on its engine's loss signal: when the engine
    is lost, the request's own task is cancelled (as `asyncio.timeout` does) and told apart
    from a client that hung up by `fired`."""

    __slots__ = ("_alone", "_outcome", "_task", "fired", "live", "reason")

    def __init__(self, outcome: ProxyOutcome) -> None:
        self.fired = False
        self.reason = ""
        self.live = True
        self._alone: bool | None = None  # whether ours was the only cancellation
        self._outcome = outcome
        self._task = asyncio.current_task()

    def fire(self, lost: asyncio.Future[str]) -> None:
        if self.live and not self.fired and self._task is not None:
            self.fired = True
            self.reason = lost.result()
            self._outcome.engine_lost = True
            self._task.cancel()

    def take_cancel(self) -> bool:
        """Undo our cancellation; False when the task was also cancelled for another reason
        (the client hung up, shutdown), which then goes on as a cancellation. Undone once,
        however often asked (the stream and its caller both ask)."""
        if self._alone is None:
            self._alone = self._task is None or self._task.uncancel() == 0
        return self._alone


def _error_of(data: bytes, status: int) -> tuple[str, str]:
    """The message and code of an engine's error body (OpenAI's shape or anything else)."""
    try:
        error = json.loads(data).get("error")
    except (ValueError, AttributeError, RecursionError):
        error = None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        code = error.get("code")
        return error["message"], str(code if code is not None else status)
    return f"the engine answered {status}: {data[:200].decode(errors='replace')}", str(status)


def describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return f"{type(error).__name__}: {text}" if text != type(error).__name__ else text
