"""The scheduler's pure core: `step(event) -> commands`, with the records that must outlive
one decision.

Pure: no I/O, no awaits, no clock of its own. The driver (scheduler/scheduler.py, the tests'
virtual gateway, the placement simulator in bench/placement) describes the world as a
`Snapshot` (engines as their owners report them, the GPUs, the time), feeds events in, and
carries the commands out. Nothing slow happens inside: a stop, a sleep, a wake, a start and
the wait for GPU memory to come back are commands the driver runs on its own time, and their
end comes back as an event.

Why this exists (issue 22): the scheduler once carried out evictions, and waited for the
memory to come back, while it held its one decision lock. A 10 s stop on GPU 0 then held a
cold start on the free GPU 1 for 11.1 s instead of 2 s. Here the decision and its record are
one synchronous step, so there is nothing to lock, and slow work for GPU 0 delays only the
decisions that need GPU 0.

What the core remembers between steps is the *reservations*: room set aside for a start
(or wake) whose evictions are being carried out. While one exists, every other decision sees
it as a start in progress on those GPUs with the reserved bytes (one start or wake per GPU at
a time; the memory must be back before the next start there), and sees its victims as
busy (no second plan counts on them). A reservation ends when its target starts, is refused,
or is abandoned by its requests.

It also answers the queue bounds (`Arrived` -> a `RefuseNow` when a queue is full) and the idle
timer (`IdleCheck` -> `PutToSleep` / `StopIdle` / `KeepIdle`), which need no memory between
steps, and decides replicas (`ScaleCheck` -> `ScaleUp`, scheduler/scaling.py), remembering
since when each model has been overloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from modelyard.placement.policy import (
    DEFAULT_SETTINGS,
    Action,
    Engine,
    EngineState,
    PolicySettings,
    free_bytes,
)
from modelyard.scheduler.decide import (
    DEFAULT_RETRY_AFTER_S,
    Ask,
    Evict,
    Go,
    Refuse,
    Snapshot,
    Wait,
    decide,
)
from modelyard.scheduler.predictor import Chance
from modelyard.scheduler.prewarm import MIN_PROBABILITY, Candidate, PreWarm, choose_prewarm
from modelyard.scheduler.scaling import (
    SCALE_UP_AFTER_S,
    IdleSlot,
    ModelLoad,
    idle_stops,
    may_add,
    overloaded,
    past_idle_timeout,
    spread,
)

# ----- events (what happened) -----


@dataclass(frozen=True)
class Wanted:
    """A model with waiting requests asks to start or wake, seeing the world as `snapshot`.

    `max_eviction_rounds` bounds how often in a row its evictions may fail to make room
    before the answer is a refusal rather than another round (a stop that keeps erring).
    """

    ask: Ask
    snapshot: Snapshot
    max_eviction_rounds: int = 8
    # A replica added for load: it takes free room or idle engines' room, or none. Waiting
    # for a busy engine to drain would make it the evictor of a model with traffic.
    no_wait: bool = False


@dataclass(frozen=True)
class EvictionsDone:
    """The evictions of reservation `number` are over (and the memory is back, or was waited
    for as long as the driver waits); `ok` is False when one of them failed."""

    target: str
    number: int
    ok: bool


@dataclass(frozen=True)
class Dropped:
    """Nobody waits for `target` any more, or its start began, or it was refused: the room
    set aside for it is free again."""

    target: str


@dataclass(frozen=True)
class Arrived:
    """A request for `model` that must wait (its engine is not ready) asks to join the queue.

    The counts are of the requests waiting now, before this one."""

    model: str
    waiting_for_model: int
    model_limit: int
    waiting_in_all: int
    limit_in_all: int
    retry_after: float  # the model's typical start: when a retry is likely to be served


@dataclass(frozen=True)
class IdleEngine:
    """One engine's idleness as its owner reports it, for `IdleCheck`."""

    key: str
    idle_s: float | None  # None: busy, or not ready
    idle_timeout: float  # 0: never idle-stopped
    pinned: bool
    sleep_level: int  # 0: cannot sleep, so it stops
    model: str = ""  # the model it serves ("": its key); engines of one model scale together
    running: bool = True  # ready, starting or waking
    min_replicas: int = 0  # engines of its model the idle timer keeps running

    @property
    def past_timeout(self) -> bool:
        return past_idle_timeout(self.idle_s, self.idle_timeout)


@dataclass(frozen=True)
class IdleCheck:
    """The idle timer fired: which engines have been idle past their timeout?"""

    engines: tuple[IdleEngine, ...]
    # For models with pre-warming on: the predictor's chance that each is asked for within
    # its idle timeout (as long as a pre-warm made now would stay up unused), and the world
    # as placement sees it (whether an engine kept up leaves room beside it).
    expected: tuple[Chance, ...] = ()
    snapshot: Snapshot | None = None


@dataclass(frozen=True)
class PreWarmAsk:
    """No request waits: is a model the predictor expects worth starting now?"""

    snapshot: Snapshot
    candidates: tuple[Candidate, ...]
    requests_waiting: bool = False
    in_use: frozenset[str] = frozenset()  # asked for a moment ago: never evicted for it
    expected: dict[str, float] = field(default_factory=dict)  # chances of loaded models
    switch_rate: float = 0.0  # first requests for a model per second, all users
    # The chances are certain (the simulator's perfect foresight): see `choose_prewarm`.
    exact: bool = False


@dataclass(frozen=True)
class PreWarmOver:
    """Pre-warmed `target` is ready, or was cancelled, or a real request came for it (from
    then on it is a start like any other, never cancelled for another model)."""

    target: str


@dataclass(frozen=True)
class ScaleCheck:
    """The scale timer fired: does a model with replicas need another engine?"""

    snapshot: Snapshot
    models: tuple[ModelLoad, ...]


Event = (
    Wanted | EvictionsDone | Dropped | Arrived | IdleCheck | PreWarmAsk | PreWarmOver | ScaleCheck
)

# ----- commands (what the driver must do) -----


@dataclass(frozen=True)
class StartNow:
    """Start (or wake) `target` now on `gpus` with this budget."""

    target: str
    gpus: tuple[int, ...]
    bytes_per_gpu: int
    wake: bool
    explanation: str


@dataclass(frozen=True)
class CarryOut:
    """Sleep or stop `actions` in order, wait for their memory to come back on `gpus`, then
    feed `EvictionsDone(target, number, ok)` back. Other decisions go on meanwhile."""

    target: str
    number: int
    actions: tuple[Action, ...]
    gpus: tuple[int, ...]
    bytes_per_gpu: int
    explanation: str


@dataclass(frozen=True)
class WaitUntil:
    """Nothing to do for `target` until something changes, or until `until` (its deadline)."""

    target: str
    until: float
    explanation: str
    waiting_for: tuple[str, ...] = ()  # the engines whose change may let it go


@dataclass(frozen=True)
class RefuseNow:
    """Answer `target`'s waiting requests with this error (503 with Retry-After)."""

    target: str
    status: int
    retry_after: float
    code: str
    message: str


@dataclass(frozen=True)
class PutToSleep:
    """Idle past its timeout: put it to sleep at `level` (a failed sleep falls back to a stop)."""

    key: str
    level: int
    reason: str


@dataclass(frozen=True)
class KeepIdle:
    """Idle past its timeout, but pre-warming would start it again at once: it stays up (as
    idle as before: a request that needs its room still evicts it)."""

    key: str
    reason: str


@dataclass(frozen=True)
class StopIdle:
    """Idle past its timeout: stop it, unless a request came meanwhile."""

    key: str
    reason: str
    scale_down: bool = False  # another engine of its model runs on


@dataclass(frozen=True)
class ScaleUp:
    """Start replica `key` of `model` now (it asks for its room as any start does, without
    waiting for a busy engine: `Wanted.no_wait`)."""

    model: str
    key: str
    reason: str


@dataclass(frozen=True)
class PreWarmNow:
    """Carry out `prewarm.actions` (idle engines only), then start or wake its target; feed
    `Dropped(target)` once the start has begun, and `PreWarmOver(target)` once it is ready."""

    prewarm: PreWarm
    number: int


@dataclass(frozen=True)
class CancelPreWarm:
    """A real request needs the start slot (or the room) of this pre-warm: do not start it,
    or stop it if it has begun. The core has forgotten it already."""

    target: str
    reason: str


Command = (
    StartNow
    | CarryOut
    | WaitUntil
    | RefuseNow
    | PutToSleep
    | StopIdle
    | KeepIdle
    | PreWarmNow
    | CancelPreWarm
    | ScaleUp
)


@dataclass(frozen=True)
class Reservation:
    """Room set aside on `gpus` for `target` while its evictions are carried out."""

    target: str
    number: int
    gpus: tuple[int, ...]
    bytes_per_gpu: int
    victims: tuple[str, ...]
    exclusive_group: str | None = None
    evictions_done: bool = False


@dataclass
class SchedulerCore:
    """The decision records across models, changed only by `step`."""

    settings: PolicySettings = DEFAULT_SETTINGS
    _reservations: dict[str, Reservation] = field(default_factory=dict)
    _rounds: dict[str, int] = field(default_factory=dict)  # eviction rounds in a row
    _numbers: int = 0
    # Pre-warms under way (their evictions, or their start), by target: cancelled when a
    # real request needs what they hold. The reservation of one in its eviction phase is in
    # `_reservations`, as any other.
    _prewarms: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # Since when each model has been above its replicas' target, without a break.
    _overloaded_since: dict[str, float] = field(default_factory=dict)
    # Why the last scale-up a model needed was not made (for status), by model.
    scale_blocked: dict[str, str] = field(default_factory=dict)

    def prewarming(self) -> tuple[str, ...]:
        return tuple(self._prewarms)

    def reservations(self) -> tuple[Reservation, ...]:
        return tuple(self._reservations.values())

    def step(self, event: Event) -> list[Command]:
        """Take one event; return what the driver must do now."""
        if isinstance(event, Dropped):
            self._reservations.pop(event.target, None)
            self._rounds.pop(event.target, None)
            return []
        if isinstance(event, EvictionsDone):
            held = self._reservations.get(event.target)
            if held is not None and held.number == event.number:
                self._reservations[event.target] = replace(held, evictions_done=True)
            return []
        if isinstance(event, Arrived):
            return _queue_bounds(event)
        if isinstance(event, IdleCheck):
            return _idle_verdicts(event, self.settings)
        if isinstance(event, PreWarmAsk):
            return self._prewarm(event)
        if isinstance(event, PreWarmOver):
            self._prewarms.pop(event.target, None)
            return []
        if isinstance(event, ScaleCheck):
            return self._scale(event)
        return self._yield_to_real(event, self._wanted(event))

    def _prewarm(self, event: PreWarmAsk) -> list[Command]:
        """A pre-warm, only when nothing else is under way (one at a time, no reservation)."""
        if self._reservations or self._prewarms:
            return []
        chosen = choose_prewarm(
            self.world(event.snapshot, ""),
            event.candidates,
            requests_waiting=event.requests_waiting,
            in_use=event.in_use,
            expected=event.expected,
            switch_rate=event.switch_rate,
            settings=self.settings,
            exact=event.exact,
        )
        if chosen is None:
            return []
        self._numbers += 1
        self._prewarms[chosen.target] = chosen.gpus
        if chosen.actions:
            self._reservations[chosen.target] = Reservation(
                chosen.target,
                self._numbers,
                chosen.gpus,
                chosen.bytes_per_gpu,
                tuple(action.name for action in chosen.actions),
            )
        return [PreWarmNow(chosen, self._numbers)]

    def _scale(self, event: ScaleCheck) -> list[Command]:
        """A replica for each model above its target for `SCALE_UP_AFTER_S`, where one fits
        in free room or idle engines' room (the same plan and cost model as any start)."""
        now = event.snapshot.now
        commands: list[Command] = []
        for load in event.models:
            if not overloaded(load):
                self._overloaded_since.pop(load.model, None)
                self.scale_blocked.pop(load.model, None)
                continue
            since = self._overloaded_since.setdefault(load.model, now)
            if now - since < SCALE_UP_AFTER_S or not may_add(load):
                continue
            assert load.free_slot is not None
            assert load.target is not None
            world = self.world(event.snapshot, load.free_slot)
            gpus = [gpu.index for gpu in world.gpus]
            target = spread(load.target, load.siblings, world.engines, gpus)
            if target is None:
                self.scale_blocked[load.model] = "every GPU it may use holds one of its engines"
                continue
            decision = decide(world, Ask(target, now), self.settings)
            if not isinstance(decision, (Go, Evict)):
                why = decision.explanation if isinstance(decision, Wait) else decision.message
                self.scale_blocked[load.model] = f"no room for another engine: {why}"
                continue
            self._overloaded_since.pop(load.model, None)
            self.scale_blocked.pop(load.model, None)
            commands.append(
                ScaleUp(
                    load.model,
                    load.free_slot,
                    f"{load.outstanding} requests for {load.running} engine(s) above "
                    f"{load.target_in_flight} each for {now - since:.1f}s",
                )
            )
        return commands

    def _yield_to_real(self, event: Wanted, commands: list[Command]) -> list[Command]:
        """A real request goes first: when it must wait for a pre-warm (its start slot, or
        its room), the pre-warm is cancelled."""
        blocking: set[str] = set()
        for command in commands:
            if isinstance(command, WaitUntil):
                blocking.update(n for n in command.waiting_for if n in self._prewarms)
        if not blocking and any(isinstance(c, WaitUntil) for c in commands):
            # Waiting on something else: a pre-warm on a GPU it may use still holds a slot.
            allowed = set(event.ask.target.gpus)
            blocking = {
                name
                for name, gpus in self._prewarms.items()
                if name != event.ask.target.name and (not allowed or allowed & set(gpus))
            }
        cancels: list[Command] = []
        for name in sorted(blocking):
            self._prewarms.pop(name, None)
            self._reservations.pop(name, None)
            cancels.append(
                CancelPreWarm(name, f"{event.ask.target.name} was asked for and needs its slot")
            )
        return cancels + commands

    def _wanted(self, event: Wanted) -> list[Command]:
        ask = event.ask
        name = ask.target.name
        held = self._reservations.get(name)
        if held is not None and not held.evictions_done:
            if event.snapshot.now >= ask.deadline:
                self.step(Dropped(name))
                return [
                    RefuseNow(
                        name,
                        503,
                        DEFAULT_RETRY_AFTER_S,
                        "waiting_for_gpu",
                        f"model {name!r}: making room ({', '.join(held.victims)}) took past "
                        "its start deadline; retry later",
                    )
                ]
            return [
                WaitUntil(
                    name,
                    ask.deadline,
                    f"waiting for {', '.join(held.victims) or 'room'} to make room for it",
                    held.victims,
                )
            ]
        # Its evictions are over (or there were none): it decides afresh, its old room free.
        self._reservations.pop(name, None)
        decision = decide(self.world(event.snapshot, name), ask, self.settings)
        if isinstance(decision, Go):
            self.step(Dropped(name))
            return [
                StartNow(
                    name, decision.gpus, decision.bytes_per_gpu, decision.wake, decision.explanation
                )
            ]
        if isinstance(decision, Refuse):
            self.step(Dropped(name))
            return [
                RefuseNow(
                    name, decision.status, decision.retry_after, decision.code, decision.message
                )
            ]
        if isinstance(decision, Wait) and event.no_wait:
            self.step(Dropped(name))
            return [
                RefuseNow(
                    name,
                    503,
                    DEFAULT_RETRY_AFTER_S,
                    "no_room_for_replica",
                    f"no room for {name!r} without waiting for a busy engine: "
                    f"{decision.explanation}",
                )
            ]
        if isinstance(decision, Wait):
            waits = tuple(w.name for w in decision.for_models)
            return [WaitUntil(name, decision.until, decision.explanation, waits)]
        assert isinstance(decision, Evict)
        rounds = self._rounds.get(name, 0)
        if rounds >= event.max_eviction_rounds:
            self.step(Dropped(name))
            return [
                RefuseNow(
                    name,
                    503,
                    DEFAULT_RETRY_AFTER_S,
                    "eviction_failed",
                    f"model {name!r}: evicting {decision.explanation!r} did not make room "
                    "(see the engines' events)",
                )
            ]
        self._rounds[name] = rounds + 1
        self._numbers += 1
        self._reservations[name] = Reservation(
            name,
            self._numbers,
            decision.gpus,
            decision.bytes_per_gpu,
            tuple(action.name for action in decision.actions),
            ask.target.exclusive_group,
        )
        return [
            CarryOut(
                name,
                self._numbers,
                decision.actions,
                decision.gpus,
                decision.bytes_per_gpu,
                decision.explanation,
            )
        ]

    def world(self, snapshot: Snapshot, asking: str) -> Snapshot:
        """`snapshot` as one decision for `asking` must see it: others' reservations are
        starts in progress holding their room, and their victims are not to be planned on."""
        others = [r for r in self._reservations.values() if r.target != asking]
        if not others:
            return snapshot
        reserved = {r.target: r for r in others}
        victims = {v for r in others if not r.evictions_done for v in r.victims}
        engines: list[Engine] = []
        for engine in snapshot.engines:
            if engine.name in reserved:
                continue  # replaced by its reservation below
            if engine.name in victims:
                # Another plan counts on it (its owner may not have begun the sleep or stop
                # yet): busy for every other plan, so none counts on the same bytes.
                engine = replace(engine, in_flight=max(engine.in_flight, 1))
            engines.append(engine)
        for r in others:
            was = next((e for e in snapshot.engines if e.name == r.target), None)
            engines.append(
                Engine(
                    name=r.target,
                    state=EngineState.WAKING if was is not None else EngineState.STARTING,
                    gpus=r.gpus,
                    awake_bytes_per_gpu=r.bytes_per_gpu,
                    in_flight=1,  # a start in progress is never a victim, only waited for
                    exclusive_group=r.exclusive_group,
                )
            )
        return replace(snapshot, engines=tuple(engines))


def _queue_bounds(event: Arrived) -> list[Command]:
    """A refusal when the model's queue or the gateway's is full (Ollama's 503 "server busy",
    with a Retry-After the client's SDK honours)."""
    if event.waiting_for_model >= event.model_limit:
        message = (
            f"too many requests are waiting for model {event.model!r} "
            f"(limit {event.model_limit}); retry later"
        )
    elif event.waiting_in_all >= event.limit_in_all:
        message = (
            f"the gateway is busy: {event.limit_in_all} requests are already waiting; retry later"
        )
    else:
        return []
    return [RefuseNow(event.model, 503, event.retry_after, "queue_full", message)]


def _room_beside(snapshot: Snapshot | None, key: str, settings: PolicySettings) -> bool:
    """Whether each of the engine's GPUs has as much free memory again as it holds: another
    model of its size could start without evicting it. An engine kept up past its idle stop
    must not be what the next start waits for (its stop takes 2-15 s), where the GPU is full
    of other users' models. Without managed GPUs, memory decides nothing."""
    if snapshot is None or not snapshot.gpus:
        return True
    engine = next((e for e in snapshot.engines if e.name == key), None)
    if engine is None:
        return False
    return all(
        free_bytes(gpu, snapshot.engines, settings) >= engine.held_bytes_per_gpu
        for gpu in snapshot.gpus
        if gpu.index in engine.gpus
    )


def _idle_verdicts(event: IdleCheck, settings: PolicySettings) -> list[Command]:
    """Sleep (where it can) or stop every unpinned engine idle past its timeout, keeping each
    model's `min_replicas` running; a replica with another engine of its model running
    stops (a scale-down). A model's last engine that pre-warming would start again (its
    chance of being asked for within its idle timeout is a pre-warm's), and that leaves room
    beside it, is kept."""
    slots = [
        IdleSlot(
            e.key,
            e.model or e.key,
            e.idle_s,
            e.idle_timeout,
            e.pinned,
            e.sleep_level,
            e.running,
            e.min_replicas,
        )
        for e in event.engines
    ]
    expected = {chance.model: chance for chance in event.expected}
    verdicts: list[Command] = []
    for slot, scale_down in idle_stops(slots):
        reason = f"idle for {slot.idle_s or 0.0:.0f}s"
        chance = expected.get(slot.model)
        if (
            not scale_down
            and not slot.sleep_level
            and chance is not None
            and chance.probability >= MIN_PROBABILITY
            and _room_beside(event.snapshot, slot.key, settings)
        ):
            # Stopped now, it would be pre-warmed again (or started cold) before its next
            # idle stop: the stop and the start would spare nothing and cost a start. (One
            # that can sleep goes to sleep: its next request waits a wake of 1-3 s, about as
            # long as the sleep a real request would wait for if it needed the room.)
            verdicts.append(KeepIdle(slot.key, f"{reason}, kept: {chance.reason}"))
        elif scale_down:
            verdicts.append(StopIdle(slot.key, f"scale down: {reason}", scale_down=True))
        elif slot.sleep_level:
            verdicts.append(PutToSleep(slot.key, slot.sleep_level, reason))
        else:
            verdicts.append(StopIdle(slot.key, reason))
    return verdicts
