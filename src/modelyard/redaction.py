"""Secrets never leave the gateway: one process-wide list of values to hide, and the hiding.

The config loader collects every value that came from `${env:...}`; every value of a model's
`env:` is added too. Whatever the gateway writes where others can read it (its log, engine
logs, events, status answers, error messages) passes through `redact`. Control characters
are escaped by `printable`, so a crafted path cannot forge or split a log line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

MASK = "[redacted]"
# Shorter values ("1", "on", a port) would mask ordinary words and numbers everywhere; a secret
# that short is no secret.
MIN_SECRET_LENGTH = 6
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")

_secrets: set[str] = set()
_pattern: re.Pattern[str] | None = None


def register_secrets(values: Iterable[str]) -> None:
    """Add values that must never be shown (idempotent)."""
    global _pattern
    added = {value for value in values if len(value) >= MIN_SECRET_LENGTH} - _secrets
    if not added:
        return
    _secrets.update(added)
    # Longest first, so a secret that contains another is masked whole. Compiled once here,
    # never per line.
    ordered = sorted(_secrets, key=len, reverse=True)
    _pattern = re.compile("|".join(re.escape(value) for value in ordered))


def secrets() -> frozenset[str]:
    return frozenset(_secrets)


def redact(text: str) -> str:
    """`text` with every registered secret replaced by a mask."""
    if _pattern is None or not text:
        return text
    return _pattern.sub(MASK, text)


def redact_value(value: Any) -> Any:
    """`redact` applied to every string inside lists, tuples and dicts."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list | tuple):
        return [redact_value(item) for item in value]
    if isinstance(value, dict):
        return {key: redact_value(item) for key, item in value.items()}
    return value


# What names where an engine runs: a URL, or `host:port` / `host 10.0.0.5:8001` as aiohttp's
# connection errors write it.
_ADDRESS = re.compile(
    r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\")]+"
    # Python's socket addresses in OS errors: ('10.0.0.5', 8001) and ('::1', 8001, 0, 0).
    r"|\(\s*'[^']*'\s*,\s*\d+[^)]*\)"
    # host:port, the host a name with a letter or a dot in it, or an [IPv6] literal.
    r"|(?<![\w.-])(?:\[[0-9a-fA-F:.]+\]|(?=[\w.-]*[a-zA-Z.])[\w-]+(?:\.[\w-]+)*):\d{1,5}"
    r"(?![\w.])"
    # Bare IP addresses: v4, and v6 with '::' or at least five groups (not a time of day).
    r"|(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?![\w.])"
    r"|(?<![\w:])(?=[0-9a-fA-F:]*::)[0-9a-fA-F:]{2,39}(?![\w:])"
    r"|(?<![\w:])(?:[0-9a-fA-F]{1,4}:){4,7}[0-9a-fA-F]{1,4}(?![\w:])"
)
ADDRESS_MASK = "[engine address]"


def without_addresses(text: str) -> str:
    """`text` with every URL and host:port replaced: a key that is not an admin's learns
    nothing of where engines run (issue 23)."""
    return _ADDRESS.sub(ADDRESS_MASK, text)


def printable(text: str) -> str:
    """Control characters (other than tab and newline) escaped as \\xNN."""
    if not _CONTROL.search(text):
        return text
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def one_line(text: str, limit: int = 200) -> str:
    """A client-supplied string made safe for one log line: escaped, no newlines, bounded."""
    text = printable(text).replace("\n", "\\n").replace("\t", "\\t")
    return text if len(text) <= limit else text[:limit] + "..."
