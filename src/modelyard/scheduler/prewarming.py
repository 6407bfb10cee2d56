"""The gateway's side of learned pre-warming: what it has learned, what it has made, and when
it asks.

The scheduler carries each pre-warm out, and its core decides it (scheduler/prewarm.py); this
keeps the rest, so that the scheduler only calls in: the predictor (it learns from every
request, on the wall clock: its hour-of-week patterns need one) and its habits file in the
state dir, the record of pre-warms made and kept (used or wasted later, with their events),
the engines the idle timer keeps up for it, which models have it on, and what it expects of
each model now (for the status page: why a model was, or was not, pre-warmed).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from modelyard.config.schema import GatewayConfig
from modelyard.observability.events import EventBus
from modelyard.placement.policy import Target
from modelyard.scheduler.core import IdleEngine, PreWarmAsk
from modelyard.scheduler.decide import Snapshot
from modelyard.scheduler.predictor import Chance, Predictor
from modelyard.scheduler.prewarm import (
    CHECK_EVERY_S,
    Candidate,
    ModelNow,
    PreWarm,
    ask_inputs,
)
from modelyard.scheduler.prewarm_habits import HABITS_NAME, HabitsFile
from modelyard.scheduler.prewarm_stats import PreWarmStats


class PreWarming:
    def __init__(
        self,
        state_dir: Path,
        events: EventBus,
        clock: Callable[[], float],
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.predictor = Predictor()
        self.stats = PreWarmStats()
        self._events = events
        self._clock = clock  # the scheduler's: the stats' times and the check's beat
        self.wall = wall  # the predictor's
        self._habits = HabitsFile(state_dir / HABITS_NAME)
        self._habits.read_into(self.predictor)
        self._config: GatewayConfig | None = None
        self._any = False
        self._checked = 0.0  # the timer's last check (clock)
        self._kept: set[str] = set()  # engine keys the idle timer keeps up for pre-warming

    @staticmethod
    def on(config: GatewayConfig, name: str) -> bool:
        model = config.models[name]
        return (model.prewarm or config.defaults.prewarm) == "auto"

    def anywhere(self, config: GatewayConfig) -> bool:
        """Whether any model may be pre-warmed (on every request's path: cached per config)."""
        if self._config is not config:
            self._config = config
            self._any = any(self.on(config, name) for name in config.models)
        return self._any

    def observe(self, model: str, key: str) -> None:
        """A request for `model` from `key` came: learn from it; a pre-warm of it was used."""
        self.predictor.observe(self.wall(), key, model)
        spared = self.stats.asked_for(model, self._clock())
        if spared is not None:
            self._events.emit("prewarm_used", model, "asked for after its pre-warm", spared)

    def ask(
        self,
        models: Iterable[ModelNow],
        target_of: Callable[[str], Target],
        snapshot: Callable[[], Snapshot],
    ) -> PreWarmAsk | None:
        """The core's question, with the predictor's chances for the models not ready (None:
        the predictor expects none of them)."""
        now = self.wall()
        inputs = ask_inputs(models)
        chances = self.predictor.chances(now, inputs.horizons)
        if not chances:
            return None
        return PreWarmAsk(
            snapshot(),
            tuple(Candidate(target_of(c.model), c, inputs.waits[c.model]) for c in chances),
            in_use=frozenset(self.predictor.in_use(now)),
            expected={c.model: c.probability for c in self.predictor.chances(now, inputs.loaded)},
            switch_rate=self.predictor.switch_rate(now),
        )

    def made(self, prewarm: PreWarm, ask: PreWarmAsk) -> None:
        self._events.emit("prewarm", prewarm.target, prewarm.reason)
        spared = next(c.wait_s for c in ask.candidates if c.target.name == prewarm.target)
        self.stats.made_for(prewarm.target, self._clock(), spared)

    def gone(self, model: str, why: str) -> None:
        """`model`'s engine went (evicted, idle, cancelled): a pre-warm of it not yet used was
        wasted."""
        if self.stats.gone(model):
            self._events.emit("prewarm_wasted", model, f"{why} before any request came")

    def expected_while_idle(
        self, config: GatewayConfig, engines: Iterable[IdleEngine]
    ) -> tuple[Chance, ...]:
        """For models with pre-warming on whose engine is idle past its timeout: the chance
        each is asked for within that timeout (the core keeps it up if a pre-warm would
        start it again)."""
        if not self.anywhere(config):
            return ()
        past = {
            e.model: e.idle_timeout for e in engines if e.past_timeout and self.on(config, e.model)
        }
        return tuple(self.predictor.chances(self.wall(), past)) if past else ()

    def note_kept(
        self, kept: Mapping[str, str], engine: Callable[[str], tuple[str, float] | None]
    ) -> None:
        """An event (and a record: used or wasted later) for each engine the idle timer began
        to keep up (`kept`: its reason by engine key; `engine`: a key's model and start
        time), once per idle spell, not at every check."""
        for key in kept.keys() - self._kept:
            found = engine(key)
            if found is None:
                continue
            model, start_s = found
            self._events.emit("prewarm_kept", model, kept[key])
            self.stats.kept_for(model, self._clock(), start_s)
        self._kept = set(kept)

    def outlook(self, model: ModelNow) -> Chance | None:
        """What the predictor expects of `model` now, within the horizon a pre-warm of it
        would be asked for (None: it is not a candidate, or nothing points to it)."""
        inputs = ask_inputs([model])
        if not inputs.horizons:
            return None
        chances = self.predictor.chances(self.wall(), inputs.horizons)
        return chances[0] if chances else None

    async def tick(self, config: GatewayConfig) -> bool:
        """On the idle timer's beat: write the habits now and then; whether it is time to
        ask again (a habit grows due with time alone: nothing else would ask)."""
        if not self.anywhere(config):
            return False
        await self._habits.save_every(self.predictor, self._clock())
        if self._clock() - self._checked < CHECK_EVERY_S:
            return False
        self._checked = self._clock()
        return True

    async def save(self) -> None:
        await self._habits.save(self.predictor)
