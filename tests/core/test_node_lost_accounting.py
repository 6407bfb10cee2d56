"""A lost node is not a crash of the engine: in-process, with fake engines standing for Ray
engines (`RayEngine` reports an exit with `node_lost`, and `RayRuntime.start` raises
`EngineStartError(node_lost=True)` when the node is declared lost under a start)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from modelyard.engines.base import LaunchSpec
from modelyard.runtime.process import EngineStartError, ExitInfo
from modelyard.scheduler.supervisor import ModelState, ModelUnavailable
from tests.core.test_supervisor import make_yard
from tests.fakes import FakeEngine, FakeRuntime, settle


class NodeLosingRuntime(FakeRuntime):
    """Its first `lost_starts` starts go to a node that is then lost."""

    def __init__(self, lost_starts: int) -> None:
        super().__init__()
        self.lost_starts = lost_starts
        self.tries = 0

    async def __call__(self, name: str, spec_for_port: Callable[[int], LaunchSpec]) -> FakeEngine:
        self.tries += 1
        if self.tries <= self.lost_starts:
            raise EngineStartError(
                "node 127.0.0.3 is lost: its agent is gone", None, [], node_lost=True
            )
        return await super().__call__(name, spec_for_port)


def lose_with_node(engine: FakeEngine) -> None:
    engine.exited.set_result(ExitInfo(None, time.monotonic(), node_lost=True))


async def test_a_start_on_a_node_lost_meanwhile_is_tried_again_and_not_counted():
    yard, _runtime, _clock, events = make_yard()
    runtime = NodeLosingRuntime(lost_starts=1)
    yard._supervisors["m"]._start_engine = runtime
    async with yard.engine_for("m") as engine:
        assert engine is runtime.engines[0]
    supervisor = yard._supervisors["m"]
    assert runtime.tries == 2
    assert supervisor.consecutive_failures == 0
    kinds = [e.kind for e in events.recent()]
    assert kinds == ["start", "start_failed", "node_lost_retry", "start", "ready"]


async def test_a_second_lost_node_fails_the_start_without_a_crash_loop():
    # Hostile: two nodes lost in a row under the same start. The request fails (502, told
    # why), but nothing counts toward the back-off: the next request starts at once.
    yard, _runtime, _clock, _events = make_yard()
    runtime = NodeLosingRuntime(lost_starts=2)
    supervisor = yard._supervisors["m"]
    supervisor._start_engine = runtime
    with pytest.raises(ModelUnavailable, match="is lost"):
        async with yard.engine_for("m"):
            pass
    assert supervisor.state is ModelState.FAILED
    assert supervisor.consecutive_failures == 0
    assert supervisor.backoff_remaining() == 0
    async with yard.engine_for("m") as engine:
        assert engine is runtime.engines[0]


async def test_engines_lost_with_their_nodes_count_toward_no_crash_loop():
    yard, runtime, _clock, events = make_yard()
    supervisor = yard._supervisors["m"]
    for round_ in range(3):  # three node losses in a row: still no back-off
        async with yard.engine_for("m") as engine:
            assert engine is runtime.engines[round_]
        lose_with_node(runtime.engines[round_])
        await settle()
        assert supervisor.state is ModelState.FAILED
        assert supervisor.consecutive_failures == 0
        assert "lost with its node" in (supervisor.failure.message if supervisor.failure else "")
    # A crash of the engine itself still counts.
    async with yard.engine_for("m"):
        pass
    runtime.engines[3].crash(1)
    await settle()
    assert supervisor.consecutive_failures == 1
    assert [e.kind for e in events.recent()].count("crash") == 4
