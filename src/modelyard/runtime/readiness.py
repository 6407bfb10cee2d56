"""Is an engine ready? Its health check, polled fast, re-checked when it prints a line.

Used by runtimes whose engines run elsewhere (a Ray node); the rules are the process
runtime's (runtime/process.py): start at 20 ms, back off to 50 ms, check at once on output.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from modelyard.engines.base import LaunchSpec
from modelyard.runtime.process import (
    FIRST_POLL_S,
    HEALTH_REQUEST_TIMEOUT_S,
    MAX_POLL_S,
    POLL_GROWTH,
)


async def poll_until_ready(
    answers: Callable[[], Awaitable[bool]],
    exited: asyncio.Future[Any],
    output_seen: asyncio.Event,
    deadline: float,
) -> str:
    """Poll `answers` until it says yes ("ready"), the engine exits ("exited") or `deadline`
    (monotonic) passes ("timeout"); a new line of engine output triggers a check at once."""
    delay = FIRST_POLL_S
    while True:
        if exited.done():
            return "exited"
        if await answers():
            return "ready"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "timeout"
        output_seen.clear()
        output: asyncio.Future[Any] = asyncio.ensure_future(output_seen.wait())
        done, _ = await asyncio.wait(
            {output, exited}, timeout=min(delay, remaining), return_when=asyncio.FIRST_COMPLETED
        )
        output.cancel()
        if output not in done:
            delay = min(delay * POLL_GROWTH, MAX_POLL_S)


async def engine_answers(session: aiohttp.ClientSession, base_url: str, spec: LaunchSpec) -> bool:
    """The engine's health check says ready (and it lists its served name, when expected)."""
    timeout = aiohttp.ClientTimeout(total=HEALTH_REQUEST_TIMEOUT_S)
    headers = spec.upstream_headers  # an engine started with --api-key wants it
    try:
        async with session.get(
            base_url + spec.health_path, timeout=timeout, headers=headers
        ) as resp:
            if resp.status != 200:
                return False
        if spec.expect_served_name is None:
            return True
        async with session.get(base_url + "/v1/models", timeout=timeout, headers=headers) as resp:
            if resp.status != 200:
                return False
            listing = await resp.json(content_type=None)
        names = {entry.get("id") for entry in listing.get("data", [])}
        return spec.expect_served_name in names
    except (TimeoutError, aiohttp.ClientError, ValueError, AttributeError):
        return False
