"""In-memory engines and a runtime that starts them, implementing the scheduler's
`EngineHandle` and `EngineStarter` interfaces; readiness, exits and time are driven by tests.

They stand for real engine processes in tests of decisions and state changes, where the
process itself adds nothing but time (process-level behaviour is tested with
tests/fake_engine.py behind a real `modelyard serve`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from modelyard.engines.base import LaunchSpec


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeEngine:
    node: str | None = None
    actor_name: str | None = None
    remote = False

    def __init__(self, number: int, name: str = "m") -> None:
        self.name = name
        self.port = 40_000 + number
        self.base_url = f"http://fake-{number}"
        self.pid = 10_000 + number
        self.health_path = "/health"
        self.upstream_headers: dict[str, str] = {}
        self._exited: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.ready = asyncio.Event()
        self.stopped = False
        self.stop_gate = asyncio.Event()
        self.stop_gate.set()
        self.start_fails = False

    @property
    def exited(self) -> asyncio.Future[Any]:
        return self._exited

    async def wait_ready(self, deadline: float) -> float:
        exit_wait = asyncio.ensure_future(asyncio.shield(self._exited))
        ready_wait = asyncio.ensure_future(self.ready.wait())
        await asyncio.wait({exit_wait, ready_wait}, return_when=asyncio.FIRST_COMPLETED)
        exit_wait.cancel()
        ready_wait.cancel()
        if self._exited.done():
            raise RuntimeError("exited while starting (exit code 1)")
        return 0.0

    def crash(self, code: int = 1) -> None:
        if not self._exited.done():
            self._exited.set_result(type("Exit", (), {"code": code})())

    async def stop(self, grace: float) -> int | None:
        await self.stop_gate.wait()
        self.stopped = True
        if not self._exited.done():
            self._exited.set_result(type("Exit", (), {"code": 0})())
        return 0

    def kill_now(self) -> None:
        self.crash(-9)

    def exit_code(self) -> int | None:
        return self._exited.result().code if self._exited.done() else None

    def log_tail(self, count: int) -> list[str]:
        return ["fake log line"]

    def subscribe_log(self, on_line: Callable[[str], None]) -> Callable[[], None]:
        return lambda: None

    def process_gone(self) -> bool:
        return self._exited.done()


class FakeRuntime:
    def __init__(self) -> None:
        self.engines: list[FakeEngine] = []
        self.auto_ready = True

    async def __call__(self, name: str, spec_for_port: Callable[[int], LaunchSpec]) -> FakeEngine:
        spec_for_port(12345)
        engine = FakeEngine(len(self.engines), name)
        if self.auto_ready:
            engine.ready.set()
        self.engines.append(engine)
        return engine

    def of(self, name: str) -> list[FakeEngine]:
        return [e for e in self.engines if e.name == name]


class FakeSleep:
    """vLLM's sleep endpoints for fake engines: `fail_with` makes `/sleep` fail (vLLM
    built without sleep mode answers 404); `gate` holds a call until the test opens it."""

    def __init__(self) -> None:
        self.fail_with: Exception | None = None
        self.gate = asyncio.Event()
        self.gate.set()
        self.calls: list[tuple[str, str]] = []

    async def sleep(self, base_url: str, level: int) -> None:
        self.calls.append(("sleep", base_url))
        await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with

    async def wake(self, base_url: str) -> None:
        self.calls.append(("wake", base_url))
        await self.gate.wait()


async def settle() -> None:
    for _ in range(30):
        await asyncio.sleep(0)
