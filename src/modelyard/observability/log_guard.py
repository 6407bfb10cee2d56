"""The gateway's log cannot be filled by its clients, and never shows a secret.

- `FloodGuard` bounds what clients can cause: the HTTP server's own reports of malformed
  requests (aiohttp logs each with a traceback, and its message can quote the raw header,
  an API key included) are cut to one short line, and every client-caused source may write
  at most `burst` lines per `window_s`; the rest are counted and reported in the next line.
- `RedactingFormatter` masks registered secrets and escapes control characters in every
  formatted line, tracebacks included.
"""

from __future__ import annotations

import logging
import time

from modelyard.redaction import one_line, printable, redact

# Loggers whose lines a client can cause at will (bad requests, refused keys, bad paths).
CLIENT_CAUSED = ("aiohttp.server", "aiohttp.web", "aiohttp.access")
CLIENT_CAUSED_ATTR = "client_caused"  # extra={"client_caused": True} marks one more record


class FloodGuard(logging.Filter):
    def __init__(self, burst: int = 5, window_s: float = 10.0) -> None:
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self._windows: dict[str, tuple[float, int, int]] = {}  # source -> start, kept, dropped

    def filter(self, record: logging.LogRecord) -> bool:
        client_caused = record.name.startswith(CLIENT_CAUSED) or getattr(
            record, CLIENT_CAUSED_ATTR, False
        )
        if not client_caused:
            return True
        if record.name.startswith("aiohttp."):
            _shorten_server_record(record)
        source = record.name
        now = time.monotonic()
        start, kept, dropped = self._windows.get(source, (now, 0, 0))
        if now - start >= self.window_s:
            start, kept = now, 0
        if kept >= self.burst:
            self._windows[source] = (start, kept, dropped + 1)
            return False
        if dropped:
            record.msg = f"{record.getMessage()} ({dropped} similar lines suppressed)"
            record.args = None
        self._windows[source] = (start, kept + 1, 0)
        return True


def _shorten_server_record(record: logging.LogRecord) -> None:
    """One line naming the problem; no traceback, no quoted request bytes (keys live there)."""
    problem = ""
    if record.exc_info and record.exc_info[1] is not None:
        error = record.exc_info[1]
        problem = f": {type(error).__name__}"
        code = getattr(error, "code", None)
        if isinstance(code, int):
            problem += f" ({code})"
    try:
        message = record.getMessage()
    except Exception:  # a malformed record must not break logging
        message = str(record.msg)
    record.msg = one_line(message, 120) + problem
    record.args = None
    record.exc_info = None
    record.exc_text = None


class RedactingFormatter(logging.Formatter):
    """Wraps the chosen formatter; what it returns is masked and escaped."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return printable(redact(self.inner.format(record)))
