"""One small SQLite database owned by one part of the gateway.

WAL mode with `synchronous=NORMAL`: a crash of the gateway loses nothing that was committed,
and readers never block the writer. Each write runs in one transaction (`write()`), so a crash
leaves the previous state or the new one. A file that is corrupt, unreadable or written by a
newer schema is set aside (renamed, logged, reported) and a fresh database is created; the same
happens when corruption is found later, during an operation, which then runs once on the fresh
file. A file locked by another process (a second gateway on the same state directory) is an
error, never set aside.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from modelyard.state.files import SetAside, SetAsideReport, set_aside

log = logging.getLogger("modelyard.state")

T = TypeVar("T")

# How long to wait for another connection's write lock before calling the file busy.
BUSY_TIMEOUT_MS = 5000
# Errors that mean "someone else holds this file": never a reason to move it aside.
_IN_USE = frozenset({"SQLITE_BUSY", "SQLITE_LOCKED"})
# Errors that mean the file itself is damaged, whenever they are seen.
_DAMAGED = frozenset({"SQLITE_CORRUPT", "SQLITE_NOTADB"})


class StateError(Exception):
    """The state file can be neither used nor set aside (e.g. the directory is read-only)."""


class _Unusable(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StateDatabase:
    """A SQLite connection with WAL, a schema version and atomic writes; safe across threads."""

    def __init__(
        self,
        path: Path,
        migrations: Sequence[str],
        report: SetAsideReport | None = None,
    ) -> None:
        """Open (or create) `path` and bring its schema to version `len(migrations)`.

        `migrations[i]` is the SQL script that takes the schema from version i to i + 1; only
        append to the list, never edit an entry that was released.
        """
        self.path = path
        self.set_aside: list[SetAside] = []  # files moved out of the way, oldest first
        self._migrations = list(migrations)
        self._report = report
        self._lock = threading.Lock()
        self._busy_timeout_ms = BUSY_TIMEOUT_MS
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._connection = _connect(path, self._migrations)
        except _Unusable as problem:
            self._connection = self._replace(problem.reason)

    def read(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        """Run `operation` (reads) on the connection."""
        with self._lock:
            return self._recovering(operation)

    def write(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        """Run `operation` in one transaction: all of its statements commit, or none."""

        def transaction(connection: sqlite3.Connection) -> T:
            connection.execute("BEGIN IMMEDIATE")
            try:
                result = operation(connection)
            except BaseException:
                # A damaged file may fail the rollback too; the first error is the one to see.
                with contextlib.suppress(sqlite3.Error):
                    connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
            return result

        with self._lock:
            return self._recovering(transaction)

    def query(self, sql: str, parameters: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return self.read(lambda connection: list(connection.execute(sql, parameters)))

    def set_busy_timeout(self, milliseconds: int) -> None:
        """How long SQLite waits for another connection's lock before SQLITE_BUSY (for a caller
        that retries by itself; the default is `BUSY_TIMEOUT_MS`)."""
        with self._lock:
            self._busy_timeout_ms = int(milliseconds)
            self._connection.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    def _recovering(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return operation(self._connection)
        except sqlite3.DatabaseError as error:
            if _error_name(error) not in _DAMAGED:
                raise
            # Damage found after opening (a disk error, a stray write): set the file aside,
            # start a fresh one, and do the operation once more there.
            self._connection.close()
            self._connection = self._replace(f"{type(error).__name__}: {error}")
            return operation(self._connection)

    def _replace(self, reason: str) -> sqlite3.Connection:
        try:
            record = set_aside(self.path, reason, self._report)
        except OSError as error:
            raise StateError(
                f"state file {self.path} is unusable ({reason}) and could not be moved aside: "
                f"{error}"
            ) from None
        self.set_aside.append(record)
        try:
            connection = _connect(self.path, self._migrations)
        except _Unusable as again:
            raise StateError(f"cannot create state file {self.path}: {again.reason}") from None
        connection.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        return connection


def _connect(path: Path, migrations: Sequence[str]) -> sqlite3.Connection:
    """Open, check and migrate; raises `_Unusable` for a file that should be set aside."""
    existed = path.exists() or path.is_symlink()
    connection: sqlite3.Connection | None = None
    try:
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
        connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        connection.row_factory = sqlite3.Row
        connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_MS)}")
        mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise _Unusable(f"cannot switch to WAL mode (journal mode is {mode})")
        connection.execute("PRAGMA synchronous = NORMAL")
        check = connection.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise _Unusable(f"integrity check failed: {check}")
        version = int(connection.execute("PRAGMA user_version").fetchone()[0])
        if version > len(migrations):
            raise _Unusable(
                f"written by a newer modelyard (schema {version}; this one knows {len(migrations)})"
            )
        for number in range(version, len(migrations)):
            # The migration and its version bump commit together.
            connection.executescript(
                f"BEGIN IMMEDIATE;\n{migrations[number]};\nPRAGMA user_version = {number + 1};\n"
                "COMMIT;"
            )
        return connection
    except sqlite3.Error as error:
        if connection is not None:
            connection.close()
        if _error_name(error) in _IN_USE:
            raise StateError(f"state file {path} is in use by another process: {error}") from None
        if not existed:
            raise StateError(f"cannot create state file {path}: {error}") from None
        raise _Unusable(f"{type(error).__name__}: {error}") from None
    except _Unusable:
        if connection is not None:
            connection.close()
        raise


def in_use(error: BaseException) -> bool:
    """Whether `error` means another connection holds the file (wait and try again)."""
    return isinstance(error, sqlite3.Error) and _error_name(error) in _IN_USE


def _error_name(error: sqlite3.Error) -> str:
    return str(getattr(error, "sqlite_errorname", "") or "")
