"""Cold starts and warm latency of the demo's real vLLM engines: through the gateway vs direct.

    python -m bench.cold_start [--warm 20] [--max-tokens 4] [--write]

For each demo model (`chat` = SmolLM2, `coder` = Gemma 3 270M), one engine at a time:

1. The engine alone, started with the very argv the gateway uses: its own time to ready (spawn
   to the first 200 from `/health`, polled every 5 ms) and the latency of its first request.
2. A cold request through the gateway (`modelyard serve -c examples/demo.yaml`, adjusted to a
   free port). Meanwhile this script polls the new engine's `/health` every 5 ms itself, so it
   knows when the engine became ready. The gateway's added time on the cold request is
   (request sent -> gateway starts the engine) + (engine ready -> response) - (the same first
   request sent straight to a fresh engine, from step 1). The gateway's own `ready` event
   shows how long it took to notice the engine was up.
3. Warm latency, N requests each, alternating: through the gateway vs straight to the engine.

`--write` puts the tables in docs/vllm-bench.md. Needs the demo's engine venv and models; waits
for the machine-wide engine lock that the vLLM tests also take.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from tests.vllm.support import (
    ProcessWatch,
    demo_document,
    engine_turn,
    start_demo_gateway,
    stop_gateway,
)

from modelyard.config import load_config
from modelyard.demo import DemoSetup, demo_config_path, prepare_demo
from modelyard.engines.vllm import VllmEngine
from modelyard.proctree import group_members
from modelyard.runtime.ports import kernel_free_port

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("chat", "coder")
POLL_S = 0.005
START_LIMIT_S = 600.0
PROMPT = [{"role": "user", "content": "Say hello."}]


@dataclass
class Direct:
    ready_s: float  # spawn -> first 200 from /health
    first_request_s: float


@dataclass
class Cold:
    total_s: float  # request sent -> response
    engine_ready_s: float  # the gateway's start of the engine -> first 200 from /health
    before_spawn_s: float  # request sent -> the gateway's `start` event
    noticed_s: float  # first 200 from /health -> the gateway's `ready` event
    after_ready_s: float  # first 200 from /health -> response
    engine_e2e_s: float | None  # the request's time inside the engine (vLLM's own metric)


def body(model: str, max_tokens: int) -> dict[str, Any]:
    return {"model": model, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0}


async def timed_post(
    session: aiohttp.ClientSession, url: str, payload: dict[str, Any]
) -> tuple[float, float]:
    """POST a chat completion; (seconds taken, wall time at the response's end)."""
    began = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=START_LIMIT_S)
    async with session.post(url + "/v1/chat/completions", json=payload, timeout=timeout) as reply:
        text = await reply.text()
        ended = time.time()
        if reply.status != 200:
            raise RuntimeError(f"{url}: {reply.status} {text[:500]}")
    return time.perf_counter() - began, ended


async def health_ok(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        timeout = aiohttp.ClientTimeout(total=1.0)
        async with session.get(url + "/health", timeout=timeout) as reply:
            return reply.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def poll_until_healthy(session: aiohttp.ClientSession, url: str, alive: Any) -> float:
    """Wall time of the first 200 from `url`/health; `alive()` False aborts."""
    deadline = time.monotonic() + START_LIMIT_S
    while time.monotonic() < deadline:
        if await health_ok(session, url):
            return time.time()
        if not alive():
            raise RuntimeError(f"{url}: the engine went away before it was ready")
        await asyncio.sleep(POLL_S)
    raise RuntimeError(f"{url}: not ready within {START_LIMIT_S:.0f} s")


async def start_direct(name: str, setup: DemoSetup, workdir: Path, max_tokens: int) -> Direct:
    """Start the engine alone, as the gateway would; time it to ready and its first answer."""
    config = load_config(demo_config_path(), {**os.environ, **setup.environ})
    port = kernel_free_port()
    spec = VllmEngine().launch_spec(name, config.models[name], config, port, None)
    env = {**os.environ, **spec.env, "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    url = f"http://127.0.0.1:{port}"
    with (workdir / f"{name}-direct.log").open("w") as log:
        began = time.time()
        process = subprocess.Popen(
            spec.argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        async with aiohttp.ClientSession() as session:
            ready = await poll_until_healthy(session, url, lambda: process.poll() is None)
            first, _ = await timed_post(session, url, body(name, max_tokens))
        return Direct(ready - began, first)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        while group_members(process.pid):
            await asyncio.sleep(0.1)


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as reply:
        return await reply.json(content_type=None)


async def engine_address(
    session: aiohttp.ClientSession, gateway: str, name: str, request: Any = None
) -> str:
    """The new engine's address, from the gateway's status once it has spawned it."""
    while True:
        if request is not None and request.done():
            await request  # the request failed before the engine got a port: raise its error
            raise RuntimeError(f"{name}: answered before any engine was seen")
        status = await get_json(session, gateway + "/gateway/status")
        entry = next(m for m in status["models"] if m["name"] == name)
        if entry["port"] and entry["pid"]:
            return f"http://127.0.0.1:{entry['port']}"
        await asyncio.sleep(POLL_S)


async def e2e_seconds(session: aiohttp.ClientSession, engine: str) -> float | None:
    """vLLM's own end-to-end time of the requests it served (sum of its histogram)."""
    async with session.get(engine + "/metrics") as reply:
        text = await reply.text()
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:e2e_request_latency_seconds_sum")
    ]
    return sum(values) if values else None


async def cold_through_gateway(gateway: str, name: str, max_tokens: int) -> Cold:
    async with aiohttp.ClientSession() as session:
        events = await get_json(session, f"{gateway}/admin/events?follow=0&recent=1")
        mark = events["last_id"]
        sent = time.time()
        request = asyncio.ensure_future(timed_post(session, gateway, body(name, max_tokens)))
        engine = await engine_address(session, gateway, name, request)
        ready = await poll_until_healthy(session, engine, lambda: not request.done())
        took, answered = await request
        e2e = await e2e_seconds(session, engine)
        later = await get_json(
            session, f"{gateway}/admin/events?follow=0&after={mark}&model={name}"
        )
    start = next(e for e in later["events"] if e["kind"] == "start")
    noticed = next(e for e in later["events"] if e["kind"] == "ready")
    return Cold(
        total_s=took,
        engine_ready_s=ready - start["time"],
        before_spawn_s=start["time"] - sent,
        noticed_s=noticed["time"] - ready,
        after_ready_s=answered - ready,
        engine_e2e_s=e2e,
    )


async def warm_latency(
    gateway: str, name: str, count: int, max_tokens: int
) -> tuple[list[float], list[float]]:
    async with aiohttp.ClientSession() as session:
        engine = await engine_address(session, gateway, name)
        payload = body(name, max_tokens)
        for url in (gateway, engine):  # one each first: connections open, caches warm
            await timed_post(session, url, payload)
        through, direct = [], []
        for index in range(count):
            order = [(gateway, through), (engine, direct)]
            for url, sink in order if index % 2 == 0 else order[::-1]:
                sink.append((await timed_post(session, url, payload))[0])
    return through, direct


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.0f}"


def report(results: dict[str, tuple[Direct, Cold, list[float], list[float]]], args: Any) -> str:
    cold_rows, added_rows, warm_rows = [], [], []
    for name, (direct, cold, through, straight) in results.items():
        # The request's own time, taken two ways: vLLM's account of this very request (which
        # leaves out the engine's HTTP and chat-template work, so the result is an upper
        # bound), and the same first request sent to a fresh engine alone (another run: noisy).
        own = cold.engine_e2e_s
        bound = None if own is None else cold.before_spawn_s + cold.after_ready_s - own
        versus_alone = cold.before_spawn_s + cold.after_ready_s - direct.first_request_s
        cold_rows.append(
            [
                name,
                f"{direct.ready_s:.1f}",
                f"{cold.engine_ready_s:.1f}",
                f"{cold.total_s:.1f}",
            ]
        )
        added_rows.append(
            [
                name,
                ms(cold.before_spawn_s),
                ms(cold.noticed_s),
                ms(cold.after_ready_s),
                ms(own),
                ms(direct.first_request_s),
                f"**{ms(bound)}**",
                ms(versus_alone),
            ]
        )
        gap = statistics.median(through) - statistics.median(straight)
        warm_rows.append(
            [
                name,
                f"{statistics.median(straight) * 1000:.1f} / {percentile(straight, 90) * 1000:.1f}",
                f"{statistics.median(through) * 1000:.1f} / {percentile(through, 90) * 1000:.1f}",
                f"{gap * 1000:+.1f}",
            ]
        )
    return (
        "Cold start, seconds:\n\n"
        + table(
            [
                "model",
                "engine alone: spawn -> ready",
                "via gateway: spawn -> ready",
                "via gateway: request -> answer",
            ],
            cold_rows,
        )
        + "\n\nThe gateway's added time on the cold request, ms:\n\n"
        + table(
            [
                "model",
                "request -> engine spawned (a)",
                "engine ready -> gateway noticed",
                "engine ready -> answer (b)",
                "vLLM's e2e of that request (c)",
                "same first request, engine alone (d)",
                "gateway added: a + b - c",
                "a + b - d",
            ],
            added_rows,
        )
        + "\n\nEngine ready = the first 200 from its `/health`, polled every 5 ms by the "
        "benchmark. (c) is vLLM's own `e2e_request_latency` of the cold request, which leaves "
        "out the engine's HTTP and chat-template work, so `a + b - c` is an upper bound of the "
        "gateway's added time; `a + b - d` subtracts the same first request timed on a fresh "
        "engine started alone instead (a different run, so it is noisier).\n\n"
        f"Warm latency, {args.warm} requests each, alternating, chat completion with "
        f"max_tokens {args.max_tokens}, ms (median / p90):\n\n"
        + table(
            ["model", "straight to the engine", "through the gateway", "gateway - direct"],
            warm_rows,
        )
        + "\n"
    )


DOC_HEAD = """# Real vLLM engines on CPU: cold starts and warm latency, measured

`python -m bench.cold_start --write` wrote this file: the demo's two models on vLLM for CPU 0.32
(`--enforce-eager -O0`, 1 GiB KV cache: examples/demo.yaml), each started by `modelyard serve`
and, for comparison, alone with the same command line.

"""


async def run(args: argparse.Namespace, setup: DemoSetup, workdir: Path) -> str:
    document = demo_document(setup)
    document["models"] = {name: document["models"][name] for name in MODELS}
    for name in MODELS:
        document["models"][name]["idle_timeout"] = 0  # never stopped by the idle timer here
    watch = ProcessWatch()
    results = {}
    gateway = start_demo_gateway(workdir / "gateway", setup, document)
    try:
        for name in MODELS:
            print(f"{name}: the engine alone ...", flush=True)
            direct = await start_direct(name, setup, workdir, args.max_tokens)
            first = ms(direct.first_request_s)
            print(f"  ready after {direct.ready_s:.1f} s; first request {first} ms")
            print(f"{name}: a cold request through the gateway ...", flush=True)
            cold = await cold_through_gateway(gateway.url, name, args.max_tokens)
            watch.note_gateway(gateway)
            print(f"  {cold}")
            through, direct_warm = await warm_latency(gateway.url, name, args.warm, args.max_tokens)
            results[name] = (direct, cold, through, direct_warm)
            unload = f"{gateway.url}/admin/models/{name}/unload"
            async with aiohttp.ClientSession() as session, session.post(unload) as reply:
                assert reply.status == 200, await reply.text()
    finally:
        stop_gateway(gateway, watch)
    return report(results, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warm", type=int, default=20, help="warm requests each way")
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--write", action="store_true", help="write docs/vllm-bench.md")
    args = parser.parse_args()
    setup = prepare_demo()
    workdir = Path(tempfile.mkdtemp(prefix="bench-cold-start-"))
    with engine_turn():
        text = asyncio.run(run(args, setup, workdir))
    print()
    print(text)
    if args.write:
        machine = (
            f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, "
            f"{len(os.sched_getaffinity(0))} CPU cores, no GPU; other test runs shared the "
            "machine, so the seconds of a cold start vary from run to run.\n\n"
        )
        (ROOT / "docs").mkdir(exist_ok=True)
        (ROOT / "docs" / "vllm-bench.md").write_text(DOC_HEAD + machine + text)
        print(f"wrote {ROOT / 'docs' / 'vllm-bench.md'}")


if __name__ == "__main__":
    main()
