"""Where to start (or wake) an engine, and which engines must sleep or stop first.

Pure: no I/O, no clock, no asyncio. The scheduler describes the GPUs and engines as they are
now and gets back a `Plan` or a `CannotFit`, like llama-swap's `EvictionFor(target, running)`,
but with memory accounting (which llama-swap leaves to the operator) and a cost model
(where the seed 004 evicts least-recently-used first, whatever it costs to bring back).

Cost model
----------
Evicting an engine costs the time it will take to bring it back, weighted by how likely it
is to be needed soon:

    cost(victim, action) = restore_seconds(action) * likelihood(idle seconds)
    restore_seconds:  Sleep(level) -> its measured wake time at that level
                      Stop         -> its measured start time (for a sleeper: start - wake,
                                      the extra time over the wake it already needed)
    likelihood(idle) = floor + (1 - floor) * 0.5 ** (idle / half_life)     (1 if busy)

Unknown times fall back to `PolicySettings` defaults (a 60 s cold start, the top of vLLM's
30-60 s; a wake at 10 % / 40 % of the start for level 1 / level 2). The floor keeps the
restore time deciding between engines that have all been idle for hours.

Restore times within `PolicySettings.noise` (25 %) of each other count as equal, so the
noise of measurement never decides between like engines: recency does, and among like
engines the least recently used is evicted first (issue 11: with three identical models the
more recently used one was evicted in 2 runs of 3).

The plan frees the *cheapest sufficient set*: the victims whose summed cost is least among
all sets that free enough bytes on every GPU of the placement. Bytes enter as the
constraint, so one big idle engine can beat three small ones, and a cheap small one is never
chosen when it does not help; the greedy fallback ranks options by cost per needed byte
(`search.py`). Ties go to fewer victims, then sleeping over stopping, then less overshoot.

Rules, and what forced them
---------------------------
- Never evict a pinned engine (`pinned: true`), nor the target itself.
- Never evict an engine with requests in flight: if only busy engines would make room, the
  plan lists them in `wait_for` (llama-swap waits for a busy model to drain). vLLM's `/sleep`
  aborts in-flight requests, so sleeping is eviction too.
- Engines that are starting, waking, draining or stopping count with their whole awake
  footprint until they are gone; a stopping one is waited for, never planned around.
- At most one engine starts or wakes on a GPU at a time: vLLM's memory profiling counts other
  processes' memory (vLLM issues 55827, 56830). A GPU with a start in progress is used only
  when no other GPU will do, and then the plan waits for that start.
- Sleep before stop when sleeping frees enough (a wake is 0.3-3 s against a 30-60 s start):
  level 1 while the host-RAM budget lasts, else level 2. A sleeping engine still holds GPU
  memory; stopping it frees that residual (and its host RAM).
- Exclusive groups (the seed 000's one-model-at-a-time, as a choice): starting a member first
  sleeps or stops its group's running members, whether or not memory needs it.
- Tensor-parallel targets need room on `tensor_parallel` GPUs at once; the search frees
  bytes on all of them together, so an engine spread over two of them counts on both.
- Unknown footprint (`bytes_per_gpu=None`): the whole GPU, less other processes' memory
  (the seed 004 stops everything for its first, measuring run; this is that, without
  touching other GPUs).
- Among placements that fit without evicting anything, the best fit (least room left): the
  emptiest GPU stays empty for the next large model, and engines do not grow (vLLM
  preallocates its KV cache to the budget it is given), so a tight fit does not risk OOM.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import combinations

from modelyard.placement.search import Option, Selection, cheapest_cover

GIB = 1024**3


class EngineState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"  # finishing requests before a stop or sleep already decided
    SLEEPING = "sleeping"
    WAKING = "waking"
    STOPPING = "stopping"


@dataclass(frozen=True)
class Target:
    """The model to start or wake."""

    name: str
    bytes_per_gpu: int | None  # None: unknown, so the whole GPU
    gpus: tuple[int, ...] = ()  # GPUs it may use; () means any
    tensor_parallel: int = 1
    exclusive_group: str | None = None


@dataclass(frozen=True)
class GpuCapacity:
    index: int
    total_bytes: int
    foreign_bytes: int = 0  # held by processes that are not our engines
    node: str | None = None  # on a cluster: the machine it is in (one engine, one node)


@dataclass(frozen=True)
class Engine:
    """An engine of ours that holds GPU memory now (stopped engines are simply absent)."""

    name: str
    state: EngineState
    gpus: tuple[int, ...]
    awake_bytes_per_gpu: int
    asleep_bytes_per_gpu: int = 0  # what it keeps on each GPU while asleep
    in_flight: int = 0
    last_used: float | None = None  # same clock as `now`; None: never used
    start_seconds: float | None = None  # measured cold start
    wake_seconds: float | None = None  # measured wake at `sleep_level` (or its current level)
    sleep_level: int = 0  # 0 cannot sleep; 1: level 1, or 2 when host RAM is short; 2: level 2
    sleeping_level: int = 0  # while SLEEPING: the level it sleeps at
    sleep_host_bytes: int | None = None  # host RAM a level-1 sleep holds; None: awake bytes
    pinned: bool = False
    exclusive_group: str | None = None

    @property
    def held_bytes_per_gpu(self) -> int:
        if self.state is EngineState.SLEEPING:
            return self.asleep_bytes_per_gpu
        return self.awake_bytes_per_gpu

    @property
    def host_bytes_for_sleep(self) -> int:
        if self.sleep_host_bytes is not None:
            return self.sleep_host_bytes
        return self.awake_bytes_per_gpu * len(self.gpus)


@dataclass(frozen=True)
class PolicySettings:
    recency_half_life_s: float = 600.0  # the seed 000's IDLE_SECONDS default
    recency_floor: float = 0.05
    default_start_seconds: float = 60.0
    level1_wake_fraction: float = 0.1
    level2_wake_fraction: float = 0.4
    headroom_bytes: int = 0  # kept free on every GPU
    noise: float = 0.25  # restore times within this fraction of each other are a tie
    exact_limit: int = 12  # candidate victims searched exactly; greedy beyond
    node_budget: int = 200_000


DEFAULT_SETTINGS = PolicySettings()


@dataclass(frozen=True)
class Sleep:
    name: str
    level: int


@dataclass(frozen=True)
class Stop:
    name: str


Action = Sleep | Stop


class WaitReason(enum.StrEnum):
    BUSY = "busy"  # requests in flight (or draining): wait until it drains
    STARTING = "starting"
    WAKING = "waking"
    STOPPING = "stopping"  # its memory is not back yet


@dataclass(frozen=True)
class WaitFor:
    name: str
    reason: WaitReason


@dataclass(frozen=True)
class Plan:
    """Where to start, and what to do first.

    When `wait_for` is empty, do `actions` in order, then start (or wake). Otherwise do
    nothing yet: wait until one of `wait_for` changes state, then plan again (`actions` then
    says what would be done, for events and status).
    """

    gpus: tuple[int, ...]
    bytes_per_gpu: int  # the memory budget to give the engine
    actions: tuple[Action, ...] = ()
    wait_for: tuple[WaitFor, ...] = ()
    wake: bool = False  # the target is asleep on `gpus`: wake it rather than start it
    cost: float = 0.0  # expected seconds of reloading that the actions cause
    explanation: str = ""


@dataclass(frozen=True)
class CannotFit:
    """No eviction can make room (the message says which GPU falls short and why)."""

    reason: str


def free_bytes(
    gpu: GpuCapacity, engines: Sequence[Engine], settings: PolicySettings = DEFAULT_SETTINGS
) -> int:
    """What `gpu` has free for a start: its memory less other processes', the headroom kept
    free, and what `engines` hold on it (negative: over-committed)."""
    held = sum(e.held_bytes_per_gpu for e in engines if gpu.index in e.gpus)
    return gpu.total_bytes - gpu.foreign_bytes - settings.headroom_bytes - held


def gib(size: int) -> str:
    return f"{size / GIB:.1f} GiB"


def likelihood(engine: Engine, now: float, settings: PolicySettings = DEFAULT_SETTINGS) -> float:
    """How likely the engine is needed soon: 1 when in use, decaying with idle time."""
    if engine.in_flight > 0 or engine.state in _ACTIVE:
        return 1.0
    if engine.last_used is None:
        return settings.recency_floor
    idle = max(now - engine.last_used, 0.0)
    decay = math.pow(0.5, idle / settings.recency_half_life_s)
    return settings.recency_floor + (1.0 - settings.recency_floor) * decay


def start_seconds(engine: Engine, settings: PolicySettings = DEFAULT_SETTINGS) -> float:
    if engine.start_seconds is not None:
        return engine.start_seconds
    return settings.default_start_seconds


def wake_seconds(engine: Engine, level: int, settings: PolicySettings = DEFAULT_SETTINGS) -> float:
    """Measured wake time at `level`, else an estimate from the start time (never above it)."""
    start = start_seconds(engine, settings)
    fraction = settings.level1_wake_fraction if level == 1 else settings.level2_wake_fraction
    measured_level = engine.sleeping_level or engine.sleep_level
    measured = engine.wake_seconds
    if measured is None:
        seconds = fraction * start
    elif level == measured_level:
        seconds = measured
    else:
        # Level 2 reloads the weights that level 1 keeps in host RAM: never faster.
        seconds = max(measured, fraction * start) if level == 2 else min(measured, fraction * start)
    return min(seconds, start)


def action_cost(
    engine: Engine, action: Action, now: float, settings: PolicySettings = DEFAULT_SETTINGS
) -> float:
    """Expected seconds of reloading that `action` causes (see the module docstring)."""
    if isinstance(action, Sleep):
        restore = wake_seconds(engine, action.level, settings)
    elif engine.state is EngineState.SLEEPING:
        restore = start_seconds(engine, settings) - wake_seconds(
            engine, engine.sleeping_level or engine.sleep_level or 1, settings
        )
    else:
        restore = start_seconds(engine, settings)
    return max(restore, 0.0) * likelihood(engine, now, settings)


def plan_placement(
    target: Target,
    gpus: Sequence[GpuCapacity],
    engines: Sequence[Engine],
    *,
    now: float,
    host_ram_for_sleep: int | None,
    settings: PolicySettings = DEFAULT_SETTINGS,
) -> Plan | CannotFit:
    """Plan where `target` runs and what must sleep, stop or drain first.

    `host_ram_for_sleep` is the host RAM still free for level-1 sleepers (None: no limit).
    The target's own entry in `engines`, if any, only says it is asleep (a wake) or starting.
    """
    return _Planner(target, gpus, engines, now, host_ram_for_sleep, settings).plan()


# Engines busy with a start or wake: not evictable, and they block other starts on their GPUs.
_ACTIVE = (EngineState.STARTING, EngineState.WAKING)


@dataclass(frozen=True)
class _Move:
    """What an option does: an action on an engine, or only waiting for it."""

    engine: Engine
    action: Action | None
    wait: WaitReason | None


@dataclass(frozen=True)
class _Candidate:
    gpus: tuple[int, ...]
    selection: Selection[_Move]
    needs_wait: bool
    leftover: int
    bytes_per_gpu: int

    def rank(self) -> tuple[bool, float, int, int, int, tuple[int, ...]]:
        cost, victims, severity, _ = self.selection.rank()
        return (self.needs_wait, cost, victims, severity, self.leftover, self.gpus)


class _Planner:
    def __init__(
        self,
        target: Target,
        gpus: Sequence[GpuCapacity],
        engines: Sequence[Engine],
        now: float,
        host_ram_for_sleep: int | None,
        settings: PolicySettings,
    ) -> None:
        self.target = target
        self.gpus = {gpu.index: gpu for gpu in gpus}
        self.settings = settings
        self.now = now
        self.host_budget: float = math.inf if host_ram_for_sleep is None else host_ram_for_sleep
        own = [engine for engine in engines if engine.name == target.name]
        self.own = own[0] if own else None
        self.wake = self.own is not None and self.own.state in (
            EngineState.SLEEPING,
            EngineState.WAKING,
        )
        self.others = within_noise_as_equal(
            [engine for engine in engines if engine.name != target.name], settings
        )

    # ----- the plan -----

    def plan(self) -> Plan | CannotFit:
        placements = self._placements()
        if isinstance(placements, CannotFit):
            return placements
        forced = self._group_moves()
        if isinstance(forced, CannotFit):
            return forced
        others = [after for e in self.others if (after := self._after(e, forced)) is not None]
        host = self.host_budget + sum(_host_delta(move) for move in forced)
        feasible = [gpus for gpus in placements if self._hard_shortfall(gpus, others) is None]
        if not feasible:
            return CannotFit(self._cannot_fit_reason(placements, others))
        forced_wait = any(move.wait for move in forced)
        best: _Candidate | None = None
        for phase_allows_waits in (False, True):
            for gpus in feasible:
                found = self._search(gpus, others, host, phase_allows_waits, forced_wait)
                if found is not None and (best is None or found.rank() < best.rank()):
                    best = found
            if best is not None:
                break
        if best is None:  # unreachable: every non-pinned engine may go in the second phase
            return CannotFit(self._cannot_fit_reason(placements, others))
        return self._to_plan(best, forced)

    def _placements(self) -> list[tuple[int, ...]] | CannotFit:
        """The GPU sets the target may use: its own GPUs for a wake, else combinations."""
        known = sorted(self.gpus)
        if self.wake:
            assert self.own is not None
            missing = [index for index in self.own.gpus if index not in self.gpus]
            if missing:
                return CannotFit(
                    f"{self.target.name!r} sleeps on GPU {missing[0]}, which is not in the "
                    f"inventory (GPUs {_indexes(known)})"
                )
            return [tuple(sorted(self.own.gpus))]
        allowed = sorted(set(self.target.gpus)) if self.target.gpus else known
        missing = [index for index in allowed if index not in self.gpus]
        if missing:
            return CannotFit(
                f"{self.target.name!r} may use GPU {missing[0]}, which is not in the inventory "
                f"(GPUs {_indexes(known) or 'none'})"
            )
        degree = self.target.tensor_parallel
        if degree > len(allowed):
            return CannotFit(
                f"{self.target.name!r} needs {degree} GPUs (tensor_parallel) but may use "
                f"only {len(allowed)}: {_indexes(allowed) or 'none'}"
            )
        # Tensor parallelism runs within one machine: GPUs of one placement share a node.
        found = [
            gpus
            for gpus in combinations(allowed, degree)
            if len({self.gpus[index].node for index in gpus}) == 1
        ]
        if not found:
            return CannotFit(
                f"{self.target.name!r} needs {degree} GPUs (tensor_parallel) on one node, "
                "and no node has that many"
            )
        return found

    def _usable(self, index: int) -> int:
        gpu = self.gpus[index]
        return gpu.total_bytes - gpu.foreign_bytes - self.settings.headroom_bytes

    def _bytes_per_gpu(self, gpus: tuple[int, ...]) -> int:
        if self.target.bytes_per_gpu is not None:
            return self.target.bytes_per_gpu
        return max(min(self._usable(index) for index in gpus), 0)

    # ----- exclusive groups -----

    def _group_moves(self) -> list[_Move] | CannotFit:
        """Running members of the target's exclusive group: they sleep or stop first."""
        group = self.target.exclusive_group
        if group is None:
            return []
        moves: list[_Move] = []
        host = self.host_budget
        for engine in sorted(self.others, key=lambda e: e.name):
            if engine.exclusive_group != group or engine.state in (
                EngineState.SLEEPING,
                EngineState.STOPPING,
            ):
                continue
            if engine.pinned:
                return CannotFit(
                    f"{engine.name!r} is pinned and running, and it shares exclusive group "
                    f"{group!r} with {self.target.name!r}: only one of them may run"
                )
            wait = _wait_reason(engine)
            action = self._cheapest_sleep(engine, host) or Stop(engine.name)
            if isinstance(action, Sleep) and action.level == 1:
                host -= engine.host_bytes_for_sleep
            moves.append(_Move(engine, action, wait))
        return moves

    def _cheapest_sleep(self, engine: Engine, host: float) -> Sleep | None:
        if engine.sleep_level == 1 and engine.host_bytes_for_sleep <= host:
            return Sleep(engine.name, 1)
        if engine.sleep_level in (1, 2):
            return Sleep(engine.name, 2)
        return None

    def _after(self, engine: Engine, forced: Sequence[_Move]) -> Engine | None:
        """The engine as the memory search sees it once the group's moves are done."""
        for move in forced:
            if move.engine.name != engine.name:
                continue
            if isinstance(move.action, Sleep):
                # Asleep (once drained, if busy: the wait is on the move): the search may
                # still stop it for its residual.
                return replace(
                    engine,
                    state=EngineState.SLEEPING,
                    sleeping_level=move.action.level,
                    in_flight=0,
                )
            return None  # stopped: holds nothing once done
        return engine

    # ----- memory -----

    def _need(self, gpus: tuple[int, ...], engines: Sequence[Engine], size: int) -> list[int]:
        """Bytes still to free on each GPU of the placement.

        A sleeping target's residual is not in `engines`: waking turns it into part of the
        awake footprint, so only the other engines' memory stands in the way.
        """
        return [size - free_bytes(self.gpus[index], engines, self.settings) for index in gpus]

    def _hard_shortfall(self, gpus: tuple[int, ...], engines: Sequence[Engine]) -> int | None:
        """The first GPU of the set where even evicting every unpinned engine is not enough."""
        size = self._bytes_per_gpu(gpus)
        for index in gpus:
            pinned = sum(e.held_bytes_per_gpu for e in engines if e.pinned and index in e.gpus)
            if size > self._usable(index) - pinned:
                return index
        return None

    def _search(
        self,
        gpus: tuple[int, ...],
        engines: Sequence[Engine],
        host: float,
        allow_waits: bool,
        forced_wait: bool,
    ) -> _Candidate | None:
        starters = [
            e for e in engines if e.state in _ACTIVE and any(index in e.gpus for index in gpus)
        ]
        if starters and not allow_waits:
            return None  # one start per GPU at a time; maybe another GPU is free
        size = self._bytes_per_gpu(gpus)
        need = self._need(gpus, engines, size)
        options = [
            opts
            for engine in engines
            if any(index in engine.gpus for index in gpus)
            for opts in [self._options(engine, gpus, host, allow_waits)]
            if opts
        ]
        selection = cheapest_cover(
            options,
            need,
            host,
            exact_limit=self.settings.exact_limit,
            node_budget=self.settings.node_budget,
        )
        if selection is None:
            return None
        freed = [sum(o.frees[g] for o in selection.chosen) for g in range(len(gpus))]
        leftover = sum(f - n for f, n in zip(freed, need, strict=True))
        waits = bool(starters) or forced_wait or any(o.payload.wait for o in selection.chosen)
        return _Candidate(gpus, selection, waits, leftover, size)

    def _options(
        self, engine: Engine, gpus: tuple[int, ...], host: float, allow_waits: bool
    ) -> list[Option[_Move]]:
        if engine.pinned:
            return []
        wait = _wait_reason(engine)
        if wait is not None and not allow_waits:
            return []

        def frees(per_gpu: int) -> tuple[int, ...]:
            return tuple(per_gpu if index in engine.gpus else 0 for index in gpus)

        if engine.state is EngineState.STOPPING:
            return [Option(0.0, frees(engine.awake_bytes_per_gpu), _Move(engine, None, wait))]
        stop = Stop(engine.name)
        stop_option = Option(
            self._cost(engine, stop),
            frees(engine.held_bytes_per_gpu),
            _Move(engine, stop, wait),
            host_delta=engine.host_bytes_for_sleep if engine.sleeping_level == 1 else 0,
            severity=2,
        )
        if engine.state is EngineState.SLEEPING:
            return [stop_option]
        options = [stop_option]
        sleep_frees = frees(max(engine.awake_bytes_per_gpu - engine.asleep_bytes_per_gpu, 0))
        if not any(sleep_frees) or engine.state in _ACTIVE:
            return options
        if engine.sleep_level == 1:
            # Offered even beyond the host RAM left now: stopping a level-1 sleeper in the
            # same plan may return enough. The search checks the sum.
            level1 = Sleep(engine.name, 1)
            options.append(
                Option(
                    self._cost(engine, level1),
                    sleep_frees,
                    _Move(engine, level1, wait),
                    host_delta=-engine.host_bytes_for_sleep,
                )
            )
        # Level 2 whenever host RAM is limited: level 1 may be worth more to another engine.
        # With no limit, level 1 is always at least as good (same bytes, faster wake).
        if engine.sleep_level == 2 or (engine.sleep_level == 1 and not math.isinf(host)):
            level2 = Sleep(engine.name, 2)
            options.append(
                Option(self._cost(engine, level2), sleep_frees, _Move(engine, level2, wait), 0, 1)
            )
        return options

    def _cost(self, engine: Engine, action: Action) -> float:
        return action_cost(engine, action, self.now, self.settings)

    # ----- answers -----

    def _to_plan(self, best: _Candidate, forced: Sequence[_Move]) -> Plan:
        chosen = {option.payload.engine.name: option for option in best.selection.chosen}
        cost = best.selection.cost
        moves: list[_Move] = []
        for move in forced:
            # The memory search may have chosen to stop a member the group rule put to sleep:
            # then it is one stop, costed on the engine as it is now.
            later = chosen.pop(move.engine.name, None)
            action = later.payload.action if later is not None else move.action
            assert action is not None
            cost += self._cost(move.engine, action) - (later.cost if later is not None else 0.0)
            moves.append(_Move(move.engine, action, move.wait))
        rest = sorted((option.payload for option in chosen.values()), key=_action_order)
        actions = tuple(m.action for m in [*moves, *rest] if m.action is not None)
        waits: list[WaitFor] = [WaitFor(m.engine.name, m.wait) for m in [*moves, *rest] if m.wait]
        for engine in self.others:
            if engine.state in _ACTIVE and any(index in engine.gpus for index in best.gpus):
                reason = WaitReason.STARTING
                if engine.state is EngineState.WAKING:
                    reason = WaitReason.WAKING
                waits.append(WaitFor(engine.name, reason))
        unique = tuple(dict.fromkeys(waits))
        return Plan(
            gpus=best.gpus,
            bytes_per_gpu=best.bytes_per_gpu,
            actions=actions,
            wait_for=unique,
            wake=self.wake,
            cost=cost,
            explanation=self._explain(best, actions, unique, cost),
        )

    def _explain(
        self,
        best: _Candidate,
        actions: Sequence[Action],
        waits: Sequence[WaitFor],
        cost: float,
    ) -> str:
        verb = "wake" if self.wake else "start"
        where = f"GPU {_indexes(best.gpus)}"
        node = self.gpus[best.gpus[0]].node if best.gpus else None
        if node:
            where += f" of node {node}"
        head = f"{verb} {self.target.name!r} on {where} with {gib(best.bytes_per_gpu)} per GPU"
        if not actions and not waits:
            return f"{head}: fits alongside ({gib(best.leftover)} left)"
        parts = [
            f"sleep {a.name!r} (level {a.level})" if isinstance(a, Sleep) else f"stop {a.name!r}"
            for a in actions
        ]
        text = f"{head}: {', '.join(parts) or 'no eviction'} (expected reload cost {cost:.1f} s)"
        if waits:
            text += "; first wait for " + ", ".join(f"{w.name!r} ({w.reason})" for w in waits)
        return text

    def _cannot_fit_reason(
        self, placements: Sequence[tuple[int, ...]], engines: Sequence[Engine]
    ) -> str:
        shortfalls: list[str] = []
        for gpus in placements:
            index = self._hard_shortfall(gpus, engines)
            if index is None:
                continue
            line = self._describe_gpu(index, engines)
            if line not in shortfalls:
                shortfalls.append(line)
        size = self.target.bytes_per_gpu
        needs = (
            "has no known footprint, so it needs a whole GPU"
            if size is None
            else f"needs {gib(size)} per GPU"
        )
        count = self.target.tensor_parallel
        across = f" on {count} GPUs at once" if count > 1 else ""
        return f"{self.target.name!r} {needs}{across}, but " + "; ".join(shortfalls)

    def _describe_gpu(self, index: int, engines: Sequence[Engine]) -> str:
        gpu = self.gpus[index]
        where = f" (node {gpu.node})" if gpu.node else ""
        text = f"GPU {index}{where} has {gib(gpu.total_bytes)} total"
        if gpu.foreign_bytes:
            text += f", {gib(gpu.foreign_bytes)} used by other processes"
        if self.settings.headroom_bytes:
            text += f", {gib(self.settings.headroom_bytes)} kept free"
        pinned = [e for e in engines if e.pinned and index in e.gpus]
        if pinned:
            names = ", ".join(repr(e.name) for e in pinned)
            held = sum(e.held_bytes_per_gpu for e in pinned)
            text += f", {gib(held)} held by pinned {names}"
        return text


def within_noise_as_equal(engines: list[Engine], settings: PolicySettings) -> list[Engine]:
    """Restore times within `settings.noise` of each other count as equal (the smallest of
    them), so measurement noise never decides between two like engines: recency does, and
    the least recently used goes first. Three identical models once evicted the more recently
    used one in 2 runs of 3 because their measured starts differed by jitter (issue 11)."""

    def even(values: dict[str, float]) -> dict[str, float]:
        result: dict[str, float] = {}
        group_floor: float | None = None
        for name, value in sorted(values.items(), key=lambda item: item[1]):
            if group_floor is None or value > group_floor * (1 + settings.noise):
                group_floor = value
            result[name] = group_floor
        return result

    starts = even({e.name: start_seconds(e, settings) for e in engines})
    measured_wakes = {e.name: e.wake_seconds for e in engines if e.wake_seconds is not None}
    wakes = even({name: value for name, value in measured_wakes.items()})
    return [
        replace(e, start_seconds=starts[e.name], wake_seconds=wakes.get(e.name, e.wake_seconds))
        for e in engines
    ]


def _wait_reason(engine: Engine) -> WaitReason | None:
    if engine.state is EngineState.STARTING:
        return WaitReason.STARTING
    if engine.state is EngineState.WAKING:
        return WaitReason.WAKING
    if engine.state is EngineState.STOPPING:
        return WaitReason.STOPPING
    if engine.state is EngineState.DRAINING or engine.in_flight > 0:
        return WaitReason.BUSY
    return None


def _host_delta(move: _Move) -> int:
    if isinstance(move.action, Sleep) and move.action.level == 1:
        return -move.engine.host_bytes_for_sleep
    return 0


def _action_order(move: _Move) -> tuple[int, str]:
    """Stops of sleepers first (cheap, return host RAM), then sleeps, then stops."""
    if move.action is None:
        return (3, move.engine.name)
    if isinstance(move.action, Sleep):
        return (1, move.engine.name)
    return (0 if move.engine.state is EngineState.SLEEPING else 2, move.engine.name)


def _indexes(indexes: Sequence[int]) -> str:
    return ", ".join(str(index) for index in indexes)
