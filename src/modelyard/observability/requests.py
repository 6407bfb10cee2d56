"""One proxied request as observability sees it (metrics, the request log, the watchdog)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# A client that went away before the answer was complete: nginx's "client closed request".
# Not a 5xx: the gateway did nothing wrong (issue 11, defect 6).
CLIENT_CLOSED_REQUEST = 499


@dataclass(frozen=True)
class RequestRecord:
    """One proxied request, for metrics and the request log."""

    model: str
    route: str
    key_name: str
    status: int
    duration_s: float
    first_byte_s: float | None
    streamed: bool
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    # The client hung up: `status` is what it was sent (200 for a stream already begun),
    # or 499 when it got nothing.
    client_gone: bool = False


RequestObserver = Callable[[RequestRecord], None]
