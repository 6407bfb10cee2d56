"""Learned pre-warming, replayed through the scheduler's real core at the driver's timings.

    python -m bench.placement.prewarm [TRACE.json ...]

Each trace (default: the traces with structure in `structured/`, then the random ones in
`traces/`) is replayed by `tests/core/virtual_gateway.py` three times: as today (no
pre-warming), with a `Predictor` learning from the requests as they come, the core deciding
each pre-warm, and with perfect foresight (`Foresight`: the chance is 1 for every model
whose next request comes within the horizon, 0 for the others), under the same rules. The
last is what knowing the future buys with the same decision rule while a pre-warm may use
only free or idle memory and a free start slot (not a strict ceiling: its pre-warms change
later evictions too, for better or worse). Printed side by side with footprint-LRU (a
typical launcher's policy, from the simulator): total load-wait, the ratio to today's,
pre-warms made, used and wasted, the wait they spared, and how many requests waited longer
with pre-warming than without, compared request by request on the same trace. Of those, the
column says in brackets how many had a pre-warm in their way (it evicted their idle or
sleeping engine, or they waited for one to be cancelled or evicted); the rest waited longer
because one decision changed every later one (another engine resident, another victim
chosen), not because of a pre-warm at their moment.
"""

from __future__ import annotations

import argparse
import bisect
import math
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    _ROOT = Path(__file__).resolve().parents[2]
    sys.path[:0] = [str(_ROOT), str(_ROOT / "src")]

from tests.core.virtual_gateway import Outcome, PreWarmRecord, VirtualGateway

from bench.placement.policies import LruByFootprint
from bench.placement.replay_core import models_of
from bench.placement.simulate import TRACES, Simulation, Trace
from modelyard.config.schema import DefaultsConfig
from modelyard.scheduler.predictor import Chance, Predictor

STRUCTURED = Path(__file__).parent / "structured"
# The gateway's idle timer at its default: an engine idle this long sleeps (a model with a
# sleep level) or stops, today and with pre-warming alike.
IDLE_TIMEOUT_S = DefaultsConfig().idle_timeout
# A request "waits longer because of a pre-warm" past this much (float noise, not seconds).
LONGER_S = 1e-6


@dataclass
class Run:
    outcomes: list[Outcome]
    prewarms: list[PreWarmRecord]
    keeps: list[PreWarmRecord]  # engines the idle timer kept up for pre-warming

    @classmethod
    def of(cls, world: VirtualGateway) -> Run:
        return cls(world.outcomes, world.prewarms, world.keeps)

    @property
    def total_wait(self) -> float:
        return sum(outcome.waited for outcome in self.outcomes)

    def longer_than(self, today: Run) -> tuple[int, int]:
        """How many requests waited longer here than in `today` (the same trace), compared
        request by request, and how many of those had a pre-warm in their way."""
        longer = [
            after
            for before, after in zip(today.outcomes, self.outcomes, strict=True)
            if after.waited > before.waited + LONGER_S
        ]
        return len(longer), sum(1 for o in longer if o.prewarm_in_the_way is not None)

    def tally(self) -> tuple[int, int, int, int, int]:
        """Pre-warms made, used and wasted; idle spells kept up, and those a request ended."""
        return (
            len(self.prewarms),
            sum(p.used_at is not None for p in self.prewarms),
            sum(p.wasted for p in self.prewarms),
            len(self.keeps),
            sum(k.used_at is not None for k in self.keeps),
        )


class Foresight(Predictor):
    """Knows the trace: a model's chance is 1 when its next request comes within the horizon
    (the rest of the predictor, "in use" and the switch rate, learns as usual)."""

    def __init__(self, trace: Trace) -> None:
        super().__init__()
        self.arrivals: dict[str, list[float]] = {}
        for request in trace.requests:
            self.arrivals.setdefault(request.model, []).append(request.at)

    def chances(self, now: float, horizons: dict[str, float]) -> list[Chance]:
        out = []
        for model, horizon in horizons.items():
            times = self.arrivals.get(model, [])
            index = bisect.bisect_right(times, now)
            if index < len(times) and times[index] - now <= horizon:
                out.append(Chance(model, 1.0, horizon, "foresight"))
        return out


def world_for(
    trace: Trace,
    predictor: Predictor | None,
    idle_timeout: float = IDLE_TIMEOUT_S,
    exact_chances: bool = False,
) -> VirtualGateway:
    """A virtual gateway with the trace's models, GPU and host RAM, nothing sent yet."""
    return VirtualGateway(
        models_of(trace),
        [trace.gpu_bytes],
        host_ram_for_sleep=trace.host_ram_for_sleep,
        predictor=predictor,
        idle_timeout=idle_timeout,
        exact_chances=exact_chances,
    )


def replayed(
    trace: Trace,
    predictor: Predictor | None = None,
    idle_timeout: float = IDLE_TIMEOUT_S,
    exact_chances: bool = False,
) -> VirtualGateway:
    """The virtual gateway once it has served the whole trace (its outcomes, transitions and
    pre-warms kept), pre-warming with `predictor` (None: as today)."""
    world = world_for(trace, predictor, idle_timeout, exact_chances)
    for request in trace.requests:
        world.request(request.at, request.model, duration=request.service_s, key=request.key)
    world.run(until=math.inf)
    return world


def replay(
    trace: Trace, prewarm: bool, foresight: bool = False, idle_timeout: float = IDLE_TIMEOUT_S
) -> Run:
    predictor = Foresight(trace) if foresight else Predictor() if prewarm else None
    return Run.of(replayed(trace, predictor, idle_timeout))


@dataclass(frozen=True)
class Row:
    trace: str
    requests: int
    lru: float
    today: float
    learned: float
    made: int
    used: int
    wasted: int
    spared: float
    longer: int  # requests that waited longer with pre-warming
    longer_in_the_way: int  # of those, requests that had a pre-warm in their way
    foresight: float  # load-wait with perfect foresight, under the same rules
    kept: int  # idle spells in which the idle timer kept an engine up for pre-warming
    kept_used: int  # of those, ended by a request for it (not by a stop or a sleep)

    @property
    def ratio(self) -> float:
        return self.learned / self.today if self.today else 1.0

    @property
    def waste(self) -> float:
        return self.wasted / self.made if self.made else 0.0

    def markdown(self) -> str:
        return (
            f"| {self.trace} | {self.requests:,} | {self.lru:,.0f} | {self.today:,.0f} "
            f"| **{self.learned:,.0f}** | {self.ratio:.2f}x | {self.made} | {self.used} "
            f"| {self.wasted} ({self.waste:.0%}) | {self.spared:,.0f} "
            f"| {self.longer} ({self.longer_in_the_way}) "
            f"| {self.kept} ({self.kept_used}) "
            f"| {self.foresight:,.0f} ({self.foresight / self.today if self.today else 1:.2f}x) |"
        )


HEADER = (
    "| trace | requests | footprint-LRU (s) | modelyard today (s) | with pre-warming (s) "
    "| vs today | pre-warms | used | wasted | wait spared (s) "
    "| requests waiting longer (a pre-warm in the way) "
    "| kept idle (then asked for) | perfect foresight (s) |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def compare(trace: Trace) -> Row:
    today = replay(trace, prewarm=False)
    learned = replay(trace, prewarm=True)
    longer, in_the_way = learned.longer_than(today)
    made, used, wasted, kept, kept_used = learned.tally()
    spared = sum(
        min(p.used_at - p.at, p.spared_s) for p in learned.prewarms if p.used_at is not None
    )
    return Row(
        trace.name,
        len(trace.requests),
        Simulation(trace, LruByFootprint()).run().total_wait,
        today.total_wait,
        learned.total_wait,
        made,
        used,
        wasted,
        spared,
        longer,
        in_the_way,
        replay(trace, prewarm=True, foresight=True).total_wait,
        kept,
        kept_used,
    )


def trace_paths(argv: list[str] | None, doc: str, random_too: bool = True) -> list[Path]:
    """The trace files named on a bench's command line (`doc`: its docstring, for --help),
    else the shipped ones: those with structure, then (`random_too`) the random ones."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    default = "all shipped" if random_too else "the traces with structure"
    parser.add_argument("traces", nargs="*", type=Path, help=f"trace files (default: {default})")
    args = parser.parse_args(argv)
    random = sorted(TRACES.glob("*.json")) if random_too else []
    return list(args.traces) or sorted(STRUCTURED.glob("*.json")) + random


def main(argv: list[str] | None = None) -> int:
    paths = trace_paths(argv, __doc__)
    print(HEADER)
    missed = []
    for path in paths:
        row = compare(Trace.load(path))
        print(row.markdown(), flush=True)
        missed += goals_missed(row, structured=path.resolve().parent == STRUCTURED.resolve())
    print("\ngoals: " + (f"missed: {'; '.join(missed)}" if missed else "met on every trace"))
    return 0


def goals_missed(row: Row, structured: bool) -> list[str]:
    """The goals: half of today's load-wait where there is structure, no worse than today
    (2 %) where there is none, at most 30 % of pre-warms wasted, no request waiting longer."""
    missed = []
    if structured and row.ratio > 0.5:
        missed.append(f"{row.trace} load-wait {row.ratio:.2f}x > 0.5x")
    if not structured and row.ratio > 1.02:
        missed.append(f"{row.trace} load-wait {row.ratio:.2f}x > 1.02x")
    if row.waste > 0.30:
        missed.append(f"{row.trace} wasted {row.waste:.0%}")
    if row.longer:
        missed.append(f"{row.trace} {row.longer} requests waited longer")
    return missed


if __name__ == "__main__":
    sys.exit(main())
