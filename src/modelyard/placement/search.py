"""The cheapest sufficient set: pick at most one option per candidate so that enough bytes are
freed on every GPU of a placement, at the least total cost.

This is a multiple-choice covering knapsack, NP-hard in general but tiny in practice: a GPU
rarely holds more than a handful of engines. So the search is exact (depth-first branch and
bound, seeded with the greedy answer) up to `exact_limit` candidates and greedy beyond, and
both answers go through the same minimality pass, so no chosen option can be dropped or
downgraded while the target still fits.

Knows nothing about engines: `policy.py` turns engines into `Option`s and back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

P = TypeVar("P")


@dataclass(frozen=True)
class Option(Generic[P]):
    """One thing that can be done to one candidate (sleep it, stop it, wait for it)."""

    cost: float
    frees: tuple[int, ...]  # bytes freed on each GPU of the placement, in placement order
    payload: P
    host_delta: int = 0  # host RAM this option returns (> 0) or takes (< 0)
    severity: int = 0  # among options of equal cost, the lower disturbs less (sleep < stop)


@dataclass(frozen=True)
class Selection(Generic[P]):
    chosen: tuple[Option[P], ...]
    cost: float
    overshoot: int  # bytes freed beyond the need, summed over GPUs

    def rank(self) -> tuple[float, int, int, int]:
        """Lower is better: cost, then fewer victims, then milder actions, then less waste."""
        return (
            self.cost,
            len(self.chosen),
            sum(option.severity for option in self.chosen),
            self.overshoot,
        )


def cheapest_cover(
    candidates: Sequence[Sequence[Option[P]]],
    need: Sequence[int],
    host_budget: float,
    *,
    exact_limit: int = 12,
    node_budget: int = 200_000,
) -> Selection[P] | None:
    """The cheapest choice of at most one option per candidate that frees `need` on every GPU.

    `host_budget` is the host RAM that options may take (math.inf for no limit). Returns None
    when even every candidate's most freeing option together is not enough.
    """
    width = len(need)
    if all(n <= 0 for n in need):
        return Selection((), 0.0, 0)
    # Candidates that return host RAM go first, so the depth-first search has seen the host RAM
    # they give back before it decides on options that take some.
    order = sorted(
        range(len(candidates)),
        key=lambda c: (not any(o.host_delta > 0 for o in candidates[c]), _density(candidates[c])),
    )
    ordered = [sorted(candidates[c], key=lambda o: (o.cost, o.severity)) for c in order]
    # Greedy can paint itself into a corner with host RAM (a cheap level-1 sleep takes the
    # RAM that a needed one wanted); then it tries again with options that take none.
    greedy = _greedy(ordered, need, host_budget, take_host=True)
    if greedy is None:
        greedy = _greedy(ordered, need, host_budget, take_host=False)
    best = None if greedy is None else _minimal(ordered, greedy, need, host_budget)
    if len(ordered) <= exact_limit:
        best = _exact(ordered, need, host_budget, best, node_budget)
    return None if best is None else _selection(ordered, best, need, width)


def _density(options: Sequence[Option[P]]) -> float:
    """Cost per byte of a candidate's best option: the order the search tries candidates in."""
    ratios = [o.cost / sum(o.frees) for o in options if sum(o.frees) > 0]
    return min(ratios, default=float("inf"))


Choice = dict[int, int]  # candidate position -> option position


def _freed(cands: Sequence[Sequence[Option[P]]], choice: Choice, width: int) -> list[int]:
    freed = [0] * width
    for c, o in choice.items():
        for gpu, amount in enumerate(cands[c][o].frees):
            freed[gpu] += amount
    return freed


def _host_left(cands: Sequence[Sequence[Option[P]]], choice: Choice, budget: float) -> float:
    return budget + sum(cands[c][o].host_delta for c, o in choice.items())


def _covers(freed: Sequence[int], need: Sequence[int]) -> bool:
    return all(f >= n for f, n in zip(freed, need, strict=True))


def _greedy(
    cands: Sequence[Sequence[Option[P]]],
    need: Sequence[int],
    host_budget: float,
    *,
    take_host: bool,
) -> Choice | None:
    """Repeatedly take the option (or upgrade, e.g. sleep -> stop) with the lowest cost per
    still-needed byte. Fast, usually good, and a bound for the exact search."""
    choice: Choice = {}
    width = len(need)
    while True:
        freed = _freed(cands, choice, width)
        remaining = [n - f for n, f in zip(need, freed, strict=True)]
        if all(r <= 0 for r in remaining):
            return choice
        host = _host_left(cands, choice, host_budget)
        best: tuple[float, int, int, int] | None = None
        for c, options in enumerate(cands):
            current = options[choice[c]] if c in choice else None
            for o, option in enumerate(options):
                if current is not None and sum(option.frees) <= sum(current.frees):
                    continue
                extra_cost = option.cost - (current.cost if current else 0.0)
                extra_host = option.host_delta - (current.host_delta if current else 0)
                if host + extra_host < 0 or (option.host_delta < 0 and not take_host):
                    continue
                useful = sum(
                    min(max(option.frees[g] - (current.frees[g] if current else 0), 0), max(r, 0))
                    for g, r in enumerate(remaining)
                )
                if useful <= 0:
                    continue
                score = (max(extra_cost, 0.0) / useful, -useful, c, o)
                if best is None or score < best:
                    best = score
        if best is None:
            return None
        choice[best[2]] = best[3]


def _minimal(
    cands: Sequence[Sequence[Option[P]]], choice: Choice, need: Sequence[int], host_budget: float
) -> Choice:
    """Drop or downgrade chosen options while the need stays covered (costliest first)."""
    choice = dict(choice)
    width = len(need)

    def feasible(trial: Choice) -> bool:
        return _covers(_freed(cands, trial, width), need) and (
            _host_left(cands, trial, host_budget) >= 0
        )

    changed = True
    while changed:
        changed = False
        for c in sorted(choice, key=lambda c: (-cands[c][choice[c]].cost, c)):
            trial = {k: v for k, v in choice.items() if k != c}
            if feasible(trial):
                choice, changed = trial, True
                break
            current = cands[c][choice[c]]
            for o, option in enumerate(cands[c]):
                milder = (option.cost, option.severity) < (current.cost, current.severity)
                if o != choice[c] and milder and feasible({**choice, c: o}):
                    choice, changed = {**choice, c: o}, True
                    break
            if changed:
                break
    return choice


def _exact(
    cands: Sequence[Sequence[Option[P]]],
    need: Sequence[int],
    host_budget: float,
    seed: Choice | None,
    node_budget: int,
) -> Choice | None:
    """Branch and bound over every combination; `seed` (the greedy answer) bounds the cost.

    Exact for host RAM as long as a candidate's options either all return host RAM or all
    take it (true of engines: a sleeper can only be stopped, an awake engine only slept or
    stopped), because returners are visited first.
    """
    width = len(need)
    count = len(cands)
    # reach[c][g]: the most that candidates c.. could still free on GPU g (feasibility bound).
    reach = [[0] * width for _ in range(count + 1)]
    # cheapest[c][g]: the least cost per byte freed on GPU g among candidates c.. . Freeing
    # R more bytes there costs at least R times that: a lower bound that prunes early.
    cheapest = [[math.inf] * width for _ in range(count + 1)]
    for c in reversed(range(count)):
        for g in range(width):
            reach[c][g] = reach[c + 1][g] + max(o.frees[g] for o in cands[c])
            rates = [o.cost / o.frees[g] for o in cands[c] if o.frees[g] > 0]
            cheapest[c][g] = min([cheapest[c + 1][g], *rates])
    best = seed
    best_rank = (math.inf, 0, 0, 0) if seed is None else _rank(cands, seed, need, width)
    nodes = 0

    def visit(c: int, freed: list[int], cost: float, host: float, choice: Choice) -> None:
        nonlocal best, best_rank, nodes
        nodes += 1
        if nodes > node_budget or cost > best_rank[0]:
            return
        if _covers(freed, need):
            # Adding more can only cost more (costs are >= 0) or rank worse, so stop here.
            rank = _rank(cands, choice, need, width)
            if best is None or rank < best_rank:
                best, best_rank = dict(choice), rank
            return
        if c == count or any(freed[g] + reach[c][g] < need[g] for g in range(width)):
            return
        bound = max((need[g] - freed[g]) * cheapest[c][g] for g in range(width))
        if cost + bound > best_rank[0] * (1 + 1e-12):
            return
        for o, option in enumerate(cands[c]):
            if host + option.host_delta < 0:
                continue
            choice[c] = o
            visit(
                c + 1,
                [f + d for f, d in zip(freed, option.frees, strict=True)],
                cost + option.cost,
                host + option.host_delta,
                choice,
            )
            del choice[c]
        visit(c + 1, freed, cost, host, choice)

    visit(0, [0] * width, 0.0, host_budget, {})
    return best


def _rank(
    cands: Sequence[Sequence[Option[P]]], choice: Choice, need: Sequence[int], width: int
) -> tuple[float, int, int, int]:
    return _selection(cands, choice, need, width).rank()


def _selection(
    cands: Sequence[Sequence[Option[P]]], choice: Choice, need: Sequence[int], width: int
) -> Selection[P]:
    chosen = tuple(cands[c][o] for c, o in sorted(choice.items()))
    freed = _freed(cands, choice, width)
    overshoot = sum(max(f - max(n, 0), 0) for f, n in zip(freed, need, strict=True))
    return Selection(chosen, sum(o.cost for o in chosen), overshoot)
