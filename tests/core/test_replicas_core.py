"""Replicas in the scheduler's pure core, in virtual time at a real GPU's sizes.

The core's `ScaleCheck` is what the driver feeds every quarter second (scheduler.py's timer);
here the clock is a number, so "sustained for a second" and "idle for ten minutes" take no
time. The engines are policy records, as the driver builds them from its supervisors.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from modelyard.placement.policy import Engine, EngineState, GpuCapacity, Target
from modelyard.scheduler.core import (
    IdleCheck,
    IdleEngine,
    PutToSleep,
    RefuseNow,
    ScaleCheck,
    ScaleUp,
    SchedulerCore,
    StartNow,
    StopIdle,
    WaitUntil,
    Wanted,
)
from modelyard.scheduler.decide import Ask, Snapshot
from modelyard.scheduler.scaling import SCALE_UP_AFTER_S, ModelLoad, replica_key, spread

GIB = 1024**3
TWO_GPUS = (GpuCapacity(0, 24 * GIB), GpuCapacity(1, 24 * GIB))


def coder_on(gpu: int, in_flight: int, key: str = "coder") -> Engine:
    return Engine(key, EngineState.READY, (gpu,), 10 * GIB, in_flight=in_flight, last_used=0.0)


def load(
    outstanding: int,
    running: int = 1,
    *,
    starting: int = 0,
    max_replicas: int = 2,
    gpus: tuple[int, ...] = (),
) -> ModelLoad:
    return ModelLoad(
        model="coder",
        outstanding=outstanding,
        running=running,
        starting=starting,
        target_in_flight=4,
        max_replicas=max_replicas,
        free_slot="coder#2",
        target=Target("coder#2", 10 * GIB, gpus),
        siblings=("coder",),
    )


def check(
    core: SchedulerCore, now: float, model: ModelLoad, *engines: Engine, gpus=TWO_GPUS
) -> list[ScaleUp]:
    snapshot = Snapshot(now, gpus, engines or (coder_on(0, model.outstanding),))
    commands = core.step(ScaleCheck(snapshot, (model,)))
    assert all(isinstance(c, ScaleUp) for c in commands)
    return [c for c in commands if isinstance(c, ScaleUp)]


def test_a_replica_is_added_after_a_second_of_overload_not_on_a_blip() -> None:
    core = SchedulerCore()
    # A blip: 9 requests for one engine aiming at 4, gone a half second later.
    assert check(core, 100.0, load(9)) == []
    assert check(core, 100.5, load(3)) == []
    # Overload again: the second counts from here, not from the blip.
    assert check(core, 101.0, load(9)) == []
    assert check(core, 101.75, load(9)) == []
    (up,) = check(core, 101.0 + SCALE_UP_AFTER_S, load(12))
    assert up.key == "coder#2"
    assert "12 requests" in up.reason
    # One at a time: while that one starts, no other is added, however long the overload.
    assert check(core, 105.0, load(20, running=2, starting=1, max_replicas=3)) == []


def test_at_or_under_the_target_nothing_is_added() -> None:
    core = SchedulerCore()
    for tick in range(12):
        assert check(core, tick * 0.25, load(4)) == []  # 4 for one engine aiming at 4


def test_max_is_respected() -> None:
    core = SchedulerCore()
    for tick in range(12):
        assert check(core, tick * 0.25, load(40, running=2, max_replicas=2)) == []


def test_a_replica_never_pushes_a_gpu_over_its_memory() -> None:
    core = SchedulerCore()
    # GPU 0 holds coder (10 GiB); GPU 1 holds a 20 GiB model with traffic: 4 GiB free there,
    # and coder's own GPU is not where a second copy goes.
    busy = Engine("chat", EngineState.READY, (1,), 20 * GIB, in_flight=3, last_used=0.0)
    for tick in range(8):
        assert check(core, tick * 0.25, load(12), coder_on(0, 12), busy) == []
    assert "no room for another engine" in core.scale_blocked["coder"]


def test_a_replica_never_evicts_a_model_with_traffic_but_takes_an_idle_ones_room() -> None:
    busy = Engine("chat", EngineState.READY, (1,), 20 * GIB, in_flight=1, last_used=0.0)
    core = SchedulerCore()
    for tick in range(8):
        assert check(core, tick * 0.25, load(12), coder_on(0, 12), busy) == []
    # The same model idle for an hour: its room may be had, at the cost model's price.
    idle = replace(busy, in_flight=0, last_used=-3600.0)
    core = SchedulerCore()
    ups = [
        u for tick in range(8) for u in check(core, tick * 0.25, load(12), coder_on(0, 12), idle)
    ]
    assert [u.key for u in ups] == ["coder#2"]


def test_a_replica_goes_to_the_other_gpu_and_its_own_start_is_planned_there() -> None:
    # GPU 0 has room for a second copy too, but it would share coder's compute.
    core = SchedulerCore()
    ups = [u for tick in range(8) for u in check(core, tick * 0.25, load(12))]
    assert [u.key for u in ups] == ["coder#2"]
    # The replica's own start (the driver's `_prepare`) asks with the spread target.
    engines = (coder_on(0, 12),)
    target = spread(Target("coder#2", 10 * GIB), ["coder"], engines, [0, 1])
    assert target is not None
    assert target.gpus == (1,)
    (start,) = core.step(Wanted(Ask(target, 10.0), Snapshot(2.0, TWO_GPUS, engines), no_wait=True))
    assert isinstance(start, StartNow)
    assert start.gpus == (1,)


def test_replicas_go_to_other_nodes() -> None:
    gpus = (GpuCapacity(0, 24 * GIB, node="node-a"), GpuCapacity(1, 24 * GIB, node="node-b"))
    core = SchedulerCore()
    ups = [u for tick in range(8) for u in check(core, tick * 0.25, load(12), gpus=gpus)]
    assert [u.key for u in ups] == ["coder#2"]


def test_a_model_limited_to_one_gpu_gets_no_second_engine_there() -> None:
    core = SchedulerCore()
    for tick in range(8):
        assert check(core, tick * 0.25, load(12, gpus=(0,))) == []
    assert core.scale_blocked["coder"] == "every GPU it may use holds one of its engines"


def test_a_replica_that_would_have_to_wait_for_a_busy_engine_is_refused_not_queued() -> None:
    busy = Engine("chat", EngineState.READY, (1,), 20 * GIB, in_flight=2, last_used=0.0)
    engines = (coder_on(0, 12), busy)
    ask = Ask(Target("coder#2", 10 * GIB, (1,)), 100.0)
    waited = SchedulerCore().step(Wanted(ask, Snapshot(1.0, TWO_GPUS, engines)))
    assert isinstance(waited[-1], WaitUntil)  # a request's start waits for chat to drain
    (refused,) = SchedulerCore().step(Wanted(ask, Snapshot(1.0, TWO_GPUS, engines), no_wait=True))
    assert isinstance(refused, RefuseNow)
    assert refused.code == "no_room_for_replica"


def idle(
    key: str, idle_s: float | None, *, running: bool = True, min_replicas: int = 0
) -> IdleEngine:
    return IdleEngine(
        key,
        idle_s,
        600.0,
        pinned=False,
        sleep_level=1 if key == "coder" else 0,
        model="coder",
        running=running,
        min_replicas=min_replicas,
    )


def test_scale_down_stops_an_idle_replica_never_a_busy_one() -> None:
    core = SchedulerCore()
    # coder#2 idle past the timeout, coder busy (a stream): the replica stops, coder serves on.
    verdicts = core.step(IdleCheck((idle("coder", None), idle("coder#2", 700.0))))
    assert verdicts == [StopIdle("coder#2", "scale down: idle for 700s", scale_down=True)]
    # Both busy, or not idle long enough: nothing stops.
    assert core.step(IdleCheck((idle("coder", None), idle("coder#2", None)))) == []
    assert core.step(IdleCheck((idle("coder", 30.0), idle("coder#2", 599.0)))) == []


def test_both_idle_scale_to_zero_replica_first_and_the_models_own_engine_sleeps() -> None:
    verdicts = SchedulerCore().step(IdleCheck((idle("coder", 900.0), idle("coder#2", 700.0))))
    assert verdicts == [
        StopIdle("coder#2", "scale down: idle for 700s", scale_down=True),
        PutToSleep("coder", 1, "idle for 900s"),  # the last one, as without replicas
    ]


@pytest.mark.parametrize("keep", [1, 2])
def test_min_replicas_stay_running(keep: int) -> None:
    engines = (
        idle("coder", 900.0, min_replicas=keep),
        idle("coder#2", 900.0, min_replicas=keep),
        idle("coder#3", 900.0, min_replicas=keep),
    )
    verdicts = SchedulerCore().step(IdleCheck(engines))
    stopped = [v.key for v in verdicts]
    assert len(stopped) == 3 - keep
    assert "coder" not in stopped  # replicas go first


def test_replica_keys() -> None:
    assert replica_key("coder", 1) == "coder"
    assert replica_key("coder", 3) == "coder#3"


def test_the_models_own_engine_stops_only_as_the_last() -> None:
    # coder idle past its timeout, coder#2 busy: coder keeps running (its state is the
    # model's), and stops once it is the last one.
    busy_replica = (idle("coder", 900.0), idle("coder#2", None))
    assert SchedulerCore().step(IdleCheck(busy_replica)) == []
    alone = (idle("coder", 900.0), idle("coder#2", None, running=False))
    assert SchedulerCore().step(IdleCheck(alone)) == [PutToSleep("coder", 1, "idle for 900s")]
