"""Which model will be asked for next, learned by counting the gateway's own request history.

Pure: no I/O and no clock of its own; the driver feeds `observe(now, key, model)` for every
request and asks `chances(now, horizons)` for the models that are not ready. What it counted
is saved in the state dir (`prewarm_habits.py`) and read at start-up, so it survives
restarts.

Two counts, each decayed with a half-life so old habits fade:

- transitions, per key (an API key or session): after each request for X, what did the same
  key ask for next (X again: the burst went on; or Y), and how long after (the gap, counted
  in buckets of 5-30 s up to `window_s`)? From the key's own counts once it has seen X
  `min_seen` times, else from all keys' (a new key borrows the others' habits). The chance
  that Y comes within a horizon `h` (about a start time) when X was asked for `e` seconds ago
  and nothing came since is the share of X's requests followed by Y `e` to `e + h` seconds
  after, among those after which nothing had come by `e`: calibrated to the start time (not
  "some time within the window"), so a model is pre-warmed just before it is usually asked
  for, not as soon as X is. One unseen request is added to the count (Laplace), so thin
  evidence gives a lower chance, never a certainty.
- the same transitions counted per turn: a key's turn of X begins with its first request for
  X and lasts while its requests for X keep coming; how long after the turn began did the key
  first ask for Y? An agent asks X a few times, seconds apart, then Y: after each single
  request for X the next one is most likely X again, so the first count sees Y coming only
  once the burst has gone quiet, too late for a 30-60 s start; the turn sees it coming from
  the turn's first request. The same share is taken (turns whose Y came `e` to `e + h`
  seconds after the turn began, among those with no other model by `e`), and the higher of
  the two chances is the transition's.
- the hour of the week (day of the week and time of day): how often Y was asked for in this
  hour, per week the history covers; in the first week, the hour of the day, per day. Requests
  arriving as a Poisson stream at that rate give `1 - exp(-rate * horizon)`.

The two are combined as independent reasons for Y to come: `1 - (1 - a)(1 - b)`. Each chance
carries its reason in words ("after coder, 0.72 within 60 s"), so a pre-warm can be explained.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

WEEK_S = 7 * 24 * 3600.0
DAY_S = 24 * 3600.0
HOUR_S = 3600.0

_K = TypeVar("_K")

# The gap buckets' upper edges (s) below the window; the window closes the last one. 5 s
# apart for the first minute, 10 s to five minutes, then 30 s: a pre-warm is timed to within
# a bucket, and a 30-60 s start needs its next request placed closer than that.
GAP_EDGES_S = (
    *(5.0 * n for n in range(1, 12)),
    *(10.0 * n for n in range(6, 30)),
    *(30.0 * n for n in range(10, 21)),
)


@dataclass(frozen=True)
class Chance:
    """The probability that `model` is asked for within `horizon_s`, and why."""

    model: str
    probability: float
    horizon_s: float
    reason: str


@dataclass
class _Decayed:
    """A count that halves every `half_life_s` (stored at its last update time)."""

    value: float = 0.0
    at: float = 0.0

    def read(self, now: float, half_life_s: float) -> float:
        return self.value * math.pow(0.5, max(now - self.at, 0.0) / half_life_s)

    def add(self, now: float, half_life_s: float, amount: float = 1.0) -> None:
        self.value = self.read(now, half_life_s) + amount
        self.at = now


@dataclass
class _Pending:
    """A key's turn of `model`, still within the window for its successor: its latest
    request came at `at`, its first at `began`."""

    model: str
    at: float
    began: float


@dataclass
class Predictor:
    """Counting and decay over (time, key, model) observations; see the module docstring."""

    window_s: float = 300.0  # "after X, Y within this long" counts as a transition
    half_life_s: float = 7 * 24 * 3600.0  # habits fade over about a week
    min_seen: float = 3.0  # fewer observations of X than this: no transition chance yet
    recent_s: float = 60.0  # a key's model asked for this recently is in use now
    switch_half_life_s: float = 600.0  # how fast `switch_rate` follows the traffic
    _switches: _Decayed = field(default_factory=_Decayed)
    # Keyed by (key, X) and (key, X, Y); the key "" holds every key's counts together.
    _seen: dict[tuple[str, str], _Decayed] = field(default_factory=dict)
    _followed: dict[tuple[str, str, str], _Decayed] = field(default_factory=dict)
    # Per request: (key, X) the requests for X whose successor is known; (key, X, Y, bucket)
    # those followed by Y (X itself: the burst went on) after a gap in that bucket, Y "" any.
    _asked: dict[tuple[str, str], _Decayed] = field(default_factory=dict)
    _gaps: dict[tuple[str, str, str, int], _Decayed] = field(default_factory=dict)
    # Per turn: (key, X, Y, bucket) the turns of X whose key asked Y first after a gap from the
    # turn's beginning in that bucket, Y "" any. Turns are counted in `_seen`.
    _turn_gaps: dict[tuple[str, str, str, int], _Decayed] = field(default_factory=dict)
    _last: dict[str, _Pending] = field(default_factory=dict)  # per key
    _hourly: dict[tuple[str, int], _Decayed] = field(default_factory=dict)  # hour of week
    _daily: dict[tuple[str, int], _Decayed] = field(default_factory=dict)  # hour of day
    _first: float | None = None
    _edges: list[float] | None = None

    def observe(self, now: float, key: str, model: str) -> None:
        """A request for `model` from `key` arrived at `now`."""
        if self._first is None:
            self._first = now
        pending = self._last.get(key)
        if pending is not None:
            # The key's previous request is answered: what came next, and how long after.
            gap = now - pending.at
            for who in {key, ""}:
                self._count(self._asked, (who, pending.model), now)
                if gap <= self.window_s:
                    bucket = self._bucket(gap)
                    self._count(self._gaps, (who, pending.model, model, bucket), now)
                    self._count(self._gaps, (who, pending.model, "", bucket), now)
        if pending is not None and pending.model == model and now - pending.at <= self.window_s:
            pending.at = now  # a burst for the same model: its successor's window moves on
            return
        if pending is not None:
            # X's turn is over: it was seen once, and followed by `model` if that came in time.
            # (Counted only now, so an X still waiting for its successor does not count.)
            turn = now - pending.began
            for who in {key, ""}:
                self._count(self._seen, (who, pending.model), now)
                if now - pending.at <= self.window_s:
                    self._count(self._followed, (who, pending.model, model), now)
                if turn <= self.window_s and model != pending.model:
                    bucket = self._bucket(turn)
                    self._count(self._turn_gaps, (who, pending.model, model, bucket), now)
                    self._count(self._turn_gaps, (who, pending.model, "", bucket), now)
        self._last[key] = _Pending(model, now, now)
        self._switches.add(now, self.switch_half_life_s)
        self._count(self._hourly, (model, hour_of_week(now)), now)
        self._count(self._daily, (model, hour_of_week(now) % 24), now)

    def to_dict(self) -> dict[str, Any]:
        """The counts as plain JSON data (the gateway keeps them in its state dir, so what
        was learned survives a restart)."""

        def rows(table: dict[Any, _Decayed]) -> list[list[Any]]:
            return [[*key, count.value, count.at] for key, count in table.items()]

        return {
            "version": 3,
            "first": self._first,
            "seen": rows(self._seen),
            "followed": rows(self._followed),
            "asked": rows(self._asked),
            "gaps": rows(self._gaps),
            "turn_gaps": rows(self._turn_gaps),
            "hourly": rows(self._hourly),
            "daily": rows(self._daily),
            "last": [[key, p.model, p.at, p.began] for key, p in self._last.items()],
            "switches": [self._switches.value, self._switches.at],
        }

    def load(self, raw: dict[str, Any]) -> None:
        """Take the counts `to_dict` wrote (this predictor's own settings stay)."""
        if raw.get("version") != 3:
            raise ValueError(f"unknown pre-warm habits version {raw.get('version')!r}")
        self._first = raw["first"]
        self._seen = {(r[0], r[1]): _Decayed(r[2], r[3]) for r in raw["seen"]}
        self._followed = {(r[0], r[1], r[2]): _Decayed(r[3], r[4]) for r in raw["followed"]}
        self._asked = {(r[0], r[1]): _Decayed(r[2], r[3]) for r in raw["asked"]}
        self._gaps = {(r[0], r[1], r[2], int(r[3])): _Decayed(r[4], r[5]) for r in raw["gaps"]}
        self._turn_gaps = {
            (r[0], r[1], r[2], int(r[3])): _Decayed(r[4], r[5]) for r in raw["turn_gaps"]
        }
        self._hourly = {(r[0], int(r[1])): _Decayed(r[2], r[3]) for r in raw["hourly"]}
        self._daily = {(r[0], int(r[1])): _Decayed(r[2], r[3]) for r in raw["daily"]}
        self._last = {r[0]: _Pending(r[1], r[2], r[3]) for r in raw["last"]}
        self._switches = _Decayed(*raw["switches"])

    def _count(self, table: dict[_K, _Decayed], key: _K, now: float) -> None:
        table.setdefault(key, _Decayed()).add(now, self.half_life_s)

    def transition(self, now: float, after: str, then: str, key: str = "") -> float:
        """P(`then` within the window | a request for `after` by `key`), from the counts at
        `now`: the key's own once it has seen `after` `min_seen` times, else every key's."""
        whose = self._whose(now, after, key)
        if whose is None:
            return 0.0
        who, turns = whose
        followed = self._followed.get((who, after, then))
        if followed is None:
            return 0.0
        return min(followed.read(now, self.half_life_s) / turns, 1.0)

    def _whose(self, now: float, after: str, key: str) -> tuple[str, float] | None:
        """Whose counts speak for `key` after `after`: its own once it has seen `after`'s turn
        `min_seen` times, else every key's (""); with how many turns of `after` they saw.
        None: too few yet."""
        for who in (key, ""):
            seen = self._seen.get((who, after))
            if seen is not None:
                turns = seen.read(now, self.half_life_s)
                if turns >= self.min_seen:
                    return who, turns
        return None

    def edges(self) -> list[float]:
        """The gap buckets' upper edges: `GAP_EDGES_S` below the window, then the window."""
        if self._edges is None:
            self._edges = [edge for edge in GAP_EDGES_S if edge < self.window_s]
            self._edges.append(self.window_s)
        return self._edges

    def _bucket(self, gap: float) -> int:
        return min(bisect.bisect_right(self.edges(), gap), len(self.edges()) - 1)

    def _mass(
        self,
        table: dict[tuple[str, str, str, int], _Decayed],
        now: float,
        who: str,
        after: str,
        then: str,
        low: float,
        high: float,
    ) -> float:
        """The decayed count in `table` (`_gaps`: X's requests, `_turn_gaps`: X's turns)
        followed by `then` ("" any) after a gap in [low, high), spreading each bucket's count
        evenly over the bucket."""
        edges = self.edges()
        total = 0.0
        for index in range(self._bucket(low), len(edges)):
            lower = edges[index - 1] if index else 0.0
            if lower >= high:
                break
            overlap = min(high, edges[index]) - max(low, lower)
            count = table.get((who, after, then, index))
            if overlap > 0.0 and count is not None:
                total += count.read(now, self.half_life_s) * overlap / (edges[index] - lower)
        return total

    def _share(
        self,
        table: dict[tuple[str, str, str, int], _Decayed],
        count: float,
        now: float,
        who: str,
        after: str,
        then: str,
        elapsed: float,
        horizon: float,
    ) -> float:
        """Of `count` requests (or turns) of `after` in `table`, the share followed by `then`
        `elapsed` to `elapsed + horizon` after, among those followed by nothing by `elapsed`."""
        ended = self._mass(table, now, who, after, "", 0.0, elapsed)
        hits = self._mass(table, now, who, after, then, elapsed, elapsed + horizon)
        # One more than counted (Laplace): thin evidence is never a certainty.
        return min(hits / (max(count - ended, 0.0) + 1.0), 1.0)

    def arrival(
        self, now: float, after: str, then: str, key: str, elapsed: float, horizon: float
    ) -> float:
        """P(`then` is asked for by `key` within `horizon` from now | its last request, for
        `after`, was `elapsed` ago and nothing came since): see the module docstring."""
        whose = self._whose(now, after, key)
        if whose is None:
            return 0.0
        who, _ = whose
        asked = self._asked[(who, after)].read(now, self.half_life_s)
        return self._share(self._gaps, asked, now, who, after, then, elapsed, horizon)

    def turn_arrival(
        self, now: float, after: str, then: str, key: str, began: float, horizon: float
    ) -> float:
        """P(`then` is asked for by `key` within `horizon` from now | its turn of `after` began
        `began` ago and it asked for no other model since): see the module docstring."""
        whose = self._whose(now, after, key)
        if whose is None:
            return 0.0
        who, turns = whose
        return self._share(self._turn_gaps, turns, now, who, after, then, began, horizon)

    def switch_rate(self, now: float) -> float:
        """First requests for a model (not the rest of a burst) per second, all keys, lately:
        how often a real request may come for a model that is not ready."""
        # A decayed count of events at rate r tends to r * half_life / ln 2.
        return (
            self._switches.read(now, self.switch_half_life_s)
            * math.log(2)
            / (self.switch_half_life_s)
        )

    def in_use(self, now: float, within: float | None = None) -> set[str]:
        """The models some key asked for within `recent_s` (or `within`): likely asked for
        again soon."""
        recent = self.recent_s if within is None else within
        return {p.model for p in self._last.values() if now - p.at <= recent}

    def hourly_rate(self, now: float, model: str) -> tuple[float, str]:
        """Requests (first of a burst) per second for `model` at this time, and which pattern
        says so: the hour of the week once a week of history is there, else the hour of the
        day once a day is. The decayed count over the decayed number of times this hour came
        round (1, 2, ... periods ago, each decayed as its count)."""
        if self._first is None:
            return 0.0, ""
        covered = now - self._first
        if covered >= WEEK_S:
            period, table, bucket, what = WEEK_S, self._hourly, hour_of_week(now), "week"
        elif covered >= DAY_S:
            period, table, bucket, what = DAY_S, self._daily, hour_of_week(now) % 24, "day"
        else:
            return 0.0, ""
        count = table.get((model, bucket))
        if count is None:
            return 0.0, ""
        rounds = sum(
            math.pow(0.5, k * period / self.half_life_s)
            for k in range(1, int(covered // period) + 1)
        )
        return count.read(now, self.half_life_s) / rounds / HOUR_S, what

    def chances(self, now: float, horizons: dict[str, float]) -> list[Chance]:
        """For each model in `horizons` (not ready; the value: its start or wake time), the
        chance it is asked for within that time, best first; models with none are left out."""
        out: list[Chance] = []
        for model, horizon in horizons.items():
            best, reason = 0.0, ""
            for key, pending in self._last.items():
                # The successor comes within the window after X; past it, X says nothing.
                if now - pending.at > self.window_s or pending.model == model:
                    continue
                p = self.arrival(now, pending.model, model, key, now - pending.at, horizon)
                if now - pending.began <= self.window_s:
                    p = max(
                        p,
                        self.turn_arrival(
                            now, pending.model, model, key, now - pending.began, horizon
                        ),
                    )
                if p > best:
                    best = p
                    reason = f"after {pending.model}, {p:.2f} within {horizon:.0f} s"
            rate, what = self.hourly_rate(now, model)
            daily = 1.0 - math.exp(-rate * horizon)
            if daily > 0.0 and best < 1.0:
                combined = 1.0 - (1.0 - best) * (1.0 - daily)
                if daily > best:
                    reason = f"this hour of the {what}, {daily:.2f} within {horizon:.0f} s"
                best = combined
            if best > 0.0:
                out.append(Chance(model, best, horizon, reason))
        out.sort(key=lambda chance: -chance.probability)
        return out


def hour_of_week(now: float) -> int:
    """0-167 from a Unix time (UTC; Unix day 0 was a Thursday, so Monday 00:00 is hour 0)."""
    return int(((now + 3 * 24 * 3600.0) % WEEK_S) // HOUR_S)
