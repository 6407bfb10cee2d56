"""Events: what happened to which model and why, kept in memory and fanned out live.

Persistence (SQLite) plugs in as a sink; the dashboard and `GET /admin/events` subscribe.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

EventSink = Callable[["Event"], None]


@dataclass(frozen=True)
class Event:
    id: int
    time: float
    kind: str  # start, ready, stop, crash, sleep, wake, evict, start_failed, adapter_load, ...
    model: str | None
    reason: str = ""
    duration_s: float | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class EventBus:
    """Keeps the last `capacity` events and hands each new one to sinks and live subscribers."""

    def __init__(self, capacity: int = 2000, first_id: int = 1) -> None:
        self._recent: collections.deque[Event] = collections.deque(maxlen=capacity)
        self._ids = itertools.count(first_id)
        self._sinks: list[EventSink] = []
        self._subscribers: set[asyncio.Queue[Event]] = set()

    def add_sink(self, sink: EventSink) -> None:
        self._sinks.append(sink)

    def emit(
        self,
        kind: str,
        model: str | None,
        reason: str = "",
        duration_s: float | None = None,
        **data: Any,
    ) -> Event:
        event = Event(next(self._ids), time.time(), kind, model, reason, duration_s, data)
        self._recent.append(event)
        for sink in self._sinks:
            sink(event)
        for queue in list(self._subscribers):
            if queue.full():
                # A subscriber that does not keep up loses its oldest events, never blocks us.
                queue.get_nowait()
            queue.put_nowait(event)
        return event

    def recent(self, limit: int = 100, model: str | None = None) -> list[Event]:
        events = [e for e in self._recent if model is None or e.model == model]
        return events[-limit:] if limit > 0 else []

    def subscribe(self, maxsize: int = 1000) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=maxsize)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        self._subscribers.discard(queue)
