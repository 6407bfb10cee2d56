"""Back-pressure under load: C concurrent clients against a waiting bound of B.

    .venv/bin/python -m bench.load [--clients 500] [--bound 100] [--ready-delay 6]

All clients ask a cold model at once; B of them wait for its start and are served, the rest
get 503 + Retry-After at once. Prints the figures as JSON (quoted in docs/security-reliability.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from tests.conftest import fake_model, start_gateway
from tests.reliability.chaos import rss_kib


async def storm(url: str, clients: int) -> list[tuple[int, float, bool]]:
    body = {"model": "chat", "messages": [{"role": "user", "content": "hello"}]}
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        began = time.monotonic()

        async def one() -> tuple[int, float, bool]:
            async with session.post(url + "/v1/chat/completions", json=body) as response:
                await response.read()
                return response.status, time.monotonic() - began, "Retry-After" in response.headers

        return await asyncio.gather(*(one() for _ in range(clients)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--bound", type=int, default=100)
    parser.add_argument("--ready-delay", type=float, default=6.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="modelyard-load-") as directory:
        gateway = start_gateway(
            Path(directory),
            {"chat": fake_model("chat", "--ready-delay", str(args.ready_delay))},
            limits={"max_queue": args.bound, "max_queue_per_model": args.bound},
        )
        try:
            rss_before = rss_kib(gateway.process.pid)
            results = asyncio.run(storm(gateway.url, args.clients))
            rss_after = rss_kib(gateway.process.pid)
        finally:
            gateway.stop()
    served = [elapsed for status, elapsed, _ in results if status == 200]
    refused = [elapsed for status, elapsed, _ in results if status == 503]
    report: dict[str, Any] = {
        "clients": args.clients,
        "queue_bound": args.bound,
        "served": len(served),
        "refused_503": len(refused),
        "refused_with_retry_after": sum(1 for s, _, r in results if s == 503 and r),
        "other": len(results) - len(served) - len(refused),
        "refusal_latency_s": {
            "median": round(statistics.median(refused), 3) if refused else None,
            "max": round(max(refused), 3) if refused else None,
        },
        "served_after_s": {"min": round(min(served), 2), "max": round(max(served), 2)}
        if served
        else None,
        "rss_before_mib": round(rss_before / 1024, 1),
        "rss_after_mib": round(rss_after / 1024, 1),
    }
    print(json.dumps(report, indent=2))
    return 0 if report["other"] == 0 and len(served) == args.bound else 1


if __name__ == "__main__":
    sys.exit(main())
