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


class SimPolicy(Protocol):
    name: str

    def decide(self, target: str, world: World, out_of_memory: bool) -> Decision:
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

    def decide(self, target: str, world: World, out_of_memory: bool) -> Decision:
        others = [e for e in world.engines.values() if e.resident and e.spec.name != target]
        return _drain_or_stop(_lru(others))


class LruByCount:
    """At most `slots` resident models, least recently used out first; no memory accounting
    (llama-swap without hand-written groups; Ollama's OLLAMA_MAX_LOADED_MODELS without its
    estimates). A start that does not fit fails with OOM; the retry then evicts until the
    memory fits, as an operator's "evict more and retry once" would."""

    def __init__(self, slots: int = 2) -> None:
        self.slots = slots
        self.name = f"LRU by count ({slots} resident)"

    def decide(self, target: str, world: World, out_of_memory: bool) -> Decision:
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

    def decide(self, target: str, world: World, out_of_memory: bool) -> Decision:
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
    """`modelyard.placement.policy.plan_placement`, fed what the gateway would measure."""

    def __init__(
        self, settings: policy.PolicySettings = policy.DEFAULT_SETTINGS, sleep: bool = True
    ) -> None:
        self.settings = settings
        self.sleep = sleep
        self.name = "modelyard" if sleep else "modelyard, sleep off (ablation)"

    def decide(self, target: str, world: World, out_of_memory: bool) -> Decision:
        engines = [self._engine(e) for e in world.engines.values() if e.resident]
        spec = world.engines[target].spec
        plan = policy.plan_placement(
            policy.Target(target, spec.bytes),
            [policy.GpuCapacity(0, world.gpu_bytes)],
            engines,
            now=world.now,
            host_ram_for_sleep=world.host_ram_for_sleep - world.host_bytes_held(),
            settings=self.settings,
        )
        if isinstance(plan, policy.CannotFit):
            raise RuntimeError(plan.reason)
        if plan.wait_for:
            return Decision(wait_for=tuple(w.name for w in plan.wait_for))
        return Decision(
            evict=tuple(
                Evict(a.name, a.level if isinstance(a, policy.Sleep) else 0) for a in plan.actions
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
    return [OneAtATime(), LruByCount(2), LruByFootprint(), Modelyard(sleep=False), Modelyard()]
