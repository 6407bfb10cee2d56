"""Replicas: when a model gets another engine, where it may go, and which idle one stops.

Pure: no I/O, no clock of its own. The core (scheduler/core.py) keeps the one record that
must outlive a step (since when each model is overloaded) and calls these.

A model's engines are its *slots*: the first is keyed by the model's name (as without
replicas), the others `name#2`, `name#3`, ... (`replica_key`). Placement, evictions and the
cost model see every slot as an engine of its own, so a replica is planned, measured and
evicted exactly as any engine; only the scheduler knows they serve one model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from modelyard.placement.policy import Engine, Target

# How long a model must stay above its target before another replica is added: a burst
# shorter than this (a few clients retrying at once) would get an engine whose 30-60 s start
# ends long after the burst. One second is what the issue asks of the reaction, and the
# scheduler's timer checks every quarter second, so a scale-up begins 1-1.25 s in.
SCALE_UP_AFTER_S = 1.0

REPLICA_SEPARATOR = "#"


def replica_key(model: str, number: int) -> str:
    """The engine key of replica `number` (1 is the model's own key, as without replicas)."""
    return model if number == 1 else f"{model}{REPLICA_SEPARATOR}{number}"


@dataclass(frozen=True)
class ModelLoad:
    """One model's demand and engines, as the driver sees them at a scale check."""

    model: str
    outstanding: int  # requests in flight on its engines plus those waiting for one
    running: int  # engines ready, starting or waking
    starting: int  # of those, starting or waking
    target_in_flight: int
    max_replicas: int
    free_slot: str | None  # the key a new replica would take (None: every slot is taken)
    target: Target | None  # what that slot needs (bytes, allowed GPUs), before spreading
    siblings: tuple[str, ...] = ()  # the keys of its other slots


def overloaded(load: ModelLoad) -> bool:
    """More requests than its running engines aim to carry (none running: the request path
    starts the first, not the scaler)."""
    return load.running > 0 and load.outstanding > load.target_in_flight * load.running


def may_add(load: ModelLoad) -> bool:
    """Room in its slots, and no replica start under way (one at a time: the next is decided
    once this one serves and the load is measured again)."""
    return (
        load.running < load.max_replicas
        and load.starting == 0
        and load.free_slot is not None
        and load.target is not None
    )


def spread(
    target: Target, siblings: Iterable[str], engines: Sequence[Engine], all_gpus: Sequence[int]
) -> Target | None:
    """`target` limited to GPUs that hold none of its siblings: two engines of one model on
    one GPU share its compute, so the second adds memory use and little throughput. None
    when no allowed GPU is left."""
    names = set(siblings)
    taken = {gpu for engine in engines if engine.name in names for gpu in engine.gpus}
    if not taken:
        return target
    allowed = target.gpus or tuple(all_gpus)
    left = tuple(gpu for gpu in allowed if gpu not in taken)
    if len(left) < target.tensor_parallel:
        return None
    return replace(target, gpus=left)


def past_idle_timeout(idle_s: float | None, idle_timeout: float) -> bool:
    """Idle (`idle_s` not None: ready, nothing in flight) for at least its timeout (0:
    never)."""
    return idle_s is not None and idle_timeout > 0 and idle_s >= idle_timeout


@dataclass(frozen=True)
class IdleSlot:
    """One engine's idleness, for the idle timer's verdicts (`idle_stops`)."""

    key: str
    model: str
    idle_s: float | None  # None: busy, or not ready
    idle_timeout: float  # 0: never idle-stopped
    pinned: bool
    sleep_level: int  # 0: cannot sleep, so it stops
    running: bool  # ready, starting or waking: counts toward the model's engines
    min_replicas: int = 0


def idle_stops(slots: Sequence[IdleSlot]) -> list[tuple[IdleSlot, bool]]:
    """The engines idle past their timeout that may go, each with whether it is a scale-down
    (another engine of its model runs on, so it stops rather than sleeps: a sleeping second
    copy would hold memory for nothing).

    A model keeps `min_replicas` engines running; replicas go before the model's own slot,
    the longest idle first, and the model's own engine only as the last one (its state is
    the model's in status, and its measured footprint and sleep level are the ones a wake
    reuses).
    """
    by_model: dict[str, list[IdleSlot]] = {}
    for slot in slots:
        by_model.setdefault(slot.model, []).append(slot)
    chosen: list[tuple[IdleSlot, bool]] = []
    for model, group in by_model.items():
        running = sum(1 for slot in group if slot.running)
        eligible = [
            slot
            for slot in group
            if past_idle_timeout(slot.idle_s, slot.idle_timeout) and not slot.pinned
        ]
        eligible.sort(key=lambda slot: (slot.key == model, -(slot.idle_s or 0.0)))
        for slot in eligible:
            if running <= slot.min_replicas:
                break
            if slot.key == model and running > 1:
                continue  # the model's own engine goes last: its state is the model's
            chosen.append((slot, running > 1))
            running -= 1
    return chosen
