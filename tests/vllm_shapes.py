"""vLLM's wire shapes that both test engines (tests/fake_engine.py, a process, and
tests/harness.py's in-process engine) answer with, written once.

What each stands for in vLLM (v0.11, `vllm/entrypoints/openai/protocol.py`):
- `reads_true`: pydantic v2's lax `bool`, which vLLM's `stream: bool | None` and
  `stream_options.include_usage` / `continuous_usage_stats` use: `1`, `"true"`, `"yes"`, `"on"`
  (any case) are true.
- `chunk_usage`: with `stream_options: {include_usage: true, continuous_usage_stats: true}`,
  every chunk carries the running usage (prompt tokens, completion tokens so far).
- `responses_answer` / `responses_events`: `/v1/responses`, whose usage is
  `input_tokens`/`output_tokens` with nested `*_details` objects, in the answer and, for a
  stream, in the last event (`response.completed`), events named by SSE `event:` lines.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

COMPACT = (",", ":")
PROMPT_TOKENS = 5  # what both test engines report for any prompt
_TRUE = {"1", "on", "t", "true", "y", "yes"}


def reads_true(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value == 1
    return isinstance(value, str) and value.strip().lower() in _TRUE


def wants_running_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options") or {}
    return reads_true(options.get("include_usage")) and reads_true(
        options.get("continuous_usage_stats")
    )


def chunk_usage(completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "total_tokens": PROMPT_TOKENS + completion_tokens,
        "completion_tokens": completion_tokens,
    }


def _responses_usage(output_tokens: int | None) -> dict[str, Any] | None:
    if output_tokens is None:
        return None
    return {
        "input_tokens": PROMPT_TOKENS,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": PROMPT_TOKENS + output_tokens,
    }


def _response(model: str, text: str, status: str, output_tokens: int | None) -> dict[str, Any]:
    output = [
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }
    ]
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": int(time.time()),
        "model": model,
        "status": status,
        "output": output if text else [],
        "usage": _responses_usage(output_tokens),
    }


def responses_answer(model: str, text: str) -> dict[str, Any]:
    """A whole `/v1/responses` answer: one output token per word."""
    return _response(model, text, "completed", len(text.split()))


def responses_events(model: str, words: list[str]) -> Iterator[bytes]:
    """A streamed `/v1/responses` answer, one SSE event at a time: one delta a word (token)."""

    def event(kind: str, data: dict[str, Any]) -> bytes:
        data = {"type": kind, **data}
        return f"event: {kind}\ndata: {json.dumps(data, separators=COMPACT)}\n\n".encode()

    yield event("response.created", {"response": _response(model, "", "in_progress", None)})
    for index, word in enumerate(words):
        yield event(
            "response.output_text.delta",
            {
                "item_id": "msg_1",
                "output_index": 0,
                "content_index": 0,
                "delta": word + " ",
                "sequence_number": index + 1,
            },
        )
    text = " ".join(words) + " "
    yield event("response.completed", {"response": _response(model, text, "completed", len(words))})
