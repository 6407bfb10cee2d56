"""The decision's engine records, built one way whether the GPUs are managed or not.

The scheduler's snapshot (`Scheduler._snapshot`) reads a `Planning`: the GPUs, every engine
on them and what a target needs. With managed GPUs that is the `PlacementCoordinator` (the
inventory, and where each engine was placed and what it measured). Without, it is
`UnmanagedGpus`: each engine on a boundless GPU of its own, so only exclusive groups, pins and
idle times decide. Both build each engine's record with `engine_record`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from modelyard.config.schema import GatewayConfig
from modelyard.lifecycle import EngineOwner, ModelState
from modelyard.placement.footprints import Footprint
from modelyard.placement.policy import Engine, EngineState, GpuCapacity, Target


def unlimited_gpus(models: Sequence[str]) -> tuple[GpuCapacity, ...]:
    """The inventory of a machine without managed GPUs: one boundless GPU per engine."""
    return tuple(GpuCapacity(index, UNLIMITED_BYTES) for index in range(len(models)))


# A GPU without managed memory: larger than any engine.
UNLIMITED_BYTES = 1 << 62

# A record's policy state; engines in other states (stopped, failed) hold nothing.
POLICY_STATE = {
    ModelState.STARTING: EngineState.STARTING,
    ModelState.READY: EngineState.READY,
    ModelState.DRAINING: EngineState.DRAINING,
    ModelState.SLEEPING: EngineState.SLEEPING,
    ModelState.WAKING: EngineState.WAKING,
    ModelState.STOPPING: EngineState.STOPPING,
}


class Planning(Protocol):
    """What a decision reads: the GPUs, the engines on them, and the target's needs."""

    config: GatewayConfig  # the current one: a reload replaces it

    def gpu_capacities(self) -> list[GpuCapacity]: ...

    def engines(self, target: str) -> list[Engine]: ...

    def host_ram_left(self) -> int | None: ...

    def target(self, owner: EngineOwner) -> Target: ...


def engine_record(
    key: str,
    owner: EngineOwner,
    config: GatewayConfig,
    target: str,
    *,
    gpus: tuple[int, ...],
    awake_bytes_per_gpu: int,
    asleep_bytes_per_gpu: int,
    sleep_level: int,
    footprint: Footprint | None = None,
) -> Engine | None:
    """One engine as the decision sees it (None when it holds nothing, or is the target's
    own start: a wake is planned on the GPUs it sleeps on, a start is not)."""
    state = POLICY_STATE.get(owner.state)
    if state is None:
        return None
    if key == target and state not in (EngineState.SLEEPING, EngineState.WAKING):
        return None
    model = config.models.get(key)  # None for a removed model's engine, still draining
    return Engine(
        name=key,
        state=state,
        gpus=gpus,
        # A sleeper being stopped never wakes again: it holds its asleep size.
        awake_bytes_per_gpu=asleep_bytes_per_gpu if owner.stopping_asleep else awake_bytes_per_gpu,
        asleep_bytes_per_gpu=asleep_bytes_per_gpu,
        in_flight=owner.demand,
        last_used=owner.last_used if owner.last_used is not None else owner.ready_since,
        start_seconds=owner.timings.last_start_s
        or (footprint.start_seconds if footprint else None),
        wake_seconds=owner.timings.last_wake_s or (footprint.wake_seconds if footprint else None),
        sleep_level=sleep_level if owner.can_sleep else 0,
        sleeping_level=owner.sleep_level if state is EngineState.SLEEPING else 0,
        pinned=model.pinned if model is not None else False,
        exclusive_group=config.exclusive_group_of(key),
    )


class UnmanagedGpus:
    """A machine without managed GPUs: every engine (by its key, configured or draining) on
    a boundless GPU of its own."""

    def __init__(
        self, config: GatewayConfig, engines: Callable[[], Mapping[str, EngineOwner]]
    ) -> None:
        self.config = config
        self._engines = engines

    def _index(self) -> dict[str, int]:
        return {key: index for index, key in enumerate(self._engines())}

    def gpu_capacities(self) -> list[GpuCapacity]:
        return list(unlimited_gpus(list(self._engines())))

    def engines(self, target: str) -> list[Engine]:
        records = []
        for index, (key, owner) in enumerate(self._engines().items()):
            if owner.placing and owner.state is not ModelState.SLEEPING:
                continue  # waiting for its go: it holds nothing yet
            model = self.config.models.get(key)
            record = engine_record(
                key,
                owner,
                self.config,
                target,
                gpus=(index,),
                awake_bytes_per_gpu=0,
                asleep_bytes_per_gpu=0,
                sleep_level=(model.sleep or 0) if model is not None else 0,
            )
            if record is not None:
                records.append(record)
        return records

    def host_ram_left(self) -> int | None:
        return None

    def target(self, owner: EngineOwner) -> Target:
        return Target(
            name=owner.key,  # a replica is planned as an engine of its own
            bytes_per_gpu=0,
            gpus=(self._index()[owner.key],),
            exclusive_group=self.config.exclusive_group_of(owner.name),
        )
