"""A chaos run: many requests over several models while engines are killed at random.

Every answer is sorted into one of: `ok` (a complete answer), `clear_error` (a 502/503/504 in
OpenAI's shape, 503s with Retry-After, or a stream ended by an SSE error event), `lost` (no
answer, a hang, or a stream cut off without an error event) and `gateway_5xx` (a 500 or a 5xx
that is not an OpenAI error: the gateway itself failed). Used by tests/reliability/test_chaos.py
and bench/chaos.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

CHAT = [{"role": "user", "content": "hello"}]
ERROR_FIELDS = {"message", "type", "param", "code"}


@dataclass
class ChaosFigures:
    requests: int = 0
    faults_injected: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    error_codes: Counter[str] = field(default_factory=Counter)
    lost_examples: list[str] = field(default_factory=list)
    rss_before_kib: int = 0
    rss_after_kib: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "requests_tried": self.requests,
            "faults_injected": self.faults_injected,
            "answered_ok": self.outcomes["ok"],
            "clear_errors": self.outcomes["clear_error"],
            "requests_lost": self.outcomes["lost"],
            "gateway_5xx": self.outcomes["gateway_5xx"],
            "error_codes": dict(self.error_codes),
            "rss_before_mib": round(self.rss_before_kib / 1024, 1),
            "rss_after_mib": round(self.rss_after_kib / 1024, 1),
            "seconds": round(self.seconds, 1),
            "lost_examples": self.lost_examples[:5],
        }


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def request_body(model: str, rng: random.Random) -> dict[str, Any]:
    if rng.random() < 0.5:
        return {"model": model, "messages": CHAT, "fake_delay": rng.uniform(0.05, 0.4)}
    return {
        "model": model,
        "messages": CHAT,
        "stream": True,
        "fake_chunks": rng.randint(5, 15),
        "fake_chunk_delay": rng.uniform(0.01, 0.03),
    }


async def classify(response: aiohttp.ClientResponse) -> tuple[str, str]:
    """(outcome, detail) for one finished response."""
    text = (await response.read()).decode("utf-8", "replace")
    if response.status == 200:
        if response.headers.get("Content-Type", "").startswith("text/event-stream"):
            if "data: [DONE]" in text:
                return "ok", "stream"
            if '"code": "upstream_stream_broken"' in text:
                return "clear_error", "upstream_stream_broken"
            # A stream whose 200 went out with loading comments, then the start failed: its
            # last event is the error, in OpenAI's shape.
            last = text.rstrip().rsplit("\n", 1)[-1]
            try:
                event = json.loads(last.removeprefix("data: "))["error"]
                if set(event) == ERROR_FIELDS:
                    return "clear_error", str(event["code"])
            except (ValueError, KeyError, TypeError):
                pass
            return "lost", f"stream cut without an error event: {text[-200:]!r}"
        try:
            return ("ok", "json") if json.loads(text).get("choices") else ("lost", text[:200])
        except ValueError:
            return "lost", f"200 with a body that is not JSON: {text[:200]!r}"
    try:
        error = json.loads(text)["error"]
        shaped = set(error) == ERROR_FIELDS
    except (ValueError, KeyError, TypeError):
        error, shaped = {}, False
    if response.status == 500 or (response.status >= 500 and not shaped):
        return "gateway_5xx", f"{response.status}: {text[:200]!r}"
    if response.status in (502, 503, 504) and shaped:
        if response.status == 503 and "Retry-After" not in response.headers:
            return "gateway_5xx", f"503 without Retry-After: {text[:200]!r}"
        return "clear_error", str(error["code"])
    return "lost", f"unexpected {response.status}: {text[:200]!r}"


async def run_chaos(
    url: str,
    models: list[str],
    gateway_pid: int,
    requests: int = 1000,
    concurrency: int = 16,
    kill_every: tuple[float, float] = (0.2, 0.6),
    request_timeout: float = 60.0,
    seed: int = 0,
    admin_headers: dict[str, str] | None = None,
) -> ChaosFigures:
    """Send `requests` requests while killing a random model's engine every few tenths of s."""
    rng = random.Random(seed)
    figures = ChaosFigures(requests=requests)
    remaining = list(range(requests))
    done = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=request_timeout)

    async def worker(session: aiohttp.ClientSession) -> None:
        while remaining:
            remaining.pop()
            body = request_body(rng.choice(models), rng)
            try:
                async with session.post(url + "/v1/chat/completions", json=body) as response:
                    outcome, detail = await classify(response)
            except (aiohttp.ClientError, TimeoutError) as error:
                outcome, detail = "lost", f"{type(error).__name__}: {error}"
            figures.outcomes[outcome] += 1
            if outcome == "clear_error":
                figures.error_codes[detail] += 1
                await asyncio.sleep(0.3)  # as a client would before retrying
            elif outcome != "ok":
                figures.lost_examples.append(detail)

    async def engine_pid(session: aiohttp.ClientSession, model: str) -> int | None:
        async with session.get(url + "/gateway/status", headers=admin_headers) as response:
            status = await response.json()
        return next((m["pid"] for m in status["models"] if m["name"] == model), None)

    async def chaos_monkey(session: aiohttp.ClientSession) -> None:
        while not done.is_set():
            await asyncio.sleep(rng.uniform(*kill_every))
            pid = await engine_pid(session, rng.choice(models))
            if pid is None or done.is_set():
                continue
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            figures.faults_injected += 1

    began = time.monotonic()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # Warm up: every engine started once, so "before" includes a loaded gateway.
        for model in models:
            body = {"model": model, "messages": CHAT}
            async with session.post(url + "/v1/chat/completions", json=body) as response:
                await response.read()
        figures.rss_before_kib = rss_kib(gateway_pid)
        monkey = asyncio.ensure_future(chaos_monkey(session))
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        done.set()
        await monkey
    figures.seconds = time.monotonic() - began
    figures.rss_after_kib = rss_kib(gateway_pid)
    return figures
