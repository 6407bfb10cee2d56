"""Where today's load-wait comes from, on each trace: what pre-warming could spare at most.

    python -m bench.placement.wait_anatomy [TRACE.json ...]

Each trace is replayed as today (no pre-warming) through `tests/core/virtual_gateway.py`.
Every load (a start or a wake) is charged to the request that set it off (its model was
stopped or asleep when it came, and no earlier request was still waiting for it), together
with the waits of the requests that joined it, while it ran or while it waited its turn
behind another start. Each load is then classed by that request's key's previous request:

- **the same model, under a minute before:** the model was evicted in the middle of its
  user's burst, for another user's request. A pre-warm cannot bring it back earlier: the
  room went to a model with traffic, which a pre-warm may never evict.
- **another model:** the user switched (under a minute, a few minutes, or longer after):
  the waits a predictor may foresee and a pre-warm may spare.
- **the key's first request.**

The share of the first class is what pre-warming cannot aim at: a pre-warming that spared
every other load in full would still leave it. It is an estimate, not a proof (every pre-warm
changes later evictions, for better or worse). The traces with structure by default: the
random ones name no users, so "the key's previous request" there is anybody's.
"""

from __future__ import annotations

import bisect
import sys
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):
    _ROOT = Path(__file__).resolve().parents[2]
    sys.path[:0] = [str(_ROOT), str(_ROOT / "src")]

from bench.placement.prewarm import replayed, trace_paths
from bench.placement.simulate import Trace

EVICTED_MID_BURST = "same model, under a minute before"
# States in which a request's arrival sets a load off (or waits for an eviction to end first).
AT_REST = {"stopped", "sleeping", "stopping", "draining"}
JOINING = {"starting", "waking"}
BURST_S = 60.0


def _kind(previous: tuple[float, str] | None, at: float, model: str) -> str:
    if previous is None:
        return "the key's first request"
    gap = at - previous[0]
    if previous[1] == model:
        return EVICTED_MID_BURST if gap < BURST_S else "same model, a minute or more before"
    if gap < BURST_S:
        return "another model, under a minute before"
    return "another model, 1-5 minutes before" if gap < 300 else "another model, 5+ minutes before"


def anatomy(trace: Trace) -> Counter[str]:
    """Today's load-wait on `trace` (seconds), by the class of the load each wait was for."""
    world = replayed(trace)
    changes: dict[str, tuple[list[float], list[str]]] = {}
    for at, model, _, after in world.transitions:
        times, states = changes.setdefault(model, ([], []))
        times.append(at)
        states.append(after)

    def state_at(model: str, at: float) -> str:
        """The model's state just before `at` (a change at the same instant comes after)."""
        times, states = changes.get(model, ([], []))
        index = bisect.bisect_left(times, at)
        return states[index - 1] if index else "stopped"

    waits: Counter[str] = Counter()
    previous: dict[str, tuple[float, str]] = {}
    load_kind: dict[str, str] = {}  # the kind of each model's latest load
    # When each model's latest load was done (its first request served). A request that
    # comes before then joins that load, even while the model is still at rest: the load may
    # be queued behind another GPU's start or an eviction, and has not begun yet.
    load_done: dict[str, float] = {}
    for outcome, request in zip(world.outcomes, trace.requests, strict=True):
        kind = _kind(previous.get(request.key), request.at, request.model)
        state = state_at(request.model, request.at)
        if request.at < load_done.get(request.model, -1.0) or state in JOINING:
            kind = load_kind.get(request.model, kind)
        elif state in AT_REST:
            load_kind[request.model] = kind
            load_done[request.model] = request.at + outcome.waited
        waits[kind] += outcome.waited
        previous[request.key] = (request.at, request.model)
    return waits


def main(argv: list[str] | None = None) -> int:
    for path in trace_paths(argv, __doc__, random_too=False):
        waits = anatomy(Trace.load(path))
        total = sum(waits.values())
        print(f"{path.stem}: {total:,.0f} s of load-wait today")
        for kind, seconds in waits.most_common():
            if seconds > 0:
                print(f"  {kind:40s} {seconds:10,.0f} s  {seconds / total:4.0%}")
        floor = waits[EVICTED_MID_BURST] / total if total else 0.0
        print(f"  pre-warming that spared every other load in full: {floor:.2f}x\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
