"""How the gateway's own log lines look: text for people, or JSON lines for log collectors.

Structured fields travel in `extra={"fields": {...}}`; the text format already has them in
the message as key=value, the JSON format also puts each one at the top level of the line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any, Literal

from modelyard.observability.log_guard import FloodGuard, RedactingFormatter
from modelyard.observability.log_stream import TurnBufferedStreamHandler

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# A value with a space (any kind), a quote or '=' is written quoted. One regex search: a
# character-by-character scan was 40% of a request's log line, at one line per request.
_NEEDS_QUOTES = re.compile(r'[\s"=]')
LogFormat = Literal["text", "json"]


class JsonLineFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                line.setdefault(key, value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class _SecondText:
    """A second's text, made once per second: at a line per request, `time.strftime` for
    every record is a measurable part of the line."""

    def __init__(self, pattern: str, convert: Callable[[float], time.struct_time]) -> None:
        self.pattern = pattern
        self.convert = convert
        self.second = -1
        self.text = ""

    def of(self, created: float) -> str:
        second = int(created)
        if second != self.second:
            self.text, self.second = time.strftime(self.pattern, self.convert(created)), second
        return self.text


_UTC_SECOND = _SecondText("%Y-%m-%dT%H:%M:%S", time.gmtime)


def _iso_time(created: float) -> str:
    return f"{_UTC_SECOND.of(created)}.{int(created % 1 * 1000):03d}Z"


class TextFormatter(logging.Formatter):
    """`TEXT_FORMAT`, with the time written as logging's default does (local time,
    `2026-01-31 12:00:00,123`), the second's text made once per second."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._local_second = _SecondText(self.default_time_format, time.localtime)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return f"{self._local_second.of(record.created)},{int(record.msecs):03d}"


def configure_logging(level: str | int = "INFO", log_format: LogFormat = "text") -> None:
    """Send every logger's records to stderr in the chosen format (replaces earlier setup)."""
    handler = TurnBufferedStreamHandler(sys.stderr)
    inner = JsonLineFormatter() if log_format == "json" else TextFormatter()
    # Secrets masked, control characters escaped, client-caused lines bounded (log_guard).
    handler.setFormatter(RedactingFormatter(inner))
    handler.addFilter(FloodGuard())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.flush()  # lines it still holds go out before the new handler's
    root.addHandler(handler)
    # No format of ours shows a record's process or thread: don't look them up per record
    # (the logging module's own optimisation switches; a getpid() call each on Python 3.11).
    logging.logProcesses = False
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # nor where in the code each call was made (sys._getframe walks)
    root.setLevel(level.upper() if isinstance(level, str) else level)


def key_values(fields: dict[str, Any]) -> str:
    """`a=1 b="two words"`: the text form of structured fields (None values left out)."""
    parts = []
    for key, value in fields.items():
        if value is None:
            continue
        kind = type(value)
        if kind is int:
            text = str(value)  # digits and a sign: never quoted
        elif kind is bool:
            text = "true" if value else "false"
        elif isinstance(value, float):
            text = f"{value:.3f}"
        else:
            text = value if kind is str else str(value)
            if not text or _NEEDS_QUOTES.search(text):
                text = json.dumps(text, ensure_ascii=False)
        parts.append(f"{key}={text}")
    return " ".join(parts)
