"""Per-request `keep_alive`, with Ollama's meaning (Open WebUI sends it): how long the engine
stays loaded after this request.

- a number of seconds, or a duration string ("30s", "5m", "1h", "1h30m");
- `0`: stop the engine after this request, when nothing else is in flight or waiting;
- capped by the model's `max_keep_alive` (a model without one keeps its idle timeout; the
  request still succeeds: Ollama's clients send keep_alive on every request);
- a key with `keep_alive: false` gets a 403 when it sends one.

Ollama takes a negative value as "forever"; here a key may not pin an engine others need, so
negative values, values longer than a year, non-finite numbers, booleans and strings that are
not durations are refused with a 400 naming the field.
"""

from __future__ import annotations

import math
import re

MAX_KEEP_ALIVE_S = 365 * 24 * 3600.0
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)(h|m|s|ms))")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


class BadKeepAlive(ValueError):
    """A keep_alive value that is not a duration this gateway accepts (a 400)."""


def parse_keep_alive(value: object) -> float:
    """Seconds from a request's `keep_alive`, or BadKeepAlive saying what is wrong."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BadKeepAlive("'keep_alive' must be a number of seconds or a duration such as '5m'")
    try:
        seconds = _parse_duration(value.strip()) if isinstance(value, str) else float(value)
    except OverflowError:  # an integer of hundreds of digits
        raise BadKeepAlive("'keep_alive' may be at most a year") from None
    if not math.isfinite(seconds):
        raise BadKeepAlive("'keep_alive' must be a finite number of seconds")
    if seconds < 0:
        raise BadKeepAlive(
            "'keep_alive' may not be negative (an engine cannot be kept loaded forever here)"
        )
    if seconds > MAX_KEEP_ALIVE_S:
        raise BadKeepAlive("'keep_alive' may be at most a year")
    return seconds


def _parse_duration(text: str) -> float:
    if len(text) > 32:
        raise BadKeepAlive("'keep_alive' is too long to be a duration")
    try:
        return float(text)  # "300", as Ollama also accepts
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise BadKeepAlive(
            "'keep_alive' must be a number of seconds or a duration such as '30s', '5m', '1h'"
        )
    return sum(float(number) * _UNITS[unit] for number, unit in parts)


def capped(seconds: float, max_keep_alive: float | None) -> float | None:
    """The idle timeout a request's keep_alive sets: None (keep the model's own) when the model
    allows none, 0 to stop after the request, else at most `max_keep_alive`."""
    if seconds == 0:
        return 0.0
    if max_keep_alive is None:
        return None
    return min(seconds, max_keep_alive)
