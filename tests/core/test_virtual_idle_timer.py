"""The virtual gateway's idle timer, as the driver's: the core's `IdleCheck` picks the engines
idle past their timeout; a model with a sleep level sleeps, another stops. The pre-warm
benchmark replays with it on (the gateway's default, 600 s), since the real gateway would stop
or put to sleep every engine left idle that long between a user's sessions."""

from __future__ import annotations

import math

from modelyard.placement.policy import EngineState
from tests.core.virtual_gateway import GIB, Model, VirtualGateway

IDLE_S = 600.0  # the gateway's default idle_timeout


def world(sleep_level: int) -> VirtualGateway:
    model = Model(
        bytes=8 * GIB,
        start_s=40.0,
        wake_s=2.0,
        sleep_level=sleep_level,
        asleep_bytes=GIB,
        stop_s=5.0,
        sleep_s=2.0,
    )
    return VirtualGateway({"chat": model}, [24 * GIB], idle_timeout=IDLE_S)


def test_an_engine_idle_past_its_timeout_is_stopped_and_starts_cold_again() -> None:
    gateway = world(sleep_level=0)
    gateway.request(0.0, "chat", duration=10.0)  # served at 40 s, idle from 50 s
    gateway.request(500.0, "chat", duration=10.0)  # idle 450 s: still there; idle from 510 s
    gateway.request(1200.0, "chat", duration=10.0)  # idle 690 s: stopped at 1110 s
    outcomes = gateway.run(until=math.inf)
    assert [o.waited for o in outcomes] == [40.0, 0.0, 40.0]
    stops = [(at, what) for at, name, what in gateway.log if what.startswith("idle")]
    assert len(stops) == 2  # after the second request, and after the last
    assert 510.0 + IDLE_S <= stops[0][0] <= 510.0 + IDLE_S + 0.5
    assert gateway.live["chat"].state is None  # the last one went too


def test_a_model_with_a_sleep_level_sleeps_instead_and_wakes_for_the_next_request() -> None:
    gateway = world(sleep_level=1)
    gateway.request(0.0, "chat", duration=10.0)
    gateway.request(1000.0, "chat", duration=10.0)
    outcomes = gateway.run(until=1005.0)
    assert [o.waited for o in outcomes] == [40.0, 2.0]  # a wake, not a start
    assert any(what == "sleep1" for _, _, what in gateway.log)


def test_without_an_idle_timeout_engines_stay() -> None:
    gateway = VirtualGateway({"chat": Model(start_s=40.0)}, [24 * GIB])
    gateway.request(0.0, "chat", duration=10.0)
    gateway.request(5000.0, "chat", duration=10.0)
    assert [o.waited for o in gateway.run(until=math.inf)] == [40.0, 0.0]
    assert gateway.live["chat"].state is EngineState.READY
