"""The same small relay on each candidate HTTP server, for bench/proxy.py's `--front-doors`:
how much of a proxy's cost is its HTTP server (issue 21 chose modelyard's by these numbers).

Each relay does what the gateway's hot path does, and nothing else: read the POST body,
parse it as JSON for `model`, forward it to that model's upstream with aiohttp's client (the
client modelyard keeps), and answer with the upstream's answer, streamed as it comes when it
is an event stream. No keys, no accounting, no alias rewriting.

    RELAY_UPSTREAMS='{"fast": "http://127.0.0.1:8001"}' python bench/front_door_relay.py \
        aiohttp --port 9000
    ... python -m uvicorn front_door_relay:asgi --app-dir bench --http httptools --loop uvloop
    ... granian --interface rsgi --working-dir bench front_door_relay:rsgi

Self-contained (no modelyard import): it runs in the venv that has the candidate servers
(~/.cache/modelyard-bench/front-doors, made by bench/contenders.py).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

UPSTREAMS: dict[str, str] = json.loads(os.environ.get("RELAY_UPSTREAMS", "{}"))
FORWARDED = {"Content-Type": "application/json"}
_session: aiohttp.ClientSession | None = None


def session() -> aiohttp.ClientSession:
    """One pooled client per process, made in the server's own event loop on first use."""
    global _session
    if _session is None:
        _session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0),
            auto_decompress=False,
        )
    return _session


class Upstream:
    """One forwarded request: its status, content type, and its body whole or in pieces."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.status = response.status
        self.content_type = response.headers.get("Content-Type", "application/json")
        self.streamed = self.content_type.startswith("text/event-stream")

    async def pieces(self) -> AsyncIterator[bytes]:
        async for piece in self.response.content.iter_any():
            yield piece


async def forward(path: str, body: bytes) -> Upstream:
    model = json.loads(body)["model"]
    response = await session().post(UPSTREAMS[model] + path, data=body, headers=FORWARDED)
    return Upstream(response)


# -- aiohttp's server alone -------------------------------------------------------------


def aiohttp_app() -> Any:
    from aiohttp import web

    async def relay(request: web.Request) -> web.StreamResponse:
        upstream = await forward(request.path, await request.read())
        try:
            if not upstream.streamed:
                return web.Response(
                    body=await upstream.response.read(),
                    status=upstream.status,
                    content_type=upstream.content_type.split(";")[0],
                )
            answer = web.StreamResponse(
                status=upstream.status, headers={"Content-Type": upstream.content_type}
            )
            await answer.prepare(request)
            async for piece in upstream.pieces():
                await answer.write(piece)
            await answer.write_eof()
            return answer
        finally:
            upstream.response.release()

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/{tail:.*}", relay)
    return app


# -- ASGI (uvicorn) ------------------------------------------------------------------------


async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["path"] == "/health":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    upstream = await forward(scope["path"], body)
    headers = [(b"content-type", upstream.content_type.encode())]
    try:
        if not upstream.streamed:
            data = await upstream.response.read()
            headers.append((b"content-length", str(len(data)).encode()))
            await send(
                {"type": "http.response.start", "status": upstream.status, "headers": headers}
            )
            await send({"type": "http.response.body", "body": data})
            return
        await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
        async for piece in upstream.pieces():
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        upstream.response.release()


# -- RSGI (granian's own interface, its fastest) -----------------------------------------------


class RSGIRelay:
    async def __rsgi__(self, scope: Any, protocol: Any) -> None:
        if scope.path == "/health":
            protocol.response_str(200, [], "ok")
            return
        upstream = await forward(scope.path, await protocol())
        headers = [("content-type", upstream.content_type)]
        try:
            if not upstream.streamed:
                protocol.response_bytes(upstream.status, headers, await upstream.response.read())
                return
            transport = protocol.response_stream(upstream.status, headers)
            async for piece in upstream.pieces():
                await transport.send_bytes(piece)
        finally:
            upstream.response.release()

    def __rsgi_init__(self, loop: Any) -> None:
        pass

    def __rsgi_del__(self, loop: Any) -> None:
        pass


rsgi = RSGIRelay()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("server", choices=["aiohttp"])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    import asyncio

    import uvloop
    from aiohttp import web

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(aiohttp_app(), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
