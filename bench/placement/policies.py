"""The policies compared: three baselines from the seeds and peers, and modelyard's.

Every policy gets the same world and the same rule that no request is cut: a busy victim is
drained first (the seeds' launchers could stop an engine mid-request, the 502s their users
report; crediting them with that would not be a fair comparison). They differ only in whom
they evict and how.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from bench.placement.world import Decision, Engine, Evict, State, World
from modelyard.placement import policy
from modelyard.scheduler.core import (
    CarryOut,
    Dropped,
    EvictionsDone,
    RefuseNow,
    SchedulerCore,
    StartNow,
    WaitUntil,
    Wanted,
)
from modelyard.scheduler.decide import Ask, Snapshot

# Before issue 11 a start that had to wait gave up after 32 polls of 0.1 s ("placement did
# not settle", 503 placement_stuck).
OLD_GIVE_UP_S = 3.2


class SimPolicy(Protocol):
    name: str
    # A request still waiting (its load not begun) this long after arriving is refused;
    # None: only at its start timeout.
    gives_up_after_s: float | None

    def decide(self, target: str, world: World, out_of_memory: bool, deadline: float) -> Decision:
        """What to do before loading `target` (which is stopped or asleep)."""


def _lru(engines: Iterable[Engine]) -> list[Engine]:
    return sorted(engines, key=lambda e: (e.last_used or 0.0, e.spec.name))


def _drain_or_stop(victims: list[Engine]) -> Decision:
    busy = tuple(e.spec.name for e in victims if e.in_flight)
    if busy:
        return Decision(wait_for=busy)
    return Decision(evict=tuple(Evict(e.spec.name) for e in victims))


class OneAtATime:
    """The seed 000's launcher: every cold request stops all other backends first."""

    name = "one-at-a-time (seed 000)"
    gives_up_after_s = None

    def decide(self, target: str, world: World, out_of_memory: bool, deadline: float) -> Decision:
        others = [e for e in world.engines.values() if e.resident and e.spec.name != target]
        return _drain_or_stop(_lru(others))


class LruByCount:
    """At most `slots` resident models, least recently used out first; no memory accounting
    (llama-swap without hand-written groups; Ollama's OLLAMA_MAX_LOADED_MODELS without its
    estimates). A start that does not fit fails with OOM; the retry then evicts until the
    memory fits, as an operator's "evict more and retry once" would."""

    gives_up_after_s = None

    def __init__(self, slots: int = 2) -> None:
        self.slots = slots
        self.name = f"LRU by count ({slots} resident)"

    def decide(self, target: str, world: World, out_of_memory: bool, deadline: float) -> Decision:
        others = _lru(e for e in world.engines.values() if e.resident and e.spec.name != target)
        victims = others[: max(len(others) + 1 - self.slots, 0)]
        if out_of_memory:
            need = world.engines[target].spec.bytes
            free = world.gpu_bytes - world.used_bytes() + sum(e.held_bytes for e in victims)
            for engine in others[len(victims) :]:
                if free >= need:
                    break
                victims.append(engine)
                free += engine.held_bytes
        return _drain_or_stop(victims)


class LruByFootprint:
    """The seed 004's gateway: known footprints; if the model does not fit, stop the least
    recently used models until it does. No sleep."""

    name = "LRU by footprint (seed 004)"
    gives_up_after_s = None

    def decide(self, target: str, world: World, out_of_memory: bool, deadline: float) -> Decision:
        need = world.engines[target].spec.bytes
        free = world.gpu_bytes - world.used_bytes()
        victims: list[Engine] = []
        idle_first = sorted(
            (e for e in world.engines.values() if e.resident and e.spec.name != target),
            key=lambda e: (e.in_flight > 0, e.last_used or 0.0, e.spec.name),
        )
        for engine in idle_first:
            if free >= need:
                break
            victims.append(engine)
            free += engine.held_bytes
        return _drain_or_stop(victims)


class Modelyard:
    """The gateway's own scheduler core (`modelyard.scheduler.core.SchedulerCore`, the object
    the gateway's driver steps, not a copy), fed what the gateway would have measured."""

    def __init__(
        self,
        settings: policy.PolicySettings = policy.DEFAULT_SETTINGS,
        sleep: bool = True,
        before_issue_11: bool = False,
    ) -> None:
        self.settings = settings
        self.core = SchedulerCore(settings)
        self.sleep = sleep
        self.gives_up_after_s = OLD_GIVE_UP_S if before_issue_11 else None
        self.name = "modelyard" if sleep else "modelyard, sleep off (ablation)"
        if before_issue_11:
            self.name = "modelyard before issue 11 (gave up after 3.2 s)"

    def decide(self, target: str, world: World, out_of_memory: bool, deadline: float) -> Decision:
        engines = tuple(self._engine(e) for e in world.engines.values() if e.resident)
        spec = world.engines[target].spec
        snapshot = Snapshot(
            now=world.now,
            gpus=(policy.GpuCapacity(0, world.gpu_bytes),),
            engines=engines,
            host_ram_for_sleep=world.host_ram_for_sleep - world.host_bytes_held(),
            start_seconds={e.spec.name: e.spec.start_s for e in world.engines.values()},
        )
        ask = Ask(policy.Target(target, spec.bytes), deadline)
        (command,) = self.core.step(
            Wanted(ask, snapshot, max_eviction_rounds=len(world.engines) + 1)
        )
        if isinstance(command, RefuseNow):
            return Decision(refuse=command.code)
        if isinstance(command, WaitUntil):
            return Decision(wait_for=command.waiting_for)
        if isinstance(command, StartNow):
            return Decision()
        assert isinstance(command, CarryOut)
        # The simulator carries the evictions out and starts the target at once (their
        # seconds are added to its load), as the driver does when they end: tell the core.
        self.core.step(EvictionsDone(target, command.number, ok=True))
        self.core.step(Dropped(target))
        return Decision(
            evict=tuple(
                Evict(a.name, a.level if isinstance(a, policy.Sleep) else 0)
                for a in command.actions
            )
        )

    def _engine(self, engine: Engine) -> policy.Engine:
        spec = engine.spec
        asleep = engine.state is State.SLEEPING
        return policy.Engine(
            name=spec.name,
            state=policy.EngineState.SLEEPING if asleep else policy.EngineState.READY,
            gpus=(0,),
            awake_bytes_per_gpu=spec.bytes,
            asleep_bytes_per_gpu=spec.asleep_bytes,
            in_flight=engine.in_flight,
            last_used=engine.last_used,
            start_seconds=spec.start_s,
            # What the gateway would have measured: the wake at the level it last slept at
            # (level 1 before any sleep, the level it is configured for).
            wake_seconds=spec.wake_seconds(engine.sleeping_level or 1),
            sleep_level=spec.sleep_level if self.sleep else 0,
            sleeping_level=engine.sleeping_level if asleep else 0,
            sleep_host_bytes=spec.bytes,
        )


def all_policies() -> list[SimPolicy]:
    """The four policies of issue 4, and modelyard without sleep to show what sleep adds."""
    return [
        OneAtATime(),
        LruByCount(2),
        LruByFootprint(),
        Modelyard(sleep=False),
        Modelyard(before_issue_11=True),
        Modelyard(),
    ]
