"""The shipped traces replayed through the gateway's scheduler core with the driver's timing.

    python -m bench.placement.replay_core [TRACE.json ...]

`bench.placement.simulate` carries each eviction out at once and then loads the target, one
load at a time. Here the same traces go through `tests/core/virtual_gateway.py`, which steps
the real `SchedulerCore` and carries its commands out as the gateway's driver does: each stop
takes `STOP_S`, each sleep its copy time, while other decisions go on. A request waits for a
load until its start timeout. Printed: total load-wait, p95, worst wait and refusals, next to
footprint-LRU (the seed 004) from the simulator.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    _ROOT = Path(__file__).resolve().parents[2]
    sys.path[:0] = [str(_ROOT), str(_ROOT / "src")]

from tests.core.virtual_gateway import Model, Outcome, VirtualGateway

from bench.placement.policies import LruByFootprint
from bench.placement.simulate import TRACES, Simulation, Trace
from bench.placement.world import STOP_S


def replay(trace: Trace) -> list[Outcome]:
    """Every request of `trace`, answered by the virtual gateway around the real core."""
    models = {
        spec.name: Model(
            bytes=spec.bytes,
            start_s=spec.start_s,
            wake_s=spec.wake_s,
            wake2_s=spec.wake2_s,
            sleep_level=spec.sleep_level,
            asleep_bytes=spec.asleep_bytes,
            start_timeout=trace.start_timeout,
            stop_s=STOP_S,
            sleep_s=spec.sleep_seconds(1),
            sleep2_s=spec.sleep_seconds(2),
        )
        for spec in trace.models
    }
    world = VirtualGateway(models, [trace.gpu_bytes], host_ram_for_sleep=trace.host_ram_for_sleep)
    for request in trace.requests:
        world.request(request.at, request.model, duration=request.service_s)
    return world.run(until=math.inf)


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(math.ceil(0.95 * len(ordered)) - 1, len(ordered) - 1)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("traces", nargs="*", type=Path, help="trace files (default: all shipped)")
    args = parser.parse_args(argv)
    print(
        "| trace | footprint-LRU (seed 004), simulator | modelyard through the core "
        "| ratio | p95 (s) | worst (s) | refused |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for path in args.traces or sorted(TRACES.glob("*.json")):
        trace = Trace.load(path)
        lru = Simulation(trace, LruByFootprint()).run().total_wait
        outcomes = replay(trace)
        waits = [outcome.waited for outcome in outcomes]
        refused = sum(outcome.served_at is None for outcome in outcomes)
        print(
            f"| {trace.name}, {len(trace.requests):,} requests | {lru:,.0f} s "
            f"| **{sum(waits):,.0f} s** | {sum(waits) / lru:.2f}x | {p95(waits):.1f} "
            f"| {max(waits):.1f} | {refused} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
