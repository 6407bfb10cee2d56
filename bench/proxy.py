"""Proxy overhead, side by side in one run: straight to a fast upstream vs through the gateway.

    python -m bench.proxy [--duration 8]

Needs `wrk` and `nginx` (Debian: apt-get install wrk nginx-light). The gateway starts both
upstreams itself, as `command` engines, exactly as it would start a real engine. Prints a
table: requests/s and latency p50/p99 at concurrency 1 and 64 (non-streaming), and for 200
concurrent streams of 20 chunks/s the delay each chunk picked up (p50/p99) and broken streams.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_gateway(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = {
        "listen": f"127.0.0.1:{port}",
        "state_dir": str(workdir / "state"),
        "limits": {"max_queue": 10_000, "max_queue_per_model": 10_000},
        "models": {
            "fast": {
                "engine": "command",
                "idle_timeout": 0,
                "command": [str(ROOT / "bench" / "upstream_nginx.sh"), "{port}"],
            },
            "stream": {
                "engine": "command",
                "idle_timeout": 0,
                "command": [sys.executable, "-m", "bench.stream_upstream", "--port", "{port}"],
            },
        },
    }
    path = workdir / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (workdir / "gateway.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "modelyard", "serve", "-c", str(path), "--log-level", "WARNING"],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=1).read()
            return process, url
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("gateway did not start; see " + str(workdir / "gateway.log"))


def engine_url(gateway_url: str, model: str) -> str:
    """Start the model through the gateway, then read the engine's own address from status."""
    body = json.dumps({"model": model, **CHAT}).encode()
    request = urllib.request.Request(
        gateway_url + "/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(request, timeout=60).read()
    with urllib.request.urlopen(gateway_url + "/gateway/status", timeout=10) as response:
        status = json.loads(response.read())
    for entry in status["models"]:
        if entry["name"] == model:
            return f"http://127.0.0.1:{entry['port']}"
    raise SystemExit(f"no port for {model}")


def wrk(url: str, connections: int, duration: float, workdir: Path) -> dict[str, float]:
    script = workdir / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = '{json.dumps({'model': 'fast', **CHAT})}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    output = subprocess.run(
        [
            "wrk",
            "-t",
            "1",
            "-c",
            str(connections),
            "-d",
            f"{int(duration)}s",
            "--latency",
            "-s",
            str(script),
            url + "/v1/chat/completions",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return {
        "rps": rps,
        "p50_ms": _latency(output, "50%"),
        "p99_ms": _latency(output, "99%"),
        "non2xx": float(errors.group(1)) if errors else 0.0,
    }


def _latency(output: str, label: str) -> float:
    match = re.search(rf"^\s*{re.escape(label)}\s+([\d.]+)(us|ms|s)", output, re.MULTILINE)
    assert match, output
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


async def streams(url: str, count: int, chunks: int, rate: float) -> dict[str, float]:
    """`count` concurrent streams of `chunks` chunks at `rate` per second.

    Per chunk, the delay is its receive time minus the upstream's send time. The inter-chunk
    delay is how much later a chunk arrived after the one before it than it was sent after
    it: the jitter the path added to the stream, which a reader sees as stutter.
    """
    delays: list[float] = []
    gaps: list[float] = []
    broken = 0

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal broken
        body = {
            "model": "stream",
            **CHAT,
            "stream": True,
            "bench_chunks": chunks,
            "bench_rate": rate,
        }
        previous: float | None = None
        seen = 0
        try:
            async with session.post(url + "/v1/chat/completions", json=body) as response:
                async for line in response.content:
                    if line.startswith(b'data: {"sent":'):
                        sent = float(line[14 : line.index(b",", 14)])
                        delay = (time.time() - sent) * 1000
                        delays.append(delay)
                        if previous is not None:
                            gaps.append(delay - previous)
                        previous = delay
                        seen += 1
                    elif line.startswith(b"data: [DONE]"):
                        break
        except aiohttp.ClientError:
            pass
        if seen != chunks:
            broken += 1

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(one(session) for _ in range(count)))
    delays.sort()
    gaps.sort()
    return {
        "p50_ms": _percentile(delays, 0.5),
        "p99_ms": _percentile(delays, 0.99),
        "gap_p50_ms": _percentile(gaps, 0.5),
        "gap_p99_ms": _percentile(gaps, 0.99),
        "broken": float(broken),
        "chunks": float(len(delays)),
    }


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run")
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument(
        "--stream-seconds",
        type=float,
        default=10.0,
        help="how long each stream lasts, at 20 chunks/s",
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install wrk nginx-light")
    workdir = Path(tempfile.mkdtemp(prefix="modelyard-bench-"))
    gateway, url = start_gateway(workdir)
    results: dict[str, Any] = {}
    try:
        direct = engine_url(url, "fast")
        for connections in (1, 64):
            results[f"direct_c{connections}"] = wrk(direct, connections, args.duration, workdir)
            results[f"gateway_c{connections}"] = wrk(url, connections, args.duration, workdir)
        stream_direct = engine_url(url, "stream")
        chunks = int(args.stream_seconds * 20)
        results["stream_direct"] = asyncio.run(streams(stream_direct, args.streams, chunks, 20))
        results["stream_gateway"] = asyncio.run(streams(url, args.streams, chunks, 20))
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(timeout=30)
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    shutil.rmtree(workdir, ignore_errors=True)


def print_table(results: dict[str, Any]) -> None:
    print(f"{'load':<28}{'direct':>12}{'gateway':>12}{'added':>12}")
    for connections in (1, 64):
        d, g = results[f"direct_c{connections}"], results[f"gateway_c{connections}"]
        print(f"{f'c={connections} requests/s':<28}{d['rps']:>12.0f}{g['rps']:>12.0f}{'':>12}")
        for key in ("p50_ms", "p99_ms"):
            label = f"c={connections} latency {key[:3]} (ms)"
            print(f"{label:<28}{d[key]:>12.2f}{g[key]:>12.2f}{g[key] - d[key]:>12.2f}")
        if g["non2xx"]:
            print(f"  gateway non-2xx answers at c={connections}: {g['non2xx']:.0f}")
    d, g = results["stream_direct"], results["stream_gateway"]
    for key, label in (
        ("gap_p50_ms", "inter-chunk delay p50"),
        ("gap_p99_ms", "inter-chunk delay p99"),
        ("p50_ms", "chunk delay p50"),
        ("p99_ms", "chunk delay p99"),
    ):
        label = f"streams {label} (ms)"
        print(f"{label:<34}{d[key]:>10.2f}{g[key]:>12.2f}{g[key] - d[key]:>12.2f}")
    print(f"{'streams broken':<34}{d['broken']:>10.0f}{g['broken']:>12.0f}")


if __name__ == "__main__":
    main()
