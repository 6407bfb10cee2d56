"""The slow-stream client of the proxy benchmark: `count` concurrent streams, all asked for
at once, and the time each of their events arrived.

    python -m bench.stream_client --url http://127.0.0.1:P --count 1000 --chunks 100 --rate 20

Prints one JSON object: intervals between the events of each stream (p50, p99, worst),
time from sending the request to the first event (p50, p99), and how many streams came
whole. It is a bare asyncio protocol that only looks for the events' first bytes (no HTTP
client, no JSON), so reading 20,000 events a second costs it little of the core it is
pinned to, and what it measures is the path, not itself.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from typing import cast
from urllib.parse import urlsplit

EVENT = b'data: {"sent":'
DONE = b"data: [DONE]"


class StreamWatcher(asyncio.Protocol):
    def __init__(self, request: bytes, finished: asyncio.Future[None]) -> None:
        self.loop = asyncio.get_running_loop()
        self.request = request
        self.finished = finished
        self.transport: asyncio.Transport | None = None
        self.tail = b""
        self.status_ok: bool | None = None
        self.sent_at = 0.0
        self.arrivals: list[float] = []
        self.complete = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.sent_at = time.monotonic()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()  # uvloop's loop.time() has millisecond steps
        if self.status_ok is None:
            self.status_ok = data.startswith(b"HTTP/1.1 200")
        data = self.tail + data
        self.arrivals.extend([now] * data.count(EVENT))
        if DONE in data:
            self.complete = True
            assert self.transport is not None
            self.transport.close()
        # Keep enough of the end to find a marker that a read split in two.
        self.tail = data[-(len(EVENT) - 1) :]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished.done():
            self.finished.set_result(None)


async def run(url: str, count: int, chunks: int, rate: float, headers: list[str]) -> dict:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    body = json.dumps(
        {
            "model": "stream",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "bench_chunks": chunks,
            "bench_rate": rate,
        }
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        + "".join(f"{line}\r\n" for line in headers)
        + "\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    watchers: list[StreamWatcher] = []
    waits = []
    for _ in range(count):
        finished: asyncio.Future[None] = loop.create_future()
        watcher = StreamWatcher(head + body, finished)
        watchers.append(watcher)
        waits.append(finished)

    async def open_one(watcher: StreamWatcher) -> None:
        try:
            await loop.create_connection(lambda: watcher, host, port)
        except OSError:
            watcher.finished.set_result(None)

    await asyncio.gather(*(open_one(watcher) for watcher in watchers))
    await asyncio.wait_for(asyncio.gather(*waits), timeout=chunks / rate * 10 + 60)
    intervals: list[float] = []
    firsts: list[float] = []
    done = 0
    for watcher in watchers:
        arrivals = watcher.arrivals
        if arrivals:
            firsts.append(arrivals[0] - watcher.sent_at)
            intervals.extend(b - a for a, b in itertools.pairwise(arrivals))
        if watcher.status_ok and watcher.complete and len(arrivals) == chunks:
            done += 1
    intervals.sort()
    firsts.sort()
    return {
        "done": done,
        "count": count,
        "gap_p50_ms": _percentile(intervals, 0.5) * 1000,
        "gap_p99_ms": _percentile(intervals, 0.99) * 1000,
        "gap_max_ms": (intervals[-1] if intervals else float("nan")) * 1000,
        "first_p50_ms": _percentile(firsts, 0.5) * 1000,
        "first_p99_ms": _percentile(firsts, 0.99) * 1000,
    }


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--chunks", type=int, default=100)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--header", action="append", default=[], help="'Name: value'")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(run(args.url, args.count, args.chunks, args.rate, args.header))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
