"""The event bus and its SQLite history, in-process."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from modelyard.observability.event_store import EventStore, open_event_store
from modelyard.observability.events import Event, EventBus, MemoryArchive


def test_history_survives_reopening_and_ids_keep_growing(tmp_path: Path) -> None:
    store = open_event_store(tmp_path)
    assert store is not None
    bus = EventBus(archive=store)
    bus.emit("start", "chat", "request")
    bus.emit("ready", "chat", "started", 1.5, port=1234)
    bus.emit("start", "coder", "admin load")
    store.close()

    again = open_event_store(tmp_path)
    assert again is not None
    bus = EventBus(archive=again)
    assert [(e.id, e.kind, e.model) for e in bus.recent(10)] == [
        (1, "start", "chat"),
        (2, "ready", "chat"),
        (3, "start", "coder"),
    ]
    ready = bus.recent(10)[1]
    assert ready.duration_s == 1.5
    assert ready.data == {"port": 1234}
    assert bus.emit("stop", "chat", "idle").id == 4  # never reuses an id from before
    assert [e.id for e in bus.after(2)] == [3, 4]
    assert [e.id for e in bus.after(1, model="chat")] == [2, 4]
    assert [e.id for e in bus.recent(1, model="chat")] == [4]
    assert bus.recent(0) == []
    again.close()


def test_history_is_bounded(tmp_path: Path) -> None:
    store = open_event_store(tmp_path, keep=5)
    assert store is not None
    bus = EventBus(archive=store)
    for number in range(12):
        bus.emit("start", "chat", f"request {number}")
    assert store.count() == 5
    assert [e.id for e in bus.recent(100)] == [8, 9, 10, 11, 12]
    assert bus.last_id() == 12
    store.close()


def test_damaged_history_is_set_aside_and_a_new_one_started(tmp_path: Path) -> None:
    (tmp_path / "events.sqlite3").write_bytes(b"this is not a database" * 100)
    store = open_event_store(tmp_path)
    assert store is not None
    assert len(store.set_aside) == 1
    assert store.set_aside[0].moved_to.exists()
    bus = EventBus(archive=store)
    assert bus.emit("start", "chat").id == 1
    store.close()


def test_unusable_state_dir_keeps_events_in_memory(tmp_path: Path, caplog) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.ERROR):
        assert open_event_store(blocker) is None
    assert "kept in memory only" in caplog.text


def test_a_failing_sink_or_archive_never_breaks_emit(caplog) -> None:
    class BrokenArchive(MemoryArchive):
        def append(self, event: Event) -> None:
            raise OSError("disk full")

    bus = EventBus(archive=BrokenArchive())
    seen: list[str] = []

    def broken(event: Event) -> None:
        raise RuntimeError("bug in a sink")

    bus.add_sink(broken)
    bus.add_sink(lambda event: seen.append(event.kind))
    queue = bus.subscribe()
    with caplog.at_level(logging.ERROR):
        event = bus.emit("crash", "chat", "exit code 1")
    assert seen == ["crash"]
    assert queue.get_nowait() is event
    assert "disk full" in caplog.text
    assert "bug in a sink" in caplog.text


def test_slow_subscriber_loses_oldest_events_only() -> None:
    bus = EventBus()
    queue = bus.subscribe(maxsize=2)
    for kind in ("a", "b", "c"):
        bus.emit(kind, None)
    assert [queue.get_nowait().kind for _ in range(2)] == ["b", "c"]
    bus.unsubscribe(queue)
    bus.emit("d", None)
    assert queue.empty()


@pytest.mark.parametrize("archive", ["memory", "sqlite"])
def test_both_archives_answer_the_same(tmp_path: Path, archive: str) -> None:
    store: EventStore | MemoryArchive | None = (
        MemoryArchive(100) if archive == "memory" else open_event_store(tmp_path)
    )
    assert store is not None
    bus = EventBus(archive=store)
    for model in ("a", "b", "a", None, "a"):
        bus.emit("start", model)
    assert [e.id for e in bus.recent(2, model="a")] == [3, 5]
    assert [e.id for e in bus.after(1, limit=2)] == [2, 3]
    assert [e.id for e in bus.after(5)] == []
    assert bus.last_id() == 5
