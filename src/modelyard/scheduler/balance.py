"""Which of a model's ready engines serves one request.

Pure but for one bounded record: `Affinity` remembers which engine each conversation (or
long prompt, or session) last went to, so its next request finds vLLM's prefix cache warm
there. The choice, in order:

1. an adapter's request goes to an engine that has the adapter loaded, while one of those
   is below the target (loading it elsewhere costs a load and a slot of `max_loras`);
2. a request with an affinity key goes to the engine it went to last, while that engine is
   below the target (above it, the queue there costs more than a cold prefix elsewhere);
3. otherwise the engine with the fewest requests outstanding (vLLM's production-stack and
   Ray Serve's default), ties to the lower key so the choice is stable.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass

# Conversations remembered across all models: the least recently seen are forgotten first.
# Each entry is a short digest and a key (about 200 bytes), so the record stays under a few
# MiB however many sessions clients invent (hostile X-Session-Id values included).
AFFINITY_ENTRIES = 16_384


@dataclass(frozen=True)
class ReplicaLoad:
    """One ready engine of the model, as the request path sees it."""

    key: str
    outstanding: int  # requests it holds now
    has_adapter: bool = False


class Affinity:
    """The engine each affinity key went to last, bounded to `AFFINITY_ENTRIES`."""

    def __init__(self, entries: int = AFFINITY_ENTRIES) -> None:
        self._entries = entries
        self._last: collections.OrderedDict[str, str] = collections.OrderedDict()

    def get(self, affinity: str) -> str | None:
        return self._last.get(affinity)

    def remember(self, affinity: str, key: str) -> None:
        self._last[affinity] = key
        self._last.move_to_end(affinity)
        while len(self._last) > self._entries:
            self._last.popitem(last=False)

    def __len__(self) -> int:
        return len(self._last)


def choose_replica(
    replicas: Sequence[ReplicaLoad],
    target_in_flight: int,
    last: str | None = None,
) -> str:
    """The key of the engine for one request (see the module docstring); `last`: where its
    affinity key went before. `replicas` must not be empty."""
    pool = list(replicas)
    holding = [r for r in pool if r.has_adapter and r.outstanding < target_in_flight]
    if holding:
        pool = holding
    if last is not None:
        previous = next((r for r in pool if r.key == last), None)
        if previous is not None and previous.outstanding < target_in_flight:
            return previous.key
    return min(pool, key=lambda r: (r.outstanding, r.key)).key
