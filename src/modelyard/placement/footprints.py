"""Measured engine footprints, persisted in SQLite under the state dir, and estimates for the rest.

A footprint belongs to a model *and* an engine configuration: vLLM's memory depends on its
arguments (`--max-model-len`, quantization, `--kv-cache-memory-bytes`), so a changed `args`
is a new fingerprint and starts unknown (issue 4). The seed 004 kept one number per model in a
JSON file, rewritten in place; here every measurement is a row written in a transaction, and
the summary is computed on read from the last `window` samples:

- bytes: the largest recent sample. Underestimating memory means an OOM at the next start;
  overestimating only packs a little less tightly.
- seconds: an exponential moving average of recent samples, so a warm file cache (the seed
  000 saw starts 5-10 s faster) shows up soon, and one slow start does not dominate.

A corrupt or unreadable database is renamed aside (`<file>.corrupt-<UTC time>`) and reported
through `on_corrupt`, the log and `recovered`; the store then starts empty. Footprints can be
measured again, so they are not worth refusing to start over, but they are never dropped
silently either.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

_log = logging.getLogger(__name__)

GIB = 1024**3
FILE_NAME = "footprints.sqlite3"
SCHEMA_VERSION = 1

# Flags and variables that change from one start to the next without changing the footprint:
# the port the gateway picks, and the budget and GPU that placement decides (engines/vllm.py).
VOLATILE_FLAGS = frozenset({"--port", "--host", "--gpu-memory-utilization"})
VOLATILE_ENV = frozenset({"CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"})

# sqlite3 result codes that mean the file itself is bad (not merely busy or locked).
_CORRUPT_CODES = frozenset({"SQLITE_CORRUPT", "SQLITE_NOTADB"})
_UNREADABLE_CODES = frozenset({"SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_IOERR"})

Metric = Literal["awake_bytes", "asleep_bytes", "start_seconds", "wake_seconds"]
_METRICS: tuple[Metric, ...] = ("awake_bytes", "asleep_bytes", "start_seconds", "wake_seconds")

T = TypeVar("T")


class FootprintStoreError(Exception):
    """The store cannot be opened even after moving a bad file aside."""


@dataclass(frozen=True)
class Footprint:
    """What was measured for one model under one engine configuration."""

    model: str
    fingerprint: str
    awake_bytes_per_gpu: int | None
    asleep_bytes_per_gpu: int | None
    start_seconds: float | None
    wake_seconds: float | None
    samples: int
    updated_at: float


def engine_fingerprint(
    argv: Sequence[str],
    env: Mapping[str, str],
    model_path: str | None,
    *,
    port: int | None = None,
) -> str:
    """A short hash of what decides an engine's footprint: argv (less the port and the
    gateway's budget flags), the engine's own env (not the gateway's), and the model path.

    `env` is the engine-specific environment (the launch spec's), not `os.environ`: a changed
    PATH is not a new footprint. Secrets in it are hashed, never stored.
    """
    kept: list[str] = []
    skip_value = False
    for arg in argv:
        if skip_value:
            skip_value = False
            continue
        flag = arg.split("=", 1)[0]
        if flag in VOLATILE_FLAGS:
            skip_value = "=" not in arg
            continue
        if port is not None:
            # Engines of kind `command` put {port} anywhere: "--listen=127.0.0.1:8123".
            text = str(port)
            if arg == text:
                arg = "{port}"
            elif arg.endswith((f":{text}", f"={text}")):
                arg = arg[: -len(text)] + "{port}"
        kept.append(arg)
    payload = {
        "argv": kept,
        "env": sorted((k, v) for k, v in env.items() if k not in VOLATILE_ENV),
        "model": model_path,
    }
    digest = hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode())
    return digest.hexdigest()[:16]


class FootprintStore:
    """Footprints in `<state_dir>/footprints.sqlite3` (WAL mode; safe across threads)."""

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        window: int = 8,
        smoothing: float = 0.4,
        on_corrupt: Callable[[Path, str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(state_dir) / FILE_NAME
        self.window = window
        self.smoothing = smoothing
        self.recovered: list[Path] = []  # files moved aside, newest last
        self._on_corrupt = on_corrupt
        self._clock = clock
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = self._open_or_recover()

    # ----- public -----

    def record(
        self,
        model: str,
        fingerprint: str,
        *,
        awake_bytes_per_gpu: int | None = None,
        asleep_bytes_per_gpu: int | None = None,
        start_seconds: float | None = None,
        wake_seconds: float | None = None,
    ) -> Footprint:
        """Add the measurements given (all in one transaction) and return the new summary."""
        values: dict[Metric, float | None] = {
            "awake_bytes": awake_bytes_per_gpu,
            "asleep_bytes": asleep_bytes_per_gpu,
            "start_seconds": start_seconds,
            "wake_seconds": wake_seconds,
        }
        for metric, value in values.items():
            if value is not None and value < 0:
                raise ValueError(f"{metric} cannot be negative: {value}")
        at = self._clock()

        def write(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                for metric, value in values.items():
                    if value is None:
                        continue
                    conn.execute(
                        "INSERT INTO samples (model, fingerprint, metric, value, at)"
                        " VALUES (?, ?, ?, ?, ?)",
                        (model, fingerprint, metric, float(value), at),
                    )
                    conn.execute(
                        "DELETE FROM samples WHERE model = ? AND fingerprint = ? AND metric = ?"
                        " AND id NOT IN (SELECT id FROM samples WHERE model = ? AND"
                        " fingerprint = ? AND metric = ? ORDER BY id DESC LIMIT ?)",
                        (model, fingerprint, metric, model, fingerprint, metric, self.window),
                    )

        self._run(write)
        found = self.get(model, fingerprint)
        assert found is not None or all(v is None for v in values.values())
        return found or Footprint(model, fingerprint, None, None, None, None, 0, at)

    def get(self, model: str, fingerprint: str) -> Footprint | None:
        """The summary for this model and configuration, or None if never measured."""

        def read(conn: sqlite3.Connection) -> list[tuple[str, float, float]]:
            return conn.execute(
                "SELECT metric, value, at FROM samples WHERE model = ? AND fingerprint = ?"
                " ORDER BY id",
                (model, fingerprint),
            ).fetchall()

        rows = self._run(read)
        return self._summary(model, fingerprint, rows) if rows else None

    def all(self) -> list[Footprint]:
        """Every stored footprint, for `/gateway/status` and `modelyard check`."""

        def read(conn: sqlite3.Connection) -> list[tuple[str, str, str, float, float]]:
            return conn.execute(
                "SELECT model, fingerprint, metric, value, at FROM samples"
                " ORDER BY model, fingerprint, id"
            ).fetchall()

        grouped: dict[tuple[str, str], list[tuple[str, float, float]]] = {}
        for model, fingerprint, metric, value, at in self._run(read):
            grouped.setdefault((model, fingerprint), []).append((metric, value, at))
        return [self._summary(m, f, rows) for (m, f), rows in grouped.items()]

    def forget(self, model: str, fingerprint: str | None = None) -> int:
        """Delete a model's footprints (one configuration, or all); returns samples deleted."""

        def delete(conn: sqlite3.Connection) -> int:
            with _transaction(conn):
                if fingerprint is None:
                    cursor = conn.execute("DELETE FROM samples WHERE model = ?", (model,))
                else:
                    cursor = conn.execute(
                        "DELETE FROM samples WHERE model = ? AND fingerprint = ?",
                        (model, fingerprint),
                    )
                return cursor.rowcount

        return self._run(delete)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # ----- summaries -----

    def _summary(
        self, model: str, fingerprint: str, rows: Sequence[tuple[str, float, float]]
    ) -> Footprint:
        series: dict[str, list[float]] = {metric: [] for metric in _METRICS}
        for metric, value, _ in rows:
            series.setdefault(metric, []).append(value)

        def peak(metric: str) -> int | None:
            return int(max(series[metric])) if series[metric] else None

        def average(metric: str) -> float | None:
            values = series[metric]
            if not values:
                return None
            mean = values[0]
            for value in values[1:]:
                mean += self.smoothing * (value - mean)
            return mean

        return Footprint(
            model=model,
            fingerprint=fingerprint,
            awake_bytes_per_gpu=peak("awake_bytes"),
            asleep_bytes_per_gpu=peak("asleep_bytes"),
            start_seconds=average("start_seconds"),
            wake_seconds=average("wake_seconds"),
            samples=len(rows),
            updated_at=max(at for _, _, at in rows),
        )

    # ----- the file, and what to do when it is bad -----

    def _run(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            try:
                return operation(self._conn)
            except sqlite3.DatabaseError as error:
                if _error_name(error) not in _CORRUPT_CODES:
                    raise
                # Corruption found after opening (a disk error, a stray write): move the file
                # aside, start empty, and do the operation once on the fresh file.
                self._conn.close()
                self._quarantine(error)
                self._conn = self._open()
                return operation(self._conn)

    def _open_or_recover(self) -> sqlite3.Connection:
        try:
            return self._open()
        except sqlite3.DatabaseError as error:
            name = _error_name(error)
            bad_file = name in _CORRUPT_CODES or (
                name in _UNREADABLE_CODES and os.path.lexists(self.path)
            )
            if not bad_file:
                raise FootprintStoreError(f"cannot open {self.path}: {error}") from error
            self._quarantine(error)
        try:
            return self._open()
        except sqlite3.DatabaseError as error:
            raise FootprintStoreError(
                f"cannot open {self.path} even after moving the bad file aside: {error}"
            ) from error

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=10.0, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: atomic, durable on commit
            status = conn.execute("PRAGMA quick_check").fetchone()[0]
            if status != "ok":
                raise _FailedCheck(f"quick_check failed: {status}")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise FootprintStoreError(
                    f"{self.path} has schema version {version}, newer than this modelyard's "
                    f"({SCHEMA_VERSION}); refusing to change it"
                )
            with _transaction(conn):
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS samples ("
                    " id INTEGER PRIMARY KEY AUTOINCREMENT,"
                    " model TEXT NOT NULL,"
                    " fingerprint TEXT NOT NULL,"
                    " metric TEXT NOT NULL CHECK (metric IN"
                    " ('awake_bytes', 'asleep_bytes', 'start_seconds', 'wake_seconds')),"
                    " value REAL NOT NULL,"
                    " at REAL NOT NULL)"
                )
                conn.execute(
                    "CREATE INDEX IF NOT EXISTS samples_by_key"
                    " ON samples (model, fingerprint, metric, id)"
                )
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _quarantine(self, error: sqlite3.DatabaseError) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._clock()))
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        counter = 1
        while os.path.lexists(target):
            counter += 1
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{counter}")
        try:
            os.replace(self.path, target)
        except OSError as move_error:
            raise FootprintStoreError(
                f"{self.path} is unusable ({error}) and could not be moved aside: {move_error}"
            ) from error
        for suffix in ("-wal", "-shm"):
            companion = Path(f"{self.path}{suffix}")
            if os.path.lexists(companion):
                with contextlib.suppress(OSError):
                    os.replace(companion, Path(f"{target}{suffix}"))
        message = f"footprint database {self.path} is unusable ({error}); moved to {target}"
        _log.error(message)
        self.recovered.append(target)
        if self._on_corrupt is not None:
            self._on_corrupt(target, str(error))


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error: a write is all or nothing."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class _FailedCheck(sqlite3.DatabaseError):
    """The file opens but SQLite's own check finds it damaged."""


def _error_name(error: sqlite3.Error) -> str:
    if isinstance(error, _FailedCheck):
        return "SQLITE_CORRUPT"
    return str(getattr(error, "sqlite_errorname", "") or "")
