"""Learned pre-warming end to end: the real gateway, slow in-process test engines.

An A-then-B habit over 20 rounds (both engines idle-stopped between rounds, so each round
starts them cold); in the 21st the gateway starts B when A is asked for, and B's request is
served warm. The pre-warm is an event with its reason, and the metrics count it as used.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from modelyard.scheduler.core import CancelPreWarm, PreWarmAsk
from modelyard.scheduler.predictor import Chance, Predictor
from modelyard.scheduler.prewarm import LOOKAHEAD_S
from modelyard.scheduler.supervisor import ModelUnavailable
from tests.harness import Behaviour, Harness, engine_model, in_process_gateway, vllm_on_gpu

START_S = 0.3  # each engine's cold start
READ_S = 0.4  # the user reads A's answer before asking B
IDLE_S = 0.8  # idle stop: every round begins cold, and a pre-warmed B lives until B is asked


async def a_round(h: Harness) -> float:
    """A, then B once A answered: B's wait (seconds)."""
    status, _, _ = await h.chat("a")
    assert status == 200
    await asyncio.sleep(READ_S)
    began = time.monotonic()
    status, _, _ = await h.chat("b")
    assert status == 200
    return time.monotonic() - began


async def both_stopped(h: Harness) -> None:
    for name in ("a", "b"):
        await h.wait_state(name, "stopped", timeout=10.0)


async def test_an_a_then_b_habit_learned_over_20_rounds_serves_the_21st_b_warm(
    tmp_path: Path,
) -> None:
    models = {"a": engine_model(), "b": engine_model()}
    slow = {name: Behaviour(ready_after=START_S) for name in models}
    defaults = {"defaults": {"prewarm": "auto", "idle_timeout": f"{IDLE_S}s"}}
    async with in_process_gateway(tmp_path, models, slow, **defaults) as h:
        # Learn over the 20 rounds first (counts decay a little meanwhile: 19.5, not 20).
        h.gateway.scheduler.prewarming.predictor.min_seen = 19.5
        waits = []
        for _ in range(20):
            waits.append(await a_round(h))
            await both_stopped(h)
        assert min(waits) >= START_S * 0.9  # B started cold every time: nothing learned yet
        warm = await a_round(h)
        assert warm < START_S / 2, f"B waited {warm:.2f} s"
        stats = h.gateway.scheduler.prewarming.stats
        assert stats.made >= 1
        assert stats.used >= 1
        events = [e for e in h.gateway.events.recent(200) if e.kind == "prewarm"]
        assert any(e.model == "b" and e.reason.startswith("after a, ") for e in events)
        exposition = h.gateway.metrics.exposition().decode()
        assert 'modelyard_prewarms_total{model="b",outcome="used"} 1.0' in exposition


async def test_a_cancelled_prewarm_start_gives_its_start_slot_back_at_once(
    tmp_path: Path,
) -> None:
    # A pre-warm's cold start of 5 s is cancelled for a real request: the engine is no longer
    # a start at once (the planner sees the GPU's start slot free) and is gone after its stop,
    # long before its start would have ended; the pre-warm ends without a retry.
    models = {"b": engine_model()}
    async with in_process_gateway(tmp_path, models, {"b": Behaviour(ready_after=5.0)}) as h:
        supervisor = h.gateway.scheduler._supervisors["b"]
        began = time.monotonic()
        load = asyncio.create_task(h.gateway.scheduler.load("b", "pre-warm: test"))
        await h.wait_state("b", "starting", timeout=5.0)
        assert supervisor.cancel_prewarm()
        await asyncio.sleep(0)
        assert supervisor.state.value in ("stopping", "stopped")
        with pytest.raises(ModelUnavailable) as refused:
            await load
        assert refused.value.code == "prewarm_cancelled"
        await h.wait_state("b", "stopped", timeout=5.0)
        assert time.monotonic() - began < 4.0


async def test_only_a_cold_start_is_cancelled_as_a_prewarm(tmp_path: Path) -> None:
    async with in_process_gateway(tmp_path, {"b": engine_model()}) as h:
        supervisor = h.gateway.scheduler._supervisors["b"]
        assert not supervisor.cancel_prewarm()  # stopped: nothing to cancel
        await h.gateway.scheduler.load("b", "pre-warm: test")
        assert not supervisor.cancel_prewarm()  # ready: a stop is an eviction's business
        assert supervisor.state.value == "ready"


async def test_a_request_that_joined_a_cancelled_prewarm_is_served_by_a_start_of_its_own(
    tmp_path: Path,
) -> None:
    # A real request for B comes while B's pre-warm start runs, and in that same moment the
    # pre-warm gives way to another model (as the core may decide just before the request
    # is counted). The pre-warm ends; the request is real, so it is served by a new start,
    # not refused.
    models = {"b": engine_model()}
    async with in_process_gateway(tmp_path, models, {"b": Behaviour(ready_after=1.0)}) as h:
        supervisor = h.gateway.scheduler._supervisors["b"]
        load = asyncio.create_task(h.gateway.scheduler.load("b", "pre-warm: test"))
        await h.wait_state("b", "starting", timeout=5.0)
        request = asyncio.create_task(h.chat("b"))
        await asyncio.sleep(0.2)  # the request now waits on the pre-warm's start
        assert supervisor.cancel_prewarm()
        with pytest.raises(ModelUnavailable):
            await load
        status, _, _ = await asyncio.wait_for(request, timeout=15.0)
        assert status == 200
        assert supervisor.state.value == "ready"


SLEEPER = {"a": vllm_on_gpu("10GiB", 0, sleep=1)}
ONE_GPU = {"gpus": [{"index": 0, "memory": "24GiB"}]}
CANCEL = CancelPreWarm("a", "b was asked for and needs its slot")


@contextlib.asynccontextmanager
async def asleep(tmp_path: Path) -> AsyncIterator[Harness]:
    """A gateway whose model `a` served a request and went to sleep (a wake takes 1 s)."""
    behaviour = {"a": Behaviour(sleep_mode=True, wake_after=1.0)}
    async with in_process_gateway(tmp_path, SLEEPER, behaviour, **ONE_GPU) as h:
        assert (await h.chat("a"))[0] == 200
        await h.gateway.scheduler.sleep("a", 1, "test")
        assert h.model_state("a") == "sleeping"
        yield h


async def test_a_cancelled_prewarm_of_a_sleeping_engine_keeps_the_sleeper(tmp_path: Path) -> None:
    # The core cancels a pre-warm while its evictions still run (its wake has not begun): the
    # sleeping engine stays asleep. Stopping it would turn its next request's wake (vLLM: 1-3
    # s) into a cold start (30-60 s on a GPU), for a pre-warm nobody asked for.
    async with asleep(tmp_path) as h:
        h.gateway.scheduler._cancel_prewarm(CANCEL)
        await asyncio.sleep(0.5)
        assert h.model_state("a") == "sleeping"
        cancelled = [e.model for e in h.gateway.events.recent(50) if e.kind == "prewarm_cancelled"]
        assert cancelled == ["a"]


async def test_a_cancelled_prewarm_wake_is_left_to_finish_and_kept(tmp_path: Path) -> None:
    # A wake is not cut (vLLM would be left half awake): it finishes, and the engine stays
    # up, for the planner to put back to sleep if the real request needs its room, as any
    # idle engine. Stopping it after its wake would lose the sleeper and cost a 2-15 s stop.
    async with asleep(tmp_path) as h:
        load = asyncio.create_task(h.gateway.scheduler.load("a", "pre-warm: test"))
        await h.wait_state("a", "waking", timeout=5.0)
        h.gateway.scheduler._cancel_prewarm(CANCEL)
        await load
        await asyncio.sleep(0.5)
        assert h.model_state("a") == "ready"


class Habitual(Predictor):
    """Stands for a learned "this hour of the day" habit: `model` is asked for within the
    test's idle timeout (0.5 s), and nothing is said for a pre-warm's horizon (30 s or more:
    nothing is pre-warmed, the idle timer alone is under test)."""

    def __init__(self, model: str) -> None:
        super().__init__()
        self.model = model

    def chances(self, now: float, horizons: dict[str, float]) -> list[Chance]:
        return [
            Chance(m, 0.9, h, f"this hour of the day, 0.90 within {h:.0f} s")
            for m, h in horizons.items()
            if m == self.model and h < LOOKAHEAD_S
        ]


async def test_the_idle_timer_keeps_an_engine_that_prewarming_would_start_again(
    tmp_path: Path,
) -> None:
    """`a` (pre-warming on) stays up past its idle timeout while its habit says it comes
    within that timeout; `b` (pre-warming off) stops as it always did. The keep is one event
    with its reason (not one per check), the metrics count it kept then used, and a's next
    request is served warm. Once the habit says nothing, `a` stops at the next check."""
    models = {"a": engine_model(), "b": {**engine_model(), "prewarm": "off"}}
    slow = {name: Behaviour(ready_after=START_S) for name in models}
    defaults = {"defaults": {"prewarm": "auto", "idle_timeout": "0.5s"}}
    async with in_process_gateway(tmp_path, models, slow, **defaults) as h:
        scheduler = h.gateway.scheduler
        scheduler.prewarming.predictor = Habitual("a")
        assert (await h.chat("a"))[0] == 200
        assert (await h.chat("b"))[0] == 200
        await h.wait_state("b", "stopped", timeout=10.0)
        await asyncio.sleep(1.0)  # four idle checks and more past a's timeout
        assert h.model_state("a") == "ready"
        kept = [e for e in h.gateway.events.recent(200) if e.kind == "prewarm_kept"]
        assert [e.model for e in kept] == ["a"]
        assert kept[0].reason.startswith("idle for ")
        assert kept[0].reason.endswith(", kept: this hour of the day, 0.90 within 0 s")
        began = time.monotonic()
        assert (await h.chat("a"))[0] == 200
        assert time.monotonic() - began < START_S / 2  # served warm
        assert (scheduler.prewarming.stats.kept, scheduler.prewarming.stats.used) == (1, 1)
        exposition = h.gateway.metrics.exposition().decode()
        assert 'modelyard_prewarms_total{model="a",outcome="kept"} 1.0' in exposition
        assert 'modelyard_prewarms_total{model="a",outcome="used"} 1.0' in exposition
        scheduler.prewarming.predictor = Predictor()  # the habit is gone: nothing keeps it
        await h.wait_state("a", "stopped", timeout=10.0)


class Certain(Predictor):
    """Every model asked about is due: 0.9 within the horizon asked."""

    def chances(self, now: float, horizons: dict[str, float]) -> list[Chance]:
        return [Chance(m, 0.9, h, "test") for m, h in horizons.items()]


async def test_the_gateway_weighs_a_sleepers_chance_before_dropping_its_sleep(
    tmp_path: Path,
) -> None:
    # The core keeps an engine as likely as the pre-warm's target, awake or asleep (a sleep
    # dropped turns a 1-3 s wake into a cold start); the gateway must tell it the sleeper's
    # chance, as it does an awake engine's (and as the simulator's driver always did).
    models = {
        "a": vllm_on_gpu("10GiB", 0, sleep=1, prewarm="auto"),
        "b": vllm_on_gpu("8GiB", 0, prewarm="auto"),
    }
    behaviour = {"a": Behaviour(sleep_mode=True, wake_after=1.0)}
    async with in_process_gateway(tmp_path, models, behaviour, **ONE_GPU) as h:
        assert (await h.chat("a"))[0] == 200
        scheduler = h.gateway.scheduler
        await scheduler.sleep("a", 1, "test")
        asks: list[PreWarmAsk] = []
        step = scheduler._core.step

        def recording(event: Any) -> Any:
            if isinstance(event, PreWarmAsk):
                asks.append(event)
            return step(event)

        scheduler._core.step = recording  # type: ignore[method-assign]
        scheduler.prewarming.predictor = Certain()
        scheduler.maybe_prewarm()
        [ask] = asks
        assert {c.target.name for c in ask.candidates} == {"a", "b"}
        assert ask.expected == {"a": 0.9}  # the sleeper, weighed as a possible victim


def taught(predictor: Predictor, start: float) -> float:
    """Six turns of `a` by alice, an hour apart, every other one followed by `b` 20 s later:
    after `a`, `b` is 3 in 6 of the five answered turns (one unseen turn counted), a little
    less once decayed. Returns the time after them."""
    now = start
    for round_ in range(6):
        predictor.observe(now, "alice", "a")
        if round_ % 2 == 0:
            predictor.observe(now + 20.0, "alice", "b")
        now += 3600.0
    return now


async def test_the_status_shows_what_prewarming_expects_of_each_model(tmp_path: Path) -> None:
    """`GET /gateway/status`, as the dashboard reads it: once alice asks for `a`, the stopped
    `b` carries the predictor's chance and its reason (0.5: shown, and not pre-warmed, being
    under 0.7); `c`, with pre-warming off, says so and nothing more; `a`, ready, is no
    candidate. Before anyone asks for `a`, nothing points to `b`."""
    models = {"a": engine_model(), "b": engine_model(), "c": {**engine_model(), "prewarm": "off"}}
    async with in_process_gateway(tmp_path, models, defaults={"prewarm": "auto"}) as h:
        prewarming = h.gateway.scheduler.prewarming
        clock = [taught(prewarming.predictor, 1_800_000_000.0)]
        prewarming.wall = lambda: clock[0]

        async def prewarm_status() -> dict[str, Any]:
            response = await h.client.get("/gateway/status")
            assert response.status == 200
            return {m["name"]: m["prewarm"] for m in (await response.json())["models"]}

        quiet = await prewarm_status()
        assert quiet["b"] == {"on": True, "chance": None, "within_s": None, "reason": None}
        assert (await h.chat("a"))[0] == 200  # anonymous: a new key borrows everyone's habits
        clock[0] += 2.0
        shown = await prewarm_status()
        assert shown["b"]["on"] is True
        assert shown["b"]["chance"] == pytest.approx(0.5, abs=0.01)
        assert shown["b"]["reason"].startswith("after a, 0.50 within ")
        assert shown["b"]["within_s"] >= LOOKAHEAD_S
        assert shown["c"] == {"on": False, "chance": None, "within_s": None, "reason": None}
        assert shown["a"]["chance"] is None  # ready: nothing to pre-warm
        assert h.model_state("b") == "stopped"
        assert not [e for e in h.gateway.events.recent(100) if e.kind == "prewarm"]
