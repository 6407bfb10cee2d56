"""What a running engine says of itself, for `/v1/models`: vLLM's own listing gives each
model's `max_model_len`, the context length when the config names none.

`/v1/models` never waits for an engine: a ready engine not asked yet is asked in the
background, and its answer shows from the next listing on. Answers are kept per engine
object, so a restarted engine (other flags, other weights) is asked again.
"""

from __future__ import annotations

import weakref

import aiohttp

from modelyard.gateway import Gateway
from modelyard.scheduler.supervisor import EngineHandle

ASK_TIMEOUT_S = 5.0
_ASKED: weakref.WeakKeyDictionary[EngineHandle, int | None] = weakref.WeakKeyDictionary()


def engine_context_length(gateway: Gateway, model: str) -> int | None:
    """The ready engine's `max_model_len`, if it has told it (else None, and it is asked)."""
    engine = gateway.scheduler.engine_of(model)
    if engine is None or gateway.scheduler.is_remote(model):
        return None
    if engine not in _ASKED:
        _ASKED[engine] = None  # asked once, whatever the answer
        gateway.in_background(_ask(gateway, engine))
    return _ASKED.get(engine)


async def _ask(gateway: Gateway, engine: EngineHandle) -> None:
    try:
        async with gateway.health_session.get(
            engine.base_url + "/v1/models",
            headers=engine.upstream_headers,
            timeout=aiohttp.ClientTimeout(total=ASK_TIMEOUT_S),
        ) as answer:
            listing = await answer.json(content_type=None) if answer.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return  # an engine that cannot say: the listing shows none
    data = listing.get("data") if isinstance(listing, dict) else None
    first = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
    length = first.get("max_model_len")
    if isinstance(length, int) and not isinstance(length, bool) and length > 0:
        _ASKED[engine] = length
