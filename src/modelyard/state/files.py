"""Atomic file writes, and setting a damaged state file aside instead of deleting it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("modelyard.state")


@dataclass(frozen=True)
class SetAside:
    """A state file that could not be used and was moved out of the way (kept for a human)."""

    path: Path  # where it was
    moved_to: Path  # where it is now
    reason: str

    def describe(self) -> str:
        return f"state file {self.path} could not be used ({self.reason}); moved to {self.moved_to}"


SetAsideReport = Callable[[SetAside], None]


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so a crash leaves either the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    # The rename itself is only durable once the directory entry is on disk.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def set_aside(path: Path, reason: str, report: SetAsideReport | None = None) -> SetAside:
    """Rename `path` (and SQLite's -wal/-shm companions) to `path.corrupt-<time>`; log, report."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    moved_to = path.with_name(f"{path.name}.corrupt-{stamp}")
    number = 1
    while moved_to.exists():
        number += 1
        moved_to = path.with_name(f"{path.name}.corrupt-{stamp}-{number}")
    os.replace(path, moved_to)
    for suffix in ("-wal", "-shm"):
        companion = path.with_name(path.name + suffix)
        if companion.exists():
            os.replace(companion, moved_to.with_name(moved_to.name + suffix))
    record = SetAside(path, moved_to, reason)
    log.error("%s", record.describe())
    if report is not None:
        report(record)
    return record


def read_json(path: Path, report: SetAsideReport | None = None) -> Any | None:
    """The JSON document at `path`; None when absent, or when damaged (then it is set aside)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        set_aside(path, f"unreadable: {error.strerror or error}", report)
        return None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError) as error:
        set_aside(path, f"not valid JSON: {error}", report)
        return None
