"""Writes to one state database from one thread of its own, so the event loop never waits on SQLite.

SQLite waits up to `BUSY_TIMEOUT_MS` for a lock another connection holds (a `modelyard events`
reader in a long transaction, a backup, a second gateway on the same state dir). On the event
loop that wait stalled every request for seconds. Here writes are queued, never blocking the
caller, and carried out in the order they came by one thread per database, many per
transaction. A batch that finds the file locked is tried again after a back-off until it
commits, so a lock held for a minute delays writes and loses none. A full queue drops the new
write and counts it (`dropped`), so only callers whose writes may be lost (events) use one.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from modelyard.state.database import StateDatabase, in_use

log = logging.getLogger("modelyard.state")

Operation = Callable[[Any], None]  # runs inside the batch's transaction, given the connection
Finished = Callable[[bool], None]  # told, on the writer thread, whether its write committed

DEFAULT_CAPACITY = 10_000
DEFAULT_BATCH = 500
RETRY_FIRST_S = 0.05
RETRY_MOST_S = 1.0
# How long `close()` keeps trying a locked file before it gives the queued writes up.
CLOSE_GRACE_S = 10.0
# SQLite's own wait for a lock, kept short: the writer tries again by itself, and reads on the
# same connection (the events API, in a worker thread) wait behind a write no longer than this.
WRITER_BUSY_TIMEOUT_MS = 100


class QueuedWriter:
    """One thread that writes queued operations to `database`, in order, in batches."""

    def __init__(
        self,
        database: StateDatabase,
        capacity: int = DEFAULT_CAPACITY,
        batch: int = DEFAULT_BATCH,
    ) -> None:
        self._database = database
        database.set_busy_timeout(WRITER_BUSY_TIMEOUT_MS)
        self._capacity = max(1, capacity)
        self._batch = max(1, batch)
        self._queue: collections.deque[tuple[Operation, Finished | None]] = collections.deque()
        self._changed = threading.Condition()
        self._submitted = 0
        self._finished = 0  # committed or given up, in submission order
        self._closing = False
        self._give_up_at: float | None = None
        self.dropped = 0  # writes refused on a full queue or given up after an error
        self._thread = threading.Thread(
            target=self._run, name=f"state-writer:{database.path.name}", daemon=True
        )
        self._thread.start()

    def submit(self, operation: Operation, finished: Finished | None = None) -> bool:
        """Queue `operation`; never blocks. False (and counted) if the queue is full or closed."""
        with self._changed:
            if self._closing or len(self._queue) >= self._capacity:
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log.warning(
                        "%s: write queue full or closed; %d writes dropped so far",
                        self._database.path,
                        self.dropped,
                    )
                return False
            self._queue.append((operation, finished))
            self._submitted += 1
            self._changed.notify_all()
            return True

    def flush(self, timeout: float | None = None) -> bool:
        """Wait (in a thread, never on the loop) until every write queued so far is done."""
        with self._changed:
            target = self._submitted
            return self._changed.wait_for(lambda: self._finished >= target, timeout)

    def close(self, grace: float = CLOSE_GRACE_S) -> None:
        """Write what is queued (trying a locked file for up to `grace` s), then stop the thread."""
        with self._changed:
            self._closing = True
            self._give_up_at = time.monotonic() + grace
            self._changed.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._queue) or self._closing)
                if not self._queue:
                    return  # closing, and nothing is left
                count = min(len(self._queue), self._batch)
                batch = [self._queue.popleft() for _ in range(count)]
            committed = self._commit([operation for operation, _ in batch])
            if not committed and self._past_deadline():
                # Still locked at shutdown: each further batch would wait out the busy
                # timeout again, so whatever is left is given up at once.
                with self._changed:
                    batch.extend(self._queue)
                    self._queue.clear()
            self._finish(batch, committed)

    def _finish(self, batch: list[tuple[Operation, Finished | None]], committed: bool) -> None:
        for _, finished in batch:
            if finished is None:
                continue
            try:
                finished(committed)
            except Exception:
                # The thread must live on: every later write depends on it.
                log.exception("%s: a write's completion hook failed", self._database.path)
        with self._changed:
            self._finished += len(batch)
            if not committed:
                self.dropped += len(batch)
            self._changed.notify_all()

    def _past_deadline(self) -> bool:
        with self._changed:
            return self._give_up_at is not None and time.monotonic() >= self._give_up_at

    def _commit(self, operations: list[Operation]) -> bool:
        delay = RETRY_FIRST_S
        warned = False
        while True:
            try:
                self._database.write(lambda connection: _run_all(operations, connection))
                if warned:
                    log.warning("%s: free again; queued writes go on", self._database.path)
                return True
            except Exception as error:
                if not in_use(error):
                    # Disk full, a read-only directory, a bug: trying again would not help.
                    log.exception("%s: %d queued writes lost", self._database.path, len(operations))
                    return False
                if not warned:
                    log.warning(
                        "%s is locked by another connection (%s); %d writes wait",
                        self._database.path,
                        error,
                        len(operations),
                    )
                    warned = True
            if self._past_deadline():
                log.error("%s still locked at shutdown; queued writes lost", self._database.path)
                return False
            with self._changed:
                # Woken early by close(), so the shutdown deadline is seen at once.
                self._changed.wait(delay)
            delay = min(delay * 2, RETRY_MOST_S)


def _run_all(operations: list[Operation], connection: Any) -> None:
    for operation in operations:
        operation(connection)
