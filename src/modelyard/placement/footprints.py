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

A corrupt or unreadable database, or one written by a newer modelyard, is renamed aside
(`<file>.corrupt-<time>`) by the shared state helper and reported through `on_corrupt`, the
log and `recovered`; the store then starts empty. Footprints can be measured again, so they
are not worth refusing to start over, but they are never dropped silently either.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from modelyard.state.database import StateDatabase, StateError
from modelyard.state.files import SetAside

GIB = 1024**3
FILE_NAME = "footprints.sqlite3"
# Append only: migrations[i] takes the schema from version i to i + 1.
MIGRATIONS = [
    "CREATE TABLE IF NOT EXISTS samples ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " model TEXT NOT NULL,"
    " fingerprint TEXT NOT NULL,"
    " metric TEXT NOT NULL CHECK (metric IN"
    " ('awake_bytes', 'asleep_bytes', 'start_seconds', 'wake_seconds')),"
    " value REAL NOT NULL,"
    " at REAL NOT NULL);"
    " CREATE INDEX IF NOT EXISTS samples_by_key ON samples (model, fingerprint, metric, id)"
]

# Flags and variables that change from one start to the next without changing the footprint:
# the port the gateway picks, and the budget and GPU that placement decides (engines/vllm.py).
VOLATILE_FLAGS = frozenset({"--port", "--host", "--gpu-memory-utilization"})
VOLATILE_ENV = frozenset({"CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"})

Metric = Literal["awake_bytes", "asleep_bytes", "start_seconds", "wake_seconds"]
_METRICS: tuple[Metric, ...] = ("awake_bytes", "asleep_bytes", "start_seconds", "wake_seconds")


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
    """Footprints in `<state_dir>/footprints.sqlite3`, through the shared state helper
    (`modelyard.state.StateDatabase`: WAL, one transaction per write, a bad file set aside)."""

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
        self._on_corrupt = on_corrupt
        self._clock = clock
        try:
            self._db = StateDatabase(self.path, MIGRATIONS, report=self._report)
        except StateError as error:
            raise FootprintStoreError(str(error)) from error

    @property
    def recovered(self) -> list[Path]:
        """Files moved aside, oldest first."""
        return [record.moved_to for record in self._db.set_aside]

    def _report(self, record: SetAside) -> None:
        if self._on_corrupt is not None:
            self._on_corrupt(record.moved_to, record.reason)

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

        self._db.write(write)
        found = self.get(model, fingerprint)
        assert found is not None or all(v is None for v in values.values())
        return found or Footprint(model, fingerprint, None, None, None, None, 0, at)

    def get(self, model: str, fingerprint: str) -> Footprint | None:
        """The summary for this model and configuration, or None if never measured."""
        rows = self._db.query(
            "SELECT metric, value, at FROM samples WHERE model = ? AND fingerprint = ? ORDER BY id",
            (model, fingerprint),
        )
        triples = [(str(r[0]), float(r[1]), float(r[2])) for r in rows]
        return self._summary(model, fingerprint, triples) if triples else None

    def all(self) -> list[Footprint]:
        """Every stored footprint, for `/gateway/status` and `modelyard check`."""
        rows = self._db.query(
            "SELECT model, fingerprint, metric, value, at FROM samples"
            " ORDER BY model, fingerprint, id"
        )
        grouped: dict[tuple[str, str], list[tuple[str, float, float]]] = {}
        for model, fingerprint, metric, value, at in rows:
            grouped.setdefault((model, fingerprint), []).append((metric, value, at))
        return [self._summary(m, f, rows) for (m, f), rows in grouped.items()]

    def forget(self, model: str, fingerprint: str | None = None) -> int:
        """Delete a model's footprints (one configuration, or all); returns samples deleted."""

        def delete(conn: sqlite3.Connection) -> int:
            if fingerprint is None:
                cursor = conn.execute("DELETE FROM samples WHERE model = ?", (model,))
            else:
                cursor = conn.execute(
                    "DELETE FROM samples WHERE model = ? AND fingerprint = ?",
                    (model, fingerprint),
                )
            return cursor.rowcount

        return self._db.write(delete)

    def close(self) -> None:
        self._db.close()

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
