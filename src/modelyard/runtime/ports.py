"""The ports this gateway's engines listen on: one engine's each, from the moment it is chosen
until the engine is gone, then kept back for a while.

The kernel calls a port free once nothing is bound to it, but an engine binds its port only
moments after the port is chosen (vLLM: once Python and its imports are up, seconds later).
Two engines started in that window could be offered the same port: the second one's readiness
check would then be answered by the first engine, and requests for one model would reach
another's engine (404 "model does not exist") until the loser failed to bind. A port freed by
a lost engine may likewise still be in a request's route for a moment, so it is not handed to
the next engine at once.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

LOCAL_HOST = "127.0.0.1"
# Long enough for any request routed to a lost engine to have seen its loss (the loss signal
# ends it within milliseconds); short enough that the book stays small: even an engine
# crashing every second keeps back only 60 of the ~28,000 ports the kernel hands out.
KEEP_BACK_S = 60.0
# How often to ask the kernel again when it offers a port that is ours. The kernel's offers
# are random over its range; with a few ports ours, one more try nearly always does.
OFFERS = 50


class NoFreePort(Exception):
    """The kernel kept offering ports that are ours (held or kept back)."""


def kernel_free_port(host: str = LOCAL_HOST) -> int:
    """A port the kernel says is free now (nothing bound to it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class PortBook:
    """Ports held by this gateway's engines, by host, and those released lately."""

    def __init__(
        self,
        offer: Callable[[str], int] = kernel_free_port,
        keep_back_s: float = KEEP_BACK_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._offer = offer
        self._keep_back_s = keep_back_s
        self._clock = clock
        self._held: set[tuple[str, int]] = set()
        self._released: dict[tuple[str, int], float] = {}  # -> when it was released

    def claim(self, host: str, port: int) -> bool:
        """Hold `port` on `host` for an engine, unless an engine holds it or held it lately."""
        self._forget_old()
        key = (host, port)
        if key in self._held or key in self._released:
            return False
        self._held.add(key)
        return True

    def take(self, host: str = LOCAL_HOST) -> int:
        """A port on `host` that the kernel calls free and no engine of ours holds or held
        lately, held from now on. Raises `NoFreePort` if the kernel offers none such."""
        for _ in range(OFFERS):
            port = self._offer(host)
            if self.claim(host, port):
                return port
        raise NoFreePort(f"the kernel offered no port on {host} that is not in use by an engine")

    def release(self, host: str, port: int) -> None:
        """The engine on `port` is gone: keep the port back for `keep_back_s`, then free."""
        key = (host, port)
        if key in self._held:
            self._held.discard(key)
            self._released[key] = self._clock()

    def holds(self, host: str, port: int) -> bool:
        return (host, port) in self._held

    def _forget_old(self) -> None:
        horizon = self._clock() - self._keep_back_s
        for key in [key for key, at in self._released.items() if at <= horizon]:
            del self._released[key]
