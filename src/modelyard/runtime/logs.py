"""An engine's output: the last lines in memory (for errors and the dashboard) and a log file."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from pathlib import Path
from typing import IO

from modelyard.redaction import redact

LineListener = Callable[[str], None]


class EngineLog:
    """Keeps the last `capacity` lines and appends every line to a file."""

    def __init__(self, path: Path | None, capacity: int = 1000) -> None:
        self._lines: collections.deque[str] = collections.deque(maxlen=capacity)
        self._listeners: list[LineListener] = []
        self._file: IO[str] | None = None
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", encoding="utf-8", errors="replace", buffering=1)

    def append(self, line: str) -> None:
        # Engines print their own command lines and settings: secrets from `${env:}` and `env:`
        # are masked before the line is kept, written or shown anywhere.
        line = redact(line.rstrip("\r\n"))
        self._lines.append(line)
        if self._file is not None:
            self._file.write(line + "\n")
        for listener in list(self._listeners):
            listener(line)

    def tail(self, count: int = 20) -> list[str]:
        if count <= 0:
            return []
        return list(self._lines)[-count:]

    def subscribe(self, listener: LineListener) -> Callable[[], None]:
        """Call `listener` for every new line; returns the function that unsubscribes."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


async def pump_lines(stream: asyncio.StreamReader, append: Callable[[str], None]) -> None:
    """Hand a process's output to `append` line by line (without the line end) until it closes.

    Used by the gateway for its own engines and by a Ray node for the engines it runs.
    """
    while True:
        try:
            raw = await stream.readline()
        except ValueError:
            # A line longer than the stream's limit: take what is buffered as one line.
            raw = await stream.read(64 * 1024)
        if not raw:
            return
        append(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
