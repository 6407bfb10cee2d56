"""Per-key requests-per-minute limits: at most `rpm` requests in any 60 seconds."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

WINDOW_S = 60.0


class RateLimiter:
    """A sliding-window log per key: exact (no burst of 2x at a minute boundary), and its
    memory is bounded by the configured rpm because only accepted requests are kept."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._accepted: dict[str, collections.deque[float]] = {}

    def acquire(self, name: str, rpm: int | None) -> float:
        """0 if the request may go now (and it is counted); else seconds until it may."""
        if rpm is None:
            return 0.0
        now = self._clock()
        window = self._accepted.setdefault(name, collections.deque())
        while window and window[0] <= now - WINDOW_S:
            window.popleft()
        if len(window) >= rpm:
            return max(window[0] + WINDOW_S - now, 0.001)
        window.append(now)
        return 0.0

    def remaining(self, name: str, rpm: int) -> int:
        window = self._accepted.get(name)
        if not window:
            return rpm
        now = self._clock()
        return max(0, rpm - sum(1 for stamp in window if stamp > now - WINDOW_S))
