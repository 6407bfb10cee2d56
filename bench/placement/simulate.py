"""Replay request traces against placement policies, in simulated time (no processes, no sleeps).

    python -m bench.placement.simulate [TRACE.json ...] [--check]
    python bench/placement/simulate.py             (also works)

One GPU; loads (starts and wakes) happen one at a time, as the gateway does (vLLM's memory
profiling counts other processes' memory), in the order requests asked for them. A request
holds its engine for its service time, so engines are busy and victims must drain first.
Requests for a model that is loading join that load; requests for a ready model are served
at once, even while another model loads. A request whose load has not begun by its start
timeout (the trace's `start_timeout`, 300 s by default, the gateway's) is refused with 503,
as the gateway does; once its load begins it waits for it. The table reports how long
requests waited for loads (total, p95, worst), cold starts, wakes, OOMs and refusals for each
policy. `--check` exits 1 unless modelyard's total load-wait is at most half of the seed 004's
on the traces of issue 4 (`bursty`, `steady`), and modelyard refused no request that waiting
within its start timeout would have served, on every trace (issue 11).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `modelyard` importable
    _ROOT = Path(__file__).resolve().parents[2]
    sys.path[:0] = [str(_ROOT), str(_ROOT / "src")]

from bench.placement.policies import LruByFootprint, Modelyard, SimPolicy, all_policies
from bench.placement.world import (
    OOM_AFTER_SHARE,
    STOP_S,
    Engine,
    ModelSpec,
    State,
    World,
)

TRACES = Path(__file__).parent / "traces"


@dataclass(frozen=True)
class Request:
    at: float
    model: str
    service_s: float
    key: str = ""  # who asked (an API key, a user): what pre-warming learns habits by


@dataclass(frozen=True)
class Trace:
    name: str
    gpu_bytes: int
    host_ram_for_sleep: int
    models: tuple[ModelSpec, ...]
    requests: tuple[Request, ...]
    start_timeout: float = 300.0
    load_wait_goal: bool = True  # issue 4's goal (half of the seed 004's) applies

    @classmethod
    def load(cls, path: Path) -> Trace:
        raw = json.loads(path.read_text())
        return cls(
            name=raw["name"],
            gpu_bytes=int(raw["gpu_bytes"]),
            host_ram_for_sleep=int(raw["host_ram_for_sleep"]),
            models=tuple(ModelSpec.from_json(m) for m in raw["models"]),
            requests=tuple(
                Request(float(row[0]), row[1], float(row[2]), *row[3:4]) for row in raw["requests"]
            ),
            start_timeout=float(raw.get("start_timeout", 300.0)),
            load_wait_goal=bool(raw.get("load_wait_goal", True)),
        )


@dataclass
class Result:
    trace: str
    policy: str
    waits: list[float]
    cold_starts: int = 0
    wakes_l1: int = 0
    wakes_l2: int = 0
    ooms: int = 0
    stops: int = 0
    sleeps: int = 0
    refused: set[int] = field(default_factory=set)
    # Refused before their start timeout: a wait within it might have served them.
    refused_early: set[int] = field(default_factory=set)
    # Of those, the ones whose model was ready within their start timeout after all.
    refused_avoidably: set[int] = field(default_factory=set)

    @property
    def total_wait(self) -> float:
        return sum(self.waits)

    def percentile(self, share: float) -> float:
        ordered = sorted(self.waits)
        return ordered[min(math.ceil(share * len(ordered)) - 1, len(ordered) - 1)]


class Simulation:
    def __init__(self, trace: Trace, policy: SimPolicy) -> None:
        self.trace = trace
        self.policy = policy
        self.world = World(
            gpu_bytes=trace.gpu_bytes,
            host_ram_for_sleep=trace.host_ram_for_sleep,
            engines={spec.name: Engine(spec) for spec in trace.models},
        )
        self.result = Result(trace.name, policy.name, [math.nan] * len(trace.requests))
        self._events: list[tuple[float, int, str, int | str]] = []
        self._seq = 0
        self._queue: deque[str] = deque()  # models waiting for the loader, in request order
        self._loading: str | None = None
        self._out_of_memory: set[str] = set()
        self._early: dict[str, list[int]] = {}  # refused early, by model

    def run(self) -> Result:
        give_up = self.policy.gives_up_after_s
        for index, request in enumerate(self.trace.requests):
            self._push(request.at, "arrive", index)
            limit = self.trace.start_timeout
            self._push(request.at + min(limit, give_up or limit), "deadline", index)
        while self._events:
            at, _, kind, data = heapq.heappop(self._events)
            self.world.now = at
            if kind == "arrive":
                assert isinstance(data, int)
                self._arrive(data)
            elif kind == "deadline":
                assert isinstance(data, int)
                self._deadline(data)
            elif kind == "done":
                assert isinstance(data, str)
                engine = self.world.engines[data]
                engine.in_flight -= 1
                engine.last_used = at
            else:
                assert isinstance(data, str)
                self._loaded(data, ok=kind == "loaded")
            self._step()
        assert not any(math.isnan(w) for w in self.result.waits), "a request was never answered"
        return self.result

    def _deadline(self, index: int) -> None:
        """The request's load has not begun in time: refused (503 with Retry-After)."""
        request = self.trace.requests[index]
        engine = self.world.engines[request.model]
        if index not in engine.waiters or engine.state is State.LOADING:
            return  # served already, or its load has begun: it waits for the load
        engine.waiters.remove(index)
        self._refuse(index)

    def _refuse(self, index: int) -> None:
        request = self.trace.requests[index]
        self.result.waits[index] = self.world.now - request.at
        self.result.refused.add(index)
        if self.world.now - request.at < self.trace.start_timeout - 1e-9:
            self.result.refused_early.add(index)
            self._early.setdefault(request.model, []).append(index)

    def _note_ready(self, name: str) -> None:
        """A model became ready: requests refused early that would still be waiting within
        their start timeout would have been served now."""
        for index in self._early.pop(name, []):
            if self.world.now - self.trace.requests[index].at <= self.trace.start_timeout:
                self.result.refused_avoidably.add(index)

    # ----- requests -----

    def _push(self, at: float, kind: str, data: int | str) -> None:
        self._seq += 1
        heapq.heappush(self._events, (at, self._seq, kind, data))

    def _arrive(self, index: int) -> None:
        request = self.trace.requests[index]
        engine = self.world.engines[request.model]
        if engine.state is State.READY and not engine.draining:
            self._serve(engine, index)
            return
        engine.waiters.append(index)
        if engine.state is not State.LOADING and request.model not in self._queue:
            self._queue.append(request.model)

    def _serve(self, engine: Engine, index: int) -> None:
        request = self.trace.requests[index]
        self.result.waits[index] = self.world.now - request.at
        engine.in_flight += 1
        engine.last_used = self.world.now
        self._push(self.world.now + request.service_s, "done", engine.spec.name)

    def _release_ready(self) -> None:
        for engine in self.world.engines.values():
            if engine.state is State.READY and not engine.draining and engine.waiters:
                waiters, engine.waiters = engine.waiters, []
                for index in waiters:
                    self._serve(engine, index)

    # ----- the loader: one start or wake at a time -----

    def _step(self) -> None:
        if self._loading is not None:
            return
        for engine in self.world.engines.values():
            engine.draining = False  # plan again from the world as it is now
        self._release_ready()  # a model that just became ready serves its waiters first
        while self._queue:
            head = self.world.engines[self._queue[0]]
            if head.waiters and head.state in (State.STOPPED, State.SLEEPING):
                break
            self._queue.popleft()  # loaded meanwhile, or nobody waits any more
        if not self._queue:
            self._release_ready()
            return
        target = self._queue[0]
        waiters = self.world.engines[target].waiters
        deadline = max(self.trace.requests[i].at for i in waiters) + self.trace.start_timeout
        decision = self.policy.decide(target, self.world, target in self._out_of_memory, deadline)
        if decision.refuse is not None:
            self._queue.popleft()
            for index in waiters:
                self._refuse(index)
            self.world.engines[target].waiters = []
            self._release_ready()
            return
        if decision.wait_for:
            for name in decision.wait_for:
                self.world.engines[name].draining = True
            self._release_ready()
            return  # planned again when a request finishes
        self._queue.popleft()
        seconds = 0.0
        for evict in decision.evict:
            victim = self.world.engines[evict.name]
            assert victim.in_flight == 0, f"{self.policy.name} evicted busy {evict.name}"
            if evict.sleep_level:
                assert victim.state is State.READY
                seconds += victim.spec.sleep_seconds(evict.sleep_level)
                victim.state, victim.sleeping_level = State.SLEEPING, evict.sleep_level
                self.result.sleeps += 1
            else:
                seconds += STOP_S
                victim.state, victim.sleeping_level = State.STOPPED, 0
                self.result.stops += 1
            if victim.waiters and evict.name not in self._queue:
                self._queue.append(evict.name)
        self._load(self.world.engines[target], seconds)
        self._release_ready()

    def _load(self, engine: Engine, seconds: float) -> None:
        spec = engine.spec
        fits = self.world.used_bytes() - engine.held_bytes + spec.bytes <= self.world.gpu_bytes
        host_ok = self.world.host_bytes_held() <= self.world.host_ram_for_sleep
        if isinstance(self.policy, (Modelyard, LruByFootprint)):
            assert fits, f"{self.policy.name} overcommitted the GPU for {spec.name}"
            assert host_ok, f"{self.policy.name} overcommitted host RAM"
        if engine.state is State.SLEEPING:
            seconds += spec.wake_seconds(engine.sleeping_level)
            if engine.sleeping_level == 1:
                self.result.wakes_l1 += 1
            else:
                self.result.wakes_l2 += 1
        else:
            self.result.cold_starts += 1
            seconds += spec.start_s if fits else OOM_AFTER_SHARE * spec.start_s
        if not fits:
            self.result.ooms += 1
        engine.state = State.LOADING
        self._loading = spec.name
        self._push(self.world.now + seconds, "loaded" if fits else "oom", spec.name)

    def _loaded(self, name: str, ok: bool) -> None:
        self._loading = None
        engine = self.world.engines[name]
        engine.sleeping_level = 0
        if ok:
            engine.state = State.READY
            self._out_of_memory.discard(name)
            self._note_ready(name)
            return
        engine.state = State.STOPPED
        self._out_of_memory.add(name)
        if name in self._queue:
            self._queue.remove(name)
        self._queue.appendleft(name)


def simulate(trace: Trace, policies: list[SimPolicy] | None = None) -> list[Result]:
    return [Simulation(trace, policy).run() for policy in policies or all_policies()]


def table(results: list[Result]) -> str:
    """A Markdown table; the last column compares each total with the seed 004's."""
    baseline = next(r.total_wait for r in results if "seed 004" in r.policy)
    lines = [
        "| policy | total load-wait (s) | p95 (s) | worst (s) | requests that waited "
        "| cold starts | wakes L1/L2 | OOMs | refused | refused, waiting would have served "
        "| vs seed 004 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        waited = sum(1 for w in r.waits if w > 0)
        ratio = r.total_wait / baseline if baseline else math.nan
        lines.append(
            f"| {r.policy} | {r.total_wait:,.0f} | {r.percentile(0.95):.1f} "
            f"| {max(r.waits):.1f} | {waited} of {len(r.waits)} | {r.cold_starts} "
            f"| {r.wakes_l1}/{r.wakes_l2} | {r.ooms} | {len(r.refused)} "
            f"| {len(r.refused_avoidably)} | {ratio:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("traces", nargs="*", type=Path, help="trace files (default: all shipped)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a goal is missed")
    args = parser.parse_args(argv)
    paths = args.traces or sorted(TRACES.glob("*.json"))
    missed = []
    for path in paths:
        trace = Trace.load(path)
        results = simulate(trace)
        print(f"### {trace.name} ({len(trace.requests)} requests, {path.name})\n")
        print(table(results) + "\n")
        ours = next(r for r in results if r.policy == "modelyard")
        seed = next(r for r in results if "seed 004" in r.policy).total_wait
        if trace.load_wait_goal and ours.total_wait > seed / 2:
            missed.append(f"{trace.name} (load-wait)")
        if ours.refused_early:
            missed.append(f"{trace.name} (refusals before the start timeout)")
    goal = (
        "modelyard's total load-wait at most half of the seed 004's (issue 4's traces), and no "
        "refusal before a request's start timeout (issue 11, every trace)"
    )
    print(f"goals ({goal}): " + (f"missed on {', '.join(missed)}" if missed else "met on all"))
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
