"""The event history in SQLite under the state dir: bounded, and it survives gateway restarts.

Events are rare (a start, a crash, a sleep), so each is written at once on the event loop:
`state.StateDatabase` runs SQLite in WAL mode with `synchronous=NORMAL`, where a commit is a
buffered append, not an fsync. Only the last `keep` events are kept, so the file cannot grow
without end on a crash-looping engine. A damaged file is set aside by `StateDatabase` and a
new history starts: losing old events is better than a gateway that will not start.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

from modelyard.observability.events import Event
from modelyard.state import SetAside, StateDatabase, StateError

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
    """Implements `events.EventArchive` on one state database."""

    def __init__(self, database: StateDatabase, keep: int = DEFAULT_KEEP) -> None:
        self.database = database
        self.keep = max(1, keep)

    @property
    def set_aside(self) -> list[SetAside]:
        """Damaged files this store moved out of the way (for the gateway to report)."""
        return self.database.set_aside

    def append(self, event: Event) -> None:
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

        self.database.write(write)

    def recent(self, limit: int, model: str | None = None) -> list[Event]:
        if limit <= 0:
            return []
        where, args = _model_filter(model)
        rows = self.database.query(
            f"SELECT {_COLUMNS} FROM events {where} ORDER BY id DESC LIMIT ?", (*args, limit)
        )
        return [_event(row) for row in reversed(rows)]

    def after(self, event_id: int, limit: int, model: str | None = None) -> list[Event]:
        if limit <= 0:
            return []
        where, args = _model_filter(model)
        where = f"{where} AND id > ?" if where else "WHERE id > ?"
        rows = self.database.query(
            f"SELECT {_COLUMNS} FROM events {where} ORDER BY id LIMIT ?", (*args, event_id, limit)
        )
        return [_event(row) for row in rows]

    def last_id(self) -> int:
        rows = self.database.query("SELECT MAX(id) AS last FROM events")
        return int(rows[0]["last"] or 0)

    def count(self) -> int:
        return int(self.database.query("SELECT COUNT(*) AS n FROM events")[0]["n"])

    def close(self) -> None:
        self.database.close()


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
