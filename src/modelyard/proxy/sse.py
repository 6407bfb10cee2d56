"""Line-level edits of a Server-Sent-Events stream, applied as chunks pass through.

Used only when needed (alias names to rewrite, usage to collect); otherwise chunks are
forwarded untouched. Lines are buffered only up to the next newline, never a whole stream.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from modelyard.redaction import redact


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
    ) -> None:
        self._replacements = replacements
        # Told the stream's final usage as soon as it passes, before the client gets the
        # stream's end: a client's next request then sees this one's tokens counted.
        self._on_final_usage = on_final_usage
        self._capture_usage = capture_usage
        self._drop_usage_only_chunk = drop_usage_only_chunk
        self._pending = b""
        self.usage: dict[str, int] = {}

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
            if self._take_usage(block[line_start:line_end]):
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
        usage = event.get("usage") if isinstance(event, dict) else None
        if isinstance(usage, dict):
            self.usage = {k: v for k, v in usage.items() if isinstance(v, int)}
            if event.get("choices") == [] and self._on_final_usage is not None:
                self._on_final_usage(self.usage)
                self._on_final_usage = None
        # The chunk vLLM sends only because we asked for usage: the client did not ask for it.
        return self._drop_usage_only_chunk and event.get("choices") == []
