"""The scheduler's pure core in virtual time, at a real GPU's timings (issue 22).

Starts of 30-60 s, stops of 2-15 s, wakes of 1-3 s, streams of minutes, on 1, 2 and 4 GPUs
and on GPUs spread over several (Ray) nodes, through `VirtualGateway`, which steps the real
`SchedulerCore` and carries its commands out as the gateway's driver does. The properties:

- a decision for GPU j never waits on work for GPU i;
- no engine changes state outside the table (`modelyard.lifecycle.ALLOWED`);
- the planned memory never exceeds a GPU (asserted by the virtual gateway after every event);
- every request is answered, or refused with Retry-After before its deadline.
"""

from __future__ import annotations

import random

import pytest

from modelyard.placement.policy import Engine, EngineState, GpuCapacity, Target
from modelyard.scheduler.core import (
    CarryOut,
    Dropped,
    EvictionsDone,
    RefuseNow,
    SchedulerCore,
    StartNow,
    WaitUntil,
    Wanted,
)
from modelyard.scheduler.decide import Ask, Snapshot
from tests.core.virtual_gateway import GIB, Model, VirtualGateway


def test_a_10_s_stop_on_gpu_0_does_not_hold_a_start_on_gpu_1() -> None:
    # The case: `c` was answered after 11.1 s instead of 2 s.
    models = {
        "a": Model(bytes=20 * GIB, gpus=(0,), stop_s=10),
        "b": Model(bytes=20 * GIB, gpus=(0,), start_s=45),
        "c": Model(bytes=10 * GIB, gpus=(1,), start_s=2),
    }
    world = VirtualGateway(models, [24 * GIB, 24 * GIB])
    world.set_ready("a")
    b = world.request(10, "b")
    c = world.request(11, "c")
    outcomes = world.run()
    assert outcomes[c].waited == 2  # its own start, nothing else
    assert outcomes[b].waited == 10 + 45  # a's memory back, then its start
    # While a stopped, the room was b's: nothing else was planned into it.
    assert world.peak_bytes == [20 * GIB, 10 * GIB]


def test_a_slow_sleep_on_gpu_0_does_not_hold_a_wake_on_gpu_1() -> None:
    sleepy = dict(sleep_level=1, asleep_bytes=GIB, wake_s=2, start_s=50)
    models = {
        "a": Model(bytes=20 * GIB, gpus=(0,), sleep_s=6, **sleepy),
        "b": Model(bytes=20 * GIB, gpus=(0,), start_s=45),
        "c": Model(bytes=10 * GIB, gpus=(1,), **sleepy),
    }
    world = VirtualGateway(models, [24 * GIB, 24 * GIB], host_ram_for_sleep=100 * GIB)
    world.set_ready("a")
    world.set_ready("c", gpu=1)
    world.live["c"].state = EngineState.SLEEPING
    world.live["c"].sleeping_level = 1
    b = world.request(10, "b")
    c = world.request(11, "c")
    outcomes = world.run()
    assert outcomes[c].waited == 2  # its wake
    assert outcomes[b].waited == 6 + 45
    assert (10, "a", "sleep1") in world.log


def test_a_second_start_on_the_gpu_being_emptied_waits_for_the_room_not_into_it() -> None:
    # b's eviction of a is under way; d (GPU 0 too) must not be planned into that room.
    models = {
        "a": Model(bytes=20 * GIB, gpus=(0,), stop_s=8),
        "b": Model(bytes=20 * GIB, gpus=(0,), start_s=40),
        "d": Model(bytes=4 * GIB, gpus=(0,), start_s=30),
    }
    world = VirtualGateway(models, [24 * GIB])
    world.set_ready("a")
    b = world.request(0, "b", duration=60)
    d = world.request(1, "d")
    outcomes = world.run()
    assert outcomes[b].waited == 8 + 40
    # d fits beside b (24 GiB), but one start per GPU: after b's start.
    assert outcomes[d].served_at == 8 + 40 + 30
    assert world.peak_bytes == [24 * GIB]


def test_the_core_alone_sets_room_aside_until_its_target_starts() -> None:
    core = SchedulerCore()
    gpus = (GpuCapacity(0, 24 * GIB), GpuCapacity(1, 24 * GIB))
    a = Engine("a", EngineState.READY, (0,), 20 * GIB, last_used=0.0)
    world = Snapshot(now=5.0, gpus=gpus, engines=(a,))
    (evict,) = core.step(Wanted(Ask(Target("b", 20 * GIB, gpus=(0,)), 305.0), world))
    assert isinstance(evict, CarryOut)
    assert [action.name for action in evict.actions] == ["a"]
    # While a stops (still READY in the owner's record, for a moment), nobody else plans on
    # it or its room; a start on GPU 1 goes at once.
    (d,) = core.step(Wanted(Ask(Target("d", 4 * GIB, gpus=(0,)), 305.0), world))
    assert isinstance(d, WaitUntil)
    assert "b" in d.waiting_for
    (c,) = core.step(Wanted(Ask(Target("c", 10 * GIB, gpus=(1,)), 305.0), world))
    assert isinstance(c, StartNow)
    assert c.gpus == (1,)
    # b asks again before its evictions end: it waits for them, and only them.
    (again,) = core.step(Wanted(Ask(Target("b", 20 * GIB, gpus=(0,)), 305.0), world))
    assert isinstance(again, WaitUntil)
    assert again.waiting_for == ("a",)
    # A stale completion (an older round) changes nothing.
    assert core.step(EvictionsDone("b", evict.number - 1, ok=True)) == []
    assert core.reservations()[0].evictions_done is False
    core.step(EvictionsDone("b", evict.number, ok=True))
    gone = Snapshot(now=15.0, gpus=gpus, engines=())
    (go,) = core.step(Wanted(Ask(Target("b", 20 * GIB, gpus=(0,)), 305.0), gone))
    assert isinstance(go, StartNow)
    assert go.gpus == (0,)
    assert core.reservations() == ()


def test_room_set_aside_past_the_deadline_is_refused_with_retry_after_and_freed() -> None:
    core = SchedulerCore()
    gpus = (GpuCapacity(0, 24 * GIB),)
    a = Engine("a", EngineState.READY, (0,), 20 * GIB, last_used=0.0)
    ask = Ask(Target("b", 20 * GIB), 60.0)
    core.step(Wanted(ask, Snapshot(now=5.0, gpus=gpus, engines=(a,))))
    (late,) = core.step(Wanted(ask, Snapshot(now=60.0, gpus=gpus, engines=(a,))))
    assert isinstance(late, RefuseNow)
    assert late.status == 503
    assert late.retry_after > 0
    assert core.reservations() == ()
    core.step(Dropped("b"))  # the driver's `finally`: harmless twice


def test_evictions_that_never_make_room_end_in_a_refusal() -> None:
    core = SchedulerCore()
    gpus = (GpuCapacity(0, 24 * GIB),)
    a = Engine("a", EngineState.READY, (0,), 20 * GIB, last_used=0.0)
    ask = Ask(Target("b", 20 * GIB), 300.0)
    world = Snapshot(now=5.0, gpus=gpus, engines=(a,))
    answers = []
    for _ in range(4):
        (command,) = core.step(Wanted(ask, world, max_eviction_rounds=3))
        answers.append(type(command).__name__)
        if isinstance(command, CarryOut):
            core.step(EvictionsDone("b", command.number, ok=False))  # a's stop keeps failing
    assert answers == ["CarryOut", "CarryOut", "CarryOut", "RefuseNow"]


# ----- properties, on random traces at realistic timings -----


def _random_world(seed: int, gpu_count: int, nodes: list[str] | None) -> VirtualGateway:
    rng = random.Random(seed)
    models: dict[str, Model] = {}
    for i in range(3 * gpu_count):
        sleeps = rng.random() < 0.4
        models[f"m{i}"] = Model(
            bytes=rng.choice([6, 8, 10, 12, 16]) * GIB,
            start_s=rng.uniform(30, 60),
            stop_s=rng.uniform(2, 15),
            sleep_s=rng.uniform(1, 5),
            wake_s=rng.uniform(1, 3),
            sleep_level=1 if sleeps else 0,
            asleep_bytes=GIB if sleeps else 0,
            gpus=(i % gpu_count,),
            start_timeout=300.0,
        )
    world = VirtualGateway(models, [24 * GIB] * gpu_count, host_ram_for_sleep=64 * GIB, nodes=nodes)
    at = 0.0
    for _ in range(40 * gpu_count):
        at += rng.expovariate(1 / 8)
        # Streams of seconds to minutes.
        world.request(at, rng.choice(list(models)), duration=rng.choice([2, 10, 30, 120, 300]))
    return world


ALLOWED_IN_VIRTUAL_GATEWAY = {
    ("stopped", "starting"),
    ("starting", "ready"),
    ("starting", "stopped"),  # crashed while starting
    ("ready", "stopping"),
    ("ready", "draining"),
    ("draining", "sleeping"),
    ("draining", "stopping"),
    ("sleeping", "waking"),
    ("sleeping", "stopping"),
    ("waking", "ready"),
    ("stopping", "stopped"),
}


@pytest.mark.parametrize(
    ("gpu_count", "nodes"),
    [(1, None), (2, None), (4, None), (4, ["node-a", "node-a", "node-b", "node-c"])],
    ids=["1 GPU", "2 GPUs", "4 GPUs", "4 GPUs on 3 Ray nodes"],
)
@pytest.mark.parametrize("seed", range(6))
def test_properties_on_random_traces(seed: int, gpu_count: int, nodes: list[str] | None) -> None:
    from modelyard.lifecycle import ALLOWED, ModelState

    world = _random_world(seed, gpu_count, nodes)
    outcomes = world.run(until=100_000)  # memory: asserted after every event

    # Every request answered; a refusal is a 503 with Retry-After, before its deadline.
    for outcome in outcomes:
        limit = world.models[outcome.model].start_timeout
        if outcome.served_at is None:
            assert outcome.refused_at is not None, outcome
            assert outcome.status == 503, outcome
            assert outcome.retry_after, outcome
            assert outcome.refused_at <= outcome.arrived + limit, outcome
        else:
            # Once its start began it waits for it (at most a start past the deadline).
            assert outcome.waited <= limit + world.models[outcome.model].start_s, outcome

    # No transition outside the table (the gateway's, `modelyard.lifecycle.ALLOWED`).
    for _, name, before, after in world.transitions:
        assert (before, after) in ALLOWED_IN_VIRTUAL_GATEWAY, (name, before, after)
        assert ModelState(after) in ALLOWED[ModelState(before)], (name, before, after)

    # A decision for GPU j never waits on work for GPU i.
    for decided in world.decisions:
        if not isinstance(decided.command, WaitUntil):
            continue
        mine = set(world.models[decided.model].gpus)
        for other in decided.command.waiting_for:
            theirs = set(world.models[other].gpus)
            assert mine & theirs, (decided, other)

    assert sum(o.served_at is not None for o in outcomes) > len(outcomes) // 2


# ----- queue bounds and idle verdicts: pure steps too -----


def test_queue_bounds_refuse_with_retry_after_per_model_then_in_all() -> None:
    from modelyard.scheduler.core import Arrived

    core = SchedulerCore()
    assert core.step(Arrived("m", 3, 4, 10, 100, 42.0)) == []
    (full,) = core.step(Arrived("m", 4, 4, 10, 100, 42.0))
    assert isinstance(full, RefuseNow)
    assert (full.status, full.code, full.retry_after) == (503, "queue_full", 42.0)
    assert "model 'm'" in full.message
    (busy,) = core.step(Arrived("m", 0, 4, 100, 100, 7.0))
    assert isinstance(busy, RefuseNow)
    assert "gateway is busy" in busy.message


def test_idle_verdicts_sleep_what_can_sleep_stop_the_rest_and_spare_pinned_and_busy() -> None:
    from modelyard.scheduler.core import IdleCheck, IdleEngine, PutToSleep, StopIdle

    core = SchedulerCore()
    verdicts = core.step(
        IdleCheck(
            (
                IdleEngine("sleepy", 700.0, 600.0, pinned=False, sleep_level=1),
                IdleEngine("plain", 700.0, 600.0, pinned=False, sleep_level=0),
                IdleEngine("pinned", 700.0, 600.0, pinned=True, sleep_level=0),
                IdleEngine("busy", None, 600.0, pinned=False, sleep_level=0),
                IdleEngine("recent", 30.0, 600.0, pinned=False, sleep_level=0),
                IdleEngine("never", 9e9, 0.0, pinned=False, sleep_level=0),
            )
        )
    )
    assert verdicts == [
        PutToSleep("sleepy", 1, "idle for 700s"),
        StopIdle("plain", "idle for 700s"),
    ]
