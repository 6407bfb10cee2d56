"""A request's affinity key: what makes two requests likely to share vLLM's prefix cache.

With several engines of one model, requests of one conversation should reach the engine
that already holds their prefix in its KV cache (vLLM's automatic prefix caching): a warm
prefix skips its prefill. The key, first found wins:

1. the `X-Session-Id` header (a client's own conversation id);
2. the body's `user` field (OpenAI's end-user id: one user's requests often share a prompt);
3. the system prompt and the first user message (a conversation's first turns do not change
   as it grows, so each of its requests has the same key);
4. the first `PREFIX_CHARS` characters of a completion's `prompt`.

Only a digest is kept: a client-chosen value (huge, or not ASCII) is hashed, never stored or
logged, and its size is bounded before hashing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

SESSION_HEADER = "X-Session-Id"
# How much of a prompt (or of the first messages) decides its key: about 1,000 tokens, well
# past vLLM's 16-token cache blocks, and a bound on the work a huge prompt costs here.
PREFIX_CHARS = 4096
# Bodies larger than this are not parsed again for a key (they go to the least loaded engine).
MAX_BODY_BYTES = 4 * 1024 * 1024


def affinity_key(headers: Mapping[str, str], body: bytes | None) -> str | None:
    """The request's affinity digest, or None when nothing ties it to an engine."""
    session = headers.get(SESSION_HEADER)
    if session:
        return _digest("session", session)
    if not body or len(body) > MAX_BODY_BYTES:
        return None
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    user = payload.get("user")
    if isinstance(user, str) and user:
        return _digest("user", user)
    messages = payload.get("messages")
    opening = _opening(messages) if isinstance(messages, list) else ""
    if opening:
        return _digest("messages", opening)
    prompt = payload.get("prompt")
    if isinstance(prompt, str) and prompt:
        return _digest("prompt", prompt)
    return None


def _opening(messages: list[Any]) -> str:
    """The system prompt(s) and the first user message, as text."""
    parts: list[str] = []
    for message in messages:
        if not isinstance(message, dict):
            break
        parts.append(json.dumps(message.get("content"), ensure_ascii=False, sort_keys=True))
        if message.get("role") not in ("system", "developer"):
            break  # the first turn of the conversation itself ends the opening
    return "\n".join(parts)


def _digest(kind: str, value: str) -> str:
    data = value[:PREFIX_CHARS].encode("utf-8", "surrogatepass")
    return kind + ":" + hashlib.blake2b(data, digest_size=12).hexdigest()
