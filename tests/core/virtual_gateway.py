"""A gateway in virtual time around the scheduler's real core, for synchronous tests.

Like llama-swap's scheduler tests: no processes, no sleeps, no asyncio. Events (arrivals,
starts, wakes, sleeps and stops finishing, crashes, requests ending, deadlines) are processed
in time order; after each one every model with waiting requests feeds `Wanted` to the real
`SchedulerCore` (scheduler/core.py, the very object the gateway's driver steps) and carries its
commands out as the driver does: `StartNow` starts or wakes, `CarryOut` sleeps or stops the
victims one after the other (each taking its model's `sleep_s` / `stop_s`) and then feeds
`EvictionsDone` back, `WaitUntil` does nothing until the next event, `RefuseNow` answers the
waiting requests 503 with Retry-After. Other decisions go on while an eviction runs.

Timings default to a real GPU's: starts of 30-60 s, wakes of 0.3-3 s. Stops and sleeps take
no time unless a model says so (`stop_s`, `sleep_s`; a real vLLM stop takes 2-15 s).

With an `idle_timeout`, the idle timer runs as the driver's does: an engine idle that long is
put to sleep (a model with a sleep level) or stopped, as the core's `IdleCheck` decides.
Without one (the default), engines stay until an eviction.

It records what the properties of issue 22 are checked on: every state change of every engine
(`transitions`), every decision (`decisions`), and the planned memory per GPU after every event
(`peak_bytes`, with an assertion that it never exceeds a GPU).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from modelyard.placement.policy import (
    Action,
    Engine,
    EngineState,
    GpuCapacity,
    Sleep,
    Stop,
    Target,
)
from modelyard.scheduler.core import (
    CancelPreWarm,
    CarryOut,
    Command,
    Dropped,
    EvictionsDone,
    IdleCheck,
    IdleEngine,
    KeepIdle,
    PreWarmAsk,
    PreWarmNow,
    PreWarmOver,
    PutToSleep,
    RefuseNow,
    SchedulerCore,
    StartNow,
    StopIdle,
    WaitUntil,
    Wanted,
)
from modelyard.scheduler.decide import Ask, Snapshot, unlimited_gpus
from modelyard.scheduler.predictor import Chance, Predictor
from modelyard.scheduler.prewarm import (
    CHECK_EVERY_S,
    Candidate,
    ModelNow,
    Standing,
    ask_inputs,
)
from modelyard.scheduler.scheduler import IDLE_CHECK_INTERVAL_S

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
    stop_s: float = 0.0  # from the stop command until the process is gone
    sleep_s: float = 0.0  # from the sleep command until it sleeps
    wake2_s: float | None = None  # a wake from level 2 (None: as from level 1)
    sleep2_s: float | None = None  # a sleep at level 2 (None: as at level 1)
    gpus: tuple[int, ...] = ()  # the GPUs it may use (config `gpus:`); () any


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
    # How a pre-warm stood in this request's way, if one did: it evicted the request's idle
    # or sleeping engine, or it was cancelled (or evicted) to make room or free the start
    # slot for it while it waited. None: no pre-warm touched it.
    prewarm_in_the_way: str | None = None

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
    gpus: tuple[int, ...] = ()  # where it runs (or sleeps)
    stopping_asleep: bool = False  # a sleeper being stopped holds only its asleep size


@dataclass
class PreWarmRecord:
    """One pre-warm: made at `at` for `model` because of `reason`; `used_at` when a request
    came for it first, `wasted` when it was cancelled or evicted before any did."""

    at: float
    model: str
    reason: str
    spared_s: float  # the wait a request at the moment it was made would have had
    used_at: float | None = None
    wasted: bool = False


@dataclass(frozen=True)
class Decided:
    at: float
    model: str
    command: Command


class VirtualGateway:
    def __init__(
        self,
        models: dict[str, Model],
        gpus: list[int] | None,
        host_ram_for_sleep: int | None = None,
        nodes: list[str] | None = None,
        predictor: Predictor | None = None,
        idle_timeout: float = 0.0,
        exact_chances: bool = False,
    ) -> None:
        """`gpus`: the GPUs' sizes in bytes; None for a machine without managed GPUs.
        `nodes`: on a cluster, the node each GPU is in. `predictor`: learn from the requests
        and pre-warm (None: never pre-warm, today's policy). `idle_timeout`: every model's
        (0: engines are never idle-stopped). `exact_chances`: the predictor knows the future
        (the bench's foresight; the core leaves recency's guess out of a pre-warm's cost)."""
        self.models = models
        self.gpus = gpus
        self.nodes = nodes
        self.host_ram = host_ram_for_sleep
        self.now = 0.0
        self.core = SchedulerCore()
        self.live = {name: _Live() for name in models}
        self.outcomes: list[Outcome] = []
        self.log: list[tuple[float, str, str]] = []  # (time, model, what)
        self.transitions: list[tuple[float, str, str, str]] = []  # (time, model, from, to)
        self.decisions: list[Decided] = []
        self.peak_bytes = [0] * len(gpus or [])
        self._events: list[tuple[float, int, str, object]] = []
        self._seq = 0
        self._durations: dict[int, float] = {}
        self._keys: dict[int, str] = {}
        self._wakeups: set[float] = set()
        self.predictor = predictor
        self.exact_chances = exact_chances
        self.prewarms: list[PreWarmRecord] = []
        self._open_prewarm: dict[str, PreWarmRecord] = {}  # not yet used, nor wasted
        # Engines the idle timer kept for pre-warming (`KeepIdle`), one record per idle spell.
        self.keeps: list[PreWarmRecord] = []
        self._open_keep: dict[str, PreWarmRecord] = {}
        self._idle_recheck = False
        # Engines a pre-warm evicted, until they are loaded again: what it was for.
        self._evicted_for_prewarm: dict[str, str] = {}
        self._ticking = False
        self._last_arrival = -math.inf  # the driver's timer runs while requests are to come
        self.idle_timeout = idle_timeout
        # Told each request's index and when its client has the whole answer (served: once
        # its duration is over; refused: at once): a closed-loop client sends its next then.
        self.on_answered: Callable[[int, float], None] | None = None

    # ----- the test's inputs -----

    def request(self, at: float, model: str, duration: float = 5.0, key: str = "") -> int:
        index = len(self.outcomes)
        self.outcomes.append(Outcome(index, model, at))
        self._durations[index] = duration
        self._keys[index] = key
        self._last_arrival = max(self._last_arrival, at)
        self._push(at, "arrive", index)
        self._push(at + self.models[model].start_timeout, "deadline", index)
        return index

    def request_timer_until(self, at: float) -> None:
        """Keep the driver's pre-warm timer running until `at`, for requests not given yet
        (a closed-loop client's next request is known only once it has its answer)."""
        self._last_arrival = max(self._last_arrival, at)

    def set_ready(
        self, model: str, at: float = 0.0, last_used: float | None = None, gpu: int | None = None
    ) -> None:
        """Start the test with this model already running (and idle)."""
        live = self.live[model]
        live.state = EngineState.READY
        live.last_used = at if last_used is None else last_used
        live.measured_start = self.models[model].start_s
        allowed = self.models[model].gpus
        if gpu is not None:
            live.gpus = (gpu,)
        else:
            live.gpus = (allowed[0],) if allowed else self._home(model)
        self._idle_timer(model)

    def run(self, until: float = 10_000.0) -> list[Outcome]:
        while self._events and self._events[0][0] <= until:
            at, _, kind, data = heapq.heappop(self._events)
            self.now = at
            self._handle(kind, data)
            self._decide_all()
            self._maybe_prewarm()
            self._check_memory()
        for open_records in (self._open_prewarm, self._open_keep):
            for record in open_records.values():
                record.wasted = True  # never asked for before the trace ended
            open_records.clear()
        return self.outcomes

    # ----- events -----

    def _push(self, at: float, kind: str, data: object) -> None:
        self._seq += 1
        heapq.heappush(self._events, (at, self._seq, kind, data))

    def _become(self, name: str, state: EngineState | None) -> None:
        live = self.live[name]
        before = "stopped" if live.state is None else live.state.value
        after = "stopped" if state is None else state.value
        if before != after:
            self.transitions.append((self.now, name, before, after))
        live.state = state

    def _handle(self, kind: str, data: object) -> None:
        if kind == "arrive":
            assert isinstance(data, int)
            outcome = self.outcomes[data]
            live = self.live[outcome.model]
            if self.predictor is not None:
                self.predictor.observe(self.now, self._keys[data], outcome.model)
                self._tick()
            kept = self._open_keep.pop(outcome.model, None)
            if kept is not None:
                kept.used_at = self.now
            record = self._open_prewarm.pop(outcome.model, None)
            if record is not None:
                record.used_at = self.now
                self.core.step(PreWarmOver(outcome.model))
            if live.state is EngineState.READY:
                self._serve(outcome.model, data)
            else:
                live.waiters.append(data)
                displaced_by = self._evicted_for_prewarm.get(outcome.model)
                if displaced_by is not None:
                    outcome.prewarm_in_the_way = f"evicted for the pre-warm of {displaced_by}"
        elif kind == "done":
            assert isinstance(data, str)
            self.live[data].in_flight -= 1
            self.live[data].last_used = self.now
            self._idle_timer(data)
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
            if name in self.core.prewarming():
                self.core.step(PreWarmOver(name))
            self._become(name, EngineState.READY)
            self._evicted_for_prewarm.pop(name, None)
            live.sleeping_level = 0
            self.log.append((self.now, name, "ready"))
            for index in live.waiters:
                self._serve(name, index)
            live.waiters = []
            self._idle_timer(name)  # a pre-warm nobody has asked for yet
        elif kind == "crash":
            name, generation = data  # type: ignore[misc]
            live = self.live[name]
            if live.generation != generation or live.state is not EngineState.STARTING:
                return
            self._become(name, None)
            self.log.append((self.now, name, "crashed"))
            for index in live.waiters:
                self._answer(index, 502, "engine_start_failed", 5.0, "crashed while starting")
            live.waiters = []
        elif kind == "prewarm_go":
            assert isinstance(data, str)
            self.core.step(Dropped(data))
            if data in self.core.prewarming() and self._at_rest(data):
                # As good as just used: the next eviction must not pick it first for having
                # never served a request (its prediction is why it is here).
                self.live[data].last_used = self.now
                self._go(data, self.live[data].gpus or (0,))
        elif kind == "stopped":
            assert isinstance(data, str)
            self._waste(data)
            self._become(data, None)
            self.live[data].sleeping_level = 0
            self.live[data].stopping_asleep = False
        elif kind == "slept":
            name, level = data  # type: ignore[misc]
            self._waste(name)
            self._become(name, EngineState.SLEEPING)
            self.live[name].sleeping_level = level
        elif kind == "evicted":
            target, number = data  # type: ignore[misc]
            self.core.step(EvictionsDone(target, number, ok=True))
        elif kind == "prewarm_tick":
            self._ticking = False
            if self.predictor is not None and self.now < self._last_arrival:
                self._tick()
        elif kind == "idle_check":
            self._check_idle()
        elif kind == "idle_recheck":
            self._idle_recheck = False
            self._check_idle()
        elif kind == "wake_deciders":
            self._wakeups.discard(data)  # type: ignore[arg-type]
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
                if not live.waiters:
                    self.core.step(Dropped(outcome.model))  # as the driver's `finally`

    def _serve(self, name: str, index: int) -> None:
        outcome = self.outcomes[index]
        outcome.served_at = self.now
        outcome.status = 200
        self.live[name].in_flight += 1
        self.live[name].last_used = self.now
        self._push(self.now + self._durations[index], "done", name)
        if self.on_answered is not None:
            self.on_answered(index, self.now + self._durations[index])

    def _answer(self, index: int, status: int, code: str, retry: float, message: str) -> None:
        outcome = self.outcomes[index]
        outcome.refused_at, outcome.status, outcome.code = self.now, status, code
        outcome.retry_after, outcome.message = retry, message
        if self.on_answered is not None:
            self.on_answered(index, self.now)

    # ----- deciding: the core's commands, carried out as the driver does -----

    def _decide_all(self) -> None:
        asking = sorted(
            (name for name, live in self.live.items() if live.waiters and self._at_rest(name)),
            key=lambda name: min(self.live[name].waiters),
        )
        for name in asking:
            live = self.live[name]
            if not live.waiters or not self._at_rest(name):
                continue
            deadline = max(self.outcomes[i].arrived for i in live.waiters)
            deadline += self.models[name].start_timeout
            wanted = Wanted(
                Ask(self._target(name), deadline),
                self._snapshot(name),
                max_eviction_rounds=len(self.models) + 1,
            )
            for command in self.core.step(wanted):
                self.decisions.append(Decided(self.now, name, command))
                self._carry_out(name, command)

    def _idle_timer(self, name: str) -> None:
        """Check `name`'s idleness once its timeout has passed (the driver checks every
        0.25 s; checking just then decides the same)."""
        live = self.live[name]
        if self.idle_timeout > 0 and live.last_used is not None:
            due = live.last_used + self.idle_timeout + IDLE_CHECK_INTERVAL_S
            self._push(due, "idle_check", None)

    def _check_idle(self) -> None:
        """The driver's idle timer: the core picks the engines idle past their timeout."""
        engines = []
        for name, live in self.live.items():
            idle_s = None
            if live.state is EngineState.READY and not (live.in_flight or live.waiters):
                idle_s = None if live.last_used is None else self.now - live.last_used
            engines.append(
                IdleEngine(
                    name,
                    idle_s,
                    self.idle_timeout,
                    self.models[name].pinned,
                    self.models[name].sleep_level,
                    model=name,
                    running=live.state
                    in (EngineState.READY, EngineState.STARTING, EngineState.WAKING),
                )
            )
        expected: tuple[Chance, ...] = ()
        if self.predictor is not None:
            past = {e.key: e.idle_timeout for e in engines if e.past_timeout}
            expected = tuple(self.predictor.chances(self.now, past))
        kept = False
        snapshot = self._snapshot("") if expected else None  # as the driver: only if asked
        check = IdleCheck(tuple(engines), expected, snapshot)
        for verdict in self.core.step(check):
            self.decisions.append(Decided(self.now, verdict.key, verdict))
            if isinstance(verdict, KeepIdle):
                if verdict.key not in self._open_keep:
                    record = PreWarmRecord(
                        self.now, verdict.key, verdict.reason, self.models[verdict.key].start_s
                    )
                    self.keeps.append(record)
                    self._open_keep[verdict.key] = record
                    self.log.append((self.now, verdict.key, f"idle: {verdict.reason}"))
                kept = True
                continue
            if isinstance(verdict, PutToSleep):
                self._evict((Sleep(verdict.key, verdict.level),))
            else:
                assert isinstance(verdict, StopIdle)
                self._evict((Stop(verdict.key),))
            self.log.append((self.now, verdict.key, f"idle: {verdict.reason}"))
        # The driver checks again every 0.25 s; every 2 s decides alike here (and, a day after
        # the trace's last request, the run ends: a chance may stay high forever).
        if kept and not self._idle_recheck and self.now < self._last_arrival + 86400.0:
            self._idle_recheck = True
            self._push(self.now + CHECK_EVERY_S, "idle_recheck", None)

    def _waste(self, name: str) -> None:
        """Evicted (or cancelled) before any request came: the pre-warm (or the idle timer's
        keeping it) was wasted."""
        for open_records in (self._open_prewarm, self._open_keep):
            record = open_records.pop(name, None)
            if record is not None:
                record.wasted = True

    def _tick(self) -> None:
        """Ask about pre-warms again in `CHECK_EVERY_S`, as the driver's timer does (always,
        whoever asked lately: a habit of the hour grows due after a quiet night)."""
        if not self._ticking:
            self._ticking = True
            self._push(self.now + CHECK_EVERY_S, "prewarm_tick", None)

    def _maybe_prewarm(self) -> None:
        """With nobody waiting, offer the core the predictor's chances (as the driver does)."""
        if self.predictor is None or any(live.waiters for live in self.live.values()):
            return
        inputs = ask_inputs(self._model_now(name) for name in self.live)
        chances = self.predictor.chances(self.now, inputs.horizons)
        if not chances:
            return
        expected = {c.model: c.probability for c in self.predictor.chances(self.now, inputs.loaded)}
        candidates = tuple(
            Candidate(self._target(c.model), c, inputs.waits[c.model]) for c in chances
        )
        for command in self.core.step(
            PreWarmAsk(
                self._snapshot(""),
                candidates,
                in_use=frozenset(self.predictor.in_use(self.now)),
                expected=expected,
                switch_rate=self.predictor.switch_rate(self.now),
                exact=self.exact_chances,
            )
        ):
            assert isinstance(command, PreWarmNow)
            self.decisions.append(Decided(self.now, command.prewarm.target, command))
            self._carry_out(command.prewarm.target, command)

    def _model_now(self, name: str) -> ModelNow:
        """`name` as the driver sees it when it asks about pre-warms (every model's on)."""
        live, model = self.live[name], self.models[name]
        wake = model.wake2_s if live.sleeping_level == 2 else None
        standing = {
            None: Standing.STOPPED,
            EngineState.READY: Standing.READY,
            EngineState.SLEEPING: Standing.ASLEEP,
        }.get(live.state, Standing.BUSY)
        return ModelNow(
            name, standing, model.start_s, wake if wake is not None else model.wake_s, True
        )

    def _evict(self, actions: tuple[Action, ...]) -> float:
        """Sleep or stop `actions` one after the other; when the last is done."""
        at = self.now
        for action in actions:
            victim = self.live[action.name]
            assert victim.in_flight == 0, f"evicted busy {action.name}"
            model = self.models[action.name]
            if isinstance(action, Sleep):
                # Still counted awake until it sleeps (the supervisor's DRAINING).
                self._become(action.name, EngineState.DRAINING)
                seconds = model.sleep_s
                if action.level == 2 and model.sleep2_s is not None:
                    seconds = model.sleep2_s
                at += seconds
                self._push(at, "slept", (action.name, action.level))
                self.log.append((self.now, action.name, f"sleep{action.level}"))
            else:
                victim.stopping_asleep = victim.state is EngineState.SLEEPING
                self._become(action.name, EngineState.STOPPING)
                at += model.stop_s
                self._push(at, "stopped", action.name)
                self.log.append((self.now, action.name, "stop"))
        return at

    def _carry_out(self, name: str, command: Command) -> None:
        live = self.live[name]
        if isinstance(command, PreWarmNow):
            prewarm = command.prewarm
            live.gpus = prewarm.gpus if live.state is None else live.gpus
            record = PreWarmRecord(self.now, name, prewarm.reason, prewarm.saving_s)
            record.spared_s = (
                self.models[name].start_s if live.state is None else self.models[name].wake_s
            )
            self.prewarms.append(record)
            self._open_prewarm[name] = record
            self.log.append((self.now, name, f"prewarm: {prewarm.reason}"))
            for action in prewarm.actions:
                self._evicted_for_prewarm[action.name] = name
            self._push(self._evict(prewarm.actions), "prewarm_go", name)
        elif isinstance(command, CancelPreWarm):
            self._in_the_way(name, f"waited for the cancelled pre-warm of {command.target}")
            live = self.live[command.target]
            self._waste(command.target)
            self.log.append((self.now, command.target, f"prewarm cancelled: {command.reason}"))
            # As the driver does: a cold start stops at once (the start slot is free; its
            # memory comes back once stopped); a wake is left to finish (1-3 s).
            if live.state is EngineState.STARTING:
                live.generation += 1  # its "loaded" event no longer counts
                live.stopping_asleep = False
                self._become(command.target, EngineState.STOPPING)
                stop_s = self.models[command.target].stop_s
                self._push(self.now + stop_s, "stopped", command.target)
        elif isinstance(command, StartNow):
            self._go(name, command.gpus)
        elif isinstance(command, RefuseNow):
            for index in live.waiters:
                self._answer(
                    index, command.status, command.code, command.retry_after, command.message
                )
            live.waiters = []
        elif isinstance(command, WaitUntil):
            if command.until not in self._wakeups:
                # One wake-up a time: every waiting model decides again at each event.
                self._wakeups.add(command.until)
                self._push(command.until, "wake_deciders", command.until)
        else:
            assert isinstance(command, CarryOut)
            for action in command.actions:
                if action.name in self._open_prewarm:
                    self._in_the_way(name, f"evicted the unused pre-warm of {action.name}")
                elif action.name in self._open_keep:
                    self._in_the_way(name, f"evicted {action.name}, kept up past its idle stop")
            at = self._evict(command.actions)
            self._push(at, "evicted", (name, command.number))

    def _in_the_way(self, name: str, how: str) -> None:
        """A pre-warm stood in the way of `name`'s waiting requests."""
        for index in self.live[name].waiters:
            outcome = self.outcomes[index]
            outcome.prewarm_in_the_way = outcome.prewarm_in_the_way or how

    def _at_rest(self, name: str) -> bool:
        return self.live[name].state in (None, EngineState.SLEEPING)

    def _go(self, name: str, gpus: tuple[int, ...]) -> None:
        live, model = self.live[name], self.models[name]
        live.generation += 1
        waking = live.state is EngineState.SLEEPING
        self._become(name, EngineState.WAKING if waking else EngineState.STARTING)
        live.gpus = gpus
        self.log.append((self.now, name, "wake" if waking else "start"))
        took = model.wake_s if waking else model.start_s
        if waking and live.sleeping_level == 2 and model.wake2_s is not None:
            took = model.wake2_s
        if not waking and model.crash_after_s is not None:
            self._push(self.now + model.crash_after_s, "crash", (name, live.generation))
            model.crash_after_s = None
        else:
            self._push(self.now + took, "loaded", (name, live.generation))
        self._check_memory()

    def held_per_gpu(self) -> list[int]:
        """What the engines hold (or will hold, once started) on each GPU now."""
        held = [0] * len(self.gpus or [])
        for name in self.models:
            for index in self.live[name].gpus if self.live[name].state is not None else ():
                held[index] += self._held(name)
        return held

    def _check_memory(self) -> None:
        if self.gpus is None:
            return
        for index, held in enumerate(self.held_per_gpu()):
            self.peak_bytes[index] = max(self.peak_bytes[index], held)
            assert held <= self.gpus[index], f"planned {held} bytes on GPU {index}"

    def _held(self, name: str) -> int:
        live, model = self.live[name], self.models[name]
        if live.state is None:
            return 0
        asleep = live.state is EngineState.SLEEPING or live.stopping_asleep
        return model.asleep_bytes if asleep else model.bytes

    def _home(self, name: str) -> tuple[int, ...]:
        """Without managed GPUs each model has a boundless GPU of its own; with, GPU 0."""
        return (list(self.models).index(name),) if self.gpus is None else (0,)

    def _target(self, name: str) -> Target:
        model = self.models[name]
        if self.gpus is None:
            return Target(name, 0, gpus=self._home(name), exclusive_group=model.group)
        return Target(name, model.bytes, gpus=model.gpus, exclusive_group=model.group)

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
                    gpus=live.gpus,
                    awake_bytes_per_gpu=(
                        model.asleep_bytes if live.stopping_asleep else model.bytes
                    )
                    if managed
                    else 0,
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
        if self.gpus is None:
            gpus = unlimited_gpus(list(self.models))
        else:
            gpus = tuple(
                GpuCapacity(i, size, node=self.nodes[i] if self.nodes else None)
                for i, size in enumerate(self.gpus)
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
        return Snapshot(self.now, gpus, tuple(engines), host, starts)
