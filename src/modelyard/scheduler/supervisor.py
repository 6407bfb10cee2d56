"""One model's lifecycle, owned by exactly one object.

Every state change of a model happens here, in one coroutine at a time (`_operation`), so
callers never branch on a snapshot of the state: they ask `use()` for a ready engine and
get one, or a clear error (the lesson of llama-swap's `EnsureReady`). Concurrent first
requests share one start (single-flight).

It decides nothing across models: when nothing is under way to make its engine ready, it says
so, and the scheduler decides where the engine goes and begins its start or wake (`begin`,
`placing_start` or `placing_wake`, then `start(budget)` or `wake(budget)`). What happened to
the engine it reports to a `ResidencyBook` (lifecycle.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelyard.engines.base import LaunchSpec, MemoryBudget
from modelyard.lifecycle import (
    EngineHandle,
    EngineStarter,
    ModelState,
    ModelTimings,
    ResidencyBook,
    SleepControl,
    check_transition,
)
from modelyard.observability.events import EventBus
from modelyard.runtime.process import EngineStartError, ExitInfo
from modelyard.runtime.remote import RemoteUnavailable
from modelyard.runtime.start_progress import Phase, ProgressView, StartProgress
from modelyard.runtime.weights_cache import folder_bytes

log = logging.getLogger("modelyard.supervisor")

__all__ = [  # the lifecycle's types, re-exported for the callers that import them from here
    "EngineHandle",
    "EngineStarter",
    "ModelState",
    "ModelTimings",
    "SleepControl",
]


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


class Refused(ModelUnavailable):
    """The scheduler said no (no room, or no room before the deadline): always 503 with
    `Retry-After`, and never an engine failure (no crash-loop count, no failed start)."""

    def __init__(self, message: str, retry_after: float, code: str) -> None:
        super().__init__(message, status=503, retry_after=retry_after, code=code)


@dataclass
class Failure:
    message: str
    exit_code: int | None
    log_tail: list[str]
    at: float


@dataclass
class SupervisorSettings:
    idle_timeout: float
    start_timeout: float
    stop_grace: float
    # After this many seconds of serving, a crash no longer counts as part of a crash loop.
    stable_after: float = 30.0
    max_backoff: float = 60.0
    # A start that progresses may run past start_timeout, never past this (start_progress.py).
    start_timeout_max: float = 3600.0
    # The hub cache folder a first start downloads into: its growth is progress.
    weights_folder: Path | None = None


# How often a starting engine's download folder is measured.
CACHE_POLL_S = 2.0
# Waiters of a start that progresses wait this much past its deadline for its own verdict.
WAITER_MARGIN_S = 1.0


Clock = Callable[[], float]


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
        book: ResidencyBook | None = None,
        sleep_control: SleepControl | None = None,
    ) -> None:
        self.name = name
        # The engine's identity for placement and evictions: the model's name while it is
        # configured, a name of its own once a reload removed the model and it drains, so a
        # re-added model of that name is a different engine, and the old one's stop never
        # touches the new one's records.
        self.key = name
        # The engine's log file's name: the model's for its own engine, a replica's key for
        # a replica (kept when a reload renames a draining engine's key).
        self.log_name = name
        self.settings = settings
        self._on_change: Callable[[], None] = lambda: None
        self._state = ModelState.STOPPED
        self.engine: EngineHandle | None = None
        self.budget: MemoryBudget | None = None
        self.in_flight = 0
        self.waiting = 0
        self.last_used: float | None = None
        self.ready_since: float | None = None
        self.failure: Failure | None = None
        # Back-off counts failures in a row, so an engine that fails now and then is never
        # refused as crash-looping: a good start ends a run of failed starts; a crash counts
        # until the engine has served stably. A config change for the engine ends both.
        self.failed_starts = 0
        self.quick_crashes = 0
        self.timings = ModelTimings()
        self.sleep_level = 0
        self._last_engine: EngineHandle | None = None
        # Completes (with the reason) when the current engine is lost or gone: its exit, or
        # the moment the watchdog declares it hung or a remote down, before the slow stop.
        # The requests holding the engine race their exchange against it.
        self.lost_signal: asyncio.Future[str] | None = None
        self._background: asyncio.Future[None] | None = None
        self._spec_for = spec_for
        self._start_engine = start_engine
        self._events = events
        self._clock = clock
        self._book = book
        self._sleep_control = sleep_control
        self._start_reason = "request"
        self._operation: asyncio.Task[None] | None = None
        self._drained = asyncio.Event()
        self._drained.set()
        self._expected_exit = False
        self._pending_config: (
            tuple[
                Callable[[int, MemoryBudget | None], LaunchSpec],
                ResidencyBook | None,
                SleepControl | None,
            ]
            | None
        ) = None
        self._deadlines: list[float] = []  # of the requests waiting now
        self._launched_at: float | None = None  # when the start or wake really began
        # True while a start or wake waits for the scheduler's go: it holds nothing yet.
        self.placing = False
        self.progress: StartProgress | None = None  # of the start in progress, if any
        self._state_changed = asyncio.Event()  # replaced at each change of state
        self.stopping_asleep = False  # STOPPING from SLEEPING: it holds its asleep size
        self._gave_way = False  # its start was cancelled for another model's request
        # Reloads that changed the engine, and the one the current engine was started under.
        self._config_version = 0
        self._engine_version = 0

    # ----- state, observed by the scheduler -----

    @property
    def state(self) -> ModelState:
        return self._state

    @state.setter
    def state(self, value: ModelState) -> None:
        check_transition(self.name, self._state, value)
        self._state = value
        self._state_changed.set()
        self._state_changed = asyncio.Event()
        self._on_change()

    @property
    def demand(self) -> int:
        """Requests that hold or want this engine, for planning: an engine with any is busy
        and never evicted. A wake waiting for room counts too, even if its requests left:
        evicting it would wait on that wake while the wake waits for the evictor."""
        return self.in_flight + self.waiting + (1 if self.placing else 0)

    def on_change(self, callback: Callable[[], None]) -> None:
        """Called on every state change and every request end (the scheduler's events)."""
        self._on_change = callback

    def wait_deadline(self) -> float:
        """Until when the requests waiting now may wait (the latest of their deadlines)."""
        return max(self._deadlines, default=self._clock() + self.settings.start_timeout)

    @property
    def consecutive_failures(self) -> int:
        """Failures in a row, for the back-off: failed starts since the last good one, and
        crashes since the engine last served stably."""
        return self.failed_starts + self.quick_crashes

    def forget_failures(self) -> None:
        """The engine's configuration changed: its old failures say nothing of the new one."""
        self.failed_starts = self.quick_crashes = 0

    def reconfigure(
        self,
        spec_for: Callable[[int, MemoryBudget | None], LaunchSpec],
        book: ResidencyBook | None,
        sleep_control: SleepControl | None,
    ) -> None:
        """A reloaded configuration for this model, taken up by its next start: the running
        engine (if any) keeps the residency book and sleep control it was started with, so its
        stop, sleep and wake still go where they must."""
        self._pending_config = (spec_for, book, sleep_control)
        if self.engine is None and self.state in (ModelState.STOPPED, ModelState.FAILED):
            self._take_pending_config()

    def engine_config_changed(self) -> None:
        """A reload changed this model's engine: requests from now on are for an engine with
        the new configuration, not for one that was started (or is starting) with the old."""
        self._config_version += 1
        self.forget_failures()

    @property
    def _stale(self) -> bool:
        return self._engine_version < self._config_version

    def _take_pending_config(self) -> None:
        if self._pending_config is not None:
            self._spec_for, self._book, self._sleep_control = self._pending_config
            self._pending_config = None
        self._engine_version = self._config_version

    # ----- public: serving -----

    async def hold(self, deadline: float) -> EngineHandle | None:
        """Hold a ready engine for one request, until `let_go`; it is not stopped while held.
        None, holding nothing: as `ensure_ready`, the caller must begin a start or wake first.

        A ready engine is taken with no await and without passing through the waiters: on
        every request's path, and nothing can look at the counts in between.
        """
        engine = self.engine
        if self.state is not ModelState.READY or engine is None or self._stale:
            engine = await self.ensure_ready(deadline)
            if engine is None:
                return None
        # No await between the state check (here or in ensure_ready) and this increment: a
        # stop or sleep decision made later sees the request in flight.
        self.in_flight += 1
        self._drained.clear()
        return engine

    def let_go(self) -> None:
        """One request that held the engine has ended."""
        self.in_flight -= 1
        self.last_used = self._clock()
        if self.in_flight == 0:
            self._drained.set()
        if self.demand == 0:
            # The engine is idle now: a drain someone waits for is over. (Plans only ask
            # whether an engine is busy, so other request ends change no decision.)
            self._on_change()

    async def ensure_ready(self, deadline: float) -> EngineHandle | None:
        """Return the ready engine once the start or wake under way made it ready (one start
        for all). None when nothing under way would make it ready (it is stopped, failed or
        asleep): where it goes is not the supervisor's to decide, so the caller decides, begins
        the start or wake (`begin`), and calls again.

        `deadline` bounds the wait for room (the request's start timeout from when it
        arrived); once its engine really starts, the request waits up to a full start timeout
        from then, so time spent queued behind other models is not taken from the start.
        """
        self.waiting += 1
        self._deadlines.append(deadline)
        wanted = self._config_version  # the configuration this request was resolved under
        handed_back = False
        try:
            while True:
                if self.state is ModelState.READY and self.engine is not None:
                    if self._engine_version >= wanted:
                        return self.engine
                    # Started under a configuration a reload has replaced: served by it, such
                    # a request would get a 404 for the new served name. The reload's
                    # stop-and-start serves it. Wait for a change.
                    changed = self._state_changed
                    remaining = self._effective_deadline(deadline) - self._clock()
                    if remaining <= 0:
                        raise self._timeout_error()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), remaining)
                    continue
                if self._operation is None or self._operation.done():
                    self._check_may_start()
                    handed_back = True
                    return None
                operation = self._operation
                assert operation is not None
                remaining = self._effective_deadline(deadline) - self._clock()
                if remaining <= 0:
                    raise self._timeout_error()
                try:
                    # asyncio.wait never cancels what it waits for: the start goes on for
                    # the other waiters if this one gives up or is cancelled.
                    done, _ = await asyncio.wait({operation}, timeout=remaining)
                    if not done:
                        continue  # the deadline may have moved (the start began): look again
                    operation.result()
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if operation.cancelled() and current is not None and not current.cancelling():
                        if self._gave_way:
                            # A request that came while a cancelled pre-warm stops: a retry
                            # in a moment starts it afresh.
                            raise ModelUnavailable(
                                f"the pre-warm of model {self.name!r} gave way to another "
                                "model's request as this one came; retry",
                                retry_after=1.0,
                                code="prewarm_cancelled",
                            ) from None
                        raise ModelUnavailable(
                            f"the start of model {self.name!r} was cancelled "
                            "(the gateway is shutting down)",
                            retry_after=5.0,
                            code="shutting_down",
                        ) from None
                    raise
                except ModelUnavailable:
                    raise
                except RemoteUnavailable as error:
                    # A remote engine that is down: not a failed start, a 503 to retry.
                    raise ModelUnavailable(
                        str(error),
                        status=503,
                        retry_after=error.retry_after,
                        log_tail=error.log_tail,
                        code=error.code,
                    ) from error
                except Exception as error:
                    raise self._start_failed_error(error) from error
        finally:
            self.waiting -= 1
            self._deadlines.remove(deadline)
            # Handed back, the waiter comes again as soon as its start or wake is begun.
            if self.demand == 0 and not handed_back:
                self._on_change()  # its last waiter left: it may be evicted now

    def _effective_deadline(self, deadline: float) -> float:
        if self._launched_at is not None and self.state in (
            ModelState.STARTING,
            ModelState.WAKING,
        ):
            if self.progress is not None and self.state is ModelState.STARTING:
                # A start that progresses keeps its waiters (the deadline moves with it); the
                # margin lets the start's own failure, which says why, reach them first.
                return max(deadline, self.progress.deadline() + WAITER_MARGIN_S)
            return max(deadline, self._launched_at + self.settings.start_timeout)
        return deadline

    def start_view(self) -> ProgressView | None:
        """The phase and progress of the start in progress (None when not starting)."""
        if self.progress is None or self.state is not ModelState.STARTING:
            return None
        return self.progress.view(self._clock())

    def _start_failed_error(self, error: Exception) -> ModelUnavailable:
        """What every waiter of a failed start gets: a clear error, always with Retry-After."""
        failure = self.failure
        tail = failure.log_tail if failure else []
        retry = max(1.0, self.backoff_remaining() or self.timings.last_start_s or 5.0)
        if isinstance(error, EngineStartError) and error.timed_out:
            # Alive but never ready: the engine did not fail, it ran out of time (503).
            return ModelUnavailable(
                f"model {self.name!r} was not ready within {self.settings.start_timeout:.0f}s: "
                f"{error}; try again shortly",
                status=503,
                retry_after=retry,
                log_tail=tail,
                code="start_timeout",
            )
        return ModelUnavailable(
            f"model {self.name!r} failed to start: {error}",
            status=502,
            retry_after=retry,
            log_tail=tail,
            code="engine_start_failed",
        )

    def _check_may_start(self) -> None:
        """Nothing is under way: raise when no start may be begun now (a crash loop's
        back-off)."""
        if self.state is ModelState.SLEEPING:
            return  # a wake
        if self.state in (ModelState.STOPPED, ModelState.FAILED):
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
        else:
            # Only reachable if the state and the engine disagree (READY without an engine):
            # the engine is gone, so record it as lost (and start afresh) rather than fail
            # every request.
            self._record_engine_lost(
                f"engine for {self.name!r} is gone (state was {self.state})", None, []
            )

    def begin(self, operation: Coroutine[Any, Any, None]) -> None:
        """Run the start or wake that `ensure_ready` asked its caller for, as this model's one
        operation: its waiters share it, and stops and sleeps wait for it to end."""
        assert self._operation is None or self._operation.done(), "an operation is under way"
        self._operation = _observed(asyncio.create_task(operation))

    def backoff_remaining(self) -> float:
        """Seconds until a crash-looping model may start again (0 when it may start now)."""
        if self.failure is None or self.consecutive_failures < 2:
            return 0.0
        backoff = min(2.0 ** (self.consecutive_failures - 2), self.settings.max_backoff)
        return max(0.0, self.failure.at + backoff - self._clock())

    def _timeout_error(self) -> ModelUnavailable:
        retry = max(1.0, round(self.timings.last_start_s or 5.0))
        what = "waiting for room to start" if self.placing else f"state: {self.state}"
        progress = self.progress
        if progress is not None and self.state is ModelState.STARTING:
            # The start is being given up (no progress, or start_timeout_max): say why.
            what = progress.failure_message(self._clock())
        return ModelUnavailable(
            f"model {self.name!r} was not ready within {self.settings.start_timeout:.0f}s "
            f"({what}); try again shortly",
            status=503,
            retry_after=retry,
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

    async def load(self, deadline: float, reason: str) -> EngineHandle | None:
        """Wait for the engine without a request, e.g. from the admin API, with `reason` for
        its start or wake; None as from `ensure_ready`."""
        self._start_reason = reason
        try:
            return await self.ensure_ready(deadline)
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

    def cancel_prewarm(self) -> bool:
        """Abandon a cold start nobody waits for (a pre-warm a real request must go before:
        the core never cancels one a request came for); whether it was cancelled. Its engine
        is STOPPING at once, no longer a start: the GPU's start slot is free for the real
        request while the stop runs (the memory comes back when the process is gone). A wake
        is left to finish: it takes 1-3 s, less than the stop, and a cancelled wake would
        lose the sleeping engine."""
        if self.state is not ModelState.STARTING:
            return False
        self._gave_way = True
        self.cancel_start()
        return True

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

    @property
    def ran_out_of_memory(self) -> bool:
        """The last failure's log says the engine ran out of GPU memory."""
        return self._failure_log_says(_OOM_MARKERS)

    @property
    def port_was_taken(self) -> bool:
        """The last start failed because another program took the engine's port first."""
        return self._failure_log_says(_PORT_TAKEN_MARKERS)

    def _failure_log_says(self, markers: tuple[str, ...]) -> bool:
        """The last failure's log lines hold one of `markers` (lower case)."""
        text = "\n".join(self.failure.log_tail if self.failure else []).lower()
        return any(marker in text for marker in markers)

    @contextlib.contextmanager
    def placing_start(self) -> Iterator[None]:
        """Starting, while the caller decides where (and may refuse): it holds nothing yet.
        A refusal, or a shutdown, launched nothing: the model is as it was, and a failed
        model keeps its failure."""
        self._take_pending_config()  # no engine now: a reloaded configuration applies
        self._gave_way = False
        before = self.state
        self._launched_at = None
        self.placing = True
        self.state = ModelState.STARTING
        try:
            yield
        except BaseException:
            self.placing = False
            self.state = before if before is ModelState.FAILED else ModelState.STOPPED
            raise
        self.placing = False

    async def start(self, budget: MemoryBudget | None) -> None:
        """Launch the engine within `budget` (after `placing_start`) and wait until it is
        ready."""
        assert self.state is ModelState.STARTING, self.state
        self.budget = budget
        self.failure = None
        started = self._clock()
        self._launched_at = started
        self._events.emit("start", self.name, self._start_reason)
        engine: EngineHandle | None = None
        ok = False
        try:
            engine = await self._start_engine(
                self.name,
                lambda port: dataclasses.replace(
                    self._spec_for(port, self.budget), log_name=self.log_name
                ),
            )
            self.engine = engine
            self._last_engine = engine
            self._expected_exit = False
            self.lost_signal = _loss_signal(engine)
            engine.exited.add_done_callback(self._exit_callback(engine))
            await self._wait_ready(engine, started)
            ok = True
        except BaseException as error:
            await self._record_failed_start(engine, error, started)
            raise
        finally:
            await self._bookkeep(ok)
        took = self._clock() - started
        self.timings.last_start_s = took
        self.timings.starts += 1
        self.failed_starts = 0  # a good start ends a run of failed ones
        self.state = ModelState.READY
        self.ready_since = self._clock()
        self._events.emit("ready", self.name, "started", took, port=engine.port)

    async def _wait_ready(self, engine: EngineHandle, started: float) -> None:
        """Wait while the start progresses: no progress for start_timeout is a hang, and no
        start outlives start_timeout_max (runtime/start_progress.py)."""
        settings = self.settings
        progress = StartProgress(started, settings.start_timeout, settings.start_timeout_max)
        self.progress = progress
        phase = progress.phase

        def on_line(line: str) -> None:
            nonlocal phase
            progress.observe_line(line, self._clock())
            if progress.phase is not phase and progress.phase is not Phase.READY:
                phase = progress.phase  # (ready is its own event, once health answers)
                view = progress.view(self._clock())
                self._events.emit(
                    "start_progress",
                    self.name,
                    view.describe(),
                    view.elapsed_s,
                    phase=view.phase.label,
                    fraction=view.fraction,
                )

        unsubscribe = engine.subscribe_log(on_line)
        watch = _observed(asyncio.create_task(self._watch_download(progress)))
        try:
            while True:
                try:
                    await engine.wait_ready(progress.deadline())
                    return
                except EngineStartError as error:
                    now = self._clock()
                    if not error.timed_out or not progress.verdict(now).keep:
                        if error.timed_out:
                            error.args = (progress.failure_message(now),)
                        raise
                    # It progressed since: the deadline moved on, and so does the wait.
        finally:
            unsubscribe()
            watch.cancel()

    async def _watch_download(self, progress: StartProgress) -> None:
        folder = self.settings.weights_folder
        if folder is None:
            return
        while True:
            size = await asyncio.to_thread(folder_bytes, folder)
            progress.observe_cache_bytes(size, self._clock())
            await asyncio.sleep(CACHE_POLL_S)

    async def _record_failed_start(
        self, engine: EngineHandle | None, error: BaseException, started: float
    ) -> None:
        self.engine = None
        if engine is not None:
            self._expected_exit = True
            if isinstance(error, asyncio.CancelledError):
                # No longer starting (the start slot is free), but it holds memory until gone.
                self.state = ModelState.STOPPING
            with contextlib.suppress(Exception):
                await engine.stop(self.settings.stop_grace)
        if isinstance(error, asyncio.CancelledError):
            self.state = ModelState.STOPPED
            return
        exit_code = error.exit_code if isinstance(error, EngineStartError) else None
        tail = error.log_tail if isinstance(error, EngineStartError) else []
        tail = list(tail or (engine.log_tail(20) if engine else []))
        self.failure = Failure(str(error), exit_code, tail, self._clock())
        node_lost = isinstance(error, EngineStartError) and error.node_lost
        if not isinstance(error, RemoteUnavailable) and not node_lost:
            # A remote engine that is down is not a crash loop of ours: no back-off, the
            # next request checks it again. Nor is a start whose node was lost under it.
            self.failed_starts += 1
        self.state = ModelState.FAILED
        self._events.emit(
            "start_failed",
            self.name,
            str(error),
            self._clock() - started,
            exit_code=exit_code,
            log_tail=tail[-10:],
        )

    @contextlib.contextmanager
    def placing_wake(self) -> Iterator[None]:
        """Asleep, while the caller decides where it wakes (and may refuse). It stays
        SLEEPING, counted at its asleep size, until room is made; a refusal leaves it asleep,
        so the next try is a wake, not a cold start."""
        assert self.engine is not None
        assert self._sleep_control is not None
        self.placing = True
        try:
            yield
        finally:
            self.placing = False

    async def wake(self, budget: MemoryBudget | None) -> None:
        """Wake the engine within `budget` (after `placing_wake`)."""
        self.budget = budget
        engine = self.engine
        if engine is None or self.state is not ModelState.SLEEPING:
            return  # it died while waiting: the next try starts it afresh
        assert self._sleep_control is not None
        began = self._clock()
        self._launched_at = began
        self.state = ModelState.WAKING
        ok = False
        try:
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
            await self._bookkeep(ok)
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
            if self.engine is not engine:
                return False  # it died while draining: the exit is recorded already
        # A sleeper being stopped holds only what it holds asleep until it is gone.
        self.stopping_asleep = self.state is ModelState.SLEEPING
        self.state = ModelState.STOPPING
        self._expected_exit = True
        began = self._clock()
        try:
            code = await engine.stop(self.settings.stop_grace)
        except Exception:
            if not engine.exited.done():
                # It could not be stopped and still runs: say so, rather than stay STOPPING
                # forever (a state that would hold every plan waiting for its memory).
                self._expected_exit = False
                self.state = ModelState.SLEEPING if self.stopping_asleep else ModelState.READY
                self.stopping_asleep = False
                raise
            code = engine.exit_code()
        self.stopping_asleep = False
        self.engine = None
        self.budget = None
        self.ready_since = None
        self.state = ModelState.STOPPED
        self._events.emit("stop", self.name, reason, self._clock() - began, exit_code=code)
        await self._bookkeep(False)
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
        engine = self.engine
        self.state = ModelState.DRAINING
        await self._drained.wait()
        if self.engine is not engine:
            # It died while draining: its exit already marked the model failed. Setting
            # READY here (as once) left a ready model with no engine (issue 11, defect 1).
            return False
        began = self._clock()
        # Still DRAINING (counted at its awake size) until the engine says it sleeps: its
        # memory is not free before that, so no plan may count on it.
        try:
            await self._sleep_control.sleep(engine.base_url, level)
        except BaseException:
            if self.engine is engine and not engine.exited.done():
                self.state = ModelState.READY  # it did not sleep; it still serves
            raise
        if self.engine is not engine:
            return False  # it died during the call: its exit is recorded already
        self.sleep_level = level
        self.state = ModelState.SLEEPING
        self._events.emit("sleep", self.name, reason, self._clock() - began, level=level)
        await self._bookkeep(False)
        return True

    async def _bookkeep(self, ok: bool) -> None:
        """Tell the residency book what the engine holds changed (it measures and learns).
        Its failure (the footprint store locked by another process, a GPU that cannot be
        read) never fails the engine's start, stop or sleep: the engine is what it is, and a
        good start failed here would answer 502 and leave a live engine counted as starting."""
        if self._book is None:
            return
        try:
            await self._book.finished(self, ok)
        except Exception as error:
            log.warning("bookkeeping for %s failed: %s", self.name, error)
            self._events.emit("bookkeeping_failed", self.name, str(error))

    def _record_engine_lost(
        self, message: str, code: int | None, tail: list[str], crash: bool = True
    ) -> None:
        """The engine is gone without our asking (a crash, or stopped as hung): mark the model
        failed, counting toward a crash loop unless the engine had served stably first (or
        it is a remote server that stopped answering: not a crash of ours)."""
        if crash:
            serving_for = self._clock() - (self.ready_since or self._clock())
            if serving_for >= self.settings.stable_after:
                self.quick_crashes = 0
            self.quick_crashes += 1
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
        code = engine.exit_code()
        tail = engine.log_tail(20)
        with_node = _lost_with_node(engine)
        self._record_engine_lost(
            f"engine for {self.name!r} was lost with its node"
            if with_node
            else f"engine for {self.name!r} exited unexpectedly (exit code {code})",
            code,
            tail,
            # A lost node is not a crash of the engine: no crash-loop count, no back-off.
            crash=not with_node,
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
        self._background = asyncio.ensure_future(self._bookkeep(False))

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
            # No drain: requests in flight are stuck on this engine. They end now, not when
            # the stop is done (up to stop_grace later) nor at their read timeout.
            _signal(self.lost_signal, f"it was declared not answering: {reason}")
            code = await engine.stop(self.settings.stop_grace)
            tail = engine.log_tail(20)
            if engine.remote:
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
                    # Its node was declared lost meanwhile: that, not the engine, was at fault.
                    crash=not _lost_with_node(engine),
                )
                self._events.emit(
                    "hung", self.name, reason, exit_code=code, log_tail=tail[-10:], pid=engine.pid
                )
            await self._bookkeep(False)
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
            self.quick_crashes
            and self.ready_since is not None
            and self._clock() - self.ready_since >= self.settings.stable_after
        ):
            self.quick_crashes = 0


_OOM_MARKERS = (
    "out of memory",
    "outofmemoryerror",
    "cuda error: out of memory",
    "not enough memory",
    "insufficient memory",
)


# The engine could not bind its port: another program bound it after the gateway chose it
# (vLLM: "OSError: [Errno 98] Address already in use"; aiohttp and uvicorn say the same words).
_PORT_TAKEN_MARKERS = ("address already in use",)


def _lost_with_node(engine: EngineHandle) -> bool:
    """Whether the engine is gone with its node (a Ray node lost): no crash of its own."""
    if not engine.exited.done():
        return False
    info = engine.exited.result()
    return isinstance(info, ExitInfo) and info.node_lost


def _loss_signal(engine: EngineHandle) -> asyncio.Future[str]:
    """A new engine's loss signal: completed by its exit at the latest."""
    lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    engine.exited.add_done_callback(
        lambda _exited: _signal(lost, f"its engine exited (exit code {engine.exit_code()})")
    )
    return lost


def _signal(lost: asyncio.Future[str] | None, reason: str) -> None:
    if lost is not None and not lost.done():
        lost.set_result(reason)


def _observed(task: asyncio.Task[None]) -> asyncio.Task[None]:
    """A start or wake whose waiters all left may fail with nobody to read its error: its
    outcome is recorded on the model already, so mark the error seen (no asyncio warning)."""
    task.add_done_callback(lambda done: done.cancelled() or done.exception())
    return task
