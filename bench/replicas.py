"""Replicas through the gateway: throughput with one engine and with two, side by side, the
delay of a scale-up, and how often conversations keep their engine.

    python -m bench.replicas [--seconds 20] [--clients 16] [--serve 0.4] [--write]

Starts `modelyard serve` (process runtime) with two declared GPUs and two models that are
the same test engine (tests/fake_engine.py as `engine: vllm`, `--max-num-seqs 4`, each request
holding one of its 4 slots for `--serve` seconds, as a vLLM batch of 4 at a fixed token
rate): `one` with `replicas.max: 1`, `two` with `max: 2` and `target_in_flight: 4`. Then:

1. throughput: `--clients` clients back to back on `one`, then on `two`, `--seconds` each;
   the second half of each run is counted (the steady state, after `two`'s scale-up);
2. scale-up delay: from the first request of the saturating load on `two` (one engine
   ready and idle before) to its `scale_up` event, and to its second engine's `ready`;
3. affinity: 8 conversations of 10 turns each on `two` with both engines ready, first below
   the target (one turn at a time each), then saturating (16 at once); the share of turns
   that went to the engine their conversation went to before (the gateway's own count,
   `replicas.affinity_kept` / `affinity_moved` in status).

`--write` puts the table in docs/replicas.md. The test engines stand for vLLM's batch limit
only: on real GPUs the gain also depends on the two GPUs' own speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from tests import fake_gpu
from tests.conftest import FAKE_ENGINE, RunningGateway, start_gateway

ROOT = Path(__file__).resolve().parent.parent
GIB = 1024**3
BEGIN, END = "<!-- bench:replicas -->", "<!-- /bench:replicas -->"


def fake_vllm(gpu_dir: Path, **settings: Any) -> dict[str, Any]:
    return {
        "engine": "vllm",
        "model": "/models/coder",
        "executable": [sys.executable, FAKE_ENGINE],
        "args": ["--max-num-seqs", "4"],
        "env": {"FAKE_GPU_DIR": str(gpu_dir)},
        "memory": "10GiB",
        "idle_timeout": 600,
        **settings,
    }


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as response:
        return await response.json()


async def model_status(session: aiohttp.ClientSession, base: str, model: str) -> dict[str, Any]:
    data = await get_json(session, base + "/gateway/status")
    found: dict[str, Any] = next(m for m in data["models"] if m["name"] == model)
    return found


async def saturate(
    session: aiohttp.ClientSession,
    base: str,
    model: str,
    seconds: float,
    clients: int,
    serve: float,
) -> tuple[float, int]:
    """Requests per second in the second half of the run, and the non-200 answers."""
    began = time.monotonic()
    counted = 0
    errors = 0

    async def client(number: int) -> None:
        nonlocal counted, errors
        while time.monotonic() - began < seconds:
            body = {
                "model": model,
                "messages": [{"role": "user", "content": f"task {number}"}],
                "fake_delay": serve,
            }
            async with session.post(base + "/v1/chat/completions", json=body) as response:
                await response.read()
                errors += response.status != 200
            if seconds / 2 <= time.monotonic() - began <= seconds:  # in the window only
                counted += 1

    await asyncio.gather(*(client(n) for n in range(clients)))
    return counted / (seconds / 2), errors


async def conversations(
    session: aiohttp.ClientSession, base: str, at_once: int, turns: int, serve: float
) -> float:
    """The share of turns that kept their conversation's engine (status counts)."""
    before = (await model_status(session, base, "two"))["replicas"]
    system = {"role": "system", "content": "You review code carefully. " * 50}

    async def converse(number: int) -> None:
        messages = [system, {"role": "user", "content": f"review change {number} {at_once}"}]
        for turn in range(turns):
            body = {"model": "two", "messages": messages, "fake_delay": serve}
            async with session.post(base + "/v1/chat/completions", json=body) as response:
                await response.read()
            messages = [*messages, {"role": "assistant", "content": f"ok {turn}"},
                        {"role": "user", "content": f"next {turn}"}]  # fmt: skip

    await asyncio.gather(*(converse(n) for n in range(at_once)))
    after = (await model_status(session, base, "two"))["replicas"]
    kept = after["affinity_kept"] - before["affinity_kept"]
    moved = after["affinity_moved"] - before["affinity_moved"]
    return kept / max(kept + moved, 1)


async def events(session: aiohttp.ClientSession, base: str) -> list[dict[str, Any]]:
    data = await get_json(session, base + "/admin/events?recent=1000&follow=0")
    found: list[dict[str, Any]] = data["events"]
    return found


async def measure(base: str, args: argparse.Namespace) -> dict[str, float]:
    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        for model in ("one", "two"):  # each started and idle before its run
            body = {"model": model, "messages": [{"role": "user", "content": "warm"}]}
            async with session.post(base + "/v1/chat/completions", json=body) as response:
                await response.read()
        one, errors_one = await saturate(
            session, base, "one", args.seconds, args.clients, args.serve
        )
        load_began = time.time()
        two, errors_two = await saturate(
            session, base, "two", args.seconds, args.clients, args.serve
        )
        seen = await events(session, base)
        up = next(e for e in seen if e["kind"] == "scale_up" and e["model"] == "two")
        ready = next(
            e
            for e in seen
            if e["kind"] == "ready" and e["model"] == "two" and e["time"] > up["time"]
        )
        below = await conversations(session, base, 8, args.turns, args.serve)
        saturated = await conversations(session, base, 16, args.turns, args.serve)
    return {
        "one": one,
        "two": two,
        "errors": errors_one + errors_two,
        "scale_up_s": up["time"] - load_began,
        "replica_ready_s": ready["time"] - load_began,
        "affinity_below": below,
        "affinity_saturated": saturated,
    }


def table(result: dict[str, float], args: argparse.Namespace) -> str:
    rows = [
        ("throughput, `replicas.max: 1`", f"{result['one']:.1f} requests/s"),
        ("throughput, `replicas.max: 2`", f"{result['two']:.1f} requests/s"),
        ("gain", f"{result['two'] / result['one']:.2f}x"),
        ("errors (both runs)", f"{result['errors']:.0f}"),
        ("load begins -> `scale_up` decided", f"{result['scale_up_s']:.2f} s"),
        ("load begins -> second engine ready", f"{result['replica_ready_s']:.2f} s"),
        ("affinity kept, below the target", f"{result['affinity_below'] * 100:.0f} %"),
        (
            "affinity kept, saturated (16 conversations)",
            f"{result['affinity_saturated'] * 100:.0f} %",
        ),
    ]
    lines = ["| measure | value |", "| --- | --- |", *(f"| {a} | {b} |" for a, b in rows)]
    setup = (
        f"{args.clients} clients, {args.seconds:.0f} s per run, each request {args.serve} s in "
        f"one of 4 slots per engine; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}"
    )
    return "\n".join(lines) + f"\n\n{setup}."


def write_doc(text: str) -> None:
    path = ROOT / "docs" / "replicas.md"
    page = path.read_text()
    head, _, rest = page.partition(BEGIN)
    _, _, tail = rest.partition(END)
    path.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def stop(gateway: RunningGateway) -> None:
    if gateway.process.poll() is None:
        gateway.stop()
    for pid in gateway.engine_pids():
        os.kill(pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--serve", type=float, default=0.4)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--write", action="store_true", help="write the table in docs/replicas.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        directory = Path(folder)
        gpu_dir = directory / "fake-gpu"
        fake_gpu.create(gpu_dir, {0: 24 * GIB, 1: 24 * GIB})
        models = {
            "one": fake_vllm(gpu_dir),
            "two": fake_vllm(gpu_dir, replicas={"max": 2, "target_in_flight": 4}),
        }
        gpus = [{"index": 0, "memory": "24GiB"}, {"index": 1, "memory": "24GiB"}]
        gateway = start_gateway(directory, models, gpus=gpus)
        try:
            result = asyncio.run(measure(gateway.url, args))
        finally:
            stop(gateway)
        peak = max(fake_gpu.peak(gpu_dir).values())
    print(json.dumps(result, indent=2))
    print(f"peak claimed on one simulated GPU: {peak / GIB:.1f} GiB of 24")
    text = table(result, args)
    print(text)
    if args.write:
        write_doc(text)


if __name__ == "__main__":
    main()
