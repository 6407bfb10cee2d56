"""A lean HTTP/1.1 client for the fast path: pooled keep-alive connections to engines, httptools
(llhttp, as in uvicorn) to parse answers, and answer bodies handed on as they arrive.

Why not aiohttp's client here: per request it builds a request object, a response object,
header multidicts, a timer context and several tasks; at tens of thousands of requests a second
that is most of the gateway's CPU. This client does one write per request and no allocation per
streamed chunk beyond the chunk itself. It speaks only what engines answer (HTTP/1.1 with a
length or chunked, or ended by close); anything odd is an `UpstreamError`, never a guess.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol, cast

import httptools

from modelyard.proxy.forward import KEEPALIVE_S, UpstreamError, UpstreamTimeout


class AnswerListener(Protocol):
    """Told of an answer's parts as they are parsed, inside the connection's read callback:
    a stream is relayed without a task switch, so its head and first event go out while a
    burst of other requests still waits in the event loop's queue."""

    def on_head(self, exchange: Exchange) -> bool:
        """The status and headers are in; True to take the body as it comes."""

    def on_piece(self, piece: bytes) -> None: ...

    def on_read_end(self) -> None:
        """One read from the engine is parsed (a place to write what was gathered)."""

    def on_end(self) -> None:
        """The whole answer has come (before `done` resolves)."""


class Exchange:
    """One request and its answer on one connection."""

    def __init__(self, connection: UpstreamConnection, listener: AnswerListener | None) -> None:
        loop = connection.loop
        self.connection = connection
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_seen = False  # the engine's status line and headers have come
        self.done: asyncio.Future[None] = loop.create_future()
        self.first_byte_at: float | None = None
        self.listener = listener
        self.streaming = False  # the listener takes the body
        self._pieces: list[bytes] = []  # the body, when no listener takes it

    def head(self) -> None:
        self.head_seen = True
        if self.listener is not None:
            self.streaming = self.listener.on_head(self)

    def body(self, piece: bytes) -> None:
        if self.streaming:
            assert self.listener is not None
            self.listener.on_piece(piece)
        else:
            self._pieces.append(piece)

    def take_buffered(self) -> bytes:
        """The whole body once `done` (an answer no listener took as it came)."""
        data = b"".join(self._pieces)
        self._pieces = []
        return data

    def fail(self, error: UpstreamError) -> None:
        if not self.done.done():
            self.done.set_exception(error)
            self.done.exception()  # marked retrieved: the awaiting side may be gone


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to an engine, one exchange at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout: float) -> None:
        self.loop = loop
        self.read_timeout = read_timeout
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser: httptools.HttpResponseParser | None = None
        self._last_data = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._length_known = False
        self._keep_alive = False

    # -- asyncio.Protocol --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._last_data = self.loop.time()
        if self._parser is None or self.exchange is None:
            self.close()  # bytes nobody asked for: the connection cannot be trusted
            return
        exchange = self.exchange
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._broken(UpstreamError(f"engine sent a malformed answer: {error}"))
            return
        if exchange.streaming:
            assert exchange.listener is not None
            exchange.listener.on_read_end()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_timer()
        try:
            self._end_exchange_at_close(exc)
        finally:
            # The parser's callbacks and the transport point back at this object: without
            # them it goes by reference counting, not at the next full collection (a burst
            # of streams leaves a thousand such cycles when its connections are closed).
            self._parser = None
            self.transport = None

    def _end_exchange_at_close(self, exc: Exception | None) -> None:
        exchange = self.exchange
        if exchange is None or exchange.done.done():
            return
        if exchange.head_seen and not self._length_known:
            self._complete()  # an answer with neither length nor chunks ends at close
            return
        detail = f": {exc}" if exc else ""
        exchange.fail(
            UpstreamError(f"ServerDisconnectedError: engine closed the connection{detail}")
        )

    def pause_writing(self) -> None:  # request bodies are bounded and written at once
        pass

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks --
    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.exchange is not None
        self.exchange.headers.append((name, value))
        lowered = name.lower()
        if lowered == b"content-length" or (
            lowered == b"transfer-encoding" and b"chunked" in value.lower()
        ):
            self._length_known = True

    def on_headers_complete(self) -> None:
        assert self.exchange is not None
        assert self._parser is not None
        self.exchange.status = self._parser.get_status_code()
        self.exchange.first_byte_at = time.perf_counter()
        self.exchange.head()

    def on_body(self, body: bytes) -> None:
        assert self.exchange is not None
        self.exchange.body(body)

    def on_message_complete(self) -> None:
        assert self._parser is not None
        self._keep_alive = self._parser.should_keep_alive()  # llhttp forgets it afterwards
        self._complete()

    # -- use --
    def send(self, request: bytes, listener: AnswerListener | None = None) -> Exchange:
        assert self.transport is not None
        self.exchange = Exchange(self, listener)
        self._parser = httptools.HttpResponseParser(self)
        self._length_known = False
        self._keep_alive = False
        self._last_data = self.loop.time()
        self._timer = self.loop.call_later(self.read_timeout, self._check_timeout)
        self.transport.write(request)
        return self.exchange

    def reusable(self) -> bool:
        return (
            not self.closed
            and self.exchange is not None
            and self.exchange.done.done()
            and not self.exchange.done.exception()
            and self._keep_alive
        )

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()
            self._last_data = self.loop.time()  # waiting on our client is not the engine's

    def close(self) -> None:
        self.closed = True
        self._stop_timer()
        if self.transport is not None:
            self.transport.close()

    def _complete(self) -> None:
        self._stop_timer()
        exchange = self.exchange
        if exchange is not None and not exchange.done.done():
            exchange.head_seen = True
            if exchange.streaming:
                assert exchange.listener is not None
                exchange.listener.on_end()
            exchange.done.set_result(None)

    def _broken(self, error: UpstreamError) -> None:
        if self.exchange is not None:
            self.exchange.fail(error)
        self.close()

    def _check_timeout(self) -> None:
        # One timer per read-timeout period rather than one per chunk: cheap on long streams.
        self._timer = None
        if self.exchange is None or self.exchange.done.done() or self.closed:
            return
        if self.transport is not None and not self.transport.is_reading():
            self._last_data = self.loop.time()  # paused for a slow client, not a silent engine
        idle = self.loop.time() - self._last_data
        if idle >= self.read_timeout:
            self._broken(
                UpstreamTimeout(
                    f"engine sent nothing for {self.read_timeout:g}s (limits.upstream_read_timeout)"
                )
            )
        else:
            self._timer = self.loop.call_later(self.read_timeout - idle, self._check_timeout)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


# How often idle connections are looked over, and how many are closed per turn of the event
# loop: a burst's worth of connections that expire together must not stall the loop in one go.
PRUNE_EVERY_S = 1.0
PRUNE_BATCH = 64


class LeanPool:
    """Keep-alive connections per engine address, reused last-in first-out.

    Expired connections are closed by a timer of the pool's own, a few per loop turn, never by
    the request that finds them: after a quiet spell, the first request of a burst would
    otherwise close every connection the last burst left (a thousand closes inline, each a
    system call and a FIN for the engine to answer) before its own could start.
    """

    def __init__(
        self, connect_timeout: float, read_timeout: float, keepalive_s: float = KEEPALIVE_S
    ) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._keepalive_s = keepalive_s
        # Per address, oldest first: `release` appends, `acquire` takes the newest.
        self._idle: dict[tuple[str, int], list[UpstreamConnection]] = {}
        self._closing = False
        self._running_loop: asyncio.AbstractEventLoop | None = None
        self._pruning: asyncio.Handle | None = None

    def _loop(self) -> asyncio.AbstractEventLoop:
        # Looked up once: on Python 3.11 each `asyncio.get_running_loop()` costs a getpid().
        if self._running_loop is None:
            self._running_loop = asyncio.get_running_loop()
        return self._running_loop

    def set_timeouts(self, connect_timeout: float, read_timeout: float) -> None:
        """A reload's limits: for the next connection made or taken from the pool."""
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout

    def idle_count(self) -> int:
        return sum(len(connections) for connections in self._idle.values())

    async def acquire(self, host: str, port: int) -> UpstreamConnection:
        loop = self._loop()
        idle = self._idle.get((host, port))
        if idle:
            now = loop.time()
            while idle:
                connection = idle[-1]
                if connection.closed:  # the engine closed it: nothing left to do
                    idle.pop()
                    continue
                # Below the engine's own keep-alive: never reuse one it may be closing right
                # now. The newest has expired, so have all older ones: the pruner closes them.
                if now - connection.idle_since >= self._keepalive_s:
                    break
                idle.pop()
                connection.read_timeout = self._read_timeout  # as a reload may have set it
                return connection
        try:
            # asyncio.timeout, not wait_for: no extra task per connection made.
            async with asyncio.timeout(self._connect_timeout):
                _transport, connection = await loop.create_connection(
                    lambda: UpstreamConnection(loop, self._read_timeout), host, port
                )
        except TimeoutError:
            raise UpstreamTimeout(
                f"engine did not accept a connection within {self._connect_timeout:g}s "
                "(limits.upstream_connect_timeout)"
            ) from None
        except OSError as error:
            raise UpstreamError(
                f"engine unreachable: ClientConnectorError: cannot connect to {host}:{port} "
                f"[{error.strerror or error}]"
            ) from None
        return connection

    def release(self, host: str, port: int, connection: UpstreamConnection) -> None:
        if self._closing or not connection.reusable():
            connection.close()
            return
        loop = self._loop()
        connection.exchange = None
        connection.idle_since = loop.time()
        self._idle.setdefault((host, port), []).append(connection)
        if self._pruning is None:
            self._pruning = loop.call_later(PRUNE_EVERY_S, self._prune)

    def _prune(self) -> None:
        """Drop what engines closed and close what has expired, at most PRUNE_BATCH of those
        per loop turn; look again while anything is idle."""
        self._pruning = None
        if self._closing:
            return
        now = self._loop().time()
        budget = PRUNE_BATCH
        for address, connections in list(self._idle.items()):
            kept = []
            for connection in connections:
                if connection.closed:
                    continue
                if budget and now - connection.idle_since >= self._keepalive_s:
                    connection.close()
                    budget -= 1
                    continue
                kept.append(connection)
            if kept:
                self._idle[address] = kept
            else:
                del self._idle[address]
        if budget == 0:  # more may have expired: the next batch after other work has run
            self._pruning = self._loop().call_soon(self._prune)
        elif self._idle:
            self._pruning = self._loop().call_later(PRUNE_EVERY_S, self._prune)

    def close(self) -> None:
        self._closing = True
        if self._pruning is not None:
            self._pruning.cancel()
            self._pruning = None
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()
