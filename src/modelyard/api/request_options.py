"""One reading of a request's options, used both for what the gateway decides (ask for usage,
reserve tokens) and for what it charges: the gateway must read a body as the engine will.

vLLM's request models are pydantic with lax booleans, so `"stream": 1`, `"true"`, `"yes"` or
`"on"` stream there. A gateway that tested `is True` would not ask for usage on such a stream
and would charge it nothing (issue 23).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# pydantic v2's lax bool (what vLLM's `stream: bool | None` accepts): these strings, any case.
_TRUE_STRINGS = frozenset({"1", "on", "t", "true", "y", "yes"})
# Tokens reserved for a request that names no limit on its answer, unless the model's
# `reserve_tokens:` says otherwise: enough for a typical answer, small enough not to refuse a
# key with some budget left.
DEFAULT_RESERVE_TOKENS = 512
# A prompt's tokens, estimated from its JSON bytes before the engine counts them: English is
# about four bytes a token; JSON's quotes and keys make this an overestimate, on purpose.
BYTES_PER_TOKEN = 4


def engine_reads_true(value: object) -> bool:
    """True when pydantic's lax `bool` (vLLM's request models) reads `value` as true."""
    if value is True:
        return True
    if isinstance(value, bool) or value is None:
        return False
    if isinstance(value, int | float):
        return value == 1
    if isinstance(value, str):
        return value.strip().lower() in _TRUE_STRINGS
    return False


@dataclass(frozen=True)
class RequestOptions:
    """What the gateway takes from a request body: whether it streams, the most tokens its
    answer may have (None: not said), and its prompt's size in tokens (estimated)."""

    stream: bool
    max_tokens: int | None
    prompt_estimate: int
    embeddings: bool = False
    choices: int = 1  # `n`: each choice is an answer of up to max_tokens

    def reservation(self, default_max_tokens: int = DEFAULT_RESERVE_TOKENS) -> int:
        """Tokens to hold for this request while it runs: its prompt and its longest answer."""
        if self.embeddings:
            return self.prompt_estimate
        answer = self.max_tokens if self.max_tokens is not None else default_max_tokens
        return self.prompt_estimate + answer * self.choices


def read_options(path: str, payload: dict[str, Any] | None, body_bytes: int) -> RequestOptions:
    """The options of a request to `path` (query excluded) with this JSON body."""
    payload = payload or {}
    limit = None
    # chat: max_completion_tokens (OpenAI's newer name) or max_tokens; responses:
    # max_output_tokens. The first one set is the one vLLM applies.
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = payload.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            limit = value
            break
    n = payload.get("n")
    return RequestOptions(
        stream=engine_reads_true(payload.get("stream")),
        max_tokens=limit,
        prompt_estimate=max(body_bytes // BYTES_PER_TOKEN, 1),
        embeddings=path.endswith("/embeddings"),
        choices=n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 128 else 1,
    )
