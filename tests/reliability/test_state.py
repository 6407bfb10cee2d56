"""The state helper: WAL, atomic writes, and damaged files set aside and reported."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from modelyard.state import SetAside, StateDatabase, StateDirectory, StateError
from modelyard.state.files import read_json, write_atomic

SCHEMA = ["CREATE TABLE items (name TEXT PRIMARY KEY, value INTEGER NOT NULL)"]
SCHEMA_V2 = [*SCHEMA, "ALTER TABLE items ADD COLUMN note TEXT"]


def put(database: StateDatabase, name: str, value: int) -> None:
    database.write(lambda c: c.execute("INSERT OR REPLACE INTO items VALUES (?, ?)", (name, value)))


def items(database: StateDatabase) -> dict[str, int]:
    return {row["name"]: row["value"] for row in database.query("SELECT * FROM items")}


def test_wal_schema_and_values_survive_reopening(tmp_path: Path):
    path = tmp_path / "s.sqlite3"
    database = StateDatabase(path, SCHEMA)
    assert database.query("PRAGMA journal_mode")[0][0] == "wal"
    put(database, "a", 1)
    database.close()
    again = StateDatabase(path, SCHEMA_V2)  # a migration is applied on open
    assert items(again) == {"a": 1}
    assert again.query("PRAGMA user_version")[0][0] == 2
    assert again.set_aside == []


def test_a_failed_write_changes_nothing(tmp_path: Path):
    database = StateDatabase(tmp_path / "s.sqlite3", SCHEMA)
    put(database, "a", 1)

    def half_then_fail(connection: sqlite3.Connection) -> None:
        connection.execute("UPDATE items SET value = 2 WHERE name = 'a'")
        connection.execute("INSERT INTO items VALUES ('b', 3)")
        raise RuntimeError("crash in the middle")

    with pytest.raises(RuntimeError):
        database.write(half_then_fail)
    assert items(database) == {"a": 1}


def test_a_killed_writer_leaves_the_last_commit(tmp_path: Path):
    path = tmp_path / "s.sqlite3"
    StateDatabase(path, SCHEMA).close()
    # A process that commits one row, then dies (SIGKILL) in the middle of a transaction.
    script = f"""
import os, sqlite3
c = sqlite3.connect({str(path)!r}, isolation_level=None)
c.execute("INSERT INTO items VALUES ('kept', 1)")
c.execute("BEGIN IMMEDIATE")
c.execute("INSERT INTO items VALUES ('lost', 2)")
os.kill(os.getpid(), 9)
"""
    subprocess.run([sys.executable, "-c", script], check=False, timeout=30)
    assert items(StateDatabase(path, SCHEMA)) == {"kept": 1}


@pytest.mark.parametrize(
    "damage",
    [
        b"this is not a database at all" * 100,
        b"SQLite format 3\x00" + b"\xff" * 4000,  # a header, then garbage
    ],
)
def test_a_corrupt_file_is_set_aside_and_reported(tmp_path: Path, damage: bytes):
    path = tmp_path / "s.sqlite3"
    path.write_bytes(damage)
    reports: list[SetAside] = []
    database = StateDatabase(path, SCHEMA, reports.append)
    assert len(reports) == 1
    moved = reports[0].moved_to
    assert moved.name.startswith("s.sqlite3.corrupt-")
    assert moved.read_bytes() == damage  # kept for a human, byte for byte
    assert database.set_aside == reports
    put(database, "fresh", 1)  # and the new file works
    assert items(database) == {"fresh": 1}


def test_damage_found_after_opening_sets_the_file_aside_and_retries_once(tmp_path: Path):
    path = tmp_path / "s.sqlite3"
    reports: list[SetAside] = []
    database = StateDatabase(path, SCHEMA, reports.append)
    put(database, "old", 1)
    calls = []

    def read_damaged_page(connection: sqlite3.Connection) -> dict[str, int]:
        calls.append(connection)
        if len(calls) == 1:
            # What SQLite raises when a page read from disk does not make sense.
            error = sqlite3.DatabaseError("database disk image is malformed")
            error.sqlite_errorname = "SQLITE_CORRUPT"  # type: ignore[attr-defined]
            raise error
        return {row["name"]: row["value"] for row in connection.execute("SELECT * FROM items")}

    assert database.read(read_damaged_page) == {}  # ran again, on a fresh file
    assert len(calls) == 2
    assert len(reports) == 1
    assert "malformed" in reports[0].reason
    assert items(StateDatabase(reports[0].moved_to, SCHEMA)) == {"old": 1}  # kept aside

    def locked(connection: sqlite3.Connection) -> None:
        error = sqlite3.OperationalError("database is locked")
        error.sqlite_errorname = "SQLITE_BUSY"  # type: ignore[attr-defined]
        raise error

    with pytest.raises(sqlite3.OperationalError):
        database.read(locked)  # busy is not damage: nothing is moved
    assert len(reports) == 1


def test_a_newer_schema_is_set_aside_not_overwritten(tmp_path: Path):
    path = tmp_path / "s.sqlite3"
    StateDatabase(path, SCHEMA_V2).close()
    reports: list[SetAside] = []
    database = StateDatabase(path, SCHEMA, reports.append)
    assert "newer modelyard" in reports[0].reason
    assert StateDatabase(reports[0].moved_to, SCHEMA_V2).query("PRAGMA user_version")[0][0] == 2
    assert items(database) == {}


def test_an_unreadable_path_is_set_aside(tmp_path: Path):
    path = tmp_path / "s.sqlite3"
    path.mkdir()  # a directory where the file should be: SQLite cannot open it
    reports: list[SetAside] = []
    StateDatabase(path, SCHEMA, reports.append)
    assert len(reports) == 1
    assert reports[0].moved_to.is_dir()


def test_a_file_in_use_by_another_process_is_an_error_not_set_aside(tmp_path, monkeypatch):
    import modelyard.state.database as module

    monkeypatch.setattr(module, "BUSY_TIMEOUT_MS", 100)
    path = tmp_path / "s.sqlite3"
    StateDatabase(path, SCHEMA).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA journal_mode = DELETE")  # leaves WAL: needs an exclusive lock
    holder.execute("BEGIN EXCLUSIVE")
    reports: list[SetAside] = []
    try:
        with pytest.raises(StateError, match="in use"):
            StateDatabase(path, SCHEMA, reports.append)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert reports == []
    assert path.exists()


def test_an_unwritable_directory_is_a_clear_error(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises((StateError, OSError)):
        StateDatabase(blocker / "s.sqlite3", SCHEMA)


def test_writes_from_threads_are_serialised(tmp_path: Path):
    database = StateDatabase(tmp_path / "s.sqlite3", SCHEMA)
    put(database, "n", 0)

    def bump() -> None:
        for _ in range(50):
            database.write(
                lambda c: c.execute("UPDATE items SET value = value + 1 WHERE name = 'n'")
            )

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert items(database) == {"n": 200}


def test_state_directory_reports_every_set_aside_file(tmp_path: Path):
    reports: list[SetAside] = []
    state = StateDirectory(tmp_path / "state", reports.append)
    (state.path / "usage.sqlite3").write_bytes(b"garbage" * 1000)
    state.database("usage", SCHEMA)
    (state.path / "plan.json").write_text("{not json")
    assert read_json(state.path / "plan.json", state.note) is None
    assert [r.path.name for r in reports] == ["usage.sqlite3", "plan.json"]
    assert state.set_aside == reports


def test_write_atomic_replaces_whole_files(tmp_path: Path):
    path = tmp_path / "deep" / "doc.json"
    write_atomic(path, b'{"a": 1}')
    write_atomic(path, json.dumps({"a": 2}).encode())
    assert read_json(path) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["doc.json"]  # no temp file left
    assert read_json(tmp_path / "absent.json") is None


async def test_the_gateway_sets_a_corrupt_state_file_aside_and_says_so(gateway_factory):
    import aiohttp

    from tests.conftest import fake_model
    from tests.reliability.running import restart

    gateway = gateway_factory({"chat": fake_model("chat")})
    gateway.stop()
    usage = gateway.state_dir / "key_usage.sqlite3"
    assert usage.exists()
    for companion in gateway.state_dir.glob("key_usage.sqlite3-*"):
        companion.unlink()
    usage.write_bytes(b"garbage" * 1000)
    history = gateway.state_dir / "events.sqlite3"
    for companion in gateway.state_dir.glob("events.sqlite3-*"):
        companion.unlink()
    history.write_bytes(b"\x00" * 100 + b"not a database" * 100)
    again = restart(gateway)
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(again.url + "/admin/events?follow=0&recent=100") as response,
        ):
            events = (await response.json())["events"]
        reports = {
            Path(e["data"]["path"]).name: Path(e["data"]["moved_to"])
            for e in events
            if e["kind"] == "state_file_corrupt"
        }
        assert set(reports) == {"key_usage.sqlite3", "events.sqlite3"}
        assert reports["key_usage.sqlite3"].read_bytes() == b"garbage" * 1000
        assert reports["events.sqlite3"].exists()
        assert "key_usage.sqlite3 could not be used" in again.log_text()
        assert again.status()["models"][0]["state"] == "stopped"  # and it serves on
    finally:
        again.stop()
