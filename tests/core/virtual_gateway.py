"""A gateway in virtual time around the real decision function, for synchronous tests.

Like llama-swap's scheduler tests: no processes, no sleeps, no asyncio. Events (arrivals,
starts and wakes finishing, crashes, requests ending, deadlines) are processed in time order;
after each one every model with waiting requests asks `decide()` (the scheduler's own pure
function, not a copy) and the driver carries out the answer the way the scheduler does:
`Go` starts or wakes, `Evict` sleeps or stops at once and asks again, `Wait` does nothing
until the next event, `Refuse` answers the waiting requests 503 with Retry-After.

Timings default to a real GPU's: starts of 30-60 s, wakes of 0.3-3 s.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from modelyard.placement.policy import Engine, EngineState, GpuCapacity, Sleep, Target
from modelyard.scheduler.decide import (
    Ask,
    Evict,
    Go,
    Refuse,
    Snapshot,
    Wait,
    decide,
    unlimited_gpus,
)

GIB = 1024**3


@dataclass
class Model:
    bytes: int = 10 * GIB
    start_s: float = 40.0
    wake_s: float = 1.0
    sleep_level: int = 0
    asleep_bytes: int = 0
    pinned: bool = False
    group: str | None = None
    start_timeout: float = 300.0
    crash_after_s: float | None = None  # the next start dies after this long


@dataclass
class Outcome:
    request: int
    model: str
    arrived: float
    served_at: float | None = None
    refused_at: float | None = None
    status: int | None = None
    code: str | None = None
    retry_after: float | None = None
    message: str = ""

    @property
    def waited(self) -> float:
        end = self.served_at if self.served_at is not None else self.refused_at
        assert end is not None
        return end - self.arrived


@dataclass
class _Live:
    state: EngineState | None = None  # None: stopped
    in_flight: int = 0
    waiters: list[int] = field(default_factory=list)
    last_used: float | None = None
    sleeping_level: int = 0
    generation: int = 0  # a start or wake in progress (its finish event names it)
    measured_start: float | None = None


class VirtualGateway:
    def __init__(
        self,
        models: dict[str, Model],
        gpus: list[int] | None,
        host_ram_for_sleep: int | None = None,
    ) -> None:
        """`gpus`: the GPUs' sizes in bytes; None for a machine without managed GPUs."""
        self.models = models
        self.gpus = gpus
        self.host_ram = host_ram_for_sleep
        self.now = 0.0
        self.live = {name: _Live() for name in models}
        self.outcomes: list[Outcome] = []
        self.log: list[tuple[float, str, str]] = []  # (time, model, what)
        self.peak_bytes = [0] * len(gpus or [])
        self._events: list[tuple[float, int, str, object]] = []
        self._seq = 0
        self._durations: dict[int, float] = {}

    # ----- the test's inputs -----

    def request(self, at: float, model: str, duration: float = 5.0) -> int:
        index = len(self.outcomes)
        self.outcomes.append(Outcome(index, model, at))
        self._durations[index] = duration
        self._push(at, "arrive", index)
        self._push(at + self.models[model].start_timeout, "deadline", index)
        return index

    def set_ready(self, model: str, at: float = 0.0, last_used: float | None = None) -> None:
        """Start the test with this model already running (and idle)."""
        live = self.live[model]
        live.state = EngineState.READY
        live.last_used = at if last_used is None else last_used
        live.measured_start = self.models[model].start_s

    def run(self, until: float = 10_000.0) -> list[Outcome]:
        while self._events and self._events[0][0] <= until:
            at, _, kind, data = heapq.heappop(self._events)
            self.now = at
            self._handle(kind, data)
            self._decide_all()
        return self.outcomes

    # ----- events -----

    def _push(self, at: float, kind: str, data: object) -> None:
        self._seq += 1
        heapq.heappush(self._events, (at, self._seq, kind, data))

    def _handle(self, kind: str, data: object) -> None:
        if kind == "arrive":
            assert isinstance(data, int)
            outcome = self.outcomes[data]
            live = self.live[outcome.model]
            if live.state is EngineState.READY:
                self._serve(outcome.model, data)
            else:
                live.waiters.append(data)
        elif kind == "done":
            assert isinstance(data, str)
            self.live[data].in_flight -= 1
            self.live[data].last_used = self.now
        elif kind == "loaded":
            name, generation = data  # type: ignore[misc]
            live = self.live[name]
            if live.generation != generation or live.state not in (
                EngineState.STARTING,
                EngineState.WAKING,
            ):
                return
            if live.state is EngineState.STARTING:
                live.measured_start = self.models[name].start_s
            live.state = EngineState.READY
            live.sleeping_level = 0
            self.log.append((self.now, name, "ready"))
            for index in live.waiters:
                self._serve(name, index)
            live.waiters = []
        elif kind == "crash":
            name, generation = data  # type: ignore[misc]
            live = self.live[name]
            if live.generation != generation or live.state is not EngineState.STARTING:
                return
            live.state = None
            self.log.append((self.now, name, "crashed"))
            for index in live.waiters:
                self._answer(index, 502, "engine_start_failed", 5.0, "crashed while starting")
            live.waiters = []
        elif kind == "deadline":
            assert isinstance(data, int)
            outcome = self.outcomes[data]
            live = self.live[outcome.model]
            if data in live.waiters and live.state not in (
                EngineState.STARTING,
                EngineState.WAKING,
            ):
                live.waiters.remove(data)
                self._answer(data, 503, "start_timeout", 5.0, "not ready within start_timeout")

    def _serve(self, name: str, index: int) -> None:
        outcome = self.outcomes[index]
        outcome.served_at = self.now
        outcome.status = 200
        self.live[name].in_flight += 1
        self.live[name].last_used = self.now
        self._push(self.now + self._durations[index], "done", name)

    def _answer(self, index: int, status: int, code: str, retry: float, message: str) -> None:
        outcome = self.outcomes[index]
        outcome.refused_at, outcome.status, outcome.code = self.now, status, code
        outcome.retry_after, outcome.message = retry, message

    # ----- deciding, as the scheduler does -----

    def _decide_all(self) -> None:
        asking = sorted(
            (name for name, live in self.live.items() if live.waiters and self._at_rest(name)),
            key=lambda name: min(self.live[name].waiters),
        )
        for name in asking:
            for _ in range(len(self.models) + 2):  # an Evict is carried out, then ask again
                live = self.live[name]
                if not live.waiters or not self._at_rest(name):
                    break
                deadline = max(self.outcomes[i].arrived for i in live.waiters)
                deadline += self.models[name].start_timeout
                decision = decide(self._snapshot(name), Ask(self._target(name), deadline))
                if isinstance(decision, Go):
                    self._go(name)
                    break
                if isinstance(decision, Refuse):
                    for index in live.waiters:
                        self._answer(
                            index,
                            decision.status,
                            decision.code,
                            decision.retry_after,
                            decision.message,
                        )
                    live.waiters = []
                    break
                if isinstance(decision, Wait):
                    self._push(decision.until, "wake_deciders", None)
                    break
                assert isinstance(decision, Evict)
                for action in decision.actions:
                    victim = self.live[action.name]
                    assert victim.in_flight == 0, f"evicted busy {action.name}"
                    if isinstance(action, Sleep):
                        victim.state, victim.sleeping_level = EngineState.SLEEPING, action.level
                        self.log.append((self.now, action.name, f"sleep{action.level}"))
                    else:
                        victim.state, victim.sleeping_level = None, 0
                        self.log.append((self.now, action.name, "stop"))

    def _at_rest(self, name: str) -> bool:
        return self.live[name].state in (None, EngineState.SLEEPING)

    def _go(self, name: str) -> None:
        live, model = self.live[name], self.models[name]
        live.generation += 1
        waking = live.state is EngineState.SLEEPING
        live.state = EngineState.WAKING if waking else EngineState.STARTING
        self.log.append((self.now, name, "wake" if waking else "start"))
        took = model.wake_s if waking else model.start_s
        if not waking and model.crash_after_s is not None:
            self._push(self.now + model.crash_after_s, "crash", (name, live.generation))
            model.crash_after_s = None
        else:
            self._push(self.now + took, "loaded", (name, live.generation))
        self._check_memory()

    def _check_memory(self) -> None:
        if self.gpus is None:
            return
        held = sum(self._held(name) for name in self.models)
        self.peak_bytes[0] = max(self.peak_bytes[0], held)
        assert held <= self.gpus[0], f"planned {held} bytes on a {self.gpus[0]}-byte GPU"

    def _held(self, name: str) -> int:
        live, model = self.live[name], self.models[name]
        if live.state is None:
            return 0
        return model.asleep_bytes if live.state is EngineState.SLEEPING else model.bytes

    def _index(self, name: str) -> int:
        return list(self.models).index(name)

    def _target(self, name: str) -> Target:
        model = self.models[name]
        if self.gpus is None:
            return Target(name, 0, gpus=(self._index(name),), exclusive_group=model.group)
        return Target(name, model.bytes, exclusive_group=model.group)

    def _snapshot(self, target: str) -> Snapshot:
        engines = []
        for name, live in self.live.items():
            if live.state is None:
                continue
            if name == target and live.state is not EngineState.SLEEPING:
                continue
            model = self.models[name]
            managed = self.gpus is not None
            engines.append(
                Engine(
                    name=name,
                    state=live.state,
                    gpus=(0,) if managed else (self._index(name),),
                    awake_bytes_per_gpu=model.bytes if managed else 0,
                    asleep_bytes_per_gpu=model.asleep_bytes if managed else 0,
                    in_flight=live.in_flight + len(live.waiters),
                    last_used=live.last_used,
                    start_seconds=live.measured_start,
                    wake_seconds=model.wake_s if model.sleep_level else None,
                    sleep_level=model.sleep_level,
                    sleeping_level=live.sleeping_level,
                    pinned=model.pinned,
                    exclusive_group=model.group,
                )
            )
        gpus = (
            tuple(GpuCapacity(i, size) for i, size in enumerate(self.gpus))
            if self.gpus is not None
            else unlimited_gpus(list(self.models))
        )
        host = None
        if self.host_ram is not None:
            held = sum(
                self.models[n].bytes
                for n, live in self.live.items()
                if live.state is EngineState.SLEEPING and live.sleeping_level == 1
            )
            host = max(self.host_ram - held, 0)
        starts = {n: live.measured_start for n, live in self.live.items() if live.measured_start}
        return Snapshot(self.now, gpus, tuple(engines), host, starts)  # type: ignore[arg-type]
