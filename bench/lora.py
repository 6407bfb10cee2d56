"""LoRA adapters behind one real vLLM engine, through the gateway: speed by adapter count.

    python -m bench.lora [--requests 48] [--concurrency 8] [--max-tokens 16] [--write]

Starts `modelyard serve` with the demo's SmolLM2 (`chat`) on CPU and 32+ peft adapters in an
adapter folder, then, for N = 1, 8 and 32 adapters (and the base model alone), sends streamed
chat completions spread evenly over the N adapters at a fixed concurrency, after one request
per adapter has loaded them all. It reports time to first token (p50/p90), requests/s and
generated tokens/s per N. Then the first-use cost of an adapter: the latency of a request that
must load the adapter into the engine (`/v1/load_lora_adapter`) vs the same request again, and
the gateway's own record of the load time. `--write` puts the table in docs/lora-bench.md.

Needs the demo's engine venv and models (`prepare_demo()`, built once per machine). Runs one
vLLM engine, and waits for the machine-wide engine lock that the vLLM tests also take.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from tests.vllm.support import (
    ProcessWatch,
    cached_adapters,
    copy_adapter,
    demo_document,
    engine_turn,
    start_demo_gateway,
    stop_gateway,
)

from modelyard.demo import DemoSetup, prepare_demo

ROOT = Path(__file__).resolve().parent.parent
COUNTS = (1, 8, 32)
COLD = [f"cold-{index:02d}" for index in range(1, 7)]
PROMPT = [{"role": "user", "content": "Write a short email inviting the team to lunch."}]
TIMEOUT = aiohttp.ClientTimeout(total=600)


@dataclass
class Run:
    label: str
    adapters: int
    requests: int
    wall_s: float
    ttft_s: list[float]
    tokens: int
    errors: int
    loads: int

    def row(self) -> list[str]:
        ttft = sorted(self.ttft_s)
        return [
            self.label,
            str(self.requests),
            f"{percentile(ttft, 50) * 1000:.0f}",
            f"{percentile(ttft, 90) * 1000:.0f}",
            f"{self.requests / self.wall_s:.2f}",
            f"{self.tokens / self.wall_s:.1f}",
            str(self.loads),
            str(self.errors),
        ]


HEADERS = [
    "model(s)",
    "requests",
    "TTFT p50 ms",
    "TTFT p90 ms",
    "req/s",
    "tokens/s",
    "loads",
    "errors",
]


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


async def stream_once(
    session: aiohttp.ClientSession, url: str, model: str, max_tokens: int
) -> tuple[float, int]:
    """One streamed chat completion: (time to first token, completion tokens)."""
    body = {
        "model": model,
        "messages": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,  # vLLM: every request generates max_tokens, so runs compare
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    began = time.perf_counter()
    first: float | None = None
    tokens = 0
    async with session.post(url + "/v1/chat/completions", json=body, timeout=TIMEOUT) as reply:
        if reply.status != 200:
            raise RuntimeError(f"{model}: {reply.status} {await reply.text()}")
        async for raw in reply.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.perf_counter() - began
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
    assert first is not None, f"{model}: no content streamed"
    return first, tokens


async def plain_once(session: aiohttp.ClientSession, url: str, model: str) -> float:
    """One non-streamed, one-token chat completion; its latency in seconds."""
    body = {"model": model, "messages": PROMPT, "max_tokens": 1, "temperature": 0}
    began = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", json=body, timeout=TIMEOUT) as reply:
        text = await reply.text()
        if reply.status != 200:
            raise RuntimeError(f"{model}: {reply.status} {text}")
    return time.perf_counter() - began


async def events_after(
    session: aiohttp.ClientSession, url: str, after: int
) -> list[dict[str, Any]]:
    async with session.get(f"{url}/admin/events?follow=0&after={after}&recent=1000") as reply:
        return list((await reply.json())["events"])


async def last_event_id(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(f"{url}/admin/events?follow=0&recent=1") as reply:
        return int((await reply.json())["last_id"])


async def measure(
    session: aiohttp.ClientSession,
    url: str,
    label: str,
    models: list[str],
    requests: int,
    concurrency: int,
    max_tokens: int,
) -> Run:
    for model in models:  # load every adapter once: the run measures the steady state
        await plain_once(session, url, model)
    mark = await last_event_id(session, url)
    limit = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    tokens = errors = 0

    async def one(model: str) -> None:
        nonlocal tokens, errors
        async with limit:
            try:
                first, count = await stream_once(session, url, model, max_tokens)
            except (RuntimeError, aiohttp.ClientError, AssertionError) as error:
                errors += 1
                print(f"  error: {error}")
                return
            ttfts.append(first)
            tokens += count

    began = time.perf_counter()
    await asyncio.gather(*(one(models[index % len(models)]) for index in range(requests)))
    wall = time.perf_counter() - began
    loads = sum(1 for e in await events_after(session, url, mark) if e["kind"] == "adapter_load")
    adapters = 0 if models == ["chat"] else len(models)
    return Run(label, adapters, requests, wall, ttfts, tokens, errors, loads)


async def first_use(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """Latency of a request that loads its adapter vs the same request right after."""
    mark = await last_event_id(session, url)
    base = [await plain_once(session, url, "chat") for _ in range(len(COLD))]
    cold, warm = [], []
    for name in COLD:
        cold.append(await plain_once(session, url, name))
        warm.append(await plain_once(session, url, name))
    loads = [
        e["duration_s"]
        for e in await events_after(session, url, mark)
        if e["kind"] == "adapter_load" and e["data"].get("adapter") in COLD
    ]
    return {
        "base_ms": statistics.median(base) * 1000,
        "cold_ms": statistics.median(cold) * 1000,
        "warm_ms": statistics.median(warm) * 1000,
        "load_ms": statistics.median(loads) * 1000 if loads else float("nan"),
        "samples": float(len(COLD)),
    }


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def prepare_folder(setup: DemoSetup, folder: Path) -> None:
    names = [f"lora-{index:02d}" for index in range(1, max(COUNTS) + 1)]
    adapters = cached_adapters(setup, [*names, *COLD])
    folder.mkdir(parents=True)
    for path in adapters.values():
        copy_adapter(path, folder)


async def run_all(url: str, args: argparse.Namespace) -> tuple[list[Run], dict[str, float], float]:
    async with aiohttp.ClientSession() as session:
        began = time.perf_counter()
        await plain_once(session, url, "chat")  # the engine's cold start
        cold_start = time.perf_counter() - began
        print(f"engine ready and first answer after {cold_start:.1f} s")
        runs = []
        plan = [("base only", ["chat"])] + [
            (f"{n} adapter{'s' if n > 1 else ''}", [f"lora-{i:02d}" for i in range(1, n + 1)])
            for n in COUNTS
        ]
        for label, models in plan:
            run = await measure(
                session, url, label, models, args.requests, args.concurrency, args.max_tokens
            )
            print("  " + " | ".join(run.row()))
            runs.append(run)
        cost = await first_use(session, url)
    return runs, cost, cold_start


def report(runs: list[Run], cost: dict[str, float], args: argparse.Namespace) -> str:
    speed = table(HEADERS, [run.row() for run in runs])
    first = table(
        ["base, 1 token", "adapter's first use", "same adapter again", "load (gateway record)"],
        [
            [
                f"{cost['base_ms']:.0f} ms",
                f"{cost['cold_ms']:.0f} ms",
                f"{cost['warm_ms']:.0f} ms",
                f"{cost['load_ms']:.0f} ms",
            ]
        ],
    )
    return (
        f"Streamed chat completions, {args.requests} per row, concurrency {args.concurrency}, "
        f"{args.max_tokens} tokens each (ignore_eos), spread evenly over the row's adapters; "
        f"lora: max_loras {args.max_loras}, max_cpu_loras {args.max_cpu_loras}, max_rank 8. "
        "`loads` counts adapters the gateway loaded during the timed run.\n\n"
        f"{speed}\n\n"
        f"First use of an adapter (medians of {int(cost['samples'])}, non-streamed, 1 token):\n\n"
        f"{first}\n"
    )


DOC_HEAD = """# LoRA adapters behind one vLLM engine: measured

`python -m bench.lora --write` wrote this file. One SmolLM2-135M-Instruct engine (vLLM for CPU
0.32, bf16, `--enforce-eager -O0`, the demo's flags) behind `modelyard serve`; the adapters are
rank-8 peft adapters on q_proj/v_proj with random weights (1.9 MB each), picked up from an
`adapter_dirs` folder and loaded at run time through `/v1/load_lora_adapter`.

"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-loras", type=int, default=4)
    parser.add_argument("--max-cpu-loras", type=int, default=40)
    parser.add_argument("--write", action="store_true", help="write docs/lora-bench.md")
    args = parser.parse_args()

    setup = prepare_demo()
    workdir = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    prepare_folder(setup, workdir / "adapters")
    document = demo_document(setup)
    chat = document["models"]["chat"]
    chat["idle_timeout"] = 0  # never stop during the run
    chat["lora"] = {
        "max_loras": args.max_loras,
        "max_cpu_loras": args.max_cpu_loras,
        "max_rank": 8,
        "adapter_dirs": [str(workdir / "adapters")],
    }
    document["models"] = {"chat": chat}
    document.pop("groups", None)
    document["limits"] = {"max_queue": 10_000, "max_queue_per_model": 10_000}
    watch = ProcessWatch()
    with engine_turn():
        gateway = start_demo_gateway(workdir / "gateway", setup, document)
        try:
            runs, cost, cold_start = asyncio.run(run_all(gateway.url, args))
        finally:
            stop_gateway(gateway, watch)
    text = report(runs, cost, args)
    print()
    print(text)
    if args.write:
        machine = (
            f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, "
            f"{_cpu_count()} CPU cores, no GPU (the engine's cold start took {cold_start:.0f} s); "
            "other test runs shared the machine, so treat small differences as noise.\n\n"
        )
        (ROOT / "docs").mkdir(exist_ok=True)
        (ROOT / "docs" / "lora-bench.md").write_text(DOC_HEAD + machine + text)
        print(f"wrote {ROOT / 'docs' / 'lora-bench.md'}")


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
