"""Pre-warming: start or wake a model before it is asked for, when that is worth its cost.

Pure, beside the core's `step`: the driver asks `choose_prewarm` when no request is waiting,
with the predictor's chances for the models that are not ready. The same placement planner and
cost model as a real start decide where it goes and what it would evict:

- saving: probability x the wait it would spare (its start, or its wake when asleep);
- cost: the plan's eviction cost (expected seconds of reloading, weighted by each victim's
  recency, as every eviction is), plus the start slot it takes: while it starts, a real
  request for another model on that GPU must have it cancelled, and the cancelled start's
  stop is a wait. That is charged as the chance another model is asked for meanwhile x the
  stop time.

The rules that keep a pre-warm harmless hold by construction:
- nothing with traffic is touched: engines with requests in flight or waiting, engines
  starting, waking or being evicted, and pinned engines are kept out of the plan;
- only free memory or memory that sleeping or idle engines hold is used;
- nothing is pre-warmed while any real request waits, nor where a start is under way (one start
  per GPU); and the core cancels a pre-warm whose start slot a real request needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from modelyard.placement.policy import (
    DEFAULT_SETTINGS,
    Action,
    CannotFit,
    Engine,
    EngineState,
    PolicySettings,
    Target,
    plan_placement,
)
from modelyard.scheduler.decide import Snapshot
from modelyard.scheduler.predictor import Chance

# A cancelled pre-warm's engine must stop before a real start may use its GPU (a vLLM stop
# takes 2-15 s; the low end, since a starting engine holds little yet).
CANCEL_STOP_S = 2.0
# Below this chance a pre-warm is never worth a GPU's start slot, whatever the saving says:
# it keeps the share of wasted pre-warms low (the goal: at most 30 %).
MIN_PROBABILITY = 0.5


@dataclass(frozen=True)
class PreWarm:
    """Sleep or stop `actions` (idle engines only), then start or wake `target` on `gpus`."""

    target: str
    gpus: tuple[int, ...]
    bytes_per_gpu: int
    wake: bool
    actions: tuple[Action, ...]
    probability: float
    saving_s: float
    cost_s: float
    reason: str


@dataclass(frozen=True)
class Candidate:
    """A model the predictor gives a chance, as placement sees it."""

    target: Target
    chance: Chance
    wait_s: float  # what a request would wait for it now: its start, or its wake


def choose_prewarm(
    snapshot: Snapshot,
    candidates: Sequence[Candidate],
    *,
    requests_waiting: bool,
    in_use: frozenset[str] = frozenset(),
    settings: PolicySettings = DEFAULT_SETTINGS,
    min_probability: float = MIN_PROBABILITY,
) -> PreWarm | None:
    """The best pre-warm worth its cost now, or None (see the module docstring).

    `in_use`: models with traffic a moment ago (the predictor's "in use now"); idle this
    instant, between two requests of a burst, they are still never evicted."""
    if requests_waiting or not candidates:
        return None
    busy_gpus = {
        gpu
        for engine in snapshot.engines
        if engine.state in (EngineState.STARTING, EngineState.WAKING, EngineState.DRAINING)
        or engine.state is EngineState.STOPPING
        for gpu in engine.gpus
    }
    engines = tuple(_untouchable(engine, in_use) for engine in snapshot.engines)
    snapshot = replace(snapshot, engines=engines)
    best: PreWarm | None = None
    others = sum(c.chance.probability for c in candidates)
    for candidate in candidates:
        chance = candidate.chance
        if chance.probability < min_probability:
            continue
        plan = plan_placement(
            candidate.target,
            [g for g in snapshot.gpus if g.index not in busy_gpus],
            snapshot.engines,
            now=snapshot.now,
            host_ram_for_sleep=snapshot.host_ram_for_sleep,
            settings=settings,
        )
        if isinstance(plan, CannotFit) or plan.wait_for:
            continue
        if any(gpu in busy_gpus for gpu in plan.gpus):
            continue
        saving = chance.probability * candidate.wait_s
        slot = min(others - chance.probability, 1.0) * CANCEL_STOP_S
        cost = plan.cost + max(slot, 0.0)
        if saving <= cost:
            continue
        if best is None or saving - cost > best.saving_s - best.cost_s:
            best = PreWarm(
                candidate.target.name,
                plan.gpus,
                plan.bytes_per_gpu,
                plan.wake,
                plan.actions,
                chance.probability,
                saving,
                cost,
                chance.reason,
            )
    return best


def _untouchable(engine: Engine, in_use: frozenset[str]) -> Engine:
    """An engine a pre-warm may not evict is shown as pinned: the planner never evicts a
    pinned engine, so the plan uses only free memory and idle or sleeping engines."""
    busy = engine.in_flight > 0 or (engine.state is EngineState.READY and engine.name in in_use)
    if busy or engine.state not in (EngineState.READY, EngineState.SLEEPING):
        return replace(engine, pinned=True)
    return engine
