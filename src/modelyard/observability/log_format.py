"""How the gateway's own log lines look: text for people, or JSON lines for log collectors.

Structured fields travel in `extra={"fields": {...}}`; the text format already has them in
the message as key=value, the JSON format also puts each one at the top level of the line.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Literal

from modelyard.observability.log_guard import FloodGuard, RedactingFormatter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
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


def _iso_time(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


def configure_logging(level: str | int = "INFO", log_format: LogFormat = "text") -> None:
    """Send every logger's records to stderr in the chosen format (replaces earlier setup)."""
    handler = logging.StreamHandler(sys.stderr)
    inner = JsonLineFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    # Secrets masked, control characters escaped, client-caused lines bounded (log_guard).
    handler.setFormatter(RedactingFormatter(inner))
    handler.addFilter(FloodGuard())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)


def key_values(fields: dict[str, Any]) -> str:
    """`a=1 b="two words"`: the text form of structured fields (None values left out)."""
    parts = []
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, float):
            text = f"{value:.3f}"
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        if not text or any(ch.isspace() or ch in '"=' for ch in text):
            text = json.dumps(text, ensure_ascii=False)
        parts.append(f"{key}={text}")
    return " ".join(parts)
