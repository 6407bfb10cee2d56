"""Token counts read from every shape of answer vLLM gives: chat and completions
(`prompt_tokens`/`completion_tokens`), Responses (`input_tokens`/`output_tokens`, with nested
`*_details` objects) and embeddings (`prompt_tokens`/`total_tokens`).

Whatever the shape, the result names the tokens `prompt_tokens` and `completion_tokens`, so the
ledger reads one shape: a Responses answer is not free because its fields are named otherwise
(issue 23).
"""

from __future__ import annotations

import json
from typing import Any

_DECODER = json.JSONDecoder()
# Responses names -> the names the ledger reads.
_RENAMES = (("input_tokens", "prompt_tokens"), ("output_tokens", "completion_tokens"))


def normalized_usage(usage: dict[str, Any]) -> dict[str, int]:
    """A `usage` object's integer counts, with the Responses names also given as
    `prompt_tokens` and `completion_tokens`."""
    counts = {k: v for k, v in usage.items() if isinstance(v, int) and not isinstance(v, bool)}
    for theirs, ours in _RENAMES:
        if theirs in counts and ours not in counts:
            counts[ours] = counts[theirs]
    return counts


def usage_of(body: bytes | None) -> dict[str, int]:
    """Token counts from a JSON answer, parsing only its `usage` object (an embeddings answer
    can be megabytes of floats: not worth parsing whole for two integers). Engines write
    `usage` last, so it is looked for from the end: a 4 MB embeddings answer took 1.1 ms of the
    event loop to search from the start, and takes microseconds this way."""
    if not body:
        return {}
    at = len(body)
    # The last mention that is an object is the answer's usage; a model's reply that merely
    # says "usage" (escaped inside a string) is not followed by a JSON object here.
    for _ in range(8):
        at = body.rfind(b'"usage"', 0, at)
        if at < 0:
            return {}
        usage = _object_after(body, at + len(b'"usage"'))
        if usage is not None:
            return normalized_usage(usage)
    return {}


def _object_after(body: bytes, at: int) -> dict[str, Any] | None:
    end = min(len(body), at + 64)
    colon = body.find(b":", at, end)
    if colon < 0 or body[at:colon].strip():
        return None
    start = colon + 1
    while start < len(body) and body[start : start + 1] in b" \t\r\n":
        start += 1
    if body[start : start + 1] != b"{":
        return None
    # The object only, at most a few KB: decoded from the bytes around it, not the whole body.
    piece = body[start : start + 4096].decode("utf-8", "replace")
    try:
        value, _ = _DECODER.raw_decode(piece)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None
