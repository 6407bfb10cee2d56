"""Hung engines: the process is alive but does not answer. Found, stopped and reported.

A crash is seen at once (the process exits); a hang is not. Every `interval` the watchdog asks
each ready engine's health path, with a timeout; `failures` failed checks in a row mean the
engine is hung. vLLM's `/health` stays 200 while its engine core is stuck (the API server is a
separate process), so upstream read timeouts on real requests count as well: `failures` of them
in a row, with no answered request in between, mean the same. A hung engine is stopped and its
model marked failed (`ModelSupervisor.declare_hung`); the next request starts it again.

Requests ask for a check of their own (`check_now`) when their engine sent no first byte in
time or refused their connection: the engine is checked then, not at the next interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from modelyard.lifecycle import EngineHandle

log = logging.getLogger("modelyard.watchdog")

Probe = Callable[[EngineHandle, float], Awaitable[bool]]


class Watched(Protocol):
    """What the watchdog needs of the scheduler."""

    def ready_engines_by_key(self) -> dict[str, EngineHandle]: ...

    def engine_of(self, name: str) -> EngineHandle | None: ...  # a model's, or a replica key's

    async def declare_hung(self, model: str, pid: int, reason: str) -> bool: ...


@dataclass(frozen=True)
class WatchdogSettings:
    interval: float  # seconds between checks; 0 turns the periodic check off
    timeout: float  # a check slower than this failed
    failures: int  # this many failures in a row (checks, or request timeouts) mean hung


def health_probe(session: aiohttp.ClientSession) -> Probe:
    """A probe that GETs the engine's health path and wants a 200 within the timeout."""

    async def probe(engine: EngineHandle, timeout: float) -> bool:
        try:
            async with session.get(
                engine.base_url + engine.health_path,
                timeout=aiohttp.ClientTimeout(total=timeout),
                headers=engine.upstream_headers,
            ) as response:
                return response.status == 200
        except (TimeoutError, aiohttp.ClientError):
            return False

    return probe


@dataclass
class _Strikes:
    pid: int
    failed_checks: int = 0
    timeouts: int = 0


class EngineWatchdog:
    def __init__(
        self,
        scheduler: Watched,
        probe: Probe,
        settings: WatchdogSettings,
    ) -> None:
        self.settings = settings
        self._scheduler = scheduler
        self._probe = probe
        self._strikes: dict[str, _Strikes] = {}
        self._task: asyncio.Task[None] | None = None
        self._verdicts: set[asyncio.Task[bool]] = set()
        # One check at a time per engine: requests that ask together share its answer (and
        # it counts once toward the failures in a row).
        self._checking: dict[int, asyncio.Future[bool]] = {}

    def start(self) -> None:
        if self.settings.interval > 0:
            self._task = asyncio.create_task(self._check_forever())

    def reconfigure(self, settings: WatchdogSettings) -> None:
        """New settings from a config reload; an interval of 0 stops the periodic checks."""
        self.settings = settings
        if settings.interval <= 0 and self._task is not None:
            self._task.cancel()  # an interval of 0 must not become a busy loop
            self._task = None
        elif settings.interval > 0 and (self._task is None or self._task.done()):
            self.start()

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._verdicts, *self._checking.values()) if t]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task  # (a failed verdict was logged when it failed)

    async def _check_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.interval)
            try:
                await self.check_all()
            except Exception:  # pragma: no cover - the watchdog must outlive any one bug
                log.exception("engine health check failed")

    async def check_all(self) -> list[str]:
        """Check every ready engine once; returns the models declared hung."""
        ready = self._scheduler.ready_engines_by_key()  # each replica of a model too
        results = await asyncio.gather(*(self._check(n, e) for n, e in ready.items()))
        return [name for name, hung in zip(ready, results, strict=True) if hung]

    async def check_now(self, name: str, engine: EngineHandle) -> bool:
        """Check `engine` now, on a request's behalf; True if it answered its health check.
        `name` is the engine's key (the model's, or a replica's).

        The check counts like a periodic one: when its failure makes enough in a row, the
        engine is declared hung before this returns (its stop goes on in the background).
        An engine that is no longer the model's ready engine counts as not answering: it was
        lost or stopped meanwhile.
        """
        if not self._is_ready(name, engine):
            return False
        pending = self._checking.get(id(engine))
        if pending is None:
            pending = asyncio.ensure_future(self._check_for_request(name, engine))
            self._checking[id(engine)] = pending
            pending.add_done_callback(lambda _done: self._checking.pop(id(engine), None))
        return await asyncio.shield(pending)

    async def _check_for_request(self, name: str, engine: EngineHandle) -> bool:
        healthy = await self._probe(engine, self.settings.timeout)
        if not self._is_ready(name, engine):
            return False
        if self._count_check(name, engine, healthy):
            # The verdict's stop takes the engine's stop grace: the request does not wait
            # for it, only for the engine to be declared (no longer the model's engine).
            task = asyncio.ensure_future(self._declare_hung(name, engine.pid, self._why()))
            self._verdicts.add(task)
            task.add_done_callback(self._verdicts.discard)
            task.add_done_callback(_log_failure)
            while self._is_ready(name, engine) and not task.done():
                await asyncio.sleep(0.01)
        return healthy

    def _is_ready(self, name: str, engine: EngineHandle) -> bool:
        """Whether `engine` is still the ready engine of `name` (a slot a reload or a
        scale-down removed has none)."""
        try:
            return self._scheduler.engine_of(name) is engine
        except KeyError:
            return False

    def _count_check(self, name: str, engine: EngineHandle, healthy: bool) -> bool:
        """Count one check's answer; True when the failures in a row make it hung."""
        strikes = self._strikes_of(name, engine.pid)
        strikes.failed_checks = 0 if healthy else strikes.failed_checks + 1
        return strikes.failed_checks >= self.settings.failures

    def _why(self) -> str:
        return (
            f"{self.settings.failures} health checks in a row failed or took longer than "
            f"{self.settings.timeout:g}s"
        )

    async def _check(self, name: str, engine: EngineHandle) -> bool:
        healthy = await self._probe(engine, self.settings.timeout)
        if self._scheduler.engine_of(name) is not engine:
            return False  # stopped, slept or restarted while we asked: the answer is stale
        if not self._count_check(name, engine, healthy):
            return False
        return await self._declare_hung(
            name,
            engine.pid,
            self._why(),
        )

    def observe_request(self, model: str, status: int, timed_out: bool) -> None:
        """A proxied request ended: a read timeout is a strike, an engine answer clears them."""
        try:
            engine = self._scheduler.engine_of(model)
        except KeyError:
            return
        if engine is None:
            return
        strikes = self._strikes_of(model, engine.pid)
        if not timed_out:
            if status < 500:
                strikes.timeouts = 0
            return
        strikes.timeouts += 1
        if strikes.timeouts >= self.settings.failures:
            strikes.timeouts = 0
            reason = (
                f"{self.settings.failures} requests in a row got no answer within the upstream "
                "read timeout"
            )
            task = asyncio.ensure_future(self._declare_hung(model, engine.pid, reason))
            self._verdicts.add(task)
            task.add_done_callback(self._verdicts.discard)
            task.add_done_callback(_log_failure)

    def _strikes_of(self, model: str, pid: int) -> _Strikes:
        strikes = self._strikes.get(model)
        if strikes is None or strikes.pid != pid:  # a new engine starts with a clean slate
            strikes = self._strikes[model] = _Strikes(pid)
        return strikes

    async def _declare_hung(self, name: str, pid: int, reason: str) -> bool:
        log.error("model %s: engine is hung (%s); stopping it", name, reason)
        self._strikes.pop(name, None)
        return await self._scheduler.declare_hung(name, pid, reason)


def _log_failure(task: asyncio.Task[bool]) -> None:
    """A verdict that failed is logged, never lost silently."""
    if not task.cancelled() and task.exception() is not None:
        log.error("stopping a hung engine failed", exc_info=task.exception())
