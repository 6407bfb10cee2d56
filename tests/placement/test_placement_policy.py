"""The placement policy, case by case: one scenario per rule in the policy's docstring."""

from __future__ import annotations

from dataclasses import replace

import pytest

from modelyard.placement.policy import (
    GIB,
    CannotFit,
    Engine,
    EngineState,
    GpuCapacity,
    Plan,
    PolicySettings,
    Sleep,
    Stop,
    Target,
    WaitFor,
    WaitReason,
    action_cost,
    likelihood,
    plan_placement,
    wake_seconds,
)

NOW = 10_000.0


def engine(
    name: str,
    gib: float,
    *,
    gpus: tuple[int, ...] = (0,),
    state: EngineState = EngineState.READY,
    idle: float = 60.0,
    start: float = 30.0,
    wake: float | None = None,
    sleep: int = 0,
    sleeping_level: int = 0,
    asleep_gib: float = 0.5,
    in_flight: int = 0,
    pinned: bool = False,
    group: str | None = None,
    host_gib: float | None = None,
) -> Engine:
    return Engine(
        name=name,
        state=state,
        gpus=gpus,
        awake_bytes_per_gpu=int(gib * GIB),
        asleep_bytes_per_gpu=int(asleep_gib * GIB),
        in_flight=in_flight,
        last_used=NOW - idle,
        start_seconds=start,
        wake_seconds=wake,
        sleep_level=sleep,
        sleeping_level=sleeping_level,
        sleep_host_bytes=None if host_gib is None else int(host_gib * GIB),
        pinned=pinned,
        exclusive_group=group,
    )


def gpu(index: int = 0, total_gib: float = 24, foreign_gib: float = 0) -> GpuCapacity:
    return GpuCapacity(index, int(total_gib * GIB), int(foreign_gib * GIB))


def plan(
    target: Target,
    engines: list[Engine],
    gpus: list[GpuCapacity] | None = None,
    host_gib: float | None = None,
    settings: PolicySettings | None = None,
) -> Plan:
    result = plan_placement(
        target,
        gpus if gpus is not None else [gpu()],
        engines,
        now=NOW,
        host_ram_for_sleep=None if host_gib is None else int(host_gib * GIB),
        settings=settings or PolicySettings(),
    )
    assert isinstance(result, Plan), result
    return result


def cannot(target: Target, engines: list[Engine], gpus: list[GpuCapacity] | None = None) -> str:
    result = plan_placement(
        target, gpus if gpus is not None else [gpu()], engines, now=NOW, host_ram_for_sleep=None
    )
    assert isinstance(result, CannotFit), result
    return result.reason


def target(
    gib: float | None,
    *,
    name: str = "new",
    gpus: tuple[int, ...] = (),
    tp: int = 1,
    group: str | None = None,
) -> Target:
    return Target(
        name=name,
        bytes_per_gpu=None if gib is None else int(gib * GIB),
        gpus=gpus,
        tensor_parallel=tp,
        exclusive_group=group,
    )


# ----- fitting alongside -----


def test_fits_alongside_without_touching_anything() -> None:
    result = plan(target(8), [engine("a", 10)])
    assert result.gpus == (0,)
    assert result.actions == ()
    assert result.wait_for == ()
    assert result.bytes_per_gpu == 8 * GIB
    assert "fits alongside" in result.explanation


def test_best_fit_gpu_is_chosen_so_the_emptiest_stays_empty() -> None:
    gpus = [gpu(0), gpu(1), gpu(2)]
    engines = [engine("a", 14, gpus=(0,)), engine("b", 4, gpus=(1,))]
    # GPU 0 has 10 GiB free, GPU 1 has 20, GPU 2 has 24: 8 GiB fits tightest on GPU 0.
    assert plan(target(8), engines, gpus).gpus == (0,)


def test_allowed_gpus_are_respected() -> None:
    gpus = [gpu(0), gpu(1)]
    assert plan(target(8, gpus=(1,)), [], gpus).gpus == (1,)


def test_other_processes_memory_counts() -> None:
    # 24 GiB GPU, 6 GiB held by a foreign process, 10 by an engine: 8 free, 9 needed.
    result = plan(target(9), [engine("a", 10)], [gpu(0, 24, foreign_gib=6)])
    assert result.actions == (Stop("a"),)


def test_headroom_is_kept_free() -> None:
    settings = PolicySettings(headroom_bytes=GIB)
    result = plan(target(14), [engine("a", 10)], settings=settings)
    assert result.actions == (Stop("a"),)


# ----- evicting -----


def test_evicts_one_when_it_does_not_fit() -> None:
    result = plan(target(8), [engine("a", 10), engine("b", 10, idle=5000)])
    # 4 GiB free, 8 needed: one of them must go; "b" has been idle far longer.
    assert result.actions == (Stop("b"),)
    assert result.wait_for == ()
    assert result.cost > 0


def test_evicts_the_cheapest_victim_not_the_least_recently_used() -> None:
    engines = [
        engine("old", 8, idle=1200, start=90),  # LRU, but 90 s to bring back
        engine("mid", 8, idle=600, start=10),
        engine("recent", 6, idle=300, start=10),
    ]
    result = plan(target(8), engines)  # 2 GiB free, 6 more needed
    assert result.actions == (Stop("mid"),)
    lru_cost = action_cost(engines[0], Stop("old"), NOW)
    assert result.cost < lru_cost


def test_evicts_the_cheapest_set_two_small_over_one_big() -> None:
    engines = [
        engine("big", 12, idle=600, start=120),  # the LRU
        engine("small1", 5, idle=100, start=8),
        engine("small2", 5, idle=100, start=8),
    ]
    result = plan(target(10), engines)  # 2 GiB free, 8 more needed
    assert set(result.actions) == {Stop("small1"), Stop("small2")}


def test_does_not_evict_more_than_needed() -> None:
    engines = [engine(f"e{i}", 4, idle=100 * i) for i in range(6)]
    result = plan(target(6), engines)  # 0 free, 6 needed: two 4 GiB engines
    assert len(result.actions) == 2


def test_the_exact_search_beats_greedy_density() -> None:
    # Greedy by cost per byte takes "dense" (cheap per byte) and then needs a second victim;
    # the exact search sees that "whole" alone is cheaper.
    engines = [
        engine("whole", 10, idle=0.0, start=5),
        engine("dense", 9, idle=0.0, start=3),
        engine("tiny", 2, idle=0.0, start=4),
    ]
    gpus = [gpu(0, 21)]
    result = plan(target(10), engines, gpus)  # 0 free, 10 needed
    assert result.actions == (Stop("whole"),)


def test_greedy_beyond_the_exact_limit_still_fits_and_is_minimal() -> None:
    engines = [engine(f"e{i:02}", 1.5, idle=10 * i, start=10 + i) for i in range(16)]
    settings = PolicySettings(exact_limit=4)
    result = plan(target(5), engines, settings=settings)  # 0 free, 5 needed -> 4 victims
    assert len(result.actions) == 4
    assert all(isinstance(action, Stop) for action in result.actions)


# ----- busy, pinned, starting, stopping -----


def test_busy_victim_is_waited_for_not_evicted() -> None:
    result = plan(target(8), [engine("busy", 20, in_flight=2)])
    assert result.wait_for == (WaitFor("busy", WaitReason.BUSY),)
    assert result.actions == (Stop("busy"),)  # what happens once it has drained


def test_idle_victim_preferred_over_waiting_for_a_busy_one() -> None:
    engines = [engine("busy", 10, in_flight=1, start=5), engine("idle", 10, start=120, idle=1)]
    result = plan(target(8), engines)
    assert result.actions == (Stop("idle"),)
    assert result.wait_for == ()


def test_draining_engine_counts_as_busy() -> None:
    result = plan(target(8), [engine("d", 20, state=EngineState.DRAINING)])
    assert result.wait_for == (WaitFor("d", WaitReason.BUSY),)


def test_pinned_model_is_never_evicted() -> None:
    engines = [engine("pinned", 10, pinned=True, idle=90_000, start=1), engine("b", 10)]
    result = plan(target(8), engines)
    assert result.actions == (Stop("b"),)


def test_only_pinned_in_the_way_cannot_fit() -> None:
    reason = cannot(target(16), [engine("pinned", 10, pinned=True)])
    assert "pinned 'pinned'" in reason
    assert "needs 16.0 GiB per GPU" in reason


def test_starting_engine_counts_with_its_full_footprint() -> None:
    # 16 GiB starting leaves 8: a 10 GiB target must wait for it (it cannot be evicted).
    result = plan(target(10), [engine("s", 16, state=EngineState.STARTING)])
    assert WaitFor("s", WaitReason.STARTING) in result.wait_for


def test_one_start_per_gpu_waits_even_when_memory_fits() -> None:
    # vLLM profiling counts other processes' memory: never two starts on one GPU.
    result = plan(target(4), [engine("s", 8, state=EngineState.STARTING)])
    assert result.actions == ()
    assert result.wait_for == (WaitFor("s", WaitReason.STARTING),)


def test_a_gpu_without_a_start_in_progress_is_used_instead() -> None:
    gpus = [gpu(0), gpu(1)]
    engines = [
        engine("s", 8, gpus=(0,), state=EngineState.STARTING),
        engine("w", 8, gpus=(1,)),
    ]
    result = plan(target(4), engines, gpus)
    assert result.gpus == (1,)
    assert result.wait_for == ()


def test_waking_engine_also_blocks_its_gpu() -> None:
    result = plan(target(4), [engine("w", 8, state=EngineState.WAKING)])
    assert result.wait_for == (WaitFor("w", WaitReason.WAKING),)


def test_stopping_engine_is_waited_for_until_its_memory_is_back() -> None:
    result = plan(target(10), [engine("going", 20, state=EngineState.STOPPING)])
    assert result.actions == ()
    assert result.wait_for == (WaitFor("going", WaitReason.STOPPING),)


# ----- sleep -----


def test_sleep_preferred_over_stop_when_host_ram_allows() -> None:
    engines = [engine("a", 12, sleep=1, wake=2.0, asleep_gib=1)]
    result = plan(target(20), engines, host_gib=64)  # needs 8, sleeping frees 11
    assert result.actions == (Sleep("a", 1),)


def test_level_2_when_host_ram_is_short() -> None:
    engines = [engine("a", 12, sleep=1, wake=2.0, asleep_gib=1)]
    result = plan(target(20), engines, host_gib=4)  # level 1 would hold 12 GiB of host RAM
    assert result.actions == (Sleep("a", 2),)


def test_level_1_goes_to_the_engine_it_saves_most_for() -> None:
    engines = [
        engine("slow", 8, sleep=1, start=120, idle=10, asleep_gib=0),
        engine("fast", 8, sleep=1, start=10, idle=10, asleep_gib=0),
    ]
    result = plan(target(24), engines, host_gib=10)  # both must go; host RAM for one
    assert set(result.actions) == {Sleep("slow", 1), Sleep("fast", 2)}


def test_engine_without_sleep_is_stopped() -> None:
    result = plan(target(20), [engine("a", 12)], host_gib=64)
    assert result.actions == (
        Stop(
            "a",
        ),
    )


def test_stop_when_sleeping_does_not_free_enough() -> None:
    # Sleeping keeps 6 GiB on the GPU: 19 GiB of room is only reached by stopping.
    engines = [engine("a", 12, sleep=1, asleep_gib=6)]
    result = plan(target(19), engines, host_gib=64)
    assert result.actions == (Stop("a"),)


def test_sleeping_engine_is_stopped_to_free_its_residual() -> None:
    engines = [
        engine("p", 21, pinned=True),
        engine("zz", 12, state=EngineState.SLEEPING, sleep=1, sleeping_level=1, asleep_gib=2),
    ]
    result = plan(target(3), engines)  # 1 GiB free; the sleeper's 2 GiB residual must go
    assert result.actions == (Stop("zz"),)


def test_stopping_a_level1_sleeper_returns_host_ram_for_another_sleep() -> None:
    engines = [
        engine(
            "asleep",
            10,
            state=EngineState.SLEEPING,
            sleeping_level=1,
            sleep=1,
            asleep_gib=1,
            idle=50_000,
            host_gib=10,
        ),
        engine(
            "busy_soon",
            20,
            sleep=1,
            wake=1.0,
            idle=1,
            asleep_gib=1,
            start=200,
            gpus=(0,),
            host_gib=10,
        ),
    ]
    gpus = [gpu(0, 48)]
    # 48 - 1 - 20 = 27 free; 40 needed -> 13 more. Stopping the long-idle sleeper frees its
    # 1 GiB and its 10 GiB of host RAM, which lets the other sleep at level 1.
    result = plan(target(40), engines, gpus, host_gib=0)
    assert result.actions == (Stop("asleep"), Sleep("busy_soon", 1))


def test_actions_are_ordered_sleeper_stops_then_sleeps_then_stops() -> None:
    engines = [
        engine("r_stop", 6, idle=40_000),
        engine("r_sleep", 8, sleep=1, asleep_gib=0, idle=10),
        engine(
            "s_stop",
            6,
            state=EngineState.SLEEPING,
            sleep=1,
            sleeping_level=2,
            asleep_gib=4,
            idle=50_000,
        ),
    ]
    result = plan(target(24), engines)  # everything has to make room
    assert result.actions == (Stop("s_stop"), Sleep("r_sleep", 1), Stop("r_stop"))


# ----- exclusive groups -----


def test_exclusive_group_stops_the_running_member_even_when_memory_fits() -> None:
    engines = [engine("coder", 4, group="one-at-a-time"), engine("other", 4)]
    result = plan(target(4, name="chat", group="one-at-a-time"), engines)
    assert result.actions == (Stop("coder"),)


def test_exclusive_group_sleeps_the_member_when_it_can() -> None:
    engines = [engine("coder", 4, group="g", sleep=1)]
    result = plan(target(4, name="chat", group="g"), engines, host_gib=64)
    assert result.actions == (Sleep("coder", 1),)


def test_exclusive_group_member_slept_then_stopped_if_memory_needs_it() -> None:
    engines = [engine("coder", 16, group="g", sleep=1, asleep_gib=4)]
    result = plan(target(22, name="chat", group="g"), engines, host_gib=64)
    assert result.actions == (Stop("coder"),)
    assert result.cost == pytest.approx(action_cost(engines[0], Stop("coder"), NOW))


def test_exclusive_group_busy_member_is_waited_for() -> None:
    engines = [engine("coder", 4, group="g", in_flight=1)]
    result = plan(target(4, name="chat", group="g"), engines)
    assert result.wait_for == (WaitFor("coder", WaitReason.BUSY),)
    assert result.actions == (Stop("coder"),)


def test_exclusive_group_leaves_sleeping_members_and_other_groups() -> None:
    engines = [
        engine("asleep", 4, group="g", state=EngineState.SLEEPING, sleeping_level=1),
        engine("elsewhere", 4, group="h"),
    ]
    assert plan(target(4, name="chat", group="g"), engines).actions == ()


def test_exclusive_group_with_a_pinned_running_member_cannot_fit() -> None:
    reason = cannot(target(4, name="chat", group="g"), [engine("coder", 4, group="g", pinned=True)])
    assert "pinned" in reason
    assert "exclusive group 'g'" in reason


# ----- unknown footprint, tensor parallel, wake -----


def test_unknown_footprint_takes_the_whole_gpu() -> None:
    engines = [
        engine("a", 8),
        engine("b", 4, state=EngineState.SLEEPING, sleeping_level=2, sleep=2, asleep_gib=1),
    ]
    result = plan(target(None), engines, [gpu(0, 24, foreign_gib=1)])
    assert set(result.actions) == {Stop("a"), Stop("b")}
    assert result.bytes_per_gpu == 23 * GIB


def test_unknown_footprint_prefers_an_empty_gpu() -> None:
    gpus = [gpu(0), gpu(1)]
    result = plan(target(None), [engine("a", 8, gpus=(0,))], gpus)
    assert result.gpus == (1,)
    assert result.actions == ()


def test_unknown_footprint_with_pinned_engine_cannot_fit() -> None:
    reason = cannot(target(None), [engine("p", 2, pinned=True)])
    assert "no known footprint" in reason


def test_tensor_parallel_needs_room_on_two_gpus_at_once() -> None:
    gpus = [gpu(0), gpu(1), gpu(2)]
    engines = [engine("a", 19, gpus=(1,)), engine("b", 12, gpus=(2,))]
    # Room: GPU 0 24, GPU 1 5, GPU 2 12 -> 10 GiB on two GPUs fits on 0 and 2.
    result = plan(target(10, tp=2), engines, gpus)
    assert result.gpus == (0, 2)
    assert result.actions == ()


def test_tensor_parallel_engine_spanning_both_gpus_is_one_victim() -> None:
    gpus = [gpu(0), gpu(1)]
    engines = [
        engine("tp", 16, gpus=(0, 1), start=40),
        engine("solo0", 6, gpus=(0,), start=30, idle=5),
        engine("solo1", 6, gpus=(1,), start=30, idle=5),
    ]
    # 2 GiB free on each, 10 needed on each: stopping "tp" frees 16 on both.
    result = plan(target(10, tp=2), engines, gpus)
    assert result.actions == (Stop("tp"),)
    assert result.gpus == (0, 1)


def test_tensor_parallel_degree_beyond_allowed_gpus_cannot_fit() -> None:
    reason = cannot(target(4, tp=2, gpus=(0,)), [], [gpu(0), gpu(1)])
    assert "needs 2 GPUs" in reason


def test_unknown_gpu_cannot_fit() -> None:
    assert "GPU 3, which is not in the inventory" in cannot(target(4, gpus=(3,)), [])


def test_cannot_fit_at_all_says_why() -> None:
    reason = cannot(target(30), [], [gpu(0, 24, foreign_gib=2)])
    assert reason == (
        "'new' needs 30.0 GiB per GPU, but GPU 0 has 24.0 GiB total, "
        "2.0 GiB used by other processes"
    )


def test_wake_uses_the_engines_own_gpu_and_counts_its_residual() -> None:
    gpus = [gpu(0), gpu(1)]
    engines = [
        engine(
            "new",
            10,
            gpus=(1,),
            state=EngineState.SLEEPING,
            sleeping_level=1,
            asleep_gib=1,
            sleep=1,
        ),
        engine("b", 14, gpus=(1,)),
    ]
    result = plan(target(10), engines, gpus)  # 24 - 14 = 10 with its residual turned awake
    assert result.wake is True
    assert result.gpus == (1,)
    assert result.actions == ()
    bigger = [engines[0], replace(engines[1], awake_bytes_per_gpu=15 * GIB)]
    assert plan(target(10), bigger, gpus).actions == (Stop("b"),)


def test_target_starting_entry_is_not_counted() -> None:
    engines = [engine("new", 20, state=EngineState.STARTING), engine("a", 10)]
    result = plan(target(12), engines)
    assert result.actions == ()
    assert result.wait_for == ()


# ----- the cost model -----


def test_likelihood_decays_with_idle_time_and_is_one_when_busy() -> None:
    settings = PolicySettings(recency_half_life_s=600, recency_floor=0.05)
    assert likelihood(engine("a", 1, idle=0), NOW, settings) == pytest.approx(1.0)
    assert likelihood(engine("a", 1, idle=600), NOW, settings) == pytest.approx(0.525)
    assert likelihood(engine("a", 1, idle=1e9), NOW, settings) == pytest.approx(0.05)
    assert likelihood(engine("a", 1, idle=1e9, in_flight=1), NOW, settings) == 1.0


def test_wake_time_estimates_never_exceed_the_start_time() -> None:
    assert wake_seconds(engine("a", 1, start=30, wake=None), 1) == pytest.approx(3.0)
    assert wake_seconds(engine("a", 1, start=30, wake=None), 2) == pytest.approx(12.0)
    assert wake_seconds(engine("a", 1, start=30, wake=50.0, sleep=1), 1) == 30.0
    assert wake_seconds(engine("a", 1, start=30, wake=2.0, sleep=1), 2) == pytest.approx(12.0)


def test_stopping_a_sleeper_costs_start_minus_wake() -> None:
    sleeper = engine(
        "z", 8, state=EngineState.SLEEPING, sleeping_level=1, sleep=1, wake=2.0, start=30, idle=0
    )
    assert action_cost(sleeper, Stop("z"), NOW) == pytest.approx(28.0, rel=1e-3)


def test_explanation_names_the_actions_and_waits() -> None:
    result = plan(target(8), [engine("busy", 20, in_flight=1)])
    assert "stop 'busy'" in result.explanation
    assert "wait for 'busy' (busy)" in result.explanation
