"""A model's engine slots as the scheduler reads them: which one serves a request, the load
the scale timer reports to the core, and what status shows.

A model's slots are its own engine's supervisor (keyed by its name) and one per other
replica (`name#2`, ...; scheduler/scaling.py). The scheduler owns them; this module only
reads them, so the decisions stay in scheduler/balance.py and the core.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

from modelyard.config.schema import ReplicasConfig
from modelyard.placement.policy import Target
from modelyard.scheduler.balance import Affinity, ReplicaLoad, choose_replica
from modelyard.scheduler.scaling import ModelLoad
from modelyard.scheduler.supervisor import ModelState, ModelSupervisor

# An engine that serves or is about to: counts toward its model's replicas.
RUNNING = (ModelState.READY, ModelState.STARTING, ModelState.WAKING)


class ReplicaRouting:
    """Which engine of a model serves each request, and how often conversations kept theirs."""

    def __init__(self) -> None:
        self._affinity = Affinity()
        # Requests whose conversation had gone to an engine before: [kept it, moved], by model.
        self.counts: dict[str, list[int]] = {}

    def choose(
        self,
        model: str,
        slots: Sequence[ModelSupervisor],
        target_in_flight: int,
        affinity: str | None,
        has_adapter: Callable[[ModelSupervisor], bool],
        avoided: Collection[str] = (),
    ) -> ModelSupervisor:
        """One of the ready engines (scheduler/balance.py); with none ready, one whose start
        or wake is under way when the model's own engine is down, else the model's own
        engine (which starts). `slots[0]` is the model's own. Engines whose key is in
        `avoided` (one that just refused a connection) serve only when no other is ready."""
        primary = slots[0]
        ready = [s for s in slots if s.state is ModelState.READY and s.engine is not None]
        if avoided:
            ready = [s for s in ready if s.key not in avoided] or ready
        if not ready:
            if primary.state in (ModelState.STOPPED, ModelState.FAILED):
                coming = [
                    s for s in slots[1:] if s.state in (ModelState.STARTING, ModelState.WAKING)
                ]
                if coming:
                    return coming[0]
            return primary
        loads = [ReplicaLoad(s.key, s.in_flight, has_adapter(s)) for s in ready]
        remembered = f"{model}\0{affinity}" if affinity else None
        last = self._affinity.get(remembered) if remembered else None
        chosen = choose_replica(loads, target_in_flight, last)
        if remembered is not None:
            self._affinity.remember(remembered, chosen)
            if last is not None:
                kept = self.counts.setdefault(model, [0, 0])
                kept[0 if last == chosen else 1] += 1
        return next(s for s in ready if s.key == chosen)


def model_load(
    name: str,
    slots: Sequence[ModelSupervisor],
    replicas: ReplicasConfig,
    target_of: Callable[[ModelSupervisor], Target],
) -> ModelLoad:
    """The model's demand and engines for the core's `ScaleCheck`."""
    running = [s for s in slots if s.state in RUNNING]
    # A free slot: a sleeping engine first (a wake beats a start), then a stopped one that
    # is not waiting out a crash-loop back-off.
    free = [s for s in slots if s.state is ModelState.SLEEPING and not s.placing] or [
        s
        for s in slots
        if s.state in (ModelState.STOPPED, ModelState.FAILED)
        and s.backoff_remaining() == 0
        and s.waiting == 0
    ]
    chosen = free[0] if free else None
    return ModelLoad(
        model=name,
        outstanding=sum(s.in_flight + s.waiting for s in slots),
        running=len(running),
        starting=sum(1 for s in running if s.state is not ModelState.READY),
        target_in_flight=replicas.target_in_flight,
        max_replicas=replicas.max,
        free_slot=chosen.key if chosen is not None else None,
        target=target_of(chosen) if chosen is not None else None,
        siblings=tuple(s.key for s in slots if s is not chosen),
    )


def replicas_status(
    slots: Sequence[ModelSupervisor],
    replicas: ReplicasConfig,
    scale_blocked: str | None,
    counts: Sequence[int],
) -> dict[str, Any]:
    """The model's engines (those that hold one), its replica settings, why the last
    scale-up it needed was not made, and how often conversations kept their engine."""
    kept, moved = counts
    return {
        "min": replicas.min,
        "max": replicas.max,
        "target_in_flight": replicas.target_in_flight,
        "running": sum(1 for s in slots if s.state in RUNNING),
        "engines": [
            engine_status(s)
            for s in slots
            if s.state not in (ModelState.STOPPED, ModelState.FAILED)
        ],
        "scale_blocked": scale_blocked,
        "affinity_kept": kept,
        "affinity_moved": moved,
    }


def engine_status(supervisor: ModelSupervisor) -> dict[str, Any]:
    engine = supervisor.engine
    return {
        "key": supervisor.key,
        "state": supervisor.state.value,
        "in_flight": supervisor.in_flight,
        "queued": supervisor.waiting,
        "pid": engine.pid if engine is not None else None,
        "port": engine.port if engine is not None else None,
        "node": engine.node if engine is not None else None,
        "gpus": list(supervisor.budget.gpu_indexes) if supervisor.budget else [],
    }
