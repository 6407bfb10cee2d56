"""The core's pre-warm decisions as properties, on random worlds (pure, no clock).

- a pre-warm never evicts an engine in use (requests in flight or waiting, starting, waking,
  draining, or asked for a moment ago), nor a pinned one, nor one (awake or asleep) the
  predictor expects as much as the pre-warm's target;
- it uses only free memory, or memory that sleeping or idle engines hold;
- nothing is pre-warmed while a real request waits, nor on a GPU where a start is under way;
- a real request that needs the start slot of a pre-warm has it cancelled, at once.

And end to end in virtual time: an A-then-B habit learned over 20 rounds, the 21st B served
warm (its start begun when A was asked for). The idle timer keeps an engine that pre-warming
would start again at once: a working morning's pauses then find it up.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from modelyard.placement.policy import Engine, EngineState, GpuCapacity, Sleep, Stop, Target
from modelyard.scheduler.core import (
    CancelPreWarm,
    IdleCheck,
    IdleEngine,
    KeepIdle,
    PreWarmAsk,
    PreWarmNow,
    PutToSleep,
    SchedulerCore,
    StartNow,
    StopIdle,
    WaitUntil,
    Wanted,
)
from modelyard.scheduler.decide import Ask, Snapshot
from modelyard.scheduler.predictor import Chance, Predictor
from modelyard.scheduler.prewarm import Candidate, ModelNow, Standing, ask_inputs
from tests.core.virtual_gateway import GIB, Model, Outcome, VirtualGateway

STATES = [
    EngineState.READY,
    EngineState.SLEEPING,
    EngineState.STARTING,
    EngineState.WAKING,
    EngineState.DRAINING,
]


def random_world(rng: random.Random) -> tuple[Snapshot, tuple[Candidate, ...], set[str]]:
    """Up to 5 engines on 1-2 GPUs of 24 GiB, and 1-3 models the predictor expects."""
    gpus = tuple(GpuCapacity(i, 24 * GIB) for i in range(rng.choice([1, 2])))
    engines = []
    used = [0] * len(gpus)
    for index in range(rng.randint(0, 5)):
        gpu = rng.randrange(len(gpus))
        size = rng.choice([2, 4, 6, 8]) * GIB
        state = rng.choice(STATES)
        held = GIB if state is EngineState.SLEEPING else size
        if used[gpu] + held > gpus[gpu].total_bytes:
            continue
        used[gpu] += held
        engines.append(
            Engine(
                name=f"e{index}",
                state=state,
                gpus=(gpu,),
                awake_bytes_per_gpu=size,
                asleep_bytes_per_gpu=GIB,
                in_flight=rng.choice([0, 0, 1]),
                last_used=rng.uniform(0, 1000),
                start_seconds=40.0,
                wake_seconds=1.0,
                sleep_level=rng.choice([0, 1]),
                sleeping_level=1 if state is EngineState.SLEEPING else 0,
                pinned=rng.random() < 0.1,
            )
        )
    candidates = tuple(
        Candidate(
            Target(f"c{index}", rng.choice([4, 8, 12]) * GIB),
            Chance(f"c{index}", rng.uniform(0.3, 1.0), 40.0, "after e0, 0.9 within 300 s"),
            40.0,
        )
        for index in range(rng.randint(1, 3))
    )
    in_use = {e.name for e in engines if rng.random() < 0.2}
    return Snapshot(1000.0, gpus, tuple(engines)), candidates, in_use


def test_exact_chances_leave_only_recencys_guess_out_of_a_prewarms_cost() -> None:
    """The bench's perfect foresight (`exact`): an idle engine used 10 s ago costs a learned
    pre-warm its reload (recency says it is likely back), so a 12 GiB target due at 0.95 is
    not worth it; with exact chances the same engine, not due, is evicted for it. One that
    is due (expected 1.0) is kept, exact or not, and one with a request in flight is never
    touched."""
    gpu = (GpuCapacity(0, 24 * GIB),)
    idle = Engine(
        name="idle",
        state=EngineState.READY,
        gpus=(0,),
        awake_bytes_per_gpu=16 * GIB,
        last_used=990.0,
        start_seconds=40.0,
    )
    target = Candidate(Target("next", 12 * GIB), Chance("next", 0.95, 60.0, "test"), 40.0)

    def decided(engine: Engine, exact: bool, expected: float = 0.0) -> list[object]:
        ask = PreWarmAsk(
            Snapshot(1000.0, gpu, (engine,)),
            (target,),
            expected={"idle": expected},
            exact=exact,
        )
        return list(SchedulerCore().step(ask))

    assert decided(idle, exact=False) == []
    [go] = decided(idle, exact=True)
    assert isinstance(go, PreWarmNow)
    assert go.prewarm.actions == (Stop("idle"),)
    assert decided(idle, exact=True, expected=1.0) == []
    busy = dataclasses.replace(idle, in_flight=1)
    assert decided(busy, exact=True) == []


@pytest.mark.parametrize("seed", range(300))
def test_a_prewarm_touches_only_free_or_idle_memory(seed: int) -> None:
    rng = random.Random(seed)
    snapshot, candidates, in_use = random_world(rng)
    # The predictor's chances for the loaded models, awake or asleep (hostile: some above 1).
    expected = {e.name: rng.choice([0.0, 0.5, 0.8, 0.95, 1.5]) for e in snapshot.engines}
    # Half the worlds with exact chances (the bench's foresight: evictions cost nothing more):
    # the rules hold all the same.
    exact = rng.random() < 0.5
    ask = PreWarmAsk(snapshot, candidates, in_use=frozenset(in_use), expected=expected, exact=exact)
    commands = SchedulerCore().step(ask)
    if not commands:
        return
    [command] = commands
    assert isinstance(command, PreWarmNow)
    prewarm = command.prewarm
    engines = {e.name: e for e in snapshot.engines}
    for action in prewarm.actions:
        victim = engines[action.name]
        assert victim.in_flight == 0
        assert not victim.pinned
        assert victim.name not in in_use
        # An engine as likely to be asked for as the target is kept, awake or asleep (a
        # sleeper's sleep dropped costs its next request a cold start, not a 1-3 s wake).
        assert expected[victim.name] < prewarm.probability
        assert victim.state in (EngineState.READY, EngineState.SLEEPING)
        assert isinstance(action, Sleep | Stop)
    # The GPUs it goes on had no start, wake or eviction under way.
    for engine in snapshot.engines:
        if engine.state in (EngineState.STARTING, EngineState.WAKING, EngineState.DRAINING):
            assert not set(engine.gpus) & set(prewarm.gpus)
    # What it needs fits in the free memory plus what its victims give back.
    for gpu in prewarm.gpus:
        held = sum(
            e.held_bytes_per_gpu
            for e in snapshot.engines
            if gpu in e.gpus and e.name not in {a.name for a in prewarm.actions}
        )
        assert held + prewarm.bytes_per_gpu <= snapshot.gpus[gpu].total_bytes
    assert prewarm.saving_s > prewarm.cost_s
    assert prewarm.reason


def test_nothing_is_prewarmed_while_a_request_waits() -> None:
    snapshot = Snapshot(0.0, (GpuCapacity(0, 24 * GIB),), ())
    candidate = Candidate(Target("b", 8 * GIB), Chance("b", 0.9, 40.0, "after a"), 40.0)
    core = SchedulerCore()
    assert core.step(PreWarmAsk(snapshot, (candidate,), requests_waiting=True)) == []
    assert core.step(PreWarmAsk(snapshot, (candidate,)))  # and it would, otherwise


def test_an_unlikely_model_is_not_prewarmed() -> None:
    snapshot = Snapshot(0.0, (GpuCapacity(0, 24 * GIB),), ())
    candidate = Candidate(Target("b", 8 * GIB), Chance("b", 0.2, 40.0, "after a"), 40.0)
    assert SchedulerCore().step(PreWarmAsk(snapshot, (candidate,))) == []


def test_the_drivers_ask_about_candidates_and_possible_victims_alike() -> None:
    # The gateway and the simulator both build their ask with `ask_inputs` (the simulator's
    # figures are the gateway's only if they ask alike). Candidates: stopped or asleep with
    # pre-warming on; possible victims: awake or asleep, whatever their own setting.
    models = [
        ModelNow("up", Standing.READY, 40.0, 1.0, True),
        ModelNow("asleep", Standing.ASLEEP, 40.0, 2.0, True),
        ModelNow("asleep-off", Standing.ASLEEP, 40.0, 2.0, False),
        ModelNow("down", Standing.STOPPED, 40.0, 1.0, True),
        ModelNow("down-off", Standing.STOPPED, 40.0, 1.0, False),
        ModelNow("starting", Standing.BUSY, 40.0, 1.0, True),
        ModelNow("slow-wake", Standing.ASLEEP, 10.0, 30.0, True),  # a wake no faster than a start
    ]
    inputs = ask_inputs(models)
    assert inputs.waits == {"asleep": 2.0, "down": 40.0, "slow-wake": 10.0}
    assert inputs.horizons == {"asleep": 30.0, "down": 60.0, "slow-wake": 30.0}
    assert inputs.loaded == {"up": 40.0, "asleep": 40.0, "asleep-off": 40.0, "slow-wake": 10.0}


def test_a_sleeper_as_likely_as_the_target_keeps_its_sleep() -> None:
    # 24 GiB: a 16 GiB engine serving, and `s` asleep (1 GiB left on the GPU, 8 GiB awake).
    # An 8 GiB pre-warm fits only if s's sleep is dropped, so s's next request would start
    # cold (40 s on a GPU) instead of waking (1 s). With s expected as much as the target, or
    # more, nothing is pre-warmed; with s unlikely, s makes way.
    def sleeper(name: str, state: EngineState, size: int, in_flight: int) -> Engine:
        return Engine(
            name=name,
            state=state,
            gpus=(0,),
            awake_bytes_per_gpu=size * GIB,
            asleep_bytes_per_gpu=GIB,
            in_flight=in_flight,
            last_used=0.0,
            start_seconds=4.0,
            wake_seconds=1.0,
            sleep_level=1,
            sleeping_level=1 if state is EngineState.SLEEPING else 0,
        )

    engines = (sleeper("busy", EngineState.READY, 16, 1), sleeper("s", EngineState.SLEEPING, 8, 0))
    snapshot = Snapshot(1000.0, (GpuCapacity(0, 24 * GIB),), engines)
    candidate = Candidate(Target("b", 8 * GIB), Chance("b", 0.9, 60.0, "after a"), 40.0)
    core = SchedulerCore()
    assert core.step(PreWarmAsk(snapshot, (candidate,), expected={"s": 0.9})) == []
    [command] = core.step(PreWarmAsk(snapshot, (candidate,), expected={"s": 0.1}))
    assert isinstance(command, PreWarmNow)
    assert [(type(a), a.name) for a in command.prewarm.actions] == [(Stop, "s")]


def test_a_real_request_takes_the_start_slot_of_a_prewarm() -> None:
    gpu = (GpuCapacity(0, 24 * GIB),)
    core = SchedulerCore()
    candidate = Candidate(Target("b", 8 * GIB), Chance("b", 0.9, 40.0, "after a"), 40.0)
    [prewarm] = core.step(PreWarmAsk(Snapshot(0.0, gpu, ()), (candidate,)))
    assert isinstance(prewarm, PreWarmNow)
    # Its start is under way when a request for c comes: c must not wait behind it.
    starting = Engine("b", EngineState.STARTING, (0,), 8 * GIB, in_flight=0)
    commands = core.step(Wanted(Ask(Target("c", 8 * GIB), 300.0), Snapshot(1.0, gpu, (starting,))))
    assert isinstance(commands[0], CancelPreWarm)
    assert commands[0].target == "b"
    assert any(isinstance(c, WaitUntil | StartNow) for c in commands[1:])
    assert core.prewarming() == ()


def test_a_b_habit_learned_over_20_rounds_serves_the_21st_b_warm() -> None:
    """Two 20 GiB models on one 24 GiB GPU, sleep off: without pre-warming every B is a cold
    start after A; with it, B starts as soon as A is served, and B's request comes later."""
    models = {
        "a": Model(bytes=12 * GIB, start_s=30.0, stop_s=2.0),
        "b": Model(bytes=12 * GIB, start_s=40.0, stop_s=2.0),
        "other": Model(bytes=20 * GIB, start_s=30.0, stop_s=2.0),
    }
    world = VirtualGateway(models, [24 * GIB], predictor=Predictor(window_s=120.0))
    b_requests = []
    t = 0.0
    for _ in range(21):
        world.request(t, "other", duration=5.0, key="someone")  # evicts a and b meanwhile
        world.request(t + 100.0, "a", duration=5.0, key="alice")
        b_requests.append(world.request(t + 100.0 + 75.0, "b", duration=5.0, key="alice"))
        t += 1000.0
    outcomes = world.run(until=1e9)
    assert outcomes[b_requests[0]].waited == pytest.approx(40.0)  # nothing learned yet
    assert outcomes[b_requests[-1]].waited == 0.0  # served warm
    assert any("after a" in p.reason for p in world.prewarms)


class _Always(Predictor):
    """Says `model` comes within any horizon, for certain (the decision, not the learning)."""

    def __init__(self, model: str) -> None:
        super().__init__()
        self.model = model

    def chances(self, now: float, horizons: dict[str, float]) -> list[Chance]:
        return [Chance(m, 1.0, h, "test") for m, h in horizons.items() if m == self.model]


def test_a_cancelled_prewarm_start_frees_the_start_slot_at_once() -> None:
    # b's 40 s pre-warm starts when a is asked for; c is asked for 5 s later and fits beside
    # it: c starts at once (the pre-warm gives way), not after b's start.
    models = {
        "a": Model(bytes=4 * GIB, start_s=30.0, stop_s=2.0),
        "b": Model(bytes=8 * GIB, start_s=40.0, stop_s=2.0),
        "c": Model(bytes=8 * GIB, start_s=30.0, stop_s=2.0),
    }
    world = VirtualGateway(models, [24 * GIB], predictor=_Always("b"))
    world.set_ready("a")
    world.request(0.0, "a", key="k")
    c = world.request(5.0, "c", key="j")
    outcomes = world.run(until=1e9)
    assert outcomes[c].waited == pytest.approx(30.0)
    [prewarm] = [p for p in world.prewarms if p.model == "b"][:1]
    assert prewarm.wasted
    assert (5.0, "b", "starting", "stopping") in world.transitions


# ----- the idle timer keeps what pre-warming would start again -----


def test_the_idle_timer_keeps_an_engine_that_prewarming_would_start_again() -> None:
    """A model's last engine, idle past its timeout and unable to sleep, stays up while its
    chance of being asked for within that timeout is a pre-warm's (0.7 or more); below it, as
    a sleeper, as a replica above the last, or busy, the idle timer does as before."""
    likely = "this hour of the day, 0.81 within 600 s"
    engines = (
        IdleEngine("chat", 700.0, 600.0, pinned=False, sleep_level=0),
        IdleEngine("vision", 700.0, 600.0, pinned=False, sleep_level=0),
        IdleEngine("coder", 700.0, 600.0, pinned=False, sleep_level=1),
        IdleEngine("agent", 700.0, 600.0, pinned=False, sleep_level=0, model="agent"),
        IdleEngine("agent#2", 700.0, 600.0, pinned=False, sleep_level=0, model="agent"),
        IdleEngine("busy", None, 600.0, pinned=False, sleep_level=0),
    )
    expected = (
        Chance("chat", 0.81, 600.0, likely),
        Chance("vision", 0.69, 600.0, "after chat, 0.69 within 600 s"),
        Chance("coder", 0.95, 600.0, likely),
        Chance("agent", 0.9, 600.0, likely),
        Chance("busy", 1.0, 600.0, likely),
        # Hostile or stale: a chance for a model with no engine, or one outside [0, 1].
        Chance("ghost", 1.0, 600.0, likely),
        Chance("chat#2", 7.0, 600.0, likely),
    )
    verdicts = SchedulerCore().step(IdleCheck(engines, expected))
    assert sorted(verdicts, key=repr) == sorted(
        [
            KeepIdle("chat", f"idle for 700s, kept: {likely}"),
            StopIdle("vision", "idle for 700s"),
            PutToSleep("coder", 1, "idle for 700s"),  # a wake spares little: it sleeps
            StopIdle("agent#2", "scale down: idle for 700s", scale_down=True),
            KeepIdle("agent", f"idle for 700s, kept: {likely}"),
        ],
        key=repr,
    )
    # Without pre-warming's chances, the same engines go as they always did.
    plain = SchedulerCore().step(IdleCheck(engines))
    assert not any(isinstance(verdict, KeepIdle) for verdict in plain)
    assert len(plain) == 5


def working_mornings(world: VirtualGateway, days: int) -> dict[int, list[int]]:
    """A user's mornings, 9:00-12:00, Monday on: a request every 5.5 min (each the first of
    its burst: more than the predictor's 5 min apart) four times, then one after a 12 min
    pause (past the 10 min idle timeout), over and over: 8.8 an hour. Returns, per day, the
    requests that came after a pause."""
    monday = 4 * 86400.0  # Unix day 4 was a Monday
    after_pause: dict[int, list[int]] = {}
    for day in range(days):
        t = monday + day * 86400.0 + 9 * 3600.0
        while t + 3 * 330.0 + 720.0 < monday + day * 86400.0 + 12 * 3600.0:
            for _ in range(4):
                world.request(t, "chat", duration=5.0, key="alice")
                t += 330.0
            t += 720.0 - 330.0
            after_pause.setdefault(day, []).append(world.request(t, "chat", 5.0, "alice"))
            t += 330.0
    return after_pause


@pytest.mark.parametrize("learned", [False, True])
def test_a_working_mornings_pauses_start_cold_today_and_find_the_engine_kept_once_learned(
    learned: bool,
) -> None:
    """A 40 s start (vLLM on a GPU), sleep off, the default 10 min idle timeout. Today the
    engine stops in every 12 min pause and the next request waits for a cold start. Learned
    (two mornings of history: about 8.8 requests an hour, so about 0.77 within 10 min), it is
    kept through the pauses of the third morning, and stopped once the morning is over (no
    request at noon, ever: the chance is 0)."""
    models = {"chat": Model(bytes=8 * GIB, start_s=40.0, stop_s=5.0)}
    world = VirtualGateway(
        models, [24 * GIB], predictor=Predictor() if learned else None, idle_timeout=600.0
    )
    after_pause = working_mornings(world, days=3)
    outcomes = world.run(until=1e9)
    third = [outcomes[i].waited for i in after_pause[2]]
    if not learned:
        assert third == [pytest.approx(40.0)] * len(third)
        assert world.keeps == []
        return
    # Served warm, but for one: the hour of 11 saw fewer requests on the first two mornings
    # (the 34 min pattern does not fit the hour), and its chance, 0.6, keeps nothing.
    assert len(third) == 5
    assert sorted(third) == [0.0, 0.0, 0.0, 0.0, pytest.approx(40.0)]
    assert all("this hour of the day" in k.reason for k in world.keeps)
    stops = [at for at, name, _, after in world.transitions if after == "stopping"]
    noon = 4 * 86400.0 + 2 * 86400.0 + 12 * 3600.0
    last = max(outcome.arrived for outcome in outcomes)
    assert last < noon
    assert any(last + 600.0 <= at <= noon + 900.0 for at in stops)


class KeepsChat(Predictor):
    """Certain that chat comes within its idle timeout (600 s), but says nothing within a
    start (so nothing is pre-warmed: the idle timer alone is under test)."""

    def chances(self, now: float, horizons: dict[str, float]) -> list[Chance]:
        return [
            Chance(m, 1.0, h, "certain") for m, h in horizons.items() if m == "chat" and h >= 600.0
        ]


def chat_then_another(chat_gib: int, other_gib: int) -> tuple[VirtualGateway, Outcome]:
    """Alice's chat request at 0 (a 40 s start, a 5 s stop, one 24 GiB GPU, sleep off), the
    idle timer at 600 s with chat certain to come within it, then bob's request for another
    model at 2000 s: the world after, and bob's outcome."""
    models = {
        "chat": Model(bytes=chat_gib * GIB, start_s=40.0, stop_s=5.0),
        "other": Model(bytes=other_gib * GIB, start_s=40.0, stop_s=5.0),
    }
    world = VirtualGateway(models, [24 * GIB], predictor=KeepsChat(), idle_timeout=600.0)
    world.request(0.0, "chat", duration=5.0, key="alice")
    other = world.request(2000.0, "other", duration=5.0, key="bob")
    return world, world.run(until=1e9)[other]


def test_a_kept_engine_gives_its_room_to_a_real_request() -> None:
    """A kept engine is as idle as before: a model that needs its room evicts it (and waits
    its stop, as for any idle engine: the bench counts such a request as one with a pre-warm
    in its way)."""
    world, other = chat_then_another(chat_gib=8, other_gib=20)
    assert [k.model for k in world.keeps] == ["chat"]
    assert world.keeps[0].wasted
    assert other.status == 200
    assert other.waited == pytest.approx(5.0 + 40.0)
    assert other.prewarm_in_the_way == "evicted chat, kept up past its idle stop"


def test_an_engine_is_not_kept_where_the_next_start_would_have_to_evict_it() -> None:
    """A 16 GiB engine on a 24 GiB GPU leaves 8 GiB beside it: another model its size could
    not start without evicting it, so it stops at its idle timeout as it always did, and the
    next model starts at once."""
    world, other = chat_then_another(chat_gib=16, other_gib=16)
    assert world.keeps == []
    assert other.waited == pytest.approx(40.0)
