"""A streaming upstream for the proxy benchmark: SSE chunks at a fixed rate, each stamped
with the time it was sent, so a client can measure the delay the path added.

Run: python -m bench.stream_upstream --port P

It is a bare asyncio protocol (httptools for the request, one timer per stream, chunked
transfer encoding as aiohttp's StreamResponse writes it) rather than an aiohttp app, so
that 1,000 streams of 20 events a second cost it a small part of one core: the benchmark
pins it beside the client on a core of its own, and the proxy's delay is what is left.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import cast

import httptools

_MODELS = json.dumps({"object": "list", "data": [{"id": "stream", "object": "model"}]}).encode()


def _plain(status: bytes, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\nContent-Type: "
        + content_type
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class StreamServer(asyncio.Protocol):
    """One client connection: requests one after another (keep-alive), one stream at a time."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body = bytearray()
        self.timer: asyncio.TimerHandle | None = None
        self.pending: list[tuple[bytes, bytes]] = []  # requests that came while streaming

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.write(_plain(b"400 Bad Request", b"{}"))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        self.pending.append((method + b" " + self.url, bytes(self.body)))
        self.url = b""
        self.body.clear()
        if self.timer is None:
            self._next_request()

    def _next_request(self) -> None:
        if not self.pending or self.transport is None:
            return
        line, body = self.pending.pop(0)
        if line.startswith(b"GET /health"):
            self.transport.write(_plain(b"200 OK", b"ok", b"text/plain"))
        elif line.startswith(b"GET /v1/models"):
            self.transport.write(_plain(b"200 OK", _MODELS))
        elif line.startswith(b"POST /v1/chat/completions"):
            self._start_stream(json.loads(body))
            return
        else:
            self.transport.write(_plain(b"404 Not Found", b"{}"))
        self._next_request()

    def _start_stream(self, body: dict) -> None:
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        self.chunks = int(body.get("bench_chunks", 20))
        self.interval = 1.0 / float(body.get("bench_rate", 20))
        self.model = json.dumps(body.get("model"))
        self.index = 0
        self.next_at = self.loop.time()
        self._tick()

    def _tick(self) -> None:
        self.timer = None
        if self.transport is None:
            return
        if self.index == self.chunks:
            self.transport.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            self._next_request()
            return
        # The send time comes first so the client can read it without parsing the JSON.
        event = (
            f'data: {{"sent":{time.time():.6f},"model":{self.model},"seq":{self.index},'
            '"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
        )
        self.transport.write(_chunk(event.encode()))
        self.index += 1
        self.next_at += self.interval
        self.timer = self.loop.call_at(self.next_at, self._tick)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(StreamServer, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
