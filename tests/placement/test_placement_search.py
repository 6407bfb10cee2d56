"""The cheapest-cover search: exact against brute force for small inputs, minimal always."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelyard.placement.search import Option, Selection, cheapest_cover

Cands = list[list[Option[str]]]


@st.composite
def problems(draw: st.DrawFn, max_candidates: int = 7) -> tuple[Cands, list[int], float]:
    width = draw(st.integers(1, 2))
    count = draw(st.integers(0, max_candidates))
    candidates: Cands = []
    for c in range(count):
        # Like engines: a candidate's options either all give host RAM back (a sleeper being
        # stopped) or all take some or none (an awake engine being slept or stopped).
        # And a stronger option frees more on the same GPUs (stop frees what sleep does, and
        # the residual too).
        returns = draw(st.booleans())
        base = [draw(st.integers(0, 10)) for _ in range(width)]
        options = []
        for o in range(draw(st.integers(1, 3))):
            host = draw(st.integers(0, 6)) * (1 if returns else -1)
            options.append(
                Option(
                    cost=float(draw(st.integers(0, 50))),
                    frees=tuple(b * (o + 1) for b in base),
                    payload=f"c{c}o{o}",
                    host_delta=host,
                    severity=o,
                )
            )
        candidates.append(options)
    need = [draw(st.integers(-5, 25)) for _ in range(width)]
    budget = draw(st.sampled_from([math.inf, 0.0, 3.0, 8.0]))
    return candidates, need, budget


def brute_force(cands: Cands, need: list[int], budget: float) -> float | None:
    best: float | None = None
    for picks in itertools.product(*[[None, *options] for options in cands]):
        chosen = [p for p in picks if p is not None]
        freed = [sum(o.frees[g] for o in chosen) for g in range(len(need))]
        host = budget + sum(o.host_delta for o in chosen)
        if host >= 0 and all(f >= n for f, n in zip(freed, need, strict=True)):
            cost = sum(o.cost for o in chosen)
            best = cost if best is None else min(best, cost)
    return best


def covers(selection: Selection[str], need: list[int], budget: float) -> bool:
    freed = [sum(o.frees[g] for o in selection.chosen) for g in range(len(need))]
    host = budget + sum(o.host_delta for o in selection.chosen)
    return host >= 0 and all(f >= n for f, n in zip(freed, need, strict=True))


@settings(max_examples=300, deadline=None)
@given(problems())
def test_exact_search_matches_brute_force(problem: tuple[Cands, list[int], float]) -> None:
    cands, need, budget = problem
    expected = brute_force(cands, need, budget)
    found = cheapest_cover(cands, need, budget)
    if expected is None:
        assert found is None
        return
    assert found is not None
    assert covers(found, need, budget)
    assert found.cost == pytest.approx(expected)


@settings(max_examples=300, deadline=None)
@given(problems(max_candidates=10), st.sampled_from([0, 2, 12]))
def test_every_answer_covers_and_is_minimal(
    problem: tuple[Cands, list[int], float], exact_limit: int
) -> None:
    cands, need, budget = problem
    found = cheapest_cover(cands, need, budget, exact_limit=exact_limit)
    if found is None:
        # Greedy (beyond the exact limit) may miss an answer only through host RAM.
        if exact_limit >= len(cands) or math.isinf(budget):
            assert brute_force(cands, need, budget) is None
        return
    assert covers(found, need, budget)
    # At most one option per candidate.
    owners = [o.payload.split("o")[0] for o in found.chosen]
    assert len(owners) == len(set(owners))
    # Minimal: dropping any chosen option breaks the cover.
    for option in found.chosen:
        rest = tuple(o for o in found.chosen if o is not option)
        assert not covers(Selection(rest, 0.0, 0), need, budget)


def test_greedy_density_is_beaten_by_the_exact_search() -> None:
    # Greedy takes "dense" (3 for 9 bytes), then needs "tiny": 7 in all. "whole" alone is 5.
    cands: Cands = [
        [Option(5.0, (10,), "whole")],
        [Option(3.0, (9,), "dense")],
        [Option(4.0, (2,), "tiny")],
    ]
    exact = cheapest_cover(cands, [10], math.inf)
    greedy = cheapest_cover(cands, [10], math.inf, exact_limit=0)
    assert exact is not None
    assert greedy is not None
    assert [o.payload for o in exact.chosen] == ["whole"]
    assert exact.cost == 5.0
    assert greedy.cost == 7.0


def test_nothing_needed_chooses_nothing() -> None:
    found = cheapest_cover([[Option(1.0, (5,), "a")]], [-3], math.inf)
    assert found is not None
    assert found.chosen == ()


def test_ties_go_to_fewer_victims_then_milder_actions() -> None:
    cands: Cands = [
        [Option(2.0, (6,), "a-sleep", severity=1), Option(2.0, (6,), "a-stop", severity=2)],
        [Option(1.0, (3,), "b")],
        [Option(1.0, (3,), "c")],
    ]
    found = cheapest_cover(cands, [6], math.inf)
    assert found is not None
    assert [o.payload for o in found.chosen] == ["a-sleep"]


def test_node_budget_keeps_the_greedy_answer() -> None:
    cands: Cands = [[Option(float(i % 7 + 1), (i % 5 + 1,), f"x{i}")] for i in range(12)]
    found = cheapest_cover(cands, [20], math.inf, node_budget=1)
    assert found is not None
    assert sum(o.frees[0] for o in found.chosen) >= 20
