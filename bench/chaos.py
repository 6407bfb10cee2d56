"""Chaos run against a real gateway with test engines; prints the figures as JSON.

    .venv/bin/python -m bench.chaos [--requests 1000] [--models 3] [--seed N]

Starts `modelyard serve` with N test-engine models, sends the requests while killing engines
at random moments, then checks that every engine serves again and no process is left. The
same harness runs in tests/reliability/test_chaos.py; docs/security-reliability.md quotes it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from tests.conftest import fake_model, start_gateway
from tests.reliability.chaos import run_chaos


async def serving_again(url: str, models: list[str], timeout: float = 60.0) -> float:
    """Seconds until every model answered 200 once more."""
    began = time.monotonic()
    async with aiohttp.ClientSession() as session:
        for model in models:
            while True:
                body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
                async with session.post(url + "/v1/chat/completions", json=body) as response:
                    if response.status == 200:
                        break
                if time.monotonic() - began > timeout:
                    raise SystemExit(f"{model} did not serve again within {timeout:.0f}s")
                await asyncio.sleep(0.2)
    return time.monotonic() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--backoff-max", default="2s", help="defaults.crash_backoff_max")
    parser.add_argument(
        "--kill-every",
        nargs=2,
        type=float,
        default=(0.2, 0.6),
        metavar=("MIN", "MAX"),
        help="seconds between two kills, drawn uniformly",
    )
    args = parser.parse_args()
    names = [f"model-{index}" for index in range(args.models)]
    with tempfile.TemporaryDirectory(prefix="modelyard-chaos-") as directory:
        gateway = start_gateway(
            Path(directory),
            {name: fake_model(name) for name in names},
            defaults={"crash_backoff_max": args.backoff_max},
            limits={"upstream_read_timeout": "20s", "health_check_interval": "1s"},
        )
        try:
            figures = asyncio.run(
                run_chaos(
                    gateway.url,
                    names,
                    gateway.process.pid,
                    requests=args.requests,
                    concurrency=args.concurrency,
                    kill_every=tuple(args.kill_every),
                    seed=args.seed,
                )
            )
            recovered = asyncio.run(serving_again(gateway.url, names))
            engines = len(gateway.engine_pids())
        finally:
            gateway.stop()
        leaked = gateway.engine_pids()
        for pid in leaked:
            os.kill(pid, signal.SIGKILL)
    report = {
        "seed": args.seed,
        **figures.to_json(),
        "all_serving_again_after_s": round(recovered, 1),
        "engines_at_end": engines,
        "processes_leaked": len(leaked),
    }
    print(json.dumps(report, indent=2))
    bad = report["requests_lost"] or report["gateway_5xx"] or leaked or engines != len(names)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
