"""What the pre-warming predictor learned, kept in the state dir so it survives restarts.

A small JSON file (the counts, not the requests), written from a thread every few minutes
and at shutdown, and read once at start-up. A damaged file is set aside: starting to learn
afresh is better than a gateway that will not start.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from modelyard.scheduler.predictor import Predictor

HABITS_NAME = "prewarm-habits.json"
SAVE_EVERY_S = 300.0  # a crash loses at most this much learning

log = logging.getLogger("modelyard.scheduler")


class HabitsFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._saved_at: float | None = None

    def read_into(self, predictor: Predictor) -> None:
        if not self.path.exists():
            return
        try:
            predictor.load(json.loads(self.path.read_text()))
        except (OSError, ValueError, KeyError, IndexError, TypeError) as error:
            aside = self.path.with_suffix(".damaged")
            log.warning(
                "pre-warm habits %s unreadable (%s); set aside as %s", self.path, error, aside
            )
            self.path.replace(aside)

    async def save(self, predictor: Predictor) -> None:
        text = json.dumps(predictor.to_dict())
        await asyncio.to_thread(self._write, text)

    def _write(self, text: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(text)
        temporary.replace(self.path)  # a reader never sees half a file

    async def save_every(self, predictor: Predictor, now: float) -> None:
        if self._saved_at is None:
            self._saved_at = now
        elif now - self._saved_at >= SAVE_EVERY_S:
            self._saved_at = now
            await self.save(predictor)
