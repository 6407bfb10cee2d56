"""Issue 22's defects, each reproduced in-process with fake engines (tests/fakes.py) and failing
on the code before the issue:

- start failures separated by good starts counted as "N failures in a row";
- a reload that fixes a crash-looping model's configuration kept the old back-off;
- a model removed while it waited for room answered `502 failed to start: 'r'` (a KeyError);
- a bookkeeping error after a good start (the footprint store locked by another process)
  answered 502, left the model `starting` with a live engine, and the next request started a
  second one.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from modelyard.config import parse_config
from modelyard.engines.base import LaunchSpec
from modelyard.lifecycle import ModelState
from modelyard.observability.events import EventBus
from modelyard.placement.coordinator import PlacementCoordinator
from modelyard.placement.footprints import FootprintStore
from modelyard.placement.inventory import DeclaredInventory
from modelyard.scheduler.reload_plan import plan_reload
from modelyard.scheduler.scheduler import Scheduler
from modelyard.scheduler.supervisor import ModelUnavailable
from tests.fakes import FakeClock, FakeEngine, FakeRuntime, FakeSleep, settle

GIB = 1024**3


class FailingStarts(FakeRuntime):
    """Starts whose engines die before they are ready when their number is in `failing`."""

    def __init__(self, failing: set[int]) -> None:
        super().__init__()
        self.failing = failing

    async def __call__(self, name: str, spec_for_port: Callable[[int], LaunchSpec]) -> FakeEngine:
        engine = await super().__call__(name, spec_for_port)
        if len(self.engines) in self.failing:
            engine.ready.clear()
            engine.crash(1)
        return engine


def command_model(**settings: Any) -> dict[str, Any]:
    return {"engine": "command", "command": ["x", "{port}"], **settings}


def make(
    models: dict[str, Any],
    runtime: FakeRuntime,
    clock: FakeClock,
    tmp_path: Path | None = None,
    **settings: Any,
) -> Scheduler:
    config = parse_config({"models": models, **settings})
    events = EventBus()
    placement = None
    if config.gpus is not None:
        assert tmp_path is not None
        placement = PlacementCoordinator(
            config,
            DeclaredInventory.from_config(config.gpus),
            FootprintStore(tmp_path),
            events,
            measures_processes=False,
            clock=clock,
        )
    return Scheduler(
        config, runtime, events, clock=clock, placement=placement, sleep_control=FakeSleep()
    )


async def serve(scheduler: Scheduler, name: str) -> int:
    """200, or the status a request is refused with."""
    try:
        async with scheduler.engine_for(name):
            return 200
    except ModelUnavailable as error:
        return error.status


async def test_failures_separated_by_good_starts_are_not_a_crash_loop() -> None:
    # Every other start fails. Before: the second failure made "2 failures in a row" and the
    # next request was refused with a back-off though the last start had gone well.
    clock = FakeClock()
    runtime = FailingStarts(failing={2, 4, 6})
    scheduler = make({"m": command_model()}, runtime, clock)
    statuses = []
    for _ in range(6):
        statuses.append(await serve(scheduler, "m"))
        await scheduler.unload("m", "test")
        clock.now += 0.1  # well inside any back-off
    assert statuses == [200, 502, 200, 502, 200, 502]
    await scheduler.shutdown(1.0)


async def test_failed_starts_in_a_row_still_back_off() -> None:
    clock = FakeClock()
    runtime = FailingStarts(failing={1, 2, 3})
    scheduler = make({"m": command_model()}, runtime, clock)
    assert await serve(scheduler, "m") == 502
    assert await serve(scheduler, "m") == 502
    assert await serve(scheduler, "m") == 503  # refused: crash-looping, back-off 1 s
    assert len(runtime.engines) == 2
    await scheduler.shutdown(1.0)


async def test_a_reload_that_changes_the_engine_ends_its_back_off() -> None:
    clock = FakeClock()
    runtime = FailingStarts(failing={1, 2, 3, 4})
    scheduler = make({"m": command_model()}, runtime, clock)
    for _ in range(4):
        clock.now += 60  # past every back-off: four failed starts in a row
        assert await serve(scheduler, "m") == 502
    assert await serve(scheduler, "m") == 503  # crash-looping
    old = scheduler.config
    new = parse_config({"models": {"m": command_model(command=["y", "{port}"])}})
    plan = plan_reload(old, new)
    assert list(plan.engine_changed) == ["m"]
    scheduler.apply_config(new, plan)
    await scheduler.reconfigured()
    assert await serve(scheduler, "m") == 200  # the fixed configuration starts at once
    await scheduler.shutdown(1.0)


async def test_a_model_removed_while_it_waits_for_room_is_refused_with_503(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    runtime = FakeRuntime()
    models = {
        "a": command_model(memory="20GiB"),
        "r": command_model(memory="20GiB"),
    }
    scheduler = make(models, runtime, clock, tmp_path, gpus=[{"index": 0, "memory": "24GiB"}])
    release = asyncio.Event()

    async def busy_a() -> None:
        async with scheduler.engine_for("a"):
            await release.wait()

    holder = asyncio.ensure_future(busy_a())
    await settle()
    waiting = asyncio.ensure_future(serve_error(scheduler, "r"))
    await settle()
    assert scheduler.load_counts("r") == (0, 1)
    new = parse_config(
        {"models": {"a": command_model(memory="20GiB")}, "gpus": [{"index": 0, "memory": "24GiB"}]}
    )
    scheduler.apply_config(new, plan_reload(scheduler.config, new))
    error = await asyncio.wait_for(waiting, 5)
    release.set()
    await holder
    assert error is not None
    assert error.status == 503, error
    assert error.retry_after
    assert "removed" in str(error)
    await scheduler.shutdown(1.0)


async def serve_error(scheduler: Scheduler, name: str) -> ModelUnavailable | None:
    try:
        async with scheduler.engine_for(name):
            return None
    except ModelUnavailable as error:
        return error


async def test_a_bookkeeping_error_after_a_good_start_never_loses_the_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    runtime = FakeRuntime()
    scheduler = make(
        {"m": command_model(memory="10GiB")},
        runtime,
        clock,
        tmp_path,
        gpus=[{"index": 0, "memory": "24GiB"}],
    )
    assert scheduler._placement is not None
    store = scheduler._placement.footprints

    def locked(*args: Any, **kwargs: Any) -> Any:
        # Another process holds the file's write lock past SQLite's busy timeout.
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(store, "record", locked)
    assert await serve(scheduler, "m") == 200
    assert scheduler.state_of("m") is ModelState.READY
    assert await serve(scheduler, "m") == 200
    assert len(runtime.engines) == 1  # no second engine
    await scheduler.shutdown(1.0)
    assert runtime.engines[0].stopped


async def test_footprints_are_read_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQLite may wait up to its busy timeout (seconds) on another process's lock: the read
    # must not hold the event loop meanwhile, as the writes already do not.
    clock = FakeClock()
    runtime = FakeRuntime()
    scheduler = make(
        {"m": command_model(memory="10GiB")},
        runtime,
        clock,
        tmp_path,
        gpus=[{"index": 0, "memory": "24GiB"}],
    )
    assert scheduler._placement is not None
    store = scheduler._placement.footprints
    loop_thread = threading.get_ident()
    read_on: list[int] = []
    real_get = store.get

    def get(*args: Any) -> Any:
        read_on.append(threading.get_ident())
        return real_get(*args)

    monkeypatch.setattr(store, "get", get)
    assert await serve(scheduler, "m") == 200
    scheduler.model_status("m")
    scheduler._placement.model_placement("m")  # status reads its copy, never the file
    assert read_on
    assert loop_thread not in read_on
    await scheduler.shutdown(1.0)


# ----- engines, not model names, are the unit (issue 22) -----

GPU_24 = [{"index": 0, "memory": "24GiB"}]


class Stream:
    """A request that holds its engine until `end()`, as a long stream does."""

    def __init__(self, scheduler: Scheduler, name: str) -> None:
        self._release = asyncio.Event()
        self.task = asyncio.ensure_future(self._run(scheduler, name))

    async def _run(self, scheduler: Scheduler, name: str) -> None:
        async with scheduler.engine_for(name):
            await self._release.wait()

    async def end(self) -> None:
        self._release.set()
        await self.task


def reload(scheduler: Scheduler, models: dict[str, Any]) -> None:
    new = parse_config({"models": models, "gpus": GPU_24})
    scheduler.apply_config(new, plan_reload(scheduler.config, new))


def planned(scheduler: Scheduler) -> tuple[int, list[str]]:
    assert scheduler._placement is not None
    (gpu,) = scheduler._placement.gpu_status()
    return gpu["planned_bytes"], gpu["models"]


async def test_a_removed_models_draining_engine_is_seen_by_placement(tmp_path: Path) -> None:
    # Before: q started at once beside the draining m and the idle p, 36 GiB planned on 24.
    twelve = command_model(memory="12GiB")
    clock, runtime = FakeClock(), FakeRuntime()
    scheduler = make({"m": twelve, "p": twelve, "q": twelve}, runtime, clock, tmp_path, gpus=GPU_24)
    assert await serve(scheduler, "p") == 200
    stream = Stream(scheduler, "m")
    await settle()
    reload(scheduler, {"p": twelve, "q": twelve})
    await settle()
    assert await serve(scheduler, "q") == 200
    total, _ = planned(scheduler)
    assert total <= 24 * GIB
    assert scheduler.state_of("p") is ModelState.STOPPED  # evicted for q, m being busy
    await stream.end()
    await scheduler.reconfigured()
    assert planned(scheduler) == (12 * GIB, ["q"])
    await scheduler.shutdown(1.0)


async def test_removing_and_re_adding_a_model_keeps_both_engines_apart(tmp_path: Path) -> None:
    # Before: the old engine's stop popped the new engine's placement (keyed by name), and
    # the GPU showed 0 GiB planned under a running engine.
    twelve = command_model(memory="12GiB")
    clock, runtime = FakeClock(), FakeRuntime()
    scheduler = make({"m": twelve}, runtime, clock, tmp_path, gpus=GPU_24)
    stream = Stream(scheduler, "m")
    await settle()
    reload(scheduler, {})
    reload(scheduler, {"m": twelve})
    assert await serve(scheduler, "m") == 200  # a new engine, beside the draining one
    assert len(runtime.engines) == 2
    assert planned(scheduler)[0] == 24 * GIB
    await stream.end()
    await scheduler.reconfigured()
    assert runtime.engines[0].stopped
    assert not runtime.engines[1].stopped
    assert planned(scheduler) == (12 * GIB, ["m"])
    await scheduler.shutdown(1.0)


async def test_a_reload_storm_never_loses_a_draining_engine(tmp_path: Path) -> None:
    # Remove, re-add, remove: before, the second removal overwrote the first draining engine
    # (kept by model name), which then was never stopped with its grace.
    twelve = command_model(memory="12GiB")
    clock, runtime = FakeClock(), FakeRuntime()
    scheduler = make({"m": twelve}, runtime, clock, tmp_path, gpus=GPU_24)
    first = Stream(scheduler, "m")
    await settle()
    reload(scheduler, {})
    reload(scheduler, {"m": twelve})
    second = Stream(scheduler, "m")
    await settle()
    reload(scheduler, {})
    await settle()
    assert len(runtime.engines) == 2
    assert scheduler.in_flight() == 2  # both draining engines are still known
    assert planned(scheduler)[0] == 24 * GIB
    await first.end()
    await second.end()
    await scheduler.reconfigured()
    assert all(engine.stopped for engine in runtime.engines)
    assert planned(scheduler) == (0, [])
    await scheduler.shutdown(1.0)


async def test_requests_after_a_reload_during_a_cold_start_get_the_new_engine() -> None:
    # Before: requests that came after the reload joined the old configuration's start and
    # were served by that stale engine (a 404 for the new served name).
    clock, runtime = FakeClock(), FakeRuntime()
    runtime.auto_ready = False
    scheduler = make({"m": command_model()}, runtime, clock)
    before = asyncio.ensure_future(scheduler.engine_for("m").__aenter__())
    await settle()
    assert scheduler.state_of("m") is ModelState.STARTING
    new = parse_config({"models": {"m": command_model(command=["y", "{port}"])}})
    scheduler.apply_config(new, plan_reload(scheduler.config, new))
    after = asyncio.ensure_future(scheduler.engine_for("m").__aenter__())
    await settle()
    runtime.engines[0].ready.set()  # the old configuration's engine becomes ready
    old_engine = await asyncio.wait_for(before, 5)
    assert old_engine is runtime.engines[0]  # asked before the reload: the old engine
    scheduler._supervisors["m"].let_go()
    for _ in range(100):
        await settle()
        if len(runtime.engines) == 2:
            break
    runtime.engines[1].ready.set()
    new_engine = await asyncio.wait_for(after, 5)
    assert new_engine is runtime.engines[1]
    assert runtime.engines[0].stopped
    scheduler._supervisors["m"].let_go()
    await scheduler.reconfigured()
    await scheduler.shutdown(1.0)
