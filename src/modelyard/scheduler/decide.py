"""The scheduler's decision: what to do now so that one model can start or wake.

Pure: no I/O, no clock of its own, no asyncio. The scheduler (and the placement simulator in
`bench/placement`, through this very function) describes the world as a `Snapshot` and asks
for one model; the answer is one `Decision`:

- `Go`: start (or wake) now, with this memory budget;
- `Evict`: sleep or stop these idle engines first, then ask again;
- `Wait`: nothing can be done until one of these engines changes (a drain ends, a start or
  wake finishes, a stop completes), or until the request's own deadline;
- `Refuse`: answer 503 with `Retry-After` (never an engine failure).

Memory comes from `plan_placement`. Machines without managed GPUs go the same path with an
unlimited inventory (`unlimited_gpus`): every model gets a virtual GPU of its own, so memory
never stands in the way and only exclusive groups decide, with the same waits and deadlines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

# Re-exported: the core's callers without managed GPUs (tests, the simulator) take them here.
from modelyard.placement.planning import UNLIMITED_BYTES as UNLIMITED_BYTES
from modelyard.placement.planning import unlimited_gpus as unlimited_gpus
from modelyard.placement.policy import (
    DEFAULT_SETTINGS,
    Action,
    CannotFit,
    Engine,
    GpuCapacity,
    PolicySettings,
    Target,
    WaitFor,
    plan_placement,
)

# A refusal with nothing better to go on: the SDK's default back-off is about this.
DEFAULT_RETRY_AFTER_S = 5.0
# "Can never fit" is refused at once; a later retry helps only after a configuration change.
NEVER_FITS_RETRY_AFTER_S = 60.0


@dataclass(frozen=True)
class Snapshot:
    """The world as the scheduler sees it at `now` (policy types, so it is plain data)."""

    now: float
    gpus: tuple[GpuCapacity, ...]
    engines: tuple[Engine, ...]
    host_ram_for_sleep: int | None = None
    # Seconds each model typically takes to start (measured, else estimated): retry hints.
    start_seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Ask:
    """One model wanted by at least one request; `deadline` is the earliest waiter's."""

    target: Target
    deadline: float


@dataclass(frozen=True)
class Go:
    gpus: tuple[int, ...]
    bytes_per_gpu: int
    wake: bool
    explanation: str


@dataclass(frozen=True)
class Evict:
    actions: tuple[Action, ...]
    gpus: tuple[int, ...]  # where the target goes once they are done
    bytes_per_gpu: int
    explanation: str


@dataclass(frozen=True)
class Wait:
    """Ask again when any of `for_models` changes state, or give up at `until`."""

    for_models: tuple[WaitFor, ...]
    until: float
    explanation: str


@dataclass(frozen=True)
class Refuse:
    status: int
    retry_after: float
    code: str
    message: str


Decision = Go | Evict | Wait | Refuse


def decide(snapshot: Snapshot, ask: Ask, settings: PolicySettings = DEFAULT_SETTINGS) -> Decision:
    """What to do now for `ask` (see the module docstring)."""
    name = ask.target.name
    # First: could it fit on an empty machine at all? If not, no wait ever helps.
    alone = plan_placement(
        ask.target,
        [GpuCapacity(g.index, g.total_bytes) for g in snapshot.gpus],
        [e for e in snapshot.engines if e.name == name],
        now=snapshot.now,
        host_ram_for_sleep=None,
        settings=settings,
    )
    if isinstance(alone, CannotFit):
        return Refuse(
            503,
            NEVER_FITS_RETRY_AFTER_S,
            "model_cannot_fit",
            f"model {name!r} can never be placed: {alone.reason}",
        )
    plan = plan_placement(
        ask.target,
        snapshot.gpus,
        snapshot.engines,
        now=snapshot.now,
        host_ram_for_sleep=snapshot.host_ram_for_sleep,
        settings=settings,
    )
    if isinstance(plan, CannotFit):
        # Pinned engines (or other processes) hold what it needs: nothing we may evict helps.
        return Refuse(
            503,
            _retry_hint(snapshot, (), name),
            "insufficient_gpu_memory",
            f"model {name!r} cannot be placed now: {plan.reason}",
        )
    if plan.wait_for:
        if snapshot.now >= ask.deadline:
            waits = ", ".join(f"{w.name} ({w.reason})" for w in plan.wait_for)
            return Refuse(
                503,
                _retry_hint(snapshot, plan.wait_for, name),
                "waiting_for_gpu",
                f"model {name!r} waited for room until its start deadline: still waiting "
                f"for {waits}; retry later",
            )
        return Wait(plan.wait_for, ask.deadline, plan.explanation)
    if plan.actions:
        return Evict(plan.actions, plan.gpus, plan.bytes_per_gpu, plan.explanation)
    return Go(plan.gpus, plan.bytes_per_gpu, plan.wake, plan.explanation or "fits")


def _retry_hint(snapshot: Snapshot, waits: Sequence[WaitFor], name: str) -> float:
    """When a retry is likely to be served: the typical start of what stands in the way."""
    times = [snapshot.start_seconds[w.name] for w in waits if w.name in snapshot.start_seconds]
    if not times and name in snapshot.start_seconds:
        times = [snapshot.start_seconds[name]]
    return max(1.0, round(min(times))) if times else DEFAULT_RETRY_AFTER_S
