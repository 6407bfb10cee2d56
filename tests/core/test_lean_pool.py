"""The fast lane's pool of engine connections (proxy/lean_client.LeanPool), against a real
local server that counts the connections it has open.

A thousand streams that end together leave a thousand idle connections. Engines close theirs
after a few seconds (uvicorn, under vLLM, after 5 s), so the pool must not reuse one past its
keep-alive, and must close them itself, a few per loop turn, rather than leave the next
burst's first request to close them all inline before it can start.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator

import pytest

from modelyard.proxy import lean_client
from modelyard.proxy.lean_client import PRUNE_BATCH, LeanPool, UpstreamConnection
from tests.core.test_proxy_workers import until

ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


class CountingServer:
    """An engine that answers every request with `{}` and keeps its connections open."""

    def __init__(self) -> None:
        self.open: set[asyncio.Transport] = set()
        self.accepted = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        server = self

        class Engine(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport
                server.open.add(transport)  # type: ignore[arg-type]
                server.accepted += 1

            def data_received(self, data: bytes) -> None:
                if data.endswith(b"\r\n\r\n"):
                    self.transport.write(ANSWER)  # type: ignore[attr-defined]

            def connection_lost(self, exc: Exception | None) -> None:
                server.open.discard(self.transport)  # type: ignore[arg-type]

        self._server = await asyncio.get_running_loop().create_server(
            Engine, "127.0.0.1", 0, backlog=1024
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for transport in list(self.open):
            transport.close()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


@pytest.fixture
async def engine() -> AsyncIterator[CountingServer]:
    server = CountingServer()
    await server.start()
    yield server
    await server.stop()


async def exchange(pool: LeanPool, port: int) -> UpstreamConnection:
    """One request over a connection from the pool, which goes back to it."""
    connection = await pool.acquire("127.0.0.1", port)
    sent = connection.send(b"GET / HTTP/1.1\r\nHost: e\r\n\r\n")
    await sent.done
    pool.release("127.0.0.1", port, connection)
    return connection


async def test_a_connection_is_reused_within_its_keep_alive(engine: CountingServer) -> None:
    pool = LeanPool(connect_timeout=5, read_timeout=5, keepalive_s=30)
    first = await exchange(pool, engine.port)
    again = await exchange(pool, engine.port)
    assert again is first
    assert engine.accepted == 1
    pool.close()


async def test_expired_connections_are_closed_by_the_pool_not_left_open(
    engine: CountingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lean_client, "PRUNE_EVERY_S", 0.05)
    pool = LeanPool(connect_timeout=5, read_timeout=5, keepalive_s=0.2)
    connections = [await pool.acquire("127.0.0.1", engine.port) for _ in range(3)]
    for connection in connections:
        await connection.send(b"GET / HTTP/1.1\r\nHost: e\r\n\r\n").done
        pool.release("127.0.0.1", engine.port, connection)
    assert len(engine.open) == 3
    assert pool.idle_count() == 3
    # No request comes: the pool's own timer closes them once their keep-alive is over.
    await until(lambda: not engine.open)
    assert pool.idle_count() == 0
    pool.close()


async def test_a_burst_after_a_quiet_spell_does_not_close_the_last_bursts_connections_inline(
    engine: CountingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The hostile case for the event loop: 300 connections expire together. The request that
    # finds them gets a new connection at once, and the closing happens PRUNE_BATCH at a time
    # per loop turn, with other work running in between.
    monkeypatch.setattr(lean_client, "PRUNE_EVERY_S", 3600.0)  # the test drives the pruner
    pool = LeanPool(connect_timeout=5, read_timeout=5, keepalive_s=0.05)
    burst = [await pool.acquire("127.0.0.1", engine.port) for _ in range(300)]
    await asyncio.gather(*(c.send(b"GET / HTTP/1.1\r\nHost: e\r\n\r\n").done for c in burst))
    for connection in burst:
        pool.release("127.0.0.1", engine.port, connection)
    await asyncio.sleep(0.1)  # all 300 have expired

    fresh = await pool.acquire("127.0.0.1", engine.port)
    assert fresh not in burst
    assert not any(connection.closed for connection in burst)  # none closed by the request

    pool._prune()
    assert sum(connection.closed for connection in burst) == PRUNE_BATCH
    turns = 0
    while not all(connection.closed for connection in burst):
        await asyncio.sleep(0)  # the pruner goes on in the following turns, by itself
        turns += 1
        assert turns < 50
    assert turns >= (300 - PRUNE_BATCH) // PRUNE_BATCH
    assert pool.idle_count() == 0
    fresh.close()
    pool.close()


async def test_a_connection_the_engine_closed_is_never_handed_out(
    engine: CountingServer,
) -> None:
    pool = LeanPool(connect_timeout=5, read_timeout=5, keepalive_s=30)
    first = await exchange(pool, engine.port)
    for transport in list(engine.open):
        transport.close()  # as uvicorn does after its keep-alive
    await until(lambda: first.closed)
    second = await exchange(pool, engine.port)
    assert second is not first
    assert engine.accepted == 2
    pool.close()


async def test_closing_the_pool_closes_its_idle_connections_and_stops_its_timer(
    engine: CountingServer,
) -> None:
    pool = LeanPool(connect_timeout=5, read_timeout=5, keepalive_s=30)
    await exchange(pool, engine.port)
    pool.close()
    await until(lambda: not engine.open)
    assert pool._pruning is None


async def test_a_closed_connection_is_freed_without_the_cycle_collector(
    engine: CountingServer,
) -> None:
    # A thousand streams' connections closed at once must not wait, in a full collection of
    # the gateway's heap, for a collection that happens to run in the next burst.
    pool = LeanPool(connect_timeout=5, read_timeout=5, keepalive_s=30)
    connection = await exchange(pool, engine.port)
    pool.close()
    await until(lambda: not engine.open)
    await asyncio.sleep(0.05)  # our side's connection_lost
    assert connection.closed
    freed = weakref.ref(connection)
    gc.disable()
    try:
        del connection
        await asyncio.sleep(0)
        assert freed() is None
    finally:
        gc.enable()
