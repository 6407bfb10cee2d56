"""The simulator's shipped traces replayed through the gateway's real scheduler core, with
evictions that take time while other decisions go on (`bench.placement.replay_core`).

Issue 22: the figures are the gateway's, not a separate loop's. They must not get worse
than the simulator's against footprint-LRU (the seed 004): at most half its load-wait, every
request answered, none refused, the GPU never over-planned (the virtual gateway asserts it
after every event).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from bench.placement.policies import LruByFootprint, Modelyard
from bench.placement.replay_core import replay
from bench.placement.simulate import TRACES, Simulation, Trace


@pytest.mark.parametrize("path", sorted(TRACES.glob("*.json")), ids=lambda p: p.stem)
def test_shipped_traces_through_the_core_beat_footprint_lru(path: Path) -> None:
    trace = Trace.load(path)
    outcomes = replay(trace)
    assert all(outcome.served_at is not None for outcome in outcomes)
    waited = sum(outcome.waited for outcome in outcomes)
    lru = Simulation(trace, LruByFootprint()).run().total_wait
    simulated = Simulation(trace, Modelyard()).run().total_wait
    assert waited <= lru / 2
    # The driver's timing (evictions as tasks) is no worse than the simulator's own loop.
    assert waited <= simulated * 1.01
