"""The simulated GPU and its engines: the state every simulated policy reads and decides on."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

# Times the gateway spends on an eviction, paid by every policy alike: a stop is SIGTERM, exit
# and the memory coming back; a level-1 sleep copies weights to host RAM (about 10 GB/s); a
# level-2 sleep discards them.
STOP_S = 2.0
SLEEP2_S = 0.5
HOST_COPY_BYTES_PER_S = 10 * 1024**3
# A start that does not fit fails with CUDA OOM after loading the weights, before the KV
# cache: about this share of its start time is lost.
OOM_AFTER_SHARE = 0.6


class State(enum.Enum):
    STOPPED = "stopped"
    LOADING = "loading"  # starting or waking
    READY = "ready"
    SLEEPING = "sleeping"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    bytes: int
    start_s: float
    wake_s: float  # level 1
    wake2_s: float
    asleep_bytes: int
    sleep_level: int

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ModelSpec:
        return cls(
            name=raw["name"],
            bytes=int(raw["bytes"]),
            start_s=float(raw["start_s"]),
            wake_s=float(raw["wake_s"]),
            wake2_s=float(raw["wake2_s"]),
            asleep_bytes=int(raw["asleep_bytes"]),
            sleep_level=int(raw["sleep_level"]),
        )

    def sleep_seconds(self, level: int) -> float:
        return SLEEP2_S if level == 2 else 0.5 + self.bytes / HOST_COPY_BYTES_PER_S

    def wake_seconds(self, level: int) -> float:
        return self.wake_s if level == 1 else self.wake2_s


@dataclass
class Engine:
    spec: ModelSpec
    state: State = State.STOPPED
    sleeping_level: int = 0
    in_flight: int = 0
    last_used: float | None = None
    draining: bool = False  # chosen as a victim: new requests wait instead of joining it
    waiters: list[int] = field(default_factory=list)  # request indexes waiting for a load

    @property
    def resident(self) -> bool:
        return self.state in (State.READY, State.LOADING, State.SLEEPING)

    @property
    def held_bytes(self) -> int:
        if self.state is State.SLEEPING:
            return self.spec.asleep_bytes
        if self.state in (State.READY, State.LOADING):
            return self.spec.bytes
        return 0


@dataclass
class World:
    gpu_bytes: int
    host_ram_for_sleep: int
    engines: dict[str, Engine]
    now: float = 0.0

    def used_bytes(self) -> int:
        return sum(engine.held_bytes for engine in self.engines.values())

    def host_bytes_held(self) -> int:
        return sum(
            e.spec.bytes
            for e in self.engines.values()
            if e.state is State.SLEEPING and e.sleeping_level == 1
        )


@dataclass(frozen=True)
class Evict:
    name: str
    sleep_level: int = 0  # 0: stop


@dataclass(frozen=True)
class Decision:
    """Evict these, then load; or, when `wait_for` is set, do nothing until they drain;
    or, with `refuse`, answer the model's waiting requests 503 (this reason)."""

    evict: tuple[Evict, ...] = ()
    wait_for: tuple[str, ...] = ()
    refuse: str | None = None
