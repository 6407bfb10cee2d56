"""Pre-warming: start or wake a model before it is asked for, when that is worth its cost.

Pure, beside the core's `step`: the driver asks `choose_prewarm` when no request is waiting,
with the predictor's chances for the models that are not ready. The same placement planner and
cost model as a real start decide where it goes and what it would evict:

- saving: probability x the wait it would spare (its start, or its wake when asleep), if it
  is not cancelled first;
- cost: the plan's eviction cost (expected seconds of reloading, weighted by each victim's
  recency, as every eviction is), plus each victim's own chance of being asked for x its
  reload, plus the start slot it takes: a real request for a model that is not ready, coming
  while it starts, has it cancelled, and the cancelled start's stop is a wait (a wake is left
  to finish, 1-3 s: cancelled, it would lose the sleeper). The chance of that is
  `1 - exp(-switch_rate x wait)`, from how often the users switch models now. And a wasted
  pre-warm (`1 - probability`) is undone later: a stop, or a sleep about as long as its wake.

The rules that keep a pre-warm harmless hold by construction:
- nothing with traffic is touched: engines with requests in flight or waiting, engines
  starting, waking or being evicted, and pinned engines are kept out of the plan;
- only free memory or memory that sleeping or idle engines hold is used;
- nothing is pre-warmed while any real request waits, nor where a start is under way (one start
  per GPU); and the core cancels a pre-warm whose start slot a real request needs.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
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
# it keeps wasted pre-warms few (at most 30 % is the goal). On the simulator's traces 0.7
# spared more load-wait than 0.5 (more pre-warms, more wasted) and than 0.8 (fewer used).
MIN_PROBABILITY = 0.7
# A pre-warm is made for a request expected within its start time and a half (a start made
# when the request is due within exactly its start time would be ready just after it), or
# within this long for a model that starts or wakes faster: a wake of 1-3 s is worth making
# before the 1-3 s that precede the request (when nobody can tell it is coming), and this
# long is still soon enough for the woken engine not to sit idle.
START_MARGIN = 1.5
LOOKAHEAD_S = 30.0
# How often a driver asks again while a habit may be due: a chance grows as the usual time of
# the next request nears, and nothing else happens meanwhile to ask on.
CHECK_EVERY_S = 2.0


def horizon(wait_s: float) -> float:
    """The time within which a request must be expected for a pre-warm that spares `wait_s`
    (its start or wake): the predictor's chances are asked for this horizon."""
    return max(START_MARGIN * wait_s, LOOKAHEAD_S)


class Standing(enum.Enum):
    """Where a model stands when a driver asks about pre-warms."""

    READY = "ready"  # awake and idle or serving: a possible victim
    ASLEEP = "asleep"  # a candidate (a wake), and a possible victim (its sleep dropped)
    STOPPED = "stopped"  # a candidate (a start)
    BUSY = "busy"  # starting, waking, stopping, failed: neither


@dataclass(frozen=True)
class ModelNow:
    """One model as a driver sees it: the gateway from its supervisors, the simulator from
    its virtual engines. Both drivers turn these into the core's ask with `ask_inputs`, so
    the simulator's figures are the gateway's."""

    name: str
    standing: Standing
    start_s: float  # its last measured start (or a guess)
    wake_s: float  # its last measured wake (or a guess)
    prewarm: bool  # pre-warming is on for it


@dataclass(frozen=True)
class AskInputs:
    waits: dict[str, float]  # candidates: what a request for each would wait now
    horizons: dict[str, float]  # candidates: the time within which their chance is asked
    loaded: dict[str, float]  # possible victims: the reload their eviction would cost


def ask_inputs(models: Iterable[ModelNow]) -> AskInputs:
    """What to ask the predictor: the chances of the candidates (stopped or asleep, with
    pre-warming on) within their horizon, and of the possible victims (awake or asleep,
    whatever their own setting) within the reload their eviction would cost."""
    waits: dict[str, float] = {}
    loaded: dict[str, float] = {}
    for model in models:
        if model.standing in (Standing.READY, Standing.ASLEEP):
            loaded[model.name] = model.start_s
        if model.prewarm and model.standing is Standing.STOPPED:
            waits[model.name] = model.start_s
        elif model.prewarm and model.standing is Standing.ASLEEP:
            waits[model.name] = min(model.wake_s, model.start_s)
    return AskInputs(waits, {name: horizon(wait) for name, wait in waits.items()}, loaded)


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
    expected: Mapping[str, float] | None = None,
    switch_rate: float = 0.0,
    settings: PolicySettings = DEFAULT_SETTINGS,
    min_probability: float = MIN_PROBABILITY,
    exact: bool = False,
) -> PreWarm | None:
    """The best pre-warm worth its cost now, or None (see the module docstring).

    `in_use`: models with traffic a moment ago (the predictor's "in use now"); idle this
    instant, between two requests of a burst, they are still never evicted. `expected`: the
    predictor's chance for models that are loaded (a victim as likely as the target is kept).
    `switch_rate`: first requests for a model per second, all users together. `exact`: the
    chances are certain (only the simulator's perfect foresight knows them so): a loaded
    model's chance in `expected` says whether it is due, and one due is kept, so evicting an
    idle engine costs nothing more (the plan's cost, recency's guess of the same, is left
    out). It measures what the goals' rules allow, not what a predictor can do."""
    expected = expected or {}
    if requests_waiting or not candidates:
        return None
    busy_gpus = {
        gpu
        for engine in snapshot.engines
        if engine.state in (EngineState.STARTING, EngineState.WAKING, EngineState.DRAINING)
        or engine.state is EngineState.STOPPING
        for gpu in engine.gpus
    }
    best: PreWarm | None = None
    for candidate in candidates:
        chance = candidate.chance
        if chance.probability < min_probability:
            continue
        # Engines as likely to be asked for as the target are kept, as if in use.
        keep = in_use | {n for n, p in expected.items() if p >= chance.probability}
        engines = [_untouchable(engine, keep) for engine in snapshot.engines]
        plan = plan_placement(
            candidate.target,
            [g for g in snapshot.gpus if g.index not in busy_gpus],
            engines,
            now=snapshot.now,
            host_ram_for_sleep=snapshot.host_ram_for_sleep,
            settings=settings,
        )
        if isinstance(plan, CannotFit) or plan.wait_for:
            continue
        if any(gpu in busy_gpus for gpu in plan.gpus):
            continue
        cancelled = 1.0 - math.exp(-switch_rate * candidate.wait_s)
        saving = chance.probability * candidate.wait_s * (1.0 - cancelled)
        victims = {e.name: e for e in engines}
        risk = sum(
            expected.get(a.name, 0.0) * (victims[a.name].start_seconds or candidate.wait_s)
            for a in plan.actions
        )
        # A cancelled start's stop is a wait (bounded by the start: one cancelled early holds
        # little yet). A wake is not cancelled but left to finish (a cancelled wake would lose
        # the sleeper): the real request waits for the rest of it.
        yielding = candidate.wait_s if plan.wake else min(CANCEL_STOP_S, candidate.wait_s)
        # A wasted pre-warm is undone later: a stop, or a sleep (its copy takes about as
        # long as the wake).
        undo = candidate.wait_s if plan.wake else CANCEL_STOP_S
        eviction = 0.0 if exact else plan.cost
        cost = eviction + risk + cancelled * yielding + (1.0 - chance.probability) * undo
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
    busy = engine.in_flight > 0 or (
        engine.state in (EngineState.READY, EngineState.SLEEPING) and engine.name in in_use
    )
    if busy or engine.state not in (EngineState.READY, EngineState.SLEEPING):
        return replace(engine, pinned=True)
    return engine
