"""The event history in SQLite under the state dir: bounded, and it survives gateway restarts.

Events are emitted on the event loop, inside the scheduler's state changes, so they are never
written there: SQLite waits up to its busy timeout (5 s) when another process holds the file
(`modelyard events`, a backup, a second gateway), and that wait stalled every request. Each
event is queued to the database's writer thread (`state.writer.QueuedWriter`), which writes
them in order, in batches, and waits out a lock without losing them. Until an event is
committed it is kept in memory and merged into every read, so a reader sees it at once.
`close()` writes what is queued. Reads run SQL: the request path calls them in a worker thread
(`EventBus.recent_off_loop`).

Only the last `keep` events are kept, so the file cannot grow without end on a crash-looping
engine. A damaged file is set aside by `StateDatabase` and a new history starts: losing old
events is better than a gateway that will not start.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

from modelyard.observability.events import Event
from modelyard.state import SetAside, StateDatabase, StateError
from modelyard.state.writer import QueuedWriter

DATABASE_NAME = "events"  # <state_dir>/events.sqlite3
DEFAULT_KEEP = 10_000

log = logging.getLogger("modelyard.events")

# Append only: each entry takes the schema one version further (see StateDatabase).
MIGRATIONS = [
    """
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        time REAL NOT NULL,
        kind TEXT NOT NULL,
        model TEXT,
        reason TEXT NOT NULL DEFAULT '',
        duration_s REAL,
        data TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX events_by_model ON events (model, id)
    """,
]
_COLUMNS = "id, time, kind, model, reason, duration_s, data"


class EventStore:
    """Implements `events.EventArchive` on one state database, written by its own thread."""

    reads_block = True  # reads run SQL: call them off the event loop

    def __init__(self, database: StateDatabase, keep: int = DEFAULT_KEEP) -> None:
        self.database = database
        self.keep = max(1, keep)
        rows = database.query("SELECT MAX(id) AS last FROM events")
        self._last_id = int(rows[0]["last"] or 0)
        # Queued but not yet committed, by id; guarded by a lock as the writer thread
        # removes what it committed while readers (worker threads) copy it.
        self._unwritten: dict[int, Event] = {}
        self._unwritten_lock = threading.Lock()
        self._writer = QueuedWriter(database)

    @property
    def set_aside(self) -> list[SetAside]:
        """Damaged files this store moved out of the way (for the gateway to report)."""
        return self.database.set_aside

    @property
    def dropped(self) -> int:
        """Events lost: refused on a full queue, or not writable (see `QueuedWriter`)."""
        return self._writer.dropped

    def append(self, event: Event) -> None:
        """Queue `event` for writing; never waits for SQLite."""
        row = (
            event.id,
            event.time,
            event.kind,
            event.model,
            event.reason,
            event.duration_s,
            json.dumps(event.data, default=str),
        )

        def write(connection: sqlite3.Connection) -> None:
            connection.execute(
                f"INSERT OR REPLACE INTO events ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", row
            )
            # A range delete on the primary key: cheap enough to do on every insert.
            connection.execute("DELETE FROM events WHERE id <= ?", (event.id - self.keep,))

        def written(_committed: bool) -> None:
            # Committed, or given up and logged by the writer: either way no longer pending.
            with self._unwritten_lock:
                self._unwritten.pop(event.id, None)

        with self._unwritten_lock:
            self._unwritten[event.id] = event
        self._last_id = max(self._last_id, event.id)
        if not self._writer.submit(write, written):
            written(False)

    def recent(self, limit: int, model: str | None = None) -> list[Event]:
        if limit <= 0:
            return []
        pending = self._pending(model)  # before the read: a commit in between is seen there
        where, args = _model_filter(model)
        rows = self.database.query(
            f"SELECT {_COLUMNS} FROM events {where} ORDER BY id DESC LIMIT ?", (*args, limit)
        )
        return _merged([_event(row) for row in rows], pending)[-limit:]

    def after(self, event_id: int, limit: int, model: str | None = None) -> list[Event]:
        if limit <= 0:
            return []
        pending = [e for e in self._pending(model) if e.id > event_id]
        where, args = _model_filter(model)
        where = f"{where} AND id > ?" if where else "WHERE id > ?"
        rows = self.database.query(
            f"SELECT {_COLUMNS} FROM events {where} ORDER BY id LIMIT ?", (*args, event_id, limit)
        )
        return _merged([_event(row) for row in rows], pending)[:limit]

    def last_id(self) -> int:
        """The highest id appended or found at opening (from memory: no SQL)."""
        return self._last_id

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event appended so far is written (in a thread, not on the loop)."""
        return self._writer.flush(timeout)

    def count(self) -> int:
        """Events in the file, once the queued ones are written."""
        self.flush()
        return int(self.database.query("SELECT COUNT(*) AS n FROM events")[0]["n"])

    def close(self) -> None:
        """Write the queued events, then close the file (blocks: run it off the loop)."""
        self._writer.close()
        self.database.close()

    def _pending(self, model: str | None) -> list[Event]:
        with self._unwritten_lock:
            return [e for e in self._unwritten.values() if model is None or e.model == model]


def open_event_store(state_dir: Path, keep: int = DEFAULT_KEEP) -> EventStore | None:
    """The store under `state_dir`, or None (events then live in memory only) if unusable."""
    path = state_dir / f"{DATABASE_NAME}.sqlite3"
    try:
        return EventStore(StateDatabase(path, MIGRATIONS), keep)
    except (StateError, sqlite3.Error, OSError) as error:
        log.error(
            "cannot open the event history %s (%s); events are kept in memory only", path, error
        )
        return None


def _model_filter(model: str | None) -> tuple[str, tuple[Any, ...]]:
    return ("WHERE model = ?", (model,)) if model is not None else ("", ())


def _merged(stored: list[Event], pending: list[Event]) -> list[Event]:
    """Both lists as one, oldest first; an event in both (committed meanwhile) once."""
    by_id = {event.id: event for event in stored}
    by_id.update((event.id, event) for event in pending)
    return [by_id[key] for key in sorted(by_id)]


def _event(row: sqlite3.Row) -> Event:
    try:
        data = json.loads(row["data"])
    except ValueError:
        data = {}
    return Event(
        int(row["id"]),
        float(row["time"]),
        str(row["kind"]),
        row["model"],
        row["reason"] or "",
        row["duration_s"],
        data if isinstance(data, dict) else {},
    )
