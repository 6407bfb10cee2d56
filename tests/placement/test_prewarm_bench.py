"""The pre-warming benchmark's mechanics on a tiny trace (its figures are in the docs)."""

from __future__ import annotations

from bench.placement.prewarm import compare, goals_missed
from bench.placement.simulate import Request, Trace
from bench.placement.world import ModelSpec

GIB = 1024**3


def test_an_a_then_b_habit_pre_warms_b_and_the_row_adds_up() -> None:
    # Two 12 GiB models and a 20 GiB one on 24 GiB, sleep off: "other" evicts a and b each
    # round; the agent asks a, then b 60 s later.
    models = tuple(
        ModelSpec(name, gib * GIB, start, 1.0, 5.0, GIB // 2, 0)
        for name, gib, start in (("a", 12, 30.0), ("b", 12, 40.0), ("other", 20, 30.0))
    )
    requests = []
    for round_ in range(12):
        t = round_ * 1000.0
        requests += [
            Request(t, "other", 5.0, "someone"),
            Request(t + 100.0, "a", 5.0, "agent"),
            Request(t + 190.0, "b", 5.0, "agent"),
        ]
    tiny = Trace("tiny", 24 * GIB, 0, models, tuple(requests))
    row = compare(tiny)
    assert row.made == row.used + row.wasted
    assert row.used >= 8  # b, from the fourth round on
    assert row.learned < row.today
    assert row.spared > 0
    assert goals_missed(row, structured=False) == []
