"""Where the gateway's log lines go: stderr, a turn of the event loop's lines in one write.

At one line per proxied request, a `logging.StreamHandler` makes one write (and flush) per
request; measured at c=64, a request's log line cost more than half of the rest of its
handling. Here routine lines (below WARNING) written on the event loop's thread wait until
the end of the loop's turn and go out together. A warning or an error, a line from another
thread or from outside an event loop, and a flush (at exit, or when the handler is
replaced) write at once, after what is waiting, so lines keep their order.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TextIO

MAX_WAITING = 256  # lines; a turn that logs more writes them as it goes


class TurnBufferedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._waiting: list[str] = []
        self._flush_scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        # Called with the handler's lock held (logging.Handler.handle).
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        loop = _running_loop() if record.levelno < logging.WARNING else None
        self._waiting.append(line)
        if loop is None or len(self._waiting) >= MAX_WAITING:
            self._write_waiting()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self.flush)

    def flush(self) -> None:
        self.acquire()
        try:
            self._flush_scheduled = False
            self._write_waiting()
        finally:
            self.release()

    def _write_waiting(self) -> None:
        if not self._waiting:
            return
        text = "".join(self._waiting)
        self._waiting.clear()
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception:  # a closed or full stream: as logging does, report and go on
            self.handleError(logging.makeLogRecord({"msg": text[:200]}))


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
