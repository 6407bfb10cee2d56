"""Why the proxy's upstream client is aiohttp: the same load through aiohttp and httpx.

    python -m bench.clients [--requests 20000] [--concurrency 64]

Starts the benchmark's nginx upstream (bench/upstream_nginx.sh) and sends the same POSTs with
each client from one asyncio loop (uvloop), alternating rounds so machine noise hits both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import time

import aiohttp
import httpx

from bench.proxy import CHAT, ROOT, free_port

BODY = json.dumps({"model": "fast", **CHAT}).encode()


async def with_aiohttp(url: str, total: int, concurrency: int) -> float:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def worker(count: int) -> None:
            for _ in range(count):
                async with session.post(
                    url, data=BODY, headers={"Content-Type": "application/json"}
                ) as r:
                    await r.read()

        began = time.perf_counter()
        await asyncio.gather(*(worker(total // concurrency) for _ in range(concurrency)))
        return total / (time.perf_counter() - began)


async def with_httpx(url: str, total: int, concurrency: int) -> float:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits) as client:

        async def worker(count: int) -> None:
            for _ in range(count):
                response = await client.post(
                    url, content=BODY, headers={"Content-Type": "application/json"}
                )
                response.read()

        began = time.perf_counter()
        await asyncio.gather(*(worker(total // concurrency) for _ in range(concurrency)))
        return total / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("nginx") is None:
        raise SystemExit("nginx is missing: apt-get install nginx-light")
    port = free_port()
    nginx = subprocess.Popen([str(ROOT / "bench" / "upstream_nginx.sh"), str(port)])
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        time.sleep(0.5)
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        results: dict[str, list[float]] = {"aiohttp": [], "httpx": []}
        for _ in range(args.rounds):
            results["aiohttp"].append(
                asyncio.run(with_aiohttp(url, args.requests, args.concurrency))
            )
            results["httpx"].append(asyncio.run(with_httpx(url, args.requests, args.concurrency)))
    finally:
        nginx.terminate()
        nginx.wait()
    best = {name: max(values) for name, values in results.items()}
    print(f"{'client':<10}{'requests/s (best of ' + str(args.rounds) + ')':>28}")
    for name, value in best.items():
        print(f"{name:<10}{value:>28.0f}")
    print(f"aiohttp / httpx: {best['aiohttp'] / best['httpx']:.1f}x")


if __name__ == "__main__":
    main()
