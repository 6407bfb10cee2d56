"""Line-level edits of a Server-Sent-Events stream, applied as chunks pass through.

Used only when needed (alias names to rewrite, usage to collect); otherwise chunks are
forwarded untouched. Lines are buffered only up to the next newline, never a whole stream.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Protocol

from modelyard.proxy.usage_reader import normalized_usage
from modelyard.redaction import redact

# A Responses stream's last event carries the whole answer's usage.
_FINAL_RESPONSE_EVENTS = ("response.completed", "response.incomplete", "response.failed")


class StreamMeter(Protocol):
    """Told what a stream carries as it passes (`api.accounting.ServedTokens`)."""

    def relayed_events(self, count: int) -> None: ...

    def saw_usage(self, usage: dict[str, int], final: bool) -> None: ...

    def saw_running_usage(self, raw: bytes) -> None: ...


def error_event(message: str, code: str) -> bytes:
    """The last event of a stream that did not end well (the engine broke off, the gateway
    shut down): OpenAI's error shape, its message redacted as every error body is."""
    event = {
        "error": {"message": redact(message), "type": "server_error", "param": None, "code": code}
    }
    return f"data: {json.dumps(event)}\n\n".encode()


def model_name_replacements(upstream_name: str, public_name: str) -> list[tuple[bytes, bytes]]:
    """The byte patterns that name the model in JSON, compact or with a space after ':'."""
    if upstream_name == public_name:
        return []
    old, new = json.dumps(upstream_name).encode(), json.dumps(public_name).encode()
    return [(b'"model":' + old, b'"model":' + new), (b'"model": ' + old, b'"model": ' + new)]


def rewrite_model_in_json(body: bytes, replacements: list[tuple[bytes, bytes]]) -> bytes:
    for old, new in replacements:
        body = body.replace(old, new)
    return body


class StreamTransformer:
    def __init__(
        self,
        replacements: list[tuple[bytes, bytes]],
        capture_usage: bool = False,
        drop_usage_only_chunk: bool = False,
        on_final_usage: Callable[[dict[str, int]], None] | None = None,
        meter: StreamMeter | None = None,
        strip_progress_usage: bool = False,
    ) -> None:
        self._replacements = replacements
        # Told the stream's final usage as soon as it passes, before the client gets the
        # stream's end: a client's next request then sees this one's tokens counted.
        self._on_final_usage = on_final_usage
        self._capture_usage = capture_usage
        self._drop_usage_only_chunk = drop_usage_only_chunk
        self._pending = b""
        self.usage: dict[str, int] = {}
        # Counts the data events relayed (a stream cut before its usage chunk is charged for
        # them) and hears every usage seen, the engine's running totals included.
        self._meter = meter
        self._strip_progress_usage = strip_progress_usage

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk
        cut = data.rfind(b"\n")
        if cut < 0:
            self._pending = data
            return b""
        self._pending = data[cut + 1 :]
        return self._edit(data[: cut + 1])

    def flush(self) -> bytes:
        data, self._pending = self._pending, b""
        return self._edit(data) if data else b""

    def _edit(self, block: bytes) -> bytes:
        for old, new in self._replacements:
            block = block.replace(old, new)
        if self._meter is not None:
            # One event a token, as vLLM streams by default; the role and finish events make
            # this an overcount by a few, never an undercount. Counted here, before a usage
            # line is dropped, and then corrected by that usage when it comes.
            events = block.count(b"\ndata:") + block.startswith(b"data:")
            events -= block.count(b"data: [DONE]") + block.count(b"data:[DONE]")
            if events > 0:
                self._meter.relayed_events(events)
        if not self._capture_usage:
            return block
        # Only the lines that mention usage are looked at (one in a whole stream, usually):
        # a block of hundreds of events costs one search, not a split into lines.
        start = 0
        while (at := block.find(b'"usage"', start)) >= 0:
            line_start = block.rfind(b"\n", 0, at) + 1
            line_end = block.find(b"\n", at)
            if line_end < 0:
                line_end = len(block)
            line = block[line_start:line_end]
            close = _running_usage_end(block, at, line)
            if close > 0:
                # A chunk with choices and the running totals (`continuous_usage_stats`),
                # as vLLM writes it (compact, usage last): kept as bytes, parsed only if the
                # stream is cut before its final usage (a JSON parse a chunk cost 20 us).
                if self._meter is not None:
                    self._meter.saw_running_usage(block[at + 8 : close])
                if self._strip_progress_usage:  # ours, not the client's: taken out
                    block = block[: at - 1] + block[close:]
                    start = at
                else:
                    start = close
                continue
            if self._take_usage(line):
                if line_end < len(block):
                    block = block[:line_start] + block[line_end + 1 :]  # the line and its \n
                else:
                    block = block[: max(line_start - 1, 0)]  # the last line and the \n before
                start = line_start
            else:
                start = line_end + 1
        return block

    def _take_usage(self, line: bytes) -> bool:
        """Record usage from a data line; True if the line must be dropped."""
        if not line.startswith(b"data:") or (
            b'"usage":{' not in line and b'"usage": {' not in line
        ):
            return False
        try:
            event = json.loads(line[5:])
        except (ValueError, RecursionError):
            return False
        if not isinstance(event, dict):
            return False
        usage = event.get("usage")
        final = event.get("choices") == []
        if not isinstance(usage, dict):
            # A Responses stream: the usage of the whole answer is in its last event.
            response = event.get("response")
            usage = response.get("usage") if isinstance(response, dict) else None
            final = event.get("type") in _FINAL_RESPONSE_EVENTS
        if isinstance(usage, dict):
            self.usage = normalized_usage(usage)
            if self._meter is not None:
                self._meter.saw_usage(self.usage, final)
            if final and self._on_final_usage is not None:
                self._on_final_usage(self.usage)
                self._on_final_usage = None
        # The chunk vLLM sends only because we asked for usage: the client did not ask for it.
        return self._drop_usage_only_chunk and event.get("choices") == []


def _running_usage_end(block: bytes, at: int, line: bytes) -> int:
    """Where the flat `,"usage":{...}` at `at` ends (after its `}`) in a chunk that has
    choices, or 0 when it is not that (a final usage chunk, another shape)."""
    if block[at - 1 : at] != b"," or block[at + 7 : at + 9] != b":{":
        return 0
    if b'"choices":[{' not in line:
        return 0
    close = block.find(b"}", at)
    return close + 1 if close > 0 and block.find(b"{", at + 9, close) < 0 else 0
