"""What knowing the future would buy: perfect foresight under the shipped rules, and under
the rules loosened as far as the pre-warming goals allow.

    python -m bench.placement.foresight [TRACE.json ...]

Each trace (default: the traces with structure, then the random ones) is replayed by the
tests' virtual gateway as today, then with perfect foresight (`Foresight`: a model's chance
is 1 when its next request comes within the horizon) three ways:

- **shipped rules**: the decision as `bench.placement.prewarm` replays it;
- **evictions free**: a pre-warm's cost leaves out the plan's eviction cost (recency's guess
  of whether an idle engine is asked for again: foresight knows it, and a victim due within
  its reload is kept);
- **traffic only in flight**: on top of that, a model has traffic only while requests for it
  are in flight or waiting, not for the minute after its last one (which a learned
  predictor needs, unable to tell a model done from one about to be asked again).

The last is the most any pre-warm may do under the rule that it never evicts or delays a
model with traffic. Printed: load-wait against today's for each, and for the shipped rules
the pre-warms wasted and the requests that waited longer than without pre-warming (in
brackets, those with a pre-warm in their way), as `bench.placement.prewarm` counts them.
About five minutes here.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    _ROOT = Path(__file__).resolve().parents[2]
    sys.path[:0] = [str(_ROOT), str(_ROOT / "src")]

from bench.placement.prewarm import (
    Foresight,
    Run,
    replay,
    replayed,
    trace_paths,
)
from bench.placement.simulate import Trace

HEADER = (
    "| trace | modelyard today (s) | perfect foresight, shipped rules | its pre-warms wasted "
    "| its requests waiting longer (a pre-warm in the way) | evictions free "
    "| evictions free, traffic only in flight |\n"
    "|---|---:|---:|---:|---:|---:|---:|"
)


class InFlightOnly(Foresight):
    """Foresight for which nothing is "in use" but what has requests in flight or waiting
    (the core keeps those out of every pre-warm's plan on its own)."""

    def in_use(self, now: float, within: float | None = None) -> set[str]:
        return set()


def foresight_run(trace: Trace, predictor: Foresight, evictions_free: bool) -> Run:
    return Run.of(replayed(trace, predictor, exact_chances=evictions_free))


def row(trace: Trace) -> str:
    today = replay(trace, prewarm=False)
    shipped = foresight_run(trace, Foresight(trace), evictions_free=False)
    free = foresight_run(trace, Foresight(trace), evictions_free=True)
    loosest = foresight_run(trace, InFlightOnly(trace), evictions_free=True)
    longer, in_the_way = shipped.longer_than(today)
    made, _, wasted, _, _ = shipped.tally()

    def ratio(run: Run) -> str:
        return f"{run.total_wait / today.total_wait:.2f}x" if today.total_wait else "-"

    return (
        f"| {trace.name} | {today.total_wait:,.0f} | {ratio(shipped)} | {wasted} of {made} "
        f"| {longer} ({in_the_way}) | {ratio(free)} | {ratio(loosest)} |"
    )


def main(argv: list[str] | None = None) -> int:
    paths = trace_paths(argv, __doc__)
    print(HEADER)
    for path in paths:
        print(row(Trace.load(path)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
