"""The watchdog's verdicts, in-process: fake engines, a fake probe, no sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from modelyard.config import parse_config
from modelyard.engines.base import LaunchSpec
from modelyard.observability.events import EventBus
from modelyard.scheduler.scheduler import Scheduler
from modelyard.scheduler.supervisor import ModelState
from modelyard.scheduler.watchdog import EngineWatchdog, WatchdogSettings


class Engine:
    node: str | None = None
    actor_name: str | None = None
    remote = False

    def __init__(self, number: int) -> None:
        self.base_url = f"http://engine-{number}"
        self.pid = 20_000 + number
        self.port = 30_000 + number
        self.health_path = "/health"
        self.exited: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.stops = 0

    async def wait_ready(self, deadline: float) -> float:
        return 0.0

    async def stop(self, grace: float) -> int | None:
        self.stops += 1
        if not self.exited.done():
            self.exited.set_result(type("Exit", (), {"code": -15})())
        return -15

    def log_tail(self, count: int) -> list[str]:
        return ["stuck in a collective"]

    def process_gone(self) -> bool:
        return self.exited.done()

    def kill_now(self) -> None:
        pass

    def exit_code(self) -> int | None:
        return self.exited.result().code if self.exited.done() else None

    def subscribe_log(self, on_line: Callable[[str], None]) -> Callable[[], None]:
        return lambda: None


class Runtime:
    def __init__(self) -> None:
        self.engines: list[Engine] = []

    async def __call__(self, name: str, spec_for_port: Callable[[int], LaunchSpec]) -> Engine:
        self.engines.append(Engine(len(self.engines)))
        return self.engines[-1]


def setup(
    failures: int = 3,
) -> tuple[Scheduler, Runtime, EventBus, dict[str, bool], EngineWatchdog]:
    config = parse_config({"models": {"m": {"engine": "command", "command": ["x", "{port}"]}}})
    runtime, events = Runtime(), EventBus()
    yard = Scheduler(config, runtime, events)
    healthy = {"http://engine-0": True, "http://engine-1": True}

    async def probe(engine: Any, timeout: float) -> bool:
        return healthy[engine.base_url]

    watchdog = EngineWatchdog(yard, probe, WatchdogSettings(1.0, 1.0, failures))
    return yard, runtime, events, healthy, watchdog


async def ready(yard: Scheduler) -> None:
    async with yard.engine_for("m"):
        pass


async def test_failed_checks_in_a_row_stop_the_engine_and_mark_it_failed():
    yard, runtime, events, healthy, watchdog = setup(failures=3)
    await ready(yard)
    healthy["http://engine-0"] = False
    assert await watchdog.check_all() == []
    healthy["http://engine-0"] = True  # one good answer clears the count
    assert await watchdog.check_all() == []
    healthy["http://engine-0"] = False
    assert await watchdog.check_all() == []
    assert await watchdog.check_all() == []
    assert await watchdog.check_all() == ["m"]
    supervisor = yard._supervisors["m"]
    assert supervisor.state is ModelState.FAILED
    assert runtime.engines[0].stops == 1
    assert supervisor.failure is not None
    assert "hung" in supervisor.failure.message
    assert supervisor.failure.log_tail == ["stuck in a collective"]
    hung = [e for e in events.recent() if e.kind == "hung"]
    assert hung[-1].data["pid"] == 20_000
    # The next request starts a new engine, which is checked from a clean slate.
    await ready(yard)
    assert supervisor.state is ModelState.READY
    assert len(runtime.engines) == 2
    assert await watchdog.check_all() == []


async def test_request_timeouts_count_even_when_health_is_200():
    yard, runtime, _events, _healthy, watchdog = setup(failures=2)
    await ready(yard)
    watchdog.observe_request("m", 504, timed_out=True)
    watchdog.observe_request("m", 200, timed_out=False)  # an answer clears the count
    watchdog.observe_request("m", 504, timed_out=True)
    watchdog.observe_request("m", 502, timed_out=False)  # neither clears nor counts
    assert await watchdog.check_all() == []  # /health is fine
    watchdog.observe_request("m", 504, timed_out=True)
    for _ in range(20):
        await asyncio.sleep(0)
    assert yard._supervisors["m"].state is ModelState.FAILED
    assert runtime.engines[0].stops == 1
    failure = yard._supervisors["m"].failure
    assert failure is not None
    assert "upstream read timeout" in failure.message
    await watchdog.close()


async def test_only_ready_engines_are_checked():
    yard, _runtime, _events, healthy, watchdog = setup(failures=1)
    healthy["http://engine-0"] = False
    assert await watchdog.check_all() == []  # stopped: nothing to check
    watchdog.observe_request("m", 504, timed_out=True)  # and nothing to count against
    assert yard._supervisors["m"].state is ModelState.STOPPED


async def test_checks_asked_together_by_requests_share_one_probe_and_count_once():
    # Requests that time out together on one frozen engine ask at once: one probe answers
    # them all, and it is one failure of the three in a row, not three.
    yard, runtime, _events, healthy, watchdog = setup(failures=3)
    await ready(yard)
    engine = runtime.engines[0]
    probes = 0
    gate = asyncio.Event()

    async def slow_probe(checked: Any, timeout: float) -> bool:
        nonlocal probes
        probes += 1
        await gate.wait()
        return healthy[checked.base_url]

    watchdog._probe = slow_probe
    healthy["http://engine-0"] = False
    asked = [asyncio.ensure_future(watchdog.check_now("m", engine)) for _ in range(5)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*asked) == [False] * 5
    assert probes == 1
    assert yard._supervisors["m"].state is ModelState.READY  # one failure of three
    # Two more, one after the other, make the verdict; it is made before the last returns.
    assert await watchdog.check_now("m", engine) is False
    assert await watchdog.check_now("m", engine) is False
    assert yard._supervisors["m"].state in (ModelState.STOPPING, ModelState.FAILED)
    # An engine that is no longer the model's counts as not answering, unprobed.
    assert await watchdog.check_now("m", engine) is False
    assert probes == 3
    await watchdog.close()


async def test_a_hung_replica_is_declared_hung_and_its_sibling_serves_on():
    config = parse_config(
        {
            "models": {
                "m": {
                    "engine": "command",
                    "command": ["x", "{port}"],
                    "replicas": {"max": 2, "target_in_flight": 1},
                }
            }
        }
    )
    now = [100.0]
    runtime, events = Runtime(), EventBus()
    yard = Scheduler(config, runtime, events, clock=lambda: now[0])
    healthy = {"http://engine-0": True, "http://engine-1": True}

    async def probe(engine: Any, timeout: float) -> bool:
        return healthy[engine.base_url]

    watchdog = EngineWatchdog(yard, probe, WatchdogSettings(1.0, 1.0, 1))
    held = [yard.engine_for("m") for _ in range(3)]  # 3 in flight for one engine aiming at 1
    for hold in held:
        await hold.__aenter__()
    assert yard.check_scale() == []  # overloaded since now: not yet
    now[0] += 1.25
    assert yard.check_scale() == ["m#2"]
    for _ in range(30):
        await asyncio.sleep(0)
    assert sorted(yard.ready_engines_by_key()) == ["m", "m#2"]
    healthy["http://engine-1"] = False
    assert await watchdog.check_all() == ["m#2"]
    assert yard._replicas["m"][0].state is ModelState.FAILED
    assert yard.state_of("m") is ModelState.READY  # the model's own engine serves on
    assert [e.data["replica"] for e in events.recent() if e.kind == "scale_up"] == ["m#2"]
    for hold in held:
        await hold.__aexit__(None, None, None)
