"""What a proxied request leaves behind: its tokens for the key (budgets, tokens per minute,
usage per model) and its record (metrics, request log, watchdog).

The one request path (`api.serving`) calls `ask_stream_for_usage` before forwarding, reads
usage with `usage_of` (or from the stream's last chunk) and ends with `finish`, once.
"""

from __future__ import annotations

import json
import re
from typing import Any

from modelyard.gateway import Gateway
from modelyard.observability.requests import RequestRecord

_USAGE_RE = re.compile(rb'"usage"\s*:\s*(\{[^{}]*\})')


def ask_stream_for_usage(path: str, payload: dict[str, Any]) -> bool:
    """Add `stream_options.include_usage` to a completion stream that lacks it (for token
    metrics and budgets); True when added. Engines send usage in a last chunk with no choices,
    which the caller drops again so the client sees the stream it asked for."""
    if payload.get("stream") is not True or not path.endswith("/completions"):
        return False
    options = payload.get("stream_options")
    if options is not None and not isinstance(options, dict):
        return False  # malformed: the engine's own error is the right answer
    if options and options.get("include_usage") is True:
        return False
    payload["stream_options"] = {**(options or {}), "include_usage": True}
    return True


def usage_of(body: bytes | None) -> dict[str, int]:
    """Token counts from a JSON answer, parsing only its flat `usage` object (an embeddings
    answer can be megabytes of floats: not worth parsing whole for two integers). Engines
    write `usage` last, so it is looked for from the end: a 4 MB embeddings answer took
    1.1 ms of the event loop to search from the start, and takes microseconds this way."""
    if not body:
        return {}
    last = body.rfind(b'"usage"')
    match = _USAGE_RE.match(body, last) if last >= 0 else None
    if match is None and last >= 0:
        match = _USAGE_RE.search(body)  # the last mention is not the object: as before
    if match is None:
        return {}
    try:
        usage = json.loads(match.group(1))
    except (ValueError, RecursionError):
        return {}
    return {k: v for k, v in usage.items() if isinstance(v, int)}


class TokenCount:
    """One request's usage for its key (budgets, tokens per minute, usage per model): counted
    once, as early as it is known (a stream's as soon as its usage chunk passes)."""

    def __init__(self, gateway: Gateway, key_name: str, model: str) -> None:
        self._gateway = gateway
        self._key_name = key_name
        self._model = model
        self.counted = False

    def count(self, usage: dict[str, int]) -> None:
        if self.counted or self._gateway.auth is None:
            return
        self.counted = True
        self._gateway.auth.ledger.record(
            self._key_name,
            self._model,
            usage.get("prompt_tokens", 0),
            usage.get("completion_tokens", 0),
        )


def finish(
    gateway: Gateway,
    tokens: TokenCount,
    *,
    model: str,
    route: str,
    key_name: str,
    status: int,
    duration_s: float,
    first_byte_s: float | None,
    streamed: bool,
    usage: dict[str, int],
    client_gone: bool,
) -> None:
    """A proxied request is over, however it ended: its tokens (unless a stream's were
    counted already) and its record."""
    tokens.count(usage)
    gateway.observe(
        RequestRecord(
            model=model,
            route=route,
            key_name=key_name,
            status=status,
            duration_s=duration_s,
            first_byte_s=first_byte_s,
            streamed=streamed,
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            client_gone=client_gone,
        )
    )
