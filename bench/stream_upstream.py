"""A streaming upstream for the proxy benchmark: SSE chunks at a fixed rate, each stamped
with the time it was sent, so a client can measure the delay the path added.

Run: python -m bench.stream_upstream --port P
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiohttp import web


async def health(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def models(_request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "stream", "object": "model"}]})


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    chunks = int(body.get("bench_chunks", 20))
    interval = 1.0 / float(body.get("bench_rate", 20))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    next_at = time.monotonic()
    model = json.dumps(body.get("model"))
    for index in range(chunks):
        # The send time comes first so the client can read it without parsing the JSON.
        event = (
            f'data: {{"sent":{time.time():.6f},"model":{model},"seq":{index},'
            '"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
        )
        await response.write(event.encode())
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
