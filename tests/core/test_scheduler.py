"""The scheduler's lifecycle rules, in-process with fake engines (tests/fakes.py).

Each test here reproduces one of issue 11's defects, found by a race hunt at realistic
timings, and fails on the code before the scheduler:
- a model's state always matches its engine's reality;
- a background task never dies silently;
- a refusal is never an engine failure.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from modelyard.config import parse_config
from modelyard.observability.events import EventBus
from modelyard.placement.coordinator import PlacementCoordinator
from modelyard.placement.footprints import FootprintStore
from modelyard.placement.inventory import DeclaredInventory
from modelyard.scheduler.scheduler import Scheduler
from modelyard.scheduler.supervisor import ModelState, ModelUnavailable
from tests.fakes import FakeClock, FakeRuntime, FakeSleep, settle

GIB = 1024**3


def make(
    models: dict[str, Any],
    tmp_path: Path | None = None,
    clock: Any = None,
    **settings: Any,
) -> tuple[Scheduler, FakeRuntime, FakeSleep, EventBus]:
    config = parse_config({"models": models, **settings})
    runtime, sleeper, events = FakeRuntime(), FakeSleep(), EventBus()
    placement = None
    if config.gpus is not None:
        assert tmp_path is not None
        placement = PlacementCoordinator(
            config,
            DeclaredInventory.from_config(config.gpus),
            FootprintStore(tmp_path),
            events,
            measures_processes=False,
            clock=clock or time.monotonic,
        )
    scheduler = Scheduler(
        config,
        runtime,
        events,
        clock=clock or time.monotonic,
        placement=placement,
        sleep_control=sleeper,
    )
    return scheduler, runtime, sleeper, events


def model(**settings: Any) -> dict[str, Any]:
    if settings.get("sleep"):  # sleep mode is vLLM's
        return {"engine": "vllm", "model": "/models/m", "executable": ["vllm"], **settings}
    return {"engine": "command", "command": ["x", "{port}"], **settings}


def kinds(events: EventBus, name: str | None = None) -> list[str]:
    return [e.kind for e in events.recent() if name is None or e.model == name]


async def serve_once(scheduler: Scheduler, name: str) -> None:
    async with scheduler.engine_for(name):
        pass


# ----- defect 1: an engine that dies while a sleep drains its requests -----


async def test_engine_dying_while_a_sleep_drains_leaves_the_model_failed_not_ready() -> None:
    scheduler, runtime, _sleeper, events = make({"m": model(sleep=1)})
    held = asyncio.Event()
    release = asyncio.Event()

    async def stream() -> None:
        async with scheduler.engine_for("m"):
            held.set()
            await release.wait()

    request = asyncio.ensure_future(stream())
    await held.wait()
    sleeping = asyncio.ensure_future(scheduler.sleep("m", 1, "admin sleep"))
    await settle()
    assert scheduler.state_of("m") is ModelState.DRAINING
    runtime.engines[0].crash(-9)  # the engine dies while its stream drains
    await settle()
    release.set()
    await request
    assert await sleeping is False
    # Once: READY with no engine, then 500 AssertionError for every request, for good.
    assert scheduler.state_of("m") is ModelState.FAILED
    assert "crash" in kinds(events, "m")
    await serve_once(scheduler, "m")  # the next request simply starts a new engine
    assert len(runtime.engines) == 2
    assert scheduler.state_of("m") is ModelState.READY


# ----- defect 2: one failed idle sleep ended the idle reaper -----


async def test_a_failed_idle_sleep_falls_back_to_a_stop_and_the_reaper_goes_on() -> None:
    clock = FakeClock()
    scheduler, runtime, sleeper, events = make(
        {"s": model(sleep=1, idle_timeout="10s"), "t": model(idle_timeout="100s")}, clock=clock
    )
    # vLLM built without sleep mode answers /sleep with 404.
    sleeper.fail_with = RuntimeError("POST /sleep answered 404")
    await serve_once(scheduler, "s")
    await serve_once(scheduler, "t")
    scheduler.start_background()
    clock.now += 11
    for _ in range(40):
        if scheduler.state_of("s") is ModelState.STOPPED:
            break
        await asyncio.sleep(0.05)
    assert scheduler.state_of("s") is ModelState.STOPPED  # stopped instead of slept
    assert "sleep_failed" in kinds(events, "s")
    clock.now += 100
    for _ in range(40):  # the reaper is still alive: the other model's timer still works
        if scheduler.state_of("t") is ModelState.STOPPED:
            break
        await asyncio.sleep(0.05)
    assert scheduler.state_of("t") is ModelState.STOPPED
    await scheduler.shutdown(grace=1.0)
    assert all(e.stopped or e.exited.done() for e in runtime.engines)


async def test_shutdown_completes_and_stops_engines_even_if_the_reaper_died() -> None:
    scheduler, runtime, _sleeper, _events = make({"a": model(), "b": model()})
    await serve_once(scheduler, "a")
    await serve_once(scheduler, "b")

    async def broken() -> None:
        raise RuntimeError("a bug in the idle check")

    scheduler._reaper = asyncio.ensure_future(broken())
    await settle()
    await scheduler.shutdown(grace=1.0)  # once: raised the stored error, left engines
    assert [e.stopped for e in runtime.engines] == [True, True]


# ----- defect 4: a refusal counted as an engine crash -----


async def test_a_refusal_is_never_an_engine_failure(tmp_path: Path) -> None:
    scheduler, runtime, _sleeper, events = make(
        {
            "pin": model(memory="20GiB", pinned=True),
            "b": model(memory="10GiB"),
        },
        tmp_path,
        gpus=[{"index": 0, "memory": "24GiB"}],
    )
    await serve_once(scheduler, "pin")
    for _ in range(4):
        with pytest.raises(ModelUnavailable) as caught:
            await serve_once(scheduler, "b")
        # Always the refusal, never "crash-looping, 2 failures in a row".
        assert caught.value.status == 503
        assert caught.value.code == "insufficient_gpu_memory"
        assert caught.value.retry_after
        assert caught.value.retry_after >= 1
    assert scheduler.state_of("b") is ModelState.STOPPED
    assert scheduler.failure_of("b") is None
    assert len(runtime.engines) == 1  # b was never launched
    assert "start_failed" not in kinds(events)
    assert "start" not in kinds(events, "b")
    assert kinds(events, "b").count("placement_refused") == 4


# ----- defect 5: a wake whose placement gives up -----


async def test_a_wake_that_cannot_get_room_leaves_the_model_asleep(tmp_path: Path) -> None:
    scheduler, runtime, sleeper, events = make(
        {
            "s": model(memory="14GiB", sleep=1, start_timeout="1s"),
            "busy": model(memory="12GiB"),
        },
        tmp_path,
        gpus=[{"index": 0, "memory": "24GiB"}],
    )
    assert scheduler._placement is not None
    await serve_once(scheduler, "s")
    assert await scheduler.sleep("s", 1, "test")
    release = asyncio.Event()
    held = asyncio.Event()

    async def stream() -> None:
        async with scheduler.engine_for("busy"):
            held.set()
            await release.wait()

    streaming = asyncio.ensure_future(stream())
    await held.wait()
    waking = asyncio.ensure_future(serve_once(scheduler, "s"))
    await asyncio.sleep(0.3)
    # While it waits for room it is still asleep, counted at its asleep size: no more is
    # planned than the GPU has (once: 28 GiB planned on a 24 GiB GPU).
    assert scheduler.state_of("s") is ModelState.SLEEPING
    planned = scheduler._placement.gpu_status()[0]["planned_bytes"]
    assert planned <= 24 * GIB
    with pytest.raises(ModelUnavailable) as caught:
        await waking
    assert caught.value.status == 503
    assert caught.value.retry_after
    # Asleep still: the next request pays a wake, not a cold start.
    assert scheduler.state_of("s") is ModelState.SLEEPING
    assert not runtime.engines[0].stopped
    assert scheduler.failure_of("s") is None
    assert "wake_failed" not in kinds(events, "s")
    release.set()
    await streaming
    await serve_once(scheduler, "s")
    assert ("wake", runtime.engines[0].base_url) in sleeper.calls
    assert len(runtime.of("s")) == 1


# ----- waits end on events -----


async def test_a_start_waiting_for_a_drain_begins_on_the_request_end_event(
    tmp_path: Path,
) -> None:
    scheduler, runtime, _sleeper, _events = make(
        {"a": model(memory="20GiB"), "b": model(memory="10GiB")},
        tmp_path,
        gpus=[{"index": 0, "memory": "24GiB"}],
    )
    release = asyncio.Event()
    held = asyncio.Event()

    async def stream() -> None:
        async with scheduler.engine_for("a"):
            held.set()
            await release.wait()

    streaming = asyncio.ensure_future(stream())
    await held.wait()
    wanted = asyncio.ensure_future(serve_once(scheduler, "b"))
    await asyncio.sleep(0.5)  # far longer than the old 32 polls of 0.1 s... minus some
    assert not wanted.done()
    assert len(runtime.engines) == 1
    release.set()
    await streaming
    await settle()  # no poll interval: the request's end is the event
    assert len(runtime.engines) == 2
    await wanted
    assert scheduler.state_of("a") is ModelState.STOPPED


async def test_an_engine_that_crashes_while_starting_frees_the_waiters_at_once(
    tmp_path: Path,
) -> None:
    scheduler, runtime, _sleeper, _events = make(
        {"a": model(memory="10GiB"), "b": model(memory="10GiB")},
        tmp_path,
        gpus=[{"index": 0, "memory": "24GiB"}],
    )
    runtime.auto_ready = False
    first = asyncio.ensure_future(serve_once(scheduler, "a"))
    second = asyncio.ensure_future(serve_once(scheduler, "b"))
    await settle()
    assert len(runtime.engines) == 1  # b waits: one start per GPU
    runtime.engines[0].crash(1)
    with pytest.raises(ModelUnavailable):
        await first
    await settle()
    assert len(runtime.engines) == 2  # b started on the crash event
    runtime.engines[1].ready.set()
    await second


async def test_shutdown_ends_waits_for_room_at_once(tmp_path: Path) -> None:
    scheduler, _runtime, _sleeper, _events = make(
        {"a": model(memory="20GiB"), "b": model(memory="10GiB")},
        tmp_path,
        gpus=[{"index": 0, "memory": "24GiB"}],
    )
    release = asyncio.Event()

    async def stream() -> None:
        async with scheduler.engine_for("a"):
            await release.wait()

    streaming = asyncio.ensure_future(stream())
    await settle()
    wanted = asyncio.ensure_future(serve_once(scheduler, "b"))
    await settle()
    scheduler.begin_shutdown()
    with pytest.raises(ModelUnavailable) as caught:
        await asyncio.wait_for(wanted, 1.0)
    assert caught.value.status == 503
    assert caught.value.retry_after
    release.set()
    await streaming
    await scheduler.shutdown(grace=1.0)


async def test_a_start_whose_requests_all_left_while_waiting_for_room_is_dropped(
    tmp_path: Path,
) -> None:
    scheduler, runtime, _sleeper, events = make(
        {"a": model(memory="20GiB"), "b": model(memory="10GiB")},
        tmp_path,
        gpus=[{"index": 0, "memory": "24GiB"}],
    )
    release = asyncio.Event()

    async def stream() -> None:
        async with scheduler.engine_for("a"):
            await release.wait()

    streaming = asyncio.ensure_future(stream())
    await settle()
    wanted = asyncio.ensure_future(serve_once(scheduler, "b"))
    await settle()
    wanted.cancel()  # the client went away while b waited for a's drain
    await settle()
    release.set()
    await streaming
    await settle()
    # Nothing was evicted and no engine started for nobody.
    assert len(runtime.engines) == 1
    assert scheduler.state_of("a") is ModelState.READY
    assert scheduler.state_of("b") is ModelState.STOPPED
    assert "evict" not in kinds(events)


async def test_a_wake_left_waiting_by_its_requests_is_never_evicted_under_it(
    tmp_path: Path,
) -> None:
    # Evicting a model whose wake still waits for room would wait on that wake, while the
    # wake waits for the decision the evictor holds: a deadlock. It counts as busy instead.
    scheduler, runtime, _sleeper, _events = make(
        {
            "s": model(memory="15GiB", sleep=1),  # its wake needs b's room
            "b": model(memory="10GiB"),
            "c": model(memory="13GiB"),  # fits once s's residual (1.5 GiB) is gone
        },
        tmp_path,
        gpus=[{"index": 0, "memory": "24GiB"}],
    )
    await serve_once(scheduler, "s")
    assert await scheduler.sleep("s", 1, "test")
    release = asyncio.Event()

    async def stream() -> None:
        async with scheduler.engine_for("b"):
            await release.wait()

    streaming = asyncio.ensure_future(stream())
    await settle()
    waking = asyncio.ensure_future(serve_once(scheduler, "s"))
    await settle()
    waking.cancel()  # its only request leaves while the wake waits for b's drain
    await settle()
    wanted = asyncio.ensure_future(serve_once(scheduler, "c"))
    await settle()
    release.set()
    await streaming
    await asyncio.wait_for(wanted, 5.0)  # served: no deadlock
    assert scheduler.state_of("c") is ModelState.READY
    assert len(runtime.of("c")) == 1


async def test_evictions_that_keep_failing_end_in_a_refusal_not_a_spin(tmp_path: Path) -> None:
    scheduler, runtime, _sleeper, _events = make(
        {"a": model(memory="20GiB"), "b": model(memory="10GiB")},
        tmp_path,
        gpus=[{"index": 0, "memory": "24GiB"}],
    )
    await serve_once(scheduler, "a")

    async def stop_fails(grace: float) -> int | None:
        raise RuntimeError("the process cannot be signalled")

    runtime.engines[0].stop = stop_fails  # type: ignore[method-assign]
    with pytest.raises(ModelUnavailable) as caught:
        await asyncio.wait_for(serve_once(scheduler, "b"), 5.0)
    assert caught.value.status == 503
    assert caught.value.code == "eviction_failed"
    assert caught.value.retry_after
    assert len(runtime.engines) == 1  # b never started on memory that was not freed


async def test_a_sleeping_engine_counts_at_its_awake_size_until_it_has_slept(
    tmp_path: Path,
) -> None:
    # vLLM frees the weights only when /sleep answers: until then no plan may use them.
    scheduler, _runtime, sleeper, _events = make(
        {"s": model(memory="14GiB", sleep=1)},
        tmp_path,
        gpus=[{"index": 0, "memory": "24GiB"}],
    )
    assert scheduler._placement is not None
    await serve_once(scheduler, "s")
    sleeper.gate.clear()  # the engine takes its time to answer /sleep
    sleeping = asyncio.ensure_future(scheduler.sleep("s", 1, "test"))
    await settle()
    assert scheduler.state_of("s") is ModelState.DRAINING
    assert scheduler._placement.gpu_status()[0]["planned_bytes"] == 14 * GIB
    sleeper.gate.set()
    assert await sleeping
    assert scheduler.state_of("s") is ModelState.SLEEPING
    assert scheduler._placement.gpu_status()[0]["planned_bytes"] < 2 * GIB
