"""Events: what happened to which model and why, kept in an archive and fanned out live.

The archive is in memory by default; the gateway gives the bus a SQLite archive
(`event_store.EventStore`) so the history survives restarts and event ids keep growing
across them (a client resuming with `Last-Event-ID` never sees an old id reused).
Metrics and the gateway log plug in as sinks; `GET /admin/events` and the dashboard subscribe.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from modelyard.redaction import redact, redact_value

EventSink = Callable[["Event"], None]

log = logging.getLogger("modelyard.events")


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


class EventArchive(Protocol):
    """Where past events are kept and looked up (memory, or SQLite under the state dir)."""

    # Whether the lookups below may wait on I/O (then the request path runs them in a thread).
    # `append` never may: it is called on the event loop, inside the scheduler's state changes.
    reads_block: bool

    def append(self, event: Event) -> None: ...

    def recent(self, limit: int, model: str | None = None) -> list[Event]:
        """The last `limit` events (of one model), oldest first."""

    def after(self, event_id: int, limit: int, model: str | None = None) -> list[Event]:
        """Up to `limit` events with an id above `event_id`, oldest first."""

    def last_id(self) -> int:
        """The highest id kept (0 when empty)."""


class MemoryArchive:
    """The last `capacity` events in a ring: for unit tests and when SQLite is unusable."""

    reads_block = False

    def __init__(self, capacity: int = 2000) -> None:
        self._events: collections.deque[Event] = collections.deque(maxlen=capacity)

    def append(self, event: Event) -> None:
        self._events.append(event)

    def recent(self, limit: int, model: str | None = None) -> list[Event]:
        if limit <= 0:
            return []
        events = [e for e in self._events if model is None or e.model == model]
        return events[-limit:]

    def after(self, event_id: int, limit: int, model: str | None = None) -> list[Event]:
        events = [
            e for e in self._events if e.id > event_id and (model is None or e.model == model)
        ]
        return events[:limit] if limit > 0 else []

    def last_id(self) -> int:
        return self._events[-1].id if self._events else 0


class EventBus:
    """Numbers each new event, archives it, and hands it to sinks and live subscribers."""

    def __init__(
        self, capacity: int = 2000, first_id: int = 1, archive: EventArchive | None = None
    ) -> None:
        self.archive: EventArchive = archive if archive is not None else MemoryArchive(capacity)
        self._ids = itertools.count(max(first_id, self.archive.last_id() + 1))
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
        # Reasons and data carry engine log lines and error messages: masked before they are
        # stored, logged or streamed (modelyard.redaction).
        event = Event(
            next(self._ids),
            time.time(),
            kind,
            model,
            redact(reason),
            duration_s,
            redact_value(data),
        )
        # Emitting happens inside the scheduler's state changes: a failing archive or sink
        # (disk full, a bug in a metric) is logged, never allowed to break a start or stop.
        for deliver in (self.archive.append, *self._sinks):
            try:
                deliver(event)
            except Exception:
                log.exception("event %s %s could not be delivered to %r", kind, model, deliver)
        for queue in list(self._subscribers):
            if queue.full():
                # A subscriber that does not keep up loses its oldest events, never blocks us.
                queue.get_nowait()
            queue.put_nowait(event)
        return event

    def recent(self, limit: int = 100, model: str | None = None) -> list[Event]:
        return self.archive.recent(limit, model)

    def after(self, event_id: int, limit: int = 1000, model: str | None = None) -> list[Event]:
        """Events newer than `event_id` (to resume a stream after `Last-Event-ID`)."""
        return self.archive.after(event_id, limit, model)

    async def recent_off_loop(self, limit: int = 100, model: str | None = None) -> list[Event]:
        """`recent` for the request path: a lookup that may wait on a locked database runs in a
        worker thread, never on the event loop."""
        if not self.archive.reads_block:
            return self.recent(limit, model)
        return await asyncio.to_thread(self.archive.recent, limit, model)

    async def after_off_loop(
        self, event_id: int, limit: int = 1000, model: str | None = None
    ) -> list[Event]:
        """`after` for the request path (see `recent_off_loop`)."""
        if not self.archive.reads_block:
            return self.after(event_id, limit, model)
        return await asyncio.to_thread(self.archive.after, event_id, limit, model)

    def last_id(self) -> int:
        return self.archive.last_id()

    def subscribe(self, maxsize: int = 1000) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=maxsize)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        self._subscribers.discard(queue)
