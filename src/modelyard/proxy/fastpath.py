"""The data path's fast lane: the common OpenAI POSTs served without aiohttp's machinery.

A connection starts here. A request that is exactly `POST /v1/chat/completions` (or
`/v1/completions`, `/v1/embeddings`) in plain HTTP/1.1, with one Content-Length, a JSON object
body within the size limit and a known model without an adapter, is served by this module:
parsed by hand, forwarded with the lean client (proxy/lean_client.py), answered with one write
(or, for a stream, one write per read of the engine's, from the engine's read callback). A
burst of new requests is read and started a few per turn of the event loop, in the order it
came (`LaneCore.take_turn`), so the first answers do not wait for the last request to be
read. It goes through everything the aiohttp route goes
through: the scheduler's `engine_for` (queues, back-pressure, in-flight counts, idle timers),
alias rewriting and usage capture (proxy/sse.py), the same error shapes, and
`gateway.observe` (metrics, request log, watchdog).

Anything else (another method or path, a query string, chunked or `Expect` requests, odd or
repeated headers, a Content-Type other than JSON, any browser header such as `Origin` or
`Sec-Fetch-*`, a body that is not a JSON object, an unknown model, an adapter) is handed, with
the bytes read so far, to aiohttp's own protocol for that connection, which serves it with
every middleware and keeps the connection: the fast lane never answers a request it is not
sure about.

With API keys (config keys or runtime keys, checked per request), it admits a request with
the web layer's own functions (`api.admission`): the key (unknown, revoked, expired), the
token budget, tokens and requests per minute, the key's scope over the served model; a
refusal is answered with the same status, headers and body as the web layer's (from the same
`error_answer`), and counted once, as there. Usage is charged with the same call
(`api.accounting.finish`). Only the request's shape is checked before admission, without side
effects, so a request handed over is admitted by the web layer alone: nothing is counted
twice. A request whose key headers are repeated or not plain ASCII is handed over.

The Host rule is the web layer's own `BrowserPolicy` (without keys, only names of this
gateway; with keys, any). Remote engines (`engine: remote`, whose URL may be https or carry
a path) and TLS listeners are aiohttp's.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import json
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol, cast

from multidict import CIMultiDict

from modelyard.api.accounting import (
    ServedTokens,
    TokenCount,
    UsageAsked,
    ask_stream_for_usage,
    finish,
    supports_running_usage,
    usage_of,
)
from modelyard.api.admission import identify, model_refusal, needs_key, refusal_answer
from modelyard.api.bodies import parse_json_object
from modelyard.api.errors import ApiError, ErrorAnswer, error_answer, unavailable, with_log_tail
from modelyard.api.request_options import read_options
from modelyard.auth.authenticator import Refusal
from modelyard.auth.credentials import is_credential_header, presented_key
from modelyard.auth.origins import BrowserPolicy
from modelyard.auth.principal import ANONYMOUS, Principal
from modelyard.gateway import Gateway
from modelyard.observability.requests import CLIENT_CLOSED_REQUEST
from modelyard.proxy.forward import _HOP_HEADERS, UpstreamError, UpstreamTimeout
from modelyard.proxy.lean_client import Exchange, LeanPool, UpstreamConnection
from modelyard.proxy.sse import StreamTransformer, model_name_replacements, rewrite_model_in_json
from modelyard.scheduler.names import Target, UnknownModel
from modelyard.scheduler.supervisor import ModelUnavailable

log = logging.getLogger("modelyard.api")

# The exact paths served here, with their metric route labels (as serving.openai_model_route).
FAST_PATHS = {
    b"/v1/chat/completions": "/v1/chat",
    b"/v1/completions": "/v1/completions",
    b"/v1/embeddings": "/v1/embeddings",
}
MAX_HEAD = 16 * 1024  # a longer head goes to aiohttp, which applies its own limits
# aiohttp refuses a header line over 8190 bytes and more than 128 headers: anything near
# that goes to it, so its answer is the one given.
MAX_LINE = 8000
MAX_HEADERS = 100
# An idle kept-alive connection is closed after this long, as aiohttp's keepalive_timeout does;
# checked by one sweep for all connections rather than a timer per request.
IDLE_CLOSE_S = 75.0
SWEEP_S = 15.0
START_PER_TURN = 16  # requests read and started per turn of the event loop (LaneCore.take_turn)
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
# Requests with these go to aiohttp: framing the lane does not handle, and anything a browser
# sends (the web layer's Host, Origin and CORS rules decide those).
_NOT_FAST = frozenset(
    {
        b"transfer-encoding",
        b"content-encoding",
        b"expect",
        b"upgrade",
        b"origin",
        b"sec-fetch-site",
        b"sec-fetch-mode",
        b"sec-fetch-dest",
        b"access-control-request-method",
        b"access-control-request-headers",
    }
)
_JSON_TYPES = frozenset({b"application/json", b"application/json; charset=utf-8"})
# Host names the lane serves without asking the web layer (which decides all others).
_LOCAL_HOST = re.compile(rb"(?:localhost|127\.0\.0\.1|\[::1\])(?::[0-9]{1,5})?")
_HOP_TO_ENGINE = frozenset(h.encode() for h in _HOP_HEADERS)
KEY_HEADERS = frozenset({b"authorization", b"x-api-key", b"api-key"})  # presented_key's
_KEPT_NAMES: dict[bytes, bool] = {}  # header name -> forwarded to the engine (bounded cache)
_DROP_FROM_ENGINE = frozenset(h.encode() for h in _HOP_HEADERS)
_STREAM_OWN = frozenset({b"cache-control", b"x-accel-buffering"})
_STREAM_HEAD = [  # a stream's own headers, in place of the engine's
    b"Cache-Control: no-cache\r\n",
    b"X-Accel-Buffering: no\r\n",  # tell nginx in front not to buffer
    b"Transfer-Encoding: chunked\r\n\r\n",
]
_REASONS = {status.value: status.phrase.encode() for status in http.HTTPStatus}


class FastRequest:
    __slots__ = (
        "body",
        "headers",
        "host",
        "keep_alive",
        "label",
        "length",
        "path",
        "payload",
        "presented",
        "principal",
        "raw",
        "raw_end",
        "target",
    )

    def __init__(
        self,
        path: bytes,
        headers: list[tuple[bytes, bytes]],
        length: int,
        keep_alive: bool,
        host: bytes,
    ) -> None:
        self.path = path
        self.label = FAST_PATHS[path]
        self.headers = headers
        self.host = host
        self.length = length
        self.body = b""
        self.keep_alive = keep_alive
        self.payload: dict[str, Any] = {}
        self.target: Target | None = None
        self.principal = ANONYMOUS
        self.presented: bytes | None = None  # the client's key, once admission has read it
        # The bytes it came in (a proxy worker may still hand the connection over with them).
        self.raw = b""
        self.raw_end = 0


class LaneCore:
    """What a lane shares across its connections: the lean pool, the requests in flight, the
    idle sweep. `FastLane` serves with the gateway in this process; a proxy worker's lane
    (proxy/worker_lane.py) asks the gateway's process for each admission instead."""

    def __init__(
        self,
        fallback: Callable[[], asyncio.Protocol],
        max_body: int,
        connect_timeout: float,
        read_timeout: float,
        idle_close_s: float = IDLE_CLOSE_S,
        sweep_s: float = SWEEP_S,
    ) -> None:
        self.idle_close_s = idle_close_s
        self.sweep_s = sweep_s
        self.fallback = fallback
        self.max_body = max_body
        self.pool = LeanPool(connect_timeout, read_timeout)
        self.in_flight: set[asyncio.Task[None]] = set()
        self.streaming: set[FastProtocol] = set()
        self.connections: set[FastProtocol] = set()  # while the lane serves them
        self._sweeper: asyncio.Task[None] | None = None
        self._addresses: dict[str, tuple[str, int, bytes]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._awaiting_turn: deque[FastProtocol] = deque()
        self._started_this_turn = 0
        self._turn: asyncio.Handle | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        # Looked up once: on Python 3.11 each `asyncio.get_running_loop()` costs a getpid().
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def apply_limits(self, max_body: int, connect_timeout: float, read_timeout: float) -> None:
        """A reload's limits, for the next request (a body over the limit goes to the web
        layer, which answers 413 with the limit in force)."""
        self.max_body = max_body
        self.pool.set_timeouts(connect_timeout, read_timeout)

    def take_turn(self, protocol: FastProtocol) -> bool:
        """True when `protocol` may read and start its request now; False when this turn of
        the event loop has started START_PER_TURN already, and the lane calls
        `protocol.turn()` in a later one, in order.

        Why: a thousand requests that arrive together would otherwise go through each stage
        together (all parsed, then all connecting to engines, then all sending), and the
        first answers could leave only after the last request had been read. Taken in turns,
        the first ones reach their engines and their clients while later ones still wait.
        """
        if self._turn is None:
            self._turn = self.loop.call_soon(self._next_turn)
        if self._awaiting_turn or self._started_this_turn >= START_PER_TURN:
            self._awaiting_turn.append(protocol)
            return False
        self._started_this_turn += 1
        return True

    def _next_turn(self) -> None:
        self._turn = None
        self._started_this_turn = 0
        waiting = self._awaiting_turn
        while waiting and self._started_this_turn < START_PER_TURN:
            self._started_this_turn += 1
            waiting.popleft().turn()
        if waiting:
            self._turn = self.loop.call_soon(self._next_turn)

    def served(self) -> None:
        """A request is served by the lane (counted in the gateway's metrics)."""

    def handed_over(self) -> None:
        """A connection went to the web layer (counted in the gateway's metrics)."""

    def eligible(self, request: FastRequest) -> bool:
        raise NotImplementedError

    def protocol(self) -> FastProtocol:
        if self._sweeper is None:
            self._sweeper = self.loop.create_task(self._sweep_idle())
        return self.make_protocol()

    def make_protocol(self) -> FastProtocol:
        return FastProtocol(self)

    async def _sweep_idle(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.sweep_s)
            now = loop.time()
            for protocol in list(self.connections):
                idle = protocol.task is None and now - protocol.last_active > self.idle_close_s
                if idle and protocol.transport is not None:
                    protocol.transport.close()

    def loop_time(self) -> float:
        return self.loop.time()

    def address(self, base_url: str) -> tuple[str, int, bytes]:
        known = self._addresses.get(base_url)
        if known is None:
            host_port = base_url.removeprefix("http://").rstrip("/")
            host, _, port = host_port.rpartition(":")
            known = (host.strip("[]"), int(port), host_port.encode())
            self._addresses[base_url] = known
        return known

    def cut_streams(self, reason: str) -> int:
        """End every stream in progress with a final SSE error event carrying `reason`
        (shutdown past its grace: a clear end, not a silent truncation). Returns how many."""
        cut = 0
        for protocol in list(self.streaming):
            exchange = protocol.exchange
            if exchange is not None and not exchange.done.done():
                exchange.fail(StreamCut(reason))
                exchange.connection.close()
                cut += 1
        return cut

    async def close(self, grace: float) -> None:
        """Wait (bounded) for requests in flight; streams still going then end with an error
        event; what is left after that is cancelled. Then drop pooled connections."""
        if self.in_flight:
            await asyncio.wait(list(self.in_flight), timeout=grace)
        if self.in_flight and self.cut_streams(
            f"the gateway is shutting down; this stream was ended after {grace:g}s "
            "(limits.shutdown_grace)"
        ):
            await asyncio.wait(list(self.in_flight), timeout=5.0)
        for task in list(self.in_flight):
            task.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.pool.close()


class UsageSink(Protocol):
    """Where a stream's usage goes as soon as its usage chunk passes (`TokenCount.count`), and
    what the answer served as it passes (`served`: a stream cut early is charged that)."""

    @property
    def served(self) -> ServedTokens: ...

    def count(self, usage: dict[str, int]) -> None: ...


class Outcome:
    """How a request ended, for its record: filled in as it goes."""

    __slots__ = ("client_gone", "first_byte", "started", "status", "streamed", "usage")

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.status = 500
        self.first_byte: float | None = None
        self.streamed = False
        self.client_gone = False
        self.usage: dict[str, int] = {}


class FastLane(LaneCore):
    """The fast lane of the gateway's own process."""

    def __init__(
        self,
        gateway: Gateway,
        fallback: Callable[[], asyncio.Protocol],
        idle_close_s: float = IDLE_CLOSE_S,
        sweep_s: float = SWEEP_S,
        policy: BrowserPolicy | None = None,
    ) -> None:
        limits = gateway.config.limits
        super().__init__(
            fallback,
            limits.max_body_bytes,
            limits.upstream_connect_timeout,
            limits.upstream_read_timeout,
            idle_close_s,
            sweep_s,
        )
        self.gateway = gateway
        # The web layer's Host rule (None: only the plain local names are served here).
        self.policy = policy
        metrics = gateway.metrics
        self._served_metric = metrics.fast_lane_served
        self._handed_over_metric = metrics.fast_lane_handed_over

    def served(self) -> None:
        self._served_metric.inc()

    def handed_over(self) -> None:
        self._handed_over_metric.inc()

    def host_allowed(self, host: bytes) -> bool:
        """The web layer's Host rule (DNS rebinding, without keys): True when it would let
        the request through; anything else is the web layer's to refuse."""
        if _LOCAL_HOST.fullmatch(host) is not None:
            return True  # always allowed (loopback names and addresses)
        if self.policy is None or not host.isascii():
            return False
        return self.policy.host_problem(host.decode("ascii")) is None

    def eligible(self, request: FastRequest) -> bool:
        """Checks that send a request to aiohttp (which answers them properly) instead.
        Free of side effects: a request handed over is counted by the web layer alone."""
        if not self.host_allowed(request.host) or not shape_ok(request):
            return False
        target = self.target_of(request.payload["model"])
        request.target = target
        return target is not None

    def target_of(self, model: str) -> Target | None:
        """The model the lane serves for this name, or None when the web layer must (an
        unknown name, whose 404 is the web layer's; an adapter; a remote engine)."""
        try:
            target = self.gateway.scheduler.resolve(model)
        except UnknownModel:
            return None
        if target.adapter is not None:
            return None
        if self.gateway.config.models[target.model].engine == "remote":
            return None  # a remote server's URL may be https or carry a path: aiohttp's
        return target

    def admission(
        self, path: str, headers: list[tuple[bytes, bytes]], remote: str | None, target: Target
    ) -> tuple[Principal, bytes | None] | ErrorAnswer:
        """The web layer's admission, with its functions (`api.admission`): the key, its
        limits and budget, its scope over the model. The principal and the key presented (kept
        from the engine's headers), or the refusal with the web layer's status, headers and
        body, counted as it counts them."""
        auth = self.gateway.auth
        if auth is None or not needs_key(auth, "POST", path):
            return ANONYMOUS, None  # no keys: the anonymous principal, as in the web layer
        # As aiohttp decodes header values (key headers are ASCII here: see _parse_head).
        mapping = CIMultiDict(
            (name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
            for name, value in headers
        )
        identity = identify(auth, "POST", path, mapping)
        if isinstance(identity, Refusal):
            return refusal_answer(auth, identity, "POST", path, remote)
        refusal = model_refusal(self.gateway, identity, target)
        if refusal is not None:
            auth.usage.count_forbidden(identity.name)  # as the middleware's FORBIDDEN_KEY
            return refusal.answer()
        key = presented_key(mapping)  # as identify read it; kept from the engine's headers
        return identity, key.encode("utf-8", "surrogateescape") if key else None


def shape_ok(request: FastRequest) -> bool:
    """The body is a JSON object naming a model (the web layer's own parse): read into
    `request.payload`. Anything else is the web layer's to answer."""
    try:
        payload = parse_json_object(request.body)
    except ApiError:
        return False
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        return False
    request.payload = payload
    return True


class FastProtocol(asyncio.Protocol):
    """One client connection: fast requests served in order, the rest handed to aiohttp."""

    def __init__(self, lane: LaneCore) -> None:
        self.lane = lane
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.task: asyncio.Task[None] | None = None
        self.last_active = 0.0
        self.gone = False
        self.keep_alive = True
        self.writable: asyncio.Future[None] | None = None
        self.upstream: UpstreamConnection | None = None  # paused while the client is slow
        self.exchange: Exchange | None = None  # the one in flight
        self.sent_done = False  # the stream's `[DONE]` has gone to the client
        self.answer_status: int | None = None  # a stream's status, once its head is sent
        self._remote: str | None = None
        self.waiting = False  # waiting for its turn to read its request (LaneCore.take_turn)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.lane.connections.add(self)
        self.last_active = self.lane.loop_time()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.last_active = self.lane.loop_time()
        if self.task is None and not self.waiting:
            if self.lane.take_turn(self):
                self._next()
            else:
                self.waiting = True

    def turn(self) -> None:
        """This connection's turn to read its request (`LaneCore.take_turn`)."""
        self.waiting = False
        if not self.gone and self.task is None:
            self._next()

    def eof_received(self) -> bool | None:
        # As aiohttp: a client that stops sending has gone; the transport closes, and the
        # request in flight is cancelled (a client that disconnects leaves the queue).
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self.lane.connections.discard(self)
        exchange = self.exchange
        finished = self.sent_done or (exchange is not None and exchange.done.done())
        if self.task is not None and not finished:
            # As aiohttp's handler_cancellation: the engine stops too. An answer the client
            # has whole (SDKs close right after `[DONE]`) is left to finish and counted served.
            self.task.cancel()
        self._wake_writer()

    def pause_writing(self) -> None:
        if self.writable is None:
            self.writable = self.lane.loop.create_future()
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()
        self._wake_writer()

    def _wake_writer(self) -> None:
        if self.writable is not None:
            if not self.writable.done():
                self.writable.set_result(None)
            self.writable = None

    def remote(self) -> str | None:
        """The client's address, read once per connection (a system call each time)."""
        if self._remote is None:
            peer = self.transport.get_extra_info("peername") if self.transport else None
            self._remote = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        return self._remote or None

    # -- parsing --
    def _next(self) -> None:
        """Serve the next complete request in the buffer, or hand the connection over."""
        buffer = self.buffer
        if not buffer:
            return
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HEAD or not buffer.startswith(b"POST /v1/"[: len(buffer)]):
                self._hand_over()
            return
        request = self._parse_head(buffer, end)
        if request is None:
            self._hand_over()
            return
        length = request.length
        start = end + 4
        if len(buffer) < start + length:
            return  # the body is still coming
        request.body = buffer[start : start + length]
        request.raw, request.raw_end = buffer, start + length
        if not self.lane.eligible(request):
            self._hand_over()
            return
        self.buffer = buffer[start + length :]
        task = self.lane.loop.create_task(self._serve(request))
        self.task = task
        self.lane.in_flight.add(task)
        task.add_done_callback(self._served)

    def _parse_head(self, buffer: bytes, end: int) -> FastRequest | None:
        lines = buffer[:end].split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or parts[0] != b"POST" or parts[2] != b"HTTP/1.1":
            return None
        path = parts[1]
        if path not in FAST_PATHS:
            return None
        if len(lines) > MAX_HEADERS:
            return None
        headers: list[tuple[bytes, bytes]] = []
        length: int | None = None
        keep_alive = True
        json_body = False
        host: bytes | None = None
        key_headers: set[bytes] = set()
        for line in lines[1:]:
            if len(line) > MAX_LINE:
                return None
            name, colon, value = line.partition(b":")
            if not colon or _TOKEN.fullmatch(name) is None:
                return None
            value = value.strip(b" \t")
            if _VALUE.fullmatch(value) is None:
                return None
            lowered = name.lower()
            if lowered == b"content-length":
                if length is not None or not value.isdigit() or len(value) > 12:
                    return None
                length = int(value)
            elif lowered in _NOT_FAST:
                return None
            elif lowered == b"host":
                if host is not None:
                    return None  # two Host headers: aiohttp refuses them
                host = value  # checked against the web layer's rule in `eligible`
            elif lowered in KEY_HEADERS:
                # A key sent twice, or not in plain ASCII: the web layer's to read.
                if lowered in key_headers or not value.isascii():
                    return None
                key_headers.add(lowered)
            elif lowered == b"content-type":
                if json_body:
                    return None
                json_body = value.lower() in _JSON_TYPES
                if not json_body:
                    return None
            elif lowered == b"connection":
                tokens = {token.strip() for token in value.lower().split(b",")}
                if b"upgrade" in tokens:
                    return None
                if b"close" in tokens:
                    keep_alive = False
            headers.append((name, value))
        if length is None or length > self.lane.max_body or host is None or not json_body:
            return None
        return FastRequest(path, headers, length, keep_alive, host)

    def _hand_over(self) -> None:
        """From here on aiohttp serves this connection, starting with the bytes we hold."""
        transport = self.transport
        if transport is None or self.gone:
            return
        handler = self.lane.fallback()
        self.lane.handed_over()
        self.lane.connections.discard(self)  # aiohttp keeps its own keep-alive timer
        transport.set_protocol(handler)
        handler.connection_made(transport)
        data, self.buffer = self.buffer, b""
        if data:
            handler.data_received(data)

    def _served(self, task: asyncio.Task[None]) -> None:
        self.lane.in_flight.discard(task)
        self.task = None
        self.last_active = self.lane.loop_time()
        if self.gone or self.transport is None:
            return
        if task.cancelled() or task.exception() is not None or not self.keep_alive:
            self.transport.close()
            return
        self._next()

    # -- serving --
    async def _serve(self, request: FastRequest) -> None:
        keep = await self._serve_one(request)
        self.keep_alive = keep and request.keep_alive
        if self.writable is not None:
            await self.writable  # the client reads slowly: its next answer waits

    def _admit(self, request: FastRequest, target: Target) -> bool:
        """Admission (`FastLane.admission`); False when refused (and answered)."""
        lane = cast(FastLane, self.lane)
        # The client's address is for a refusal's log line, and only keys refuse: without
        # them, no system call to read it.
        remote = self.remote() if lane.gateway.auth is not None else None
        admitted = lane.admission(request.path.decode(), request.headers, remote, target)
        if isinstance(admitted, ErrorAnswer):
            self._answer(admitted)
            return False
        request.principal, request.presented = admitted
        return True

    async def _serve_one(self, request: FastRequest) -> bool:
        """Serve one request; False when the connection must close afterwards."""
        gateway = cast(FastLane, self.lane).gateway
        target = request.target
        assert target is not None
        if not self._admit(request, target):
            return True
        self.lane.served()
        outcome = Outcome()
        path = request.path.decode()
        tokens = TokenCount(
            gateway,
            request.principal.name,
            target.model,
            read_options(path, request.payload, len(request.body)),
        )
        try:
            tokens.reserve()  # the web layer's reservation: 429 when it does not fit
        except ApiError as refused:
            self._answer(refused.answer())
            return True
        continuous = supports_running_usage(gateway, target.model)
        try:
            async with gateway.scheduler.engine_for(target.model) as engine:
                return await self._relay(
                    request,
                    engine.base_url,
                    engine.upstream_headers,
                    target.upstream_name,
                    target.public_name,
                    tokens,
                    outcome,
                    continuous,
                )
        except ModelUnavailable as error:
            refusal = unavailable(error, show_tail=request.principal.admin)
            outcome.status = refusal.status
            self._answer(refusal.answer())
            return True
        except asyncio.CancelledError:
            if not outcome.client_gone:  # it hung up while waiting for the engine
                outcome.client_gone = True
                outcome.status = CLIENT_CLOSED_REQUEST
            raise
        finally:
            # The same call as the web layer's: tokens for the key, metrics, request log.
            finish(
                gateway,
                tokens,
                model=target.model,
                route=request.label,
                key_name=request.principal.name,
                status=outcome.status,
                duration_s=time.perf_counter() - outcome.started,
                first_byte_s=outcome.first_byte,
                streamed=outcome.streamed,
                usage=outcome.usage,
                client_gone=outcome.client_gone,
            )

    async def _relay(
        self,
        request: FastRequest,
        base_url: str,
        engine_headers: Mapping[str, str],
        upstream_name: str,
        public_name: str,
        tokens: UsageSink,
        outcome: Outcome,
        continuous: bool = False,
    ) -> bool:
        """Send an admitted request to its engine and the answer to the client, with the
        engine's own model name going in and the client's coming back; `outcome` says how it
        ended. False when the connection must close afterwards."""
        self.answer_status = None
        path = request.path.decode()
        payload = request.payload
        had_options = "stream_options" in payload
        usage_added = ask_stream_for_usage(path, payload, continuous)
        body = request.body
        if payload.get("model") != upstream_name or (
            usage_added and (had_options or usage_added.running)
        ):
            payload["model"] = upstream_name
            body = json.dumps(payload).encode()
        elif usage_added:
            body = _with_usage_asked(body, payload)
        replacements = model_name_replacements(upstream_name, public_name)
        try:
            (
                outcome.status,
                outcome.first_byte,
                outcome.streamed,
                outcome.usage,
            ) = await self._forward(
                request, base_url, engine_headers, path, body, replacements, usage_added, tokens
            )
            outcome.client_gone = self.gone
            return True
        except UpstreamError as error:
            answer = await self._upstream_failed(request, error)
            outcome.status = answer.status
            self._answer(answer)
            return True
        except asyncio.CancelledError:
            # The client hung up: a stream whose 200 was sent keeps it; otherwise 499.
            outcome.client_gone = True
            outcome.status = self.answer_status or CLIENT_CLOSED_REQUEST
            outcome.streamed = self.answer_status is not None
            raise
        except Exception:
            log.exception("internal error on POST %s", path)
            outcome.status = 500
            self._answer(
                error_answer(500, "internal gateway error; see the gateway log", "internal_error")
            )
            return False

    async def _upstream_failed(self, request: FastRequest, error: UpstreamError) -> ErrorAnswer:
        target = request.target
        assert target is not None
        gateway = cast(FastLane, self.lane).gateway
        timed_out = isinstance(error, UpstreamTimeout)
        return await upstream_failure(gateway, target.model, error, timed_out, request.principal)

    async def _forward(
        self,
        request: FastRequest,
        base_url: str,
        engine_headers: Mapping[str, str],
        path: str,
        body: bytes,
        replacements: list[tuple[bytes, bytes]],
        usage_added: UsageAsked,
        tokens: UsageSink,
    ) -> tuple[int, float | None, bool, dict[str, int]]:
        host, port, host_header = self.lane.address(base_url)
        started = time.perf_counter()
        head = [b"POST ", request.path, b" HTTP/1.1\r\nHost: ", host_header, b"\r\n"]
        # As `forward_headers`: no credential header, nor any header that carries the key the
        # client presented; then the engine's own key, which the client never sees or sets.
        key = request.presented or _presented_key(request.headers)
        for name, value in request.headers:
            if _to_engine(name) and (key is None or key not in value):
                head += [name, b": ", value, b"\r\n"]
        for engine_name, engine_value in engine_headers.items():
            head += [engine_name.encode("latin-1"), b": ", engine_value.encode("latin-1"), b"\r\n"]
        head.append(b"Content-Length: %d\r\n\r\n" % len(body))
        head.append(body)
        connection = await self.lane.pool.acquire(host, port)
        clean = False
        relay = StreamRelay(self, replacements, usage_added, tokens)
        try:
            exchange = self.exchange = connection.send(b"".join(head), relay)
            # One wait for the whole exchange: a stream's head and events reach the client
            # from the engine's read callbacks (StreamRelay), so this task need not wake at
            # the head (one loop step fewer for each stream of a burst).
            clean = await self._settled(exchange, relay)
            first_byte = (exchange.first_byte_at or time.perf_counter()) - started
            if exchange.streaming:
                # A stream the engine broke off: the client got a 200 header, then an error.
                status = exchange.status if clean else 502
                return status, first_byte, True, relay.usage
            data = exchange.take_buffered()
            if replacements and exchange.status < 400:
                data = rewrite_model_in_json(data, replacements)
            self._write_whole(exchange, data)
            clean = True
            return exchange.status, first_byte, False, usage_of(data)
        finally:
            self.exchange = None
            self.upstream = None  # set by the relay at the head, whether or not _stream ran
            self.sent_done = False
            if clean and not self.gone:
                self.lane.pool.release(host, port, connection)
            else:
                connection.close()  # drop the connection so the engine stops generating

    def response_head(self, exchange: Exchange, extra: list[bytes]) -> list[bytes]:
        status = exchange.status
        head = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))]
        for name, value in exchange.headers:
            lowered = name.lower()
            if lowered not in _DROP_FROM_ENGINE and (not extra or lowered not in _STREAM_OWN):
                head += [name, b": ", value, b"\r\n"]
        head += extra
        return head

    def _write_whole(self, exchange: Exchange, data: bytes) -> None:
        head = self.response_head(exchange, [])
        head.append(b"Content-Length: %d\r\n\r\n" % len(data))
        head.append(data)
        self.write_to_client(b"".join(head))

    def write_to_client(self, data: bytes) -> None:
        """Write to the client, unless it has gone: a request whose answer was complete is
        left to finish when its client hangs up (`connection_lost`), and uvloop raises on a
        write to a closed transport."""
        if not self.gone and self.transport is not None:
            self.transport.write(data)

    async def _settled(self, exchange: Exchange, relay: StreamRelay) -> bool:
        """Wait for the end of the exchange. An answer that fails before it is a stream
        raises; a stream `relay` passes on that the engine broke off ends with an error event
        to the client, and False."""
        try:
            await exchange.done
        except UpstreamError as error:
            if not exchange.streaming:
                raise
            # The engine died or hung mid-stream, or the gateway ended it (shutdown past its
            # grace): an error event that says which, then a clean end.
            cut = isinstance(error, StreamCut)
            event = {
                "error": {
                    "message": str(error) if cut else f"the engine broke off the stream: {error}",
                    "type": "server_error",
                    "param": None,
                    "code": "shutting_down" if cut else "upstream_stream_broken",
                }
            }
            relay.close_with(f"data: {json.dumps(event)}\n\n".encode())
            return cut  # a cut stream keeps its status: the engine did nothing wrong
        finally:
            self.lane.streaming.discard(self)
        return True

    def _answer(self, answer: ErrorAnswer) -> None:
        """An error as the web layer writes it (`api.errors.error_answer`): same status,
        headers and JSON body."""
        status = answer.status
        head = [
            b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Error")),
            b"Content-Type: application/json; charset=utf-8\r\n",
            b"Date: %s\r\n" % _http_date(),
        ]
        for name, value in answer.headers.items():
            head += [name.encode("latin-1"), b": ", value.encode("latin-1"), b"\r\n"]
        head += [b"Content-Length: %d\r\n\r\n" % len(answer.body), answer.body]
        self.write_to_client(b"".join(head))


class StreamRelay:
    """Relays an event stream from the engine's socket to the client's inside the engine's
    read callback (`lean_client.AnswerListener`): no task switch per chunk, and the head, the
    first event and the end go out as soon as they are read, even while a burst of other
    requests waits in the event loop's queue. What one read of the engine's brings (the
    head, events, the end) leaves in one write."""

    def __init__(
        self,
        protocol: FastProtocol,
        replacements: list[tuple[bytes, bytes]],
        usage_added: UsageAsked,
        tokens: UsageSink,
    ) -> None:
        self.protocol = protocol
        self.replacements = replacements
        self.usage_added = usage_added
        self.tokens = tokens
        self.transformer: StreamTransformer | None = None
        self.pending: list[bytes] = []  # what this read of the engine's has made so far

    @property
    def usage(self) -> dict[str, int]:
        return self.transformer.usage if self.transformer is not None else {}

    def on_head(self, exchange: Exchange) -> bool:
        for name, value in exchange.headers:
            if name.lower() == b"content-type":
                if not value.startswith(b"text/event-stream"):
                    return False
                break
        else:
            return False
        self.transformer = StreamTransformer(
            self.replacements,
            capture_usage=True,
            drop_usage_only_chunk=self.usage_added.final,
            on_final_usage=self.tokens.count,  # as early as the web layer counts it
            meter=self.tokens.served,  # a stream cut early is charged what it relayed
            strip_progress_usage=self.usage_added.running,
        )
        protocol = self.protocol
        self.pending = protocol.response_head(exchange, _STREAM_HEAD)
        protocol.answer_status = exchange.status
        protocol.upstream = exchange.connection  # paused while the client reads slowly
        protocol.lane.streaming.add(protocol)  # until _settled: cut at shutdown past grace
        return True

    def on_piece(self, piece: bytes) -> None:
        assert self.transformer is not None
        piece = self.transformer.feed(piece)
        if piece:
            # httptools gives each chunk on its own: those of one read leave in one write.
            self.pending.append(_chunk(piece))
            self.protocol.sent_done = piece.endswith(b"data: [DONE]\n\n")

    def on_read_end(self) -> None:
        if self.pending:
            self._flush()

    def on_end(self) -> None:
        assert self.transformer is not None
        tail = self.transformer.flush()
        if tail:
            self.pending.append(_chunk(tail))
        self.pending.append(_LAST_CHUNK)
        self._flush()

    def close_with(self, event: bytes) -> None:
        """End a broken stream: what the engine left unfinished, `event`, the last chunk."""
        if self.transformer is not None:
            self.transformer.flush()
        self.pending += (_chunk(event), _LAST_CHUNK)
        self._flush()

    def _flush(self) -> None:
        data = b"".join(self.pending)
        self.pending = []
        self.protocol.write_to_client(data)


_LAST_CHUNK = b"0\r\n\r\n"


def _chunk(data: bytes) -> bytes:
    """`data` as one chunk of a chunked HTTP/1.1 body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


async def upstream_failure(
    gateway: Gateway, model: str, error: object, timed_out: bool, principal: Principal
) -> ErrorAnswer:
    """The answer to a request whose engine failed it (502) or did not answer in time (504),
    once the scheduler has seen whether the engine died; its log tail for an admin only."""
    await gateway.scheduler.notice_exit(model, timeout=1.0)
    failure = gateway.scheduler.failure_of(model)
    tail = failure.log_tail if failure else []
    message = f"model {model!r}: {error}"
    code = "upstream_timeout" if timed_out else "upstream_error"
    return error_answer(
        504 if timed_out else 502, with_log_tail(message, tail, principal.admin), code
    )


_DATE: list[Any] = [0, b""]  # the second and its HTTP date, formatted once a second


def _http_date() -> bytes:
    now = int(time.time())
    if _DATE[0] != now:
        _DATE[:] = [now, email.utils.formatdate(now, usegmt=True).encode()]
    return cast(bytes, _DATE[1])


class StreamCut(UpstreamError):
    """The gateway ended a stream (shutdown past its grace); the message says why."""


def _presented_key(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The key a client sent, as `auth.credentials.presented_key` reads it."""
    found = [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in headers
        if name.lower() in KEY_HEADERS
    ]
    if not found:
        return None
    key = presented_key(CIMultiDict(found))
    return key.encode("latin-1") if key else None


def _with_usage_asked(body: bytes, payload: dict[str, Any]) -> bytes:
    """`body` asking for usage in the stream: the option spliced in after the opening brace
    rather than the whole payload serialised again (a fifth of a stream request's CPU). Only
    for a body in plain UTF-8 without `stream_options` (so no key is repeated); any other
    is serialised from `payload`, which already holds the option."""
    if body[:1] == b"{" and body[1:2] != b"\x00":
        # UTF-8 by json.detect_encoding's own rule (no BOM, no UTF-16 or -32), and no copy.
        return b'{"stream_options":{"include_usage":true},' + body[1:]
    start = len(body) - len(body.lstrip())
    if body[start : start + 1] != b"{" or json.detect_encoding(body) != "utf-8":
        return json.dumps(payload).encode()
    return body[: start + 1] + b'"stream_options":{"include_usage":true},' + body[start + 1 :]


def _to_engine(name: bytes) -> bool:
    """Whether a client header goes on to the engine: no hop-by-hop header and no credential
    of any kind (`auth.credentials`, the same rule as the aiohttp path)."""
    kept = _KEPT_NAMES.get(name)
    if kept is None:
        kept = name.lower() not in _HOP_TO_ENGINE and not is_credential_header(
            name.decode("latin-1")
        )
        if len(_KEPT_NAMES) < 1024:  # names are the client's: never an unbounded cache
            _KEPT_NAMES[name] = kept
    return kept


async def start_server(
    lane: LaneCore, host: str, port: int, backlog: int = 2048, reuse_port: bool = False
) -> asyncio.AbstractServer:
    """Listen for the lane. With `reuse_port`, proxy workers listen on the same port and the
    kernel spreads new connections across the processes (SO_REUSEPORT)."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lane.protocol,
        host,
        port,
        backlog=backlog,
        reuse_address=True,
        reuse_port=reuse_port or None,
    )
