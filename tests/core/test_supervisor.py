"""The model state machine and single-flight starts, in-process, with no real sleeps.

Engines here are in-memory fakes implementing the supervisor's `EngineHandle` interface;
readiness, exits and time are driven by the test.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from modelyard.config import parse_config
from modelyard.engines.base import LaunchSpec, MemoryBudget
from modelyard.observability.events import EventBus
from modelyard.scheduler.scheduler import Scheduler
from modelyard.scheduler.supervisor import (
    ModelState,
    ModelSupervisor,
    ModelUnavailable,
    Refused,
    SupervisorSettings,
)
from tests.fakes import FakeClock, FakeRuntime, settle


def make_yard(
    models: dict[str, Any] | None = None, **settings: Any
) -> tuple[Scheduler, FakeRuntime, FakeClock, EventBus]:
    models = models or {"m": {"engine": "command", "command": ["x", "{port}"], "idle_timeout": 60}}
    config = parse_config({"models": models, **settings})
    runtime, clock, events = FakeRuntime(), FakeClock(), EventBus()
    return Scheduler(config, runtime, events, clock=clock), runtime, clock, events


async def test_single_flight_start_for_concurrent_requests():
    yard, runtime, _clock, events = make_yard()
    runtime.auto_ready = False
    supervisor = yard._supervisors["m"]

    async def request() -> str:
        async with yard.engine_for("m") as engine:
            return engine.base_url

    tasks = [asyncio.create_task(request()) for _ in range(50)]
    await settle()
    assert len(runtime.engines) == 1
    assert supervisor.state is ModelState.STARTING
    assert supervisor.waiting == 50
    runtime.engines[0].ready.set()
    results = await asyncio.gather(*tasks)
    assert set(results) == {"http://fake-0"}
    assert supervisor.state is ModelState.READY
    assert [e.kind for e in events.recent()] == ["start", "ready"]
    assert supervisor.waiting == 0
    assert supervisor.in_flight == 0


async def test_failed_start_reaches_every_waiter_then_next_request_retries():
    yard, runtime, _clock, events = make_yard()
    runtime.auto_ready = False

    async def request() -> None:
        async with yard.engine_for("m"):
            pass

    tasks = [asyncio.create_task(request()) for _ in range(3)]
    await settle()
    runtime.engines[0].crash(3)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, ModelUnavailable) and r.status == 502 for r in results)
    assert yard._supervisors["m"].state is ModelState.FAILED
    assert events.recent()[-1].kind == "start_failed"
    # One failure is no crash loop: the next request starts again at once.
    runtime.auto_ready = True
    async with yard.engine_for("m") as engine:
        assert engine is runtime.engines[1]


async def test_crash_loop_backs_off_exponentially():
    yard, runtime, clock, _events = make_yard()
    supervisor = yard._supervisors["m"]
    # One crash restarts at once; from the second in a row, waits of 1, 2, 4 s follow.
    for expected_backoff in (None, 1.0, 2.0, 4.0):
        async with yard.engine_for("m"):
            pass
        runtime.engines[-1].crash(1)
        await settle()
        assert supervisor.state is ModelState.FAILED
        if expected_backoff is not None:
            with pytest.raises(ModelUnavailable) as refused:
                async with yard.engine_for("m"):
                    pass
            assert refused.value.status == 503
            assert refused.value.retry_after == pytest.approx(expected_backoff)
            starts_before = len(runtime.engines)
            clock.now += expected_backoff
            assert len(runtime.engines) == starts_before
    assert supervisor.timings.crashes == 4


async def test_idle_stop_never_while_in_flight():
    yard, runtime, clock, events = make_yard()
    supervisor = yard._supervisors["m"]
    async with yard.engine_for("m"):
        clock.now += 3600  # long past the idle timeout, but a request is in flight
        assert await yard.reap_idle(clock.now) == []
        assert supervisor.state is ModelState.READY
    clock.now += 59
    assert await yard.reap_idle(clock.now) == []
    clock.now += 2
    assert await yard.reap_idle(clock.now) == ["m"]
    assert supervisor.state is ModelState.STOPPED
    assert runtime.engines[0].stopped
    assert events.recent()[-1].kind == "stop"
    assert events.recent()[-1].reason.startswith("idle for")


async def test_idle_stop_abandoned_when_request_arrives_first():
    yard, _runtime, clock, _events = make_yard()
    supervisor = yard._supervisors["m"]
    async with yard.engine_for("m"):
        pass
    clock.now += 120
    # A request takes the engine between the idle check and the stop operation.
    stop = asyncio.ensure_future(supervisor.stop("idle", if_idle=True))
    async with yard.engine_for("m"):
        assert await stop is False
        assert supervisor.state is ModelState.READY


async def test_request_during_stop_waits_then_restarts():
    yard, runtime, _clock, _events = make_yard()
    supervisor = yard._supervisors["m"]
    async with yard.engine_for("m"):
        pass
    runtime.engines[0].stop_gate.clear()
    stopping = asyncio.ensure_future(supervisor.stop("admin"))
    await settle()
    assert supervisor.state is ModelState.STOPPING

    async def request() -> str:
        async with yard.engine_for("m") as engine:
            return engine.base_url

    pending = asyncio.create_task(request())
    await settle()
    assert supervisor.waiting == 1  # it waits for the stop instead of using a dying engine
    runtime.engines[0].stop_gate.set()
    assert await pending == "http://fake-1"
    await stopping
    assert len(runtime.engines) == 2


async def test_stop_drains_requests_in_flight_first():
    yard, runtime, _clock, _events = make_yard()
    supervisor = yard._supervisors["m"]
    async with yard.engine_for("m"):
        stopping = asyncio.ensure_future(supervisor.stop("admin"))
        await settle()
        assert supervisor.state is ModelState.DRAINING
        assert not runtime.engines[0].stopped
    await stopping
    assert runtime.engines[0].stopped


async def test_unexpected_exit_marks_failed_with_exit_code():
    yard, runtime, _clock, events = make_yard()
    async with yard.engine_for("m"):
        pass
    runtime.engines[0].crash(137)
    await settle()
    supervisor = yard._supervisors["m"]
    assert supervisor.state is ModelState.FAILED
    assert supervisor.failure is not None
    assert supervisor.failure.exit_code == 137
    assert events.recent()[-1].kind == "crash"


async def test_queue_bound_refuses_at_once():
    yard, runtime, _clock, _events = make_yard(
        {"m": {"engine": "command", "command": ["x", "{port}"], "max_queue": 2}}
    )
    runtime.auto_ready = False

    async def request() -> None:
        async with yard.engine_for("m"):
            pass

    waiting = [asyncio.create_task(request()) for _ in range(2)]
    await settle()
    with pytest.raises(ModelUnavailable) as refused:
        await request()
    assert refused.value.code == "queue_full"
    assert refused.value.retry_after is not None
    runtime.engines[0].ready.set()
    await asyncio.gather(*waiting)


async def test_waiter_that_goes_away_leaves_the_queue():
    yard, runtime, _clock, _events = make_yard()
    runtime.auto_ready = False

    async def request() -> None:
        async with yard.engine_for("m"):
            pass

    task = asyncio.create_task(request())
    await settle()
    assert yard.total_waiting() == 1
    task.cancel()
    await settle()
    assert yard.total_waiting() == 0
    # The start itself goes on for the next request.
    assert yard._supervisors["m"].state is ModelState.STARTING


async def test_shutdown_cancels_start_and_stops_engines():
    yard, runtime, _clock, _events = make_yard(
        {
            "a": {"engine": "command", "command": ["x", "{port}"]},
            "b": {"engine": "command", "command": ["x", "{port}"]},
        }
    )
    async with yard.engine_for("a"):
        pass
    runtime.auto_ready = False

    async def request() -> None:
        async with yard.engine_for("b"):
            pass

    pending = asyncio.create_task(request())
    await settle()
    await yard.shutdown(grace=1.0)
    with pytest.raises(ModelUnavailable) as refused:
        await pending
    assert refused.value.code == "shutting_down"
    assert all(engine.stopped for engine in runtime.engines)
    assert {s.state for s in yard._supervisors.values()} == {ModelState.STOPPED}


async def test_the_supervisor_hands_back_and_starts_within_the_budget_it_is_told():
    """A supervisor decides nothing across models: with nothing under way it hands the
    request back, and its engine is launched with the budget its caller decided."""
    runtime, events, clock = FakeRuntime(), EventBus(), FakeClock()
    budgets: list[MemoryBudget | None] = []

    def spec_for(port: int, budget: MemoryBudget | None) -> LaunchSpec:
        budgets.append(budget)
        return LaunchSpec(argv=["x", str(port)])

    settings = SupervisorSettings(idle_timeout=60, start_timeout=60, stop_grace=1)
    supervisor = ModelSupervisor("m", spec_for, runtime, settings, events, clock=clock)
    assert await supervisor.hold(deadline=clock() + 60) is None
    assert supervisor.state is ModelState.STOPPED
    assert runtime.engines == []

    decided = MemoryBudget(gpu_indexes=(1,), bytes_per_gpu=2**30, gpu_total_bytes=2**34)

    async def start() -> None:
        with supervisor.placing_start():
            assert supervisor.placing
            assert supervisor.state is ModelState.STARTING
        await supervisor.start(decided)

    supervisor.begin(start())
    engine = await supervisor.hold(deadline=clock() + 60)
    assert engine is runtime.engines[0]
    assert budgets == [decided]
    assert supervisor.budget == decided
    assert supervisor.in_flight == 1


async def test_a_refusal_while_placing_leaves_the_model_as_it_was():
    runtime, events, clock = FakeRuntime(), EventBus(), FakeClock()
    settings = SupervisorSettings(idle_timeout=60, start_timeout=60, stop_grace=1)
    supervisor = ModelSupervisor(
        "m",
        lambda port, _budget: LaunchSpec(argv=["x", str(port)]),
        runtime,
        settings,
        events,
        clock=clock,
    )

    async def refused_start() -> None:
        with supervisor.placing_start():
            raise Refused("no room", 5.0, "no_room")

    assert await supervisor.ensure_ready(deadline=clock() + 60) is None
    supervisor.begin(refused_start())
    with pytest.raises(ModelUnavailable) as refused:
        await supervisor.ensure_ready(deadline=clock() + 60)
    assert refused.value.code == "no_room"
    assert supervisor.state is ModelState.STOPPED
    assert not supervisor.placing
    assert runtime.engines == []
