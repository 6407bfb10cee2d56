"""One model's lifecycle, owned by exactly one object.

Every state change of a model happens here, in one coroutine at a time (`_operation`), so
callers never branch on a snapshot of the state: they ask `use()` for a ready engine and
get one, or a clear error (the lesson of llama-swap's `EnsureReady`). Concurrent first
requests share one start (single-flight).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from modelyard.engines.base import LaunchSpec, MemoryBudget
from modelyard.observability.events import EventBus
from modelyard.runtime.remote import RemoteEndpoint, RemoteUnavailable


class ModelState(enum.StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    SLEEPING = "sleeping"
    WAKING = "waking"
    STOPPING = "stopping"
    FAILED = "failed"


class EngineHandle(Protocol):
    """A running engine as the supervisor sees it (a process, or a fake in unit tests)."""

    base_url: str
    pid: int

    @property
    def exited(self) -> asyncio.Future[Any]: ...

    async def wait_ready(self, deadline: float) -> float: ...

    async def stop(self, grace: float) -> int | None: ...

    def log_tail(self, count: int) -> list[str]: ...

    @property
    def upstream_headers(self) -> dict[str, str]:
        """Headers every request to the engine carries (its own key, when it wants one)."""
        ...

    def process_gone(self) -> bool:
        """The OS says the process has exited (before the exit is reported to us)."""
        ...


class SleepControl(Protocol):
    """vLLM's sleep endpoints (`POST /sleep?level=N`, `POST /wake_up`) for one engine."""

    async def sleep(self, base_url: str, level: int) -> None: ...

    async def wake(self, base_url: str) -> None: ...


class EngineStarter(Protocol):
    async def __call__(
        self, name: str, spec_for_port: Callable[[int], LaunchSpec]
    ) -> EngineHandle: ...


class ModelUnavailable(Exception):
    """The model cannot serve now; the API turns this into 502/503 with details."""

    def __init__(
        self,
        message: str,
        status: int = 503,
        retry_after: float | None = None,
        log_tail: list[str] | None = None,
        code: str = "model_unavailable",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.log_tail = log_tail or []
        self.code = code


@dataclass
class Failure:
    message: str
    exit_code: int | None
    log_tail: list[str]
    at: float


@dataclass
class ModelTimings:
    """What was measured for this model, for placement's cost model and for status."""

    last_start_s: float | None = None
    last_wake_s: float | None = None
    starts: int = 0
    wakes: int = 0
    crashes: int = 0


@dataclass
class SupervisorSettings:
    idle_timeout: float
    start_timeout: float
    stop_grace: float
    # After this many seconds of serving, a crash no longer counts as part of a crash loop.
    stable_after: float = 30.0
    max_backoff: float = 60.0


Clock = Callable[[], float]


@dataclass
class Placement:
    """The hook through which placement (GPU memory) takes part in a start or wake."""

    prepare: Callable[[ModelSupervisor], Awaitable[MemoryBudget | None]] | None = None
    finished: Callable[[ModelSupervisor, bool], Awaitable[None]] | None = None
    # Told when a start failed for lack of GPU memory, before the one retry.
    out_of_memory: Callable[[ModelSupervisor], None] | None = None


@dataclass
class _Lease:
    supervisor: ModelSupervisor
    released: bool = field(default=False)


class ModelSupervisor:
    def __init__(
        self,
        name: str,
        spec_for: Callable[[int, MemoryBudget | None], LaunchSpec],
        start_engine: EngineStarter,
        settings: SupervisorSettings,
        events: EventBus,
        clock: Clock = time.monotonic,
        placement: Placement | None = None,
        sleep_control: SleepControl | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.state = ModelState.STOPPED
        self.engine: EngineHandle | None = None
        self.budget: MemoryBudget | None = None
        self.in_flight = 0
        self.waiting = 0
        self.last_used: float | None = None
        self.ready_since: float | None = None
        self.failure: Failure | None = None
        self.consecutive_failures = 0
        self.timings = ModelTimings()
        self.sleep_level = 0
        self._last_engine: EngineHandle | None = None
        self._background: asyncio.Future[None] | None = None
        self._spec_for = spec_for
        self._start_engine = start_engine
        self._events = events
        self._clock = clock
        self._placement = placement or Placement()
        self._sleep_control = sleep_control
        self._start_reason = "request"
        self._operation: asyncio.Task[None] | None = None
        self._drained = asyncio.Event()
        self._drained.set()
        self._expected_exit = False
        self._pending_config: (
            tuple[
                Callable[[int, MemoryBudget | None], LaunchSpec],
                Placement,
                SleepControl | None,
            ]
            | None
        ) = None

    def reconfigure(
        self,
        spec_for: Callable[[int, MemoryBudget | None], LaunchSpec],
        placement: Placement | None,
        sleep_control: SleepControl | None,
    ) -> None:
        """A reloaded configuration for this model, taken up by its next start: the running
        engine (if any) keeps the placement hook and sleep control it was started with, so its
        stop, sleep and wake still go where they must."""
        self._pending_config = (spec_for, placement or Placement(), sleep_control)
        if self.engine is None and self.state in (ModelState.STOPPED, ModelState.FAILED):
            self._take_pending_config()

    def _take_pending_config(self) -> None:
        if self._pending_config is not None:
            self._spec_for, self._placement, self._sleep_control = self._pending_config
            self._pending_config = None

    # ----- public: serving -----

    @contextlib.asynccontextmanager
    async def use(self, deadline: float) -> AsyncIterator[EngineHandle]:
        """Hold a ready engine for one request; the engine is not stopped while held."""
        engine = await self.ensure_ready(deadline)
        # No await between the state check in ensure_ready and this increment: a stop or
        # sleep decision made later sees the request in flight.
        self.in_flight += 1
        self._drained.clear()
        try:
            yield engine
        finally:
            self.in_flight -= 1
            self.last_used = self._clock()
            if self.in_flight == 0:
                self._drained.set()

    async def ensure_ready(self, deadline: float) -> EngineHandle:
        """Return the ready engine, starting or waking it if needed (one start for all)."""
        self.waiting += 1
        try:
            while True:
                if self.state is ModelState.READY and self.engine is not None:
                    return self.engine
                if self._operation is None or self._operation.done():
                    self._begin_needed_operation()
                operation = self._operation
                assert operation is not None
                remaining = deadline - self._clock()
                if remaining <= 0:
                    raise self._timeout_error()
                try:
                    await asyncio.wait_for(asyncio.shield(operation), remaining)
                except TimeoutError:
                    raise self._timeout_error() from None
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if operation.cancelled() and current is not None and not current.cancelling():
                        raise ModelUnavailable(
                            f"the start of model {self.name!r} was cancelled "
                            "(the gateway is shutting down)",
                            retry_after=5.0,
                            code="shutting_down",
                        ) from None
                    raise
                except ModelUnavailable:
                    raise
                except Exception as error:
                    # Every waiter of a failed start gets the same clear error.
                    failure = self.failure
                    if isinstance(error, RemoteUnavailable):
                        # A remote engine that is down: not a failed start, a 503 to retry.
                        raise ModelUnavailable(
                            str(error),
                            status=503,
                            retry_after=error.retry_after,
                            log_tail=error.log_tail,
                            code=error.code,
                        ) from error
                    raise ModelUnavailable(
                        f"model {self.name!r} failed to start: {error}",
                        status=502,
                        log_tail=failure.log_tail if failure else [],
                        code="engine_start_failed",
                    ) from error
        finally:
            self.waiting -= 1

    def _begin_needed_operation(self) -> None:
        if self.state is ModelState.SLEEPING:
            self._operation = asyncio.create_task(self._wake())
        elif self.state in (ModelState.STOPPED, ModelState.FAILED):
            wait = self.backoff_remaining()
            if wait > 0:
                assert self.failure is not None
                raise ModelUnavailable(
                    f"model {self.name!r} is crash-looping ({self.consecutive_failures} failures "
                    f"in a row); next start in {wait:.0f}s. Last error: {self.failure.message}",
                    status=503,
                    retry_after=wait,
                    log_tail=self.failure.log_tail,
                    code="engine_crash_loop",
                )
            self._operation = asyncio.create_task(self._start())
        else:  # pragma: no cover - READY returns earlier; transitional states have an operation
            raise AssertionError(f"no operation for state {self.state}")

    def backoff_remaining(self) -> float:
        """Seconds until a crash-looping model may start again (0 when it may start now)."""
        if self.failure is None or self.consecutive_failures < 2:
            return 0.0
        backoff = min(2.0 ** (self.consecutive_failures - 2), self.settings.max_backoff)
        return max(0.0, self.failure.at + backoff - self._clock())

    def _timeout_error(self) -> ModelUnavailable:
        return ModelUnavailable(
            f"model {self.name!r} was not ready within {self.settings.start_timeout:.0f}s "
            f"(state: {self.state}); try again shortly",
            status=503,
            retry_after=5.0,
            code="start_timeout",
        )

    # ----- public: lifecycle commands (idle timer, eviction, admin, shutdown) -----

    def idle_for(self, now: float) -> float | None:
        """Seconds this model has been ready with nothing in flight; None if not idle."""
        if self.state is not ModelState.READY or self.in_flight or self.waiting:
            return None
        since = self.last_used if self.last_used is not None else self.ready_since
        return None if since is None else now - since

    async def drained(self) -> None:
        await self._drained.wait()

    async def load(self, deadline: float, reason: str) -> None:
        """Start (or wake) the engine without a request, e.g. from the admin API."""
        self._start_reason = reason
        try:
            await self.ensure_ready(deadline)
        finally:
            self._start_reason = "request"

    async def stop(self, reason: str, if_idle: bool = False, drain: bool = True) -> bool:
        """Stop the engine (after any operation in progress). Returns whether it stopped.

        With `if_idle`, the stop is abandoned when a request arrived meanwhile: the idle
        timer must never stop an engine with requests in flight.
        """
        stopped = False

        async def run() -> None:
            nonlocal stopped
            stopped = await self._stop(reason, if_idle, drain)

        await self._run_exclusive(run)
        return stopped

    @property
    def can_sleep(self) -> bool:
        return self._sleep_control is not None

    async def sleep(self, level: int, reason: str) -> bool:
        """Put the ready engine to sleep (drains first). Returns whether it sleeps now."""
        done = False

        async def run() -> None:
            nonlocal done
            done = await self._sleep(level, reason)

        await self._run_exclusive(run)
        return done

    def cancel_start(self) -> None:
        """Abandon a start or wake in progress (gateway shutdown); its engine is stopped."""
        if (
            self._operation is not None
            and not self._operation.done()
            and self.state in (ModelState.STARTING, ModelState.WAKING)
        ):
            self._operation.cancel()

    async def _run_exclusive(self, make: Callable[[], Awaitable[None]]) -> None:
        while self._operation is not None and not self._operation.done():
            operation = self._operation
            try:
                await asyncio.shield(operation)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if not operation.cancelled() or (current is not None and current.cancelling()):
                    raise  # we were cancelled ourselves, not the operation we waited for
            except Exception:
                pass
        self._operation = asyncio.ensure_future(make())
        await asyncio.shield(self._operation)

    # ----- operations: each runs as the single `_operation` task -----

    @property
    def last_log_tail(self) -> list[str]:
        """The output of the current engine, or of the last one once it is gone."""
        engine = self.engine or self._last_engine
        if engine is not None:
            return engine.log_tail(1000)
        return self.failure.log_tail if self.failure else []

    def launch_spec_for(self, port: int, budget: MemoryBudget | None) -> LaunchSpec:
        return self._spec_for(port, budget)

    async def _start(self) -> None:
        try:
            await self._start_once()
        except Exception:
            tail = self.failure.log_tail if self.failure else []
            if self._placement.out_of_memory is None or not _looks_out_of_memory(tail):
                raise
            # vLLM sized itself on memory that was not really free (an estimate was low, or
            # another program grew): make more room and try once more.
            self._placement.out_of_memory(self)
            self._events.emit(
                "oom_retry",
                self.name,
                "engine ran out of GPU memory while starting; evicting more and retrying once",
            )
            await self._start_once()

    async def _start_once(self) -> None:
        self._take_pending_config()  # no engine now: a reloaded configuration applies
        self.state = ModelState.STARTING
        self.failure = None
        started = self._clock()
        self._events.emit("start", self.name, self._start_reason)
        engine: EngineHandle | None = None
        ok = False
        try:
            if self._placement.prepare is not None:
                self.budget = await self._placement.prepare(self)
            engine = await self._start_engine(
                self.name, lambda port: self._spec_for(port, self.budget)
            )
            self.engine = engine
            self._last_engine = engine
            self._expected_exit = False
            engine.exited.add_done_callback(self._exit_callback(engine))
            await engine.wait_ready(started + self.settings.start_timeout)
            ok = True
        except BaseException as error:
            await self._record_failed_start(engine, error, started)
            raise
        finally:
            if self._placement.finished is not None:
                await self._placement.finished(self, ok)
        took = self._clock() - started
        self.timings.last_start_s = took
        self.timings.starts += 1
        self.state = ModelState.READY
        self.ready_since = self._clock()
        self._events.emit("ready", self.name, "started", took, port=_port_of(engine))

    async def _record_failed_start(
        self, engine: EngineHandle | None, error: BaseException, started: float
    ) -> None:
        self.engine = None
        if engine is not None:
            self._expected_exit = True
            with contextlib.suppress(Exception):
                await engine.stop(self.settings.stop_grace)
        if isinstance(error, asyncio.CancelledError):
            self.state = ModelState.STOPPED
            return
        exit_code = getattr(error, "exit_code", None)
        tail = list(getattr(error, "log_tail", None) or (engine.log_tail(20) if engine else []))
        self.failure = Failure(str(error), exit_code, tail, self._clock())
        if not isinstance(error, RemoteUnavailable):
            # A remote engine that is down is not a crash loop of ours: no back-off, the
            # next request checks it again.
            self.consecutive_failures += 1
        self.state = ModelState.FAILED
        self._events.emit(
            "start_failed",
            self.name,
            str(error),
            self._clock() - started,
            exit_code=exit_code,
            log_tail=tail[-10:],
        )

    async def _wake(self) -> None:
        engine = self.engine
        assert engine is not None
        assert self._sleep_control is not None
        self.state = ModelState.WAKING
        began = self._clock()
        ok = False
        try:
            if self._placement.prepare is not None:
                self.budget = await self._placement.prepare(self)
            await self._sleep_control.wake(engine.base_url)
            ok = True
        except BaseException as error:
            self._events.emit("wake_failed", self.name, str(error))
            self._expected_exit = True
            with contextlib.suppress(Exception):
                await engine.stop(self.settings.stop_grace)
            self.engine = None
            self.failure = Failure(
                f"wake failed: {error}", None, engine.log_tail(20), self._clock()
            )
            self.state = ModelState.FAILED
            raise
        finally:
            if self._placement.finished is not None:
                await self._placement.finished(self, ok)
        took = self._clock() - began
        self.timings.last_wake_s = took
        self.timings.wakes += 1
        self.state = ModelState.READY
        self.ready_since = self._clock()
        self._events.emit("wake", self.name, self._start_reason, took)

    async def _stop(self, reason: str, if_idle: bool = False, drain: bool = True) -> bool:
        engine = self.engine
        if if_idle and (self.in_flight or self.waiting or self.state is not ModelState.READY):
            return False
        if engine is None or self.state in (ModelState.STOPPED, ModelState.FAILED):
            if self.state is not ModelState.FAILED:
                self.state = ModelState.STOPPED
            return False
        if drain and self.in_flight and self.state is ModelState.READY:
            # New requests wait for this operation instead of joining the engine we stop.
            self.state = ModelState.DRAINING
            await self._drained.wait()
        self.state = ModelState.STOPPING
        self._expected_exit = True
        began = self._clock()
        code = await engine.stop(self.settings.stop_grace)
        self.engine = None
        self.budget = None
        self.ready_since = None
        self.state = ModelState.STOPPED
        self._events.emit("stop", self.name, reason, self._clock() - began, exit_code=code)
        if self._placement.finished is not None:
            await self._placement.finished(self, False)
        return True

    async def _sleep(self, level: int, reason: str) -> bool:
        if self.state is not ModelState.READY or self.engine is None:
            return False
        if self._sleep_control is None:
            raise ModelUnavailable(
                f"model {self.name!r} cannot sleep (set 'sleep: 1' or 2)",
                status=409,
                code="sleep_unsupported",
            )
        # vLLM's /sleep aborts requests in flight: wait for them to finish first. Requests
        # that arrive meanwhile wait on this operation and are served after the wake.
        self.state = ModelState.DRAINING
        await self._drained.wait()
        began = self._clock()
        engine = self.engine
        self.state = ModelState.SLEEPING
        try:
            await self._sleep_control.sleep(engine.base_url, level)
        except BaseException:
            self.state = ModelState.READY  # it did not sleep; it still serves
            raise
        self.sleep_level = level
        self._events.emit("sleep", self.name, reason, self._clock() - began, level=level)
        if self._placement.finished is not None:
            await self._placement.finished(self, False)
        return True

    def _record_engine_lost(
        self, message: str, code: int | None, tail: list[str], crash: bool = True
    ) -> None:
        """The engine is gone without our asking (a crash, or stopped as hung): mark the model
        failed, counting toward a crash loop unless the engine had served stably first (or
        it is a remote server that stopped answering: not a crash of ours)."""
        if crash:
            serving_for = self._clock() - (self.ready_since or self._clock())
            if serving_for >= self.settings.stable_after:
                self.consecutive_failures = 0
            self.consecutive_failures += 1
            self.timings.crashes += 1
        self.engine = None
        self.budget = None
        self.ready_since = None
        self.failure = Failure(message, code, tail, self._clock())
        self.state = ModelState.FAILED

    def _exit_callback(self, engine: EngineHandle) -> Callable[[asyncio.Future[Any]], None]:
        return lambda _future: self._on_exit(engine)

    def _on_exit(self, engine: EngineHandle) -> None:
        if engine is not self.engine or self._expected_exit:
            return
        if self.state in (ModelState.STARTING,):
            return  # wait_ready sees the exit and reports it with the start error
        code = _exit_code(engine)
        tail = engine.log_tail(20)
        self._record_engine_lost(
            f"engine for {self.name!r} exited unexpectedly (exit code {code})", code, tail
        )
        assert self.failure is not None
        self._events.emit(
            "crash",
            self.name,
            self.failure.message,
            exit_code=code,
            log_tail=tail[-10:],
            in_flight=self.in_flight,
        )
        if self._placement.finished is not None:
            self._background = asyncio.ensure_future(self._placement.finished(self, False))

    async def declare_hung(self, reason: str) -> bool:
        """Stop a ready engine that no longer answers and mark the model failed, like a crash
        (the watchdog's verdict). Returns whether it was stopped; the next request restarts it."""
        stopped = False

        async def run() -> None:
            nonlocal stopped
            engine = self.engine
            if self.state is not ModelState.READY or engine is None:
                return  # it changed meanwhile: stopped, slept or already restarted
            self.state = ModelState.STOPPING
            self._expected_exit = True
            # No drain: requests in flight are stuck on this engine and end with its exit.
            code = await engine.stop(self.settings.stop_grace)
            tail = engine.log_tail(20)
            if isinstance(engine, RemoteEndpoint):
                # Not ours, so not a crash (no back-off): forgotten until it answers again.
                self._record_engine_lost(
                    f"remote engine for {self.name!r} is not answering: {reason}",
                    None,
                    tail,
                    crash=False,
                )
                self._events.emit("remote_down", self.name, reason)
            else:
                self._record_engine_lost(
                    f"engine for {self.name!r} was hung and has been stopped: {reason}",
                    code,
                    tail,
                )
                self._events.emit(
                    "hung", self.name, reason, exit_code=code, log_tail=tail[-10:], pid=engine.pid
                )
            if self._placement.finished is not None:
                await self._placement.finished(self, False)
            stopped = True

        await self._run_exclusive(run)
        return stopped

    async def notice_exit(self, timeout: float) -> None:
        """After a broken upstream connection: if the engine is dying, wait (briefly) until
        its exit is recorded, so the client's error carries the exit code and the log.

        The kernel closes a killed process's sockets before the process is reaped, so the
        gateway can see the reset first; a live engine is given up on after 0.2 s.
        """
        engine = self.engine
        if engine is None:
            return
        loop = asyncio.get_running_loop()
        deadline, still_alive_after = loop.time() + timeout, loop.time() + 0.2
        while not engine.exited.done() and loop.time() < deadline:
            if loop.time() > still_alive_after and not engine.process_gone():
                return
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)  # the exit callback runs on the next loop turn

    def mark_serving_healthy(self) -> None:
        """A request succeeded: a later crash starts a new count once the engine was stable."""
        if (
            self.consecutive_failures
            and self.ready_since is not None
            and self._clock() - self.ready_since >= self.settings.stable_after
        ):
            self.consecutive_failures = 0


_OOM_MARKERS = (
    "out of memory",
    "outofmemoryerror",
    "cuda error: out of memory",
    "not enough memory",
    "insufficient memory",
)


def _looks_out_of_memory(log_tail: list[str]) -> bool:
    text = "\n".join(log_tail).lower()
    return any(marker in text for marker in _OOM_MARKERS)


def _exit_code(engine: EngineHandle) -> int | None:
    result = engine.exited.result() if engine.exited.done() else None
    return getattr(result, "code", None)


def _port_of(engine: EngineHandle | None) -> int | None:
    return getattr(engine, "port", None)
