"""Reading Server-Sent Events in tests, with a deadline so a missing event fails, never hangs."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp


class SseReader:
    """Parses an SSE response body into (id, data) pairs as they arrive."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.comments = 0

    async def next(self, timeout: float) -> tuple[int | None, str]:
        event_id: int | None = None
        data: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no event in time")
            raw = await asyncio.wait_for(self.response.content.readline(), remaining)
            if not raw:
                raise EOFError("the stream ended")
            line = raw.decode().rstrip("\r\n")
            if not line:
                if data:
                    return event_id, "\n".join(data)
                continue
            if line.startswith(":"):
                self.comments += 1
            elif line.startswith("id:"):
                event_id = int(line[3:].strip())
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))

    async def events_until(
        self, done: Callable[[list[dict[str, Any]]], bool], timeout: float = 15.0
    ) -> list[dict[str, Any]]:
        """JSON events (with their SSE id checked) until `done(events)` says enough."""
        events: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while not done(events):
            remaining = deadline - time.monotonic()
            try:
                event_id, data = await self.next(max(remaining, 0.001))
            except TimeoutError:
                raise AssertionError(f"timed out; events so far: {events}") from None
            event = json.loads(data)
            assert event_id == event["id"]
            events.append(event)
        return events
