"""Fair queues in front of busy engines: who is sent to an engine next when it is full.

A model's `max_in_flight` is the most requests the gateway sends to its engine at once;
vLLM's own queue is first come, first served whatever the key, so a batch job's 500 requests
would sit in front of a person's chat. Beyond the limit, requests wait here, one queue per
model, and a freed slot goes to the next request by start-time fair queueing (Goyal et al.,
SFQ) across keys:

- each request gets a virtual start tag: the later of the model's virtual time and its key's
  last finish tag; its key's finish tag moves on by `1 / weight`;
- the waiting request with the lowest (priority, start tag) is sent next, and the model's
  virtual time becomes its start tag.

So a key with a backlog does not delay a key that sends one request now and then (the new
request's tag is the current virtual time, ahead of the backlog's), two backlogged keys share
the slots in the ratio of their weights, and within a key requests keep their order. A key's
own `max_in_flight` bounds its requests in flight across all models.

Pure bookkeeping on the event loop (no locks, no I/O): `admit` returns at once when a slot is
free, else waits on a future that `release` resolves. A waiter whose client hangs up is
cancelled and leaves its queue.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from modelyard.auth.principal import ShareTerms

# Retry-After for a full queue: the expected wait, within these bounds (seconds).
MIN_RETRY_AFTER_S = 1.0
MAX_RETRY_AFTER_S = 60.0
SERVICE_TIME_SMOOTHING = 0.2  # weight of the newest request in the mean service time


class QueueFull(Exception):
    """The model's queue is at its bound: a 503 with `retry_after`."""

    def __init__(self, model: str, waiting: int, retry_after: float) -> None:
        super().__init__(
            f"model {model!r} is busy: {waiting} requests are waiting for it; retry later"
        )
        self.retry_after = retry_after


@dataclass
class KeyCounts:
    """One key's figures on one model (for metrics and the dashboard)."""

    waiting: int = 0
    in_flight: int = 0
    served: int = 0  # requests sent to the engine (after waiting or not)
    queued: int = 0  # of those, how many had to wait
    wait_seconds: float = 0.0  # total time spent waiting
    longest_wait_s: float = 0.0


@dataclass
class _Waiter:
    key: str
    priority: int
    start_tag: float
    seq: int
    arrived: float
    granted: asyncio.Future[None]


@dataclass
class _ModelQueue:
    name: str
    limit: int | None
    in_flight: int = 0
    virtual_time: float = 0.0
    finish_tags: dict[str, float] = field(default_factory=dict)
    waiters: dict[str, deque[_Waiter]] = field(default_factory=dict)
    counts: dict[str, KeyCounts] = field(default_factory=dict)
    service_s: float | None = None  # mean time a request holds a slot

    def waiting(self) -> int:
        return sum(len(queue) for queue in self.waiters.values())


@dataclass(frozen=True)
class Slot:
    """Leave to send one request to `model`'s engine; give it back with `release`."""

    model: str
    key: str
    taken_at: float


class FairQueues:
    """The fair queues of every model, and each key's requests in flight across them."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._models: dict[str, _ModelQueue] = {}
        self._key_in_flight: dict[str, int] = {}
        self._key_limits: dict[str, int | None] = {}
        self._seq = itertools.count()

    async def admit(
        self,
        model: str,
        limit: int | None,
        key: str,
        share: ShareTerms,
        max_waiting: int,
        max_waiting_total: int | None = None,
    ) -> Slot:
        """A slot on `model` (at most `limit` in flight, None: no limit) for one of `key`'s
        requests: at once if one is free, else after waiting fairly. Raises QueueFull when
        `max_waiting` requests already wait for `model`, or `max_waiting_total` for all
        models. The limits are passed on each call, so a reload or a changed key applies
        from its next request."""
        queue = self._queue(model)
        self._key_limits[key] = share.max_in_flight
        if limit != queue.limit:
            queue.limit = limit
            self._dispatch(queue)
        counts = queue.counts.setdefault(key, KeyCounts())
        now = self._clock()
        room = self._has_room(queue, key)
        if not room:
            # Counted only for a request that must wait: the usual one, served at once,
            # skips a sum over every key's waiters.
            waiting = queue.waiting()
            if waiting >= max_waiting or (
                max_waiting_total is not None and self.total_waiting() >= max_waiting_total
            ):
                raise QueueFull(model, waiting, self._retry_after(queue, waiting))
        # Requests sent at once are tagged too: a key's share counts all it sent, so a
        # backlog's first requests (sent before anything waited) are not free.
        start = max(queue.virtual_time, queue.finish_tags.get(key, 0.0))
        queue.finish_tags[key] = start + 1.0 / share.weight
        if room:
            # Served now, so the model's virtual time is this request's: a key that used an
            # idle engine alone is not held back for it once others arrive.
            queue.virtual_time = max(queue.virtual_time, start)
            return self._grant(queue, key, counts, now)
        waiter = _Waiter(
            key,
            share.priority,
            start,
            next(self._seq),
            now,
            asyncio.get_running_loop().create_future(),
        )
        queue.waiters.setdefault(key, deque()).append(waiter)
        counts.waiting += 1
        try:
            await waiter.granted
        except asyncio.CancelledError:
            if waiter.granted.done() and not waiter.granted.cancelled():
                # Granted in the same turn the client left: give the slot straight back.
                self.release(Slot(model, key, self._clock()))
            else:
                self._forget(queue, waiter, counts)
            raise
        return Slot(model, key, self._clock())

    def release(self, slot: Slot) -> None:
        """The request that held `slot` has ended: the next waiter (of any model, when the
        key's own limit held one back elsewhere) may go."""
        queue = self._models[slot.model]
        queue.in_flight -= 1
        counts = queue.counts[slot.key]
        counts.in_flight -= 1
        self._key_in_flight[slot.key] = self._key_in_flight.get(slot.key, 1) - 1
        held = self._clock() - slot.taken_at
        queue.service_s = (
            held
            if queue.service_s is None
            else (1 - SERVICE_TIME_SMOOTHING) * queue.service_s + SERVICE_TIME_SMOOTHING * held
        )
        self._dispatch(queue)
        if self._key_limits.get(slot.key) is not None:
            for other in self._models.values():
                if other is not queue and slot.key in other.waiters:
                    self._dispatch(other)

    def in_flight(self, model: str) -> int:
        """Slots held on `model` (granted requests, also those not yet at the engine)."""
        queue = self._models.get(model)
        return queue.in_flight if queue is not None else 0

    def waiting(self, model: str) -> int:
        queue = self._models.get(model)
        return queue.waiting() if queue is not None else 0

    def total_waiting(self) -> int:
        return sum(queue.waiting() for queue in self._models.values())

    def counts(self) -> dict[str, dict[str, KeyCounts]]:
        """model -> key -> figures (a snapshot, for metrics and the dashboard)."""
        return {
            model: {key: KeyCounts(**vars(counts)) for key, counts in queue.counts.items()}
            for model, queue in self._models.items()
        }

    def limit_of(self, model: str) -> int | None:
        queue = self._models.get(model)
        return queue.limit if queue is not None else None

    # ----- inside -----

    def _queue(self, model: str) -> _ModelQueue:
        queue = self._models.get(model)
        if queue is None:
            queue = self._models[model] = _ModelQueue(model, limit=None)
        return queue

    def _key_has_room(self, key: str) -> bool:
        limit = self._key_limits.get(key)
        return limit is None or self._key_in_flight.get(key, 0) < limit

    def _has_room(self, queue: _ModelQueue, key: str) -> bool:
        # Whoever waits has no room (else `_dispatch` would have sent it): a free slot now
        # is free for this request unless its own key is at its limit.
        model_room = queue.limit is None or queue.in_flight < queue.limit
        return model_room and self._key_has_room(key)

    def _grant(self, queue: _ModelQueue, key: str, counts: KeyCounts, now: float) -> Slot:
        queue.in_flight += 1
        self._key_in_flight[key] = self._key_in_flight.get(key, 0) + 1
        counts.in_flight += 1
        counts.served += 1
        return Slot(queue.name, key, now)

    def _dispatch(self, queue: _ModelQueue) -> None:
        while queue.limit is None or queue.in_flight < queue.limit:
            chosen: _Waiter | None = None
            for key, waiters in queue.waiters.items():
                if not waiters or not self._key_has_room(key):
                    continue
                head = waiters[0]
                if chosen is None or (head.priority, head.start_tag, head.seq) < (
                    chosen.priority,
                    chosen.start_tag,
                    chosen.seq,
                ):
                    chosen = head
            if chosen is None:
                return
            waiters = queue.waiters[chosen.key]
            waiters.popleft()
            if not waiters:
                del queue.waiters[chosen.key]
            if chosen.granted.done():
                # Its client left (the task was cancelled) and the waiter has not yet run
                # its own clean-up: drop it here, so its slot goes to the next one.
                queue.counts[chosen.key].waiting -= 1
                if chosen.key not in queue.waiters:
                    queue.finish_tags.pop(chosen.key, None)
                continue
            queue.virtual_time = max(queue.virtual_time, chosen.start_tag)
            counts = queue.counts[chosen.key]
            counts.waiting -= 1
            now = self._clock()
            waited_s = now - chosen.arrived
            counts.queued += 1
            counts.wait_seconds += waited_s
            counts.longest_wait_s = max(counts.longest_wait_s, waited_s)
            self._grant(queue, chosen.key, counts, now)
            chosen.granted.set_result(None)

    def _forget(self, queue: _ModelQueue, waiter: _Waiter, counts: KeyCounts) -> None:
        waiters = queue.waiters.get(waiter.key)
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)
            counts.waiting -= 1
            if not waiters:
                del queue.waiters[waiter.key]
                # Nothing of this key waits: its unused virtual time is not held against it.
                queue.finish_tags.pop(waiter.key, None)

    def _retry_after(self, queue: _ModelQueue, waiting: int) -> float:
        service = queue.service_s if queue.service_s is not None else MIN_RETRY_AFTER_S
        slots = queue.limit or 1
        expected = service * (waiting + 1) / slots
        return min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, expected))
