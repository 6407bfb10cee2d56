"""An engine's lifecycle as every part sees it: its states and the transitions allowed between
them, the handle of a running engine, and the start and sleep interfaces.

A small module at the bottom: the scheduler, placement, observability, the API and the runtimes
import it, and it imports none of them, so no part reads another's fields with `getattr` or asks
which runtime an engine came from with `isinstance`, and a supervisor reports what happened to
its engine without knowing who listens.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from modelyard.engines.base import LaunchSpec, MemoryBudget


class ModelState(enum.StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"  # finishing requests before a stop or sleep already decided
    SLEEPING = "sleeping"
    WAKING = "waking"
    STOPPING = "stopping"
    FAILED = "failed"


_S = ModelState

# Every change of state a supervisor may make; anything else is a bug (`ForbiddenTransition`).
ALLOWED: Mapping[ModelState, frozenset[ModelState]] = {
    _S.STOPPED: frozenset({_S.STARTING}),
    # A refusal or a cancelled start gives the model back as it was (stopped or failed); a
    # cancelled start whose engine runs stops it (no longer a start: the GPU's slot is free).
    _S.STARTING: frozenset({_S.READY, _S.STOPPED, _S.FAILED, _S.STOPPING}),
    # Draining before a stop or sleep; stopping at once (idle, or hung); lost (a crash).
    _S.READY: frozenset({_S.DRAINING, _S.STOPPING, _S.FAILED}),
    # A failed sleep leaves it serving; a crash while draining leaves it failed.
    _S.DRAINING: frozenset({_S.SLEEPING, _S.STOPPING, _S.READY, _S.FAILED}),
    _S.SLEEPING: frozenset({_S.WAKING, _S.STOPPING, _S.FAILED}),
    _S.WAKING: frozenset({_S.READY, _S.FAILED}),
    # A stop that errs while the process still runs leaves it as it was (serving, or
    # asleep); a hung engine's stop ends failed.
    _S.STOPPING: frozenset({_S.STOPPED, _S.READY, _S.SLEEPING, _S.FAILED}),
    _S.FAILED: frozenset({_S.STARTING}),
}


@dataclass
class ModelTimings:
    """What was measured for a model, for placement's cost model and for status."""

    last_start_s: float | None = None
    last_wake_s: float | None = None
    starts: int = 0
    wakes: int = 0
    crashes: int = 0


class ForbiddenTransition(RuntimeError):
    """A state change outside `ALLOWED`: a bug in the supervisor, caught by the tests."""


def check_transition(name: str, before: ModelState, after: ModelState) -> None:
    """Raise `ForbiddenTransition` unless `before -> after` is in the table (or no change)."""
    if after is not before and after not in ALLOWED[before]:
        raise ForbiddenTransition(f"model {name!r}: {before} -> {after} is not allowed")


class EngineHandle(Protocol):
    """A running engine as the scheduler sees it (a process, a Ray actor, a remote server, or
    a fake in tests)."""

    base_url: str
    pid: int
    port: int

    @property
    def node(self) -> str | None:
        """On a cluster, the node it runs on; None on this machine."""
        ...

    @property
    def actor_name(self) -> str | None:
        """On a Ray cluster, its actor's name; None elsewhere."""
        ...

    @property
    def remote(self) -> bool:
        """Whether it runs outside our control (a server we only connect to): its loss is
        not a crash of ours, so it counts toward no back-off."""
        ...

    @property
    def health_path(self) -> str: ...

    @property
    def exited(self) -> asyncio.Future[Any]: ...

    async def wait_ready(self, deadline: float) -> float: ...

    async def stop(self, grace: float) -> int | None: ...

    def log_tail(self, count: int) -> list[str]: ...

    @property
    def upstream_headers(self) -> dict[str, str]:
        """Headers every request to the engine carries (its own key, when it wants one)."""
        ...

    def process_gone(self) -> bool:
        """The OS says the process has exited (before the exit is reported to us)."""
        ...

    def kill_now(self) -> None:
        """Last resort on gateway exit: kill without waiting."""
        ...

    def exit_code(self) -> int | None:
        """The process's exit code once it has exited (None while it runs)."""
        ...

    def subscribe_log(self, on_line: Callable[[str], None]) -> Callable[[], None]:
        """Follow the engine's output; returns the unsubscribe function."""
        ...


class SleepControl(Protocol):
    """vLLM's sleep endpoints (`POST /sleep?level=N`, `POST /wake_up`) for one engine."""

    async def sleep(self, base_url: str, level: int) -> None: ...

    async def wake(self, base_url: str) -> None: ...


class EngineStarter(Protocol):
    async def __call__(
        self, name: str, spec_for_port: Callable[[int], LaunchSpec]
    ) -> EngineHandle: ...


class EngineOwner(Protocol):
    """What placement reads of the part that owns one engine (the scheduler's supervisor):
    placement measures and plans on it, and never imports the scheduler."""

    name: str  # the model's name
    key: str  # the engine's own: the model's name, or its own once a reload removed the model
    engine: EngineHandle | None
    last_used: float | None
    ready_since: float | None
    timings: ModelTimings
    sleep_level: int
    stopping_asleep: bool
    placing: bool  # a start or wake waiting for the decision's go: it holds nothing yet

    @property
    def state(self) -> ModelState: ...

    @property
    def demand(self) -> int:
        """Requests that hold or want the engine: with any, it is busy, never evicted."""
        ...

    @property
    def can_sleep(self) -> bool: ...

    def launch_spec_for(self, port: int, budget: MemoryBudget | None) -> LaunchSpec: ...


class ResidencyBook(Protocol):
    """Where an engine's owner reports that what the engine holds changed (it started, woke,
    slept, stopped or was lost), so it is measured and learned (placement). The owner only
    reports: it asks nothing, and waits for no decision here."""

    async def finished(self, owner: EngineOwner, ok: bool) -> None: ...
