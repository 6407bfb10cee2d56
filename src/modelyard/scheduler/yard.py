"""The yard: every configured model's supervisor, name resolution, queue bounds, idle timers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from modelyard.config.diff import ReloadPlan
from modelyard.config.schema import GatewayConfig, ModelConfig
from modelyard.engines import engine_kind, served_name
from modelyard.engines.base import LaunchSpec, MemoryBudget
from modelyard.observability.events import EventBus
from modelyard.scheduler.supervisor import (
    EngineHandle,
    EngineStarter,
    ModelState,
    ModelSupervisor,
    ModelUnavailable,
    Placement,
    SleepControl,
    SupervisorSettings,
)

# How often idle timers are checked: idle stops happen within this much of their timeout.
IDLE_CHECK_INTERVAL_S = 0.25


@dataclass(frozen=True)
class Target:
    """What a public model name resolves to."""

    model: str  # the configured model (the engine to run)
    public_name: str  # what the client asked for
    upstream_name: str  # what the engine calls it (served name, or the adapter's name)
    adapter: str | None = None


class UnknownModel(Exception):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(name)
        self.name = name
        self.known = known


class Yard:
    def __init__(
        self,
        config: GatewayConfig,
        start_engine: EngineStarter,
        events: EventBus,
        clock: Callable[[], float] = time.monotonic,
        placement: Placement | None = None,
        sleep_control: SleepControl | None = None,
    ) -> None:
        self.config = config
        self.events = events
        self._clock = clock
        self.supervisors: dict[str, ModelSupervisor] = {}
        self._names: dict[str, Target] = {}
        self._routes: dict[str, str] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._closing = False
        self._retiring: dict[str, ModelSupervisor] = {}  # removed by a reload, draining
        self._reconfiguring: set[asyncio.Task[None]] = set()
        self._start_engine = start_engine
        self._placement = placement
        self._sleep_control = sleep_control
        for name, model in config.models.items():
            self.supervisors[name] = self._make_supervisor(name, model)
        self._served_names: dict[str, Target] = {}
        self._index_names()
        self.adapter_targets: dict[str, Target] = {}

    def _index_names(self) -> None:
        """Names, aliases, served names and routes of the current config."""
        names: dict[str, Target] = {}
        served_names: dict[str, Target] = {}
        routes: dict[str, str] = {}
        for name, model in self.config.models.items():
            served = served_name(name, model)
            names[name] = Target(name, name, served)
            for alias in model.aliases:
                names[alias] = Target(name, alias, served)
            if model.route:
                routes[model.route.strip("/")] = name
        for name, model in self.config.models.items():
            # The engine's own name is accepted too (not listed): clients of the seeds 002
            # and 004 send it. A name another model owns stays that model's.
            served = served_name(name, model)
            if served not in names and served not in served_names:
                served_names[served] = Target(name, served, served)
        self._names, self._served_names, self._routes = names, served_names, routes

    def _make_supervisor(self, name: str, model: ModelConfig) -> ModelSupervisor:
        remote = model.engine == "remote"
        return ModelSupervisor(
            name=name,
            spec_for=self._spec_factory(name, model),
            start_engine=self._start_engine,
            settings=self._settings_for(model),
            events=self.events,
            clock=self._clock,
            # A remote engine holds none of our GPUs: placement and groups leave it alone.
            placement=None if remote else self._placement,
            sleep_control=self._sleep_control if model.sleep else None,
        )

    def _settings_for(self, model: ModelConfig) -> SupervisorSettings:
        defaults = self.config.defaults
        # "Stopping" a remote engine only forgets it: no idle timeout unless one is set.
        idle_default = 0.0 if model.engine == "remote" else defaults.idle_timeout
        return SupervisorSettings(
            idle_timeout=_pick(model.idle_timeout, idle_default),
            start_timeout=_pick(model.start_timeout, defaults.start_timeout),
            stop_grace=_pick(model.stop_grace, defaults.stop_grace),
            stable_after=defaults.crash_stable_after,
            max_backoff=defaults.crash_backoff_max,
        )

    def _spec_factory(
        self, name: str, model: ModelConfig
    ) -> Callable[[int, MemoryBudget | None], LaunchSpec]:
        kind = engine_kind(model.engine)
        return lambda port, budget: kind.launch_spec(name, model, self.config, port, budget)

    # ----- names -----

    def model_names(self) -> list[str]:
        """Configured models and their aliases (adapters may not take these names)."""
        return sorted(self._names)

    def public_names(self) -> list[str]:
        return sorted({*self._names, *self.adapter_targets})

    def resolve(self, public_name: str) -> Target:
        target = (
            self._names.get(public_name)
            or self.adapter_targets.get(public_name)
            or self._served_names.get(public_name)
        )
        if target is None:
            raise UnknownModel(public_name, self.public_names())
        return target

    def routes(self) -> list[str]:
        return sorted(self._routes)

    def model_for_route(self, route: str) -> str | None:
        return self._routes.get(route)

    def model_config(self, name: str) -> ModelConfig:
        return self.config.models[name]

    def is_remote(self, name: str) -> bool:
        """Whether the model's engine runs elsewhere (never started or stopped by us)."""
        model = self.config.models.get(name)
        return model is not None and model.engine == "remote"

    def open_routes(self) -> dict[str, str]:
        """Routes (without '/') served without an API key (`open_route: true`) -> model."""
        return {
            model.route.strip("/"): name
            for name, model in self.config.models.items()
            if model.open_route and model.route
        }

    # ----- configuration -----

    def apply_config(self, config: GatewayConfig, plan: ReloadPlan) -> None:
        """Switch to a reloaded config (already validated), following `plan`.

        Names, routes, timeouts and queue bounds change at once. Unchanged engines are not
        touched (same process, requests in flight go on). A model whose engine configuration
        changed finishes its requests in flight on the old engine; requests that arrive
        meanwhile wait until it has drained and stopped, then are served by an engine with the
        new configuration (started again at once if the old one was running).
        A removed model takes no new requests; its engine drains, then stops. A new model is
        available at once.
        """
        self.config = config
        retired = {name: self.supervisors.pop(name) for name in plan.removed}
        self._retiring.update(retired)
        for name, model in config.models.items():
            supervisor = self.supervisors.get(name)
            if supervisor is None:
                self.supervisors[name] = self._make_supervisor(name, model)
                continue
            # The next start (only) uses these; a running engine is not affected.
            supervisor.settings = self._settings_for(model)
            supervisor.reconfigure(
                self._spec_factory(name, model),
                placement=None if model.engine == "remote" else self._placement,
                sleep_control=self._sleep_control if model.sleep else None,
            )
        self._index_names()
        # Adapters of a removed base model go with it (their requests would find no engine).
        self.adapter_targets = {
            name: target
            for name, target in self.adapter_targets.items()
            if target.model in config.models
        }
        for supervisor in retired.values():
            self._in_background(self._retire(supervisor))
        for name in plan.engine_changed:
            self._in_background(self._replace_engine(self.supervisors[name]))

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._reconfiguring.add(task)
        task.add_done_callback(self._reconfiguring.discard)

    async def _retire(self, supervisor: ModelSupervisor) -> None:
        try:
            await supervisor.stop("removed from the configuration", drain=True)
        finally:
            self._retiring.pop(supervisor.name, None)

    async def _replace_engine(self, supervisor: ModelSupervisor) -> None:
        was_running = supervisor.state in (
            ModelState.READY,
            ModelState.SLEEPING,
            ModelState.STARTING,
            ModelState.WAKING,
        )
        # Requests that arrive meanwhile wait for this stop (the model is "draining"), then
        # start the new engine themselves.
        await supervisor.stop("engine configuration changed", drain=True)
        if was_running and not self._closing:
            with contextlib.suppress(Exception):  # a failed start is an event already
                await self.load(supervisor.name, reason="engine configuration changed")

    async def reconfigured(self) -> None:
        """Wait until the engines a reload replaced or retired are done (for tests, shutdown)."""
        while self._reconfiguring:
            await asyncio.gather(*list(self._reconfiguring), return_exceptions=True)

    def supervisor_of(self, name: str) -> ModelSupervisor:
        """The model's supervisor, also while a reload that removed it drains its engine."""
        return self.supervisors.get(name) or self._retiring[name]

    def all_supervisors(self) -> list[ModelSupervisor]:
        """Configured models' supervisors and those of removed models still draining."""
        return [*self.supervisors.values(), *self._retiring.values()]

    # ----- serving -----

    @contextlib.asynccontextmanager
    async def engine_for(self, model: str) -> AsyncIterator[EngineHandle]:
        """A ready engine for one request, within the model's start timeout and queue bounds."""
        if self._closing:
            raise ModelUnavailable(
                "the gateway is shutting down", retry_after=5.0, code="shutting_down"
            )
        supervisor = self.supervisors[model]
        if supervisor.state is not ModelState.READY:
            self._check_queue_bounds(supervisor)
        deadline = self._clock() + supervisor.settings.start_timeout
        async with supervisor.use(deadline) as engine:
            yield engine

    def _check_queue_bounds(self, supervisor: ModelSupervisor) -> None:
        limits = self.config.limits
        model_limit = self.config.models[supervisor.name].max_queue
        if model_limit is None:
            model_limit = limits.max_queue_per_model
        if supervisor.waiting >= model_limit:
            raise ModelUnavailable(
                f"too many requests are waiting for model {supervisor.name!r} "
                f"(limit {model_limit}); retry later",
                retry_after=self._retry_hint(supervisor),
                code="queue_full",
            )
        if self.total_waiting() >= limits.max_queue:
            raise ModelUnavailable(
                f"the gateway is busy: {limits.max_queue} requests are already waiting; "
                "retry later",
                retry_after=self._retry_hint(supervisor),
                code="queue_full",
            )

    def _retry_hint(self, supervisor: ModelSupervisor) -> float:
        # The typical time for this model to come up is a fair hint for when to try again.
        return max(1.0, round(supervisor.timings.last_start_s or 5.0))

    def total_waiting(self) -> int:
        return sum(s.waiting for s in self.supervisors.values())

    # ----- timers and lifecycle -----

    def start_background(self) -> None:
        self._reaper = asyncio.create_task(self._reap_idle_forever())

    async def _reap_idle_forever(self) -> None:
        while True:
            await asyncio.sleep(IDLE_CHECK_INTERVAL_S)
            await self.reap_idle(self._clock())

    async def reap_idle(self, now: float) -> list[str]:
        """Stop (or put to sleep) every engine idle past its timeout; returns their names."""
        acted = []
        for supervisor in list(self.supervisors.values()):
            idle = supervisor.idle_for(now)
            timeout = supervisor.settings.idle_timeout
            if idle is None or timeout <= 0 or idle < timeout:
                continue
            model = self.config.models[supervisor.name]
            if model.pinned:
                continue
            reason = f"idle for {idle:.0f}s"
            if supervisor.can_sleep:
                done = await supervisor.sleep(model.sleep, reason)
            else:
                done = await supervisor.stop(reason, if_idle=True)
            if done:
                acted.append(supervisor.name)
        return acted

    async def load(self, model: str, reason: str = "admin load") -> None:
        supervisor = self.supervisors[model]
        await supervisor.load(self._clock() + supervisor.settings.start_timeout, reason)

    def begin_shutdown(self) -> None:
        """Refuse new requests and abandon starts in progress; requests in flight go on."""
        self._closing = True
        for supervisor in self.all_supervisors():
            supervisor.cancel_start()

    async def shutdown(self, grace: float) -> None:
        """Stop every engine: wait up to `grace` for requests in flight, then stop all."""
        self.begin_shutdown()
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        everyone = self.all_supervisors()
        busy = [s.drained() for s in everyone if s.in_flight]
        if busy:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*busy), grace)
        await asyncio.gather(
            *(s.stop("gateway shutdown", drain=False) for s in everyone),
            return_exceptions=True,
        )
        for task in list(self._reconfiguring):
            task.cancel()
        await asyncio.gather(*self._reconfiguring, return_exceptions=True)

    # ----- status -----

    def model_status(self, name: str) -> dict[str, Any]:
        supervisor = self.supervisors[name]
        model = self.config.models[name]
        now = self._clock()
        failure = supervisor.failure
        remote = model.engine == "remote"
        return {
            "name": name,
            "engine": model.engine,
            "served_name": served_name(name, model),
            "aliases": list(model.aliases),
            "route": model.route,
            "state": supervisor.state.value,
            "can_sleep": supervisor.can_sleep,
            "sleep_level": supervisor.sleep_level if supervisor.state.value == "sleeping" else 0,
            "url": model.url,
            "pid": None if supervisor.engine is None or remote else supervisor.engine.pid,
            "port": None if remote else getattr(supervisor.engine, "port", None),
            "in_flight": supervisor.in_flight,
            "queued": supervisor.waiting,
            "idle_s": supervisor.idle_for(now),
            "last_used_ago_s": None if supervisor.last_used is None else now - supervisor.last_used,
            "idle_timeout_s": supervisor.settings.idle_timeout,
            "last_start_s": supervisor.timings.last_start_s,
            "last_wake_s": supervisor.timings.last_wake_s,
            "starts": supervisor.timings.starts,
            "crashes": supervisor.timings.crashes,
            "gpus": list(supervisor.budget.gpu_indexes) if supervisor.budget else [],
            "failure": None
            if failure is None
            else {
                "message": failure.message,
                "exit_code": failure.exit_code,
                "log_tail": failure.log_tail,
                "retry_in_s": supervisor.backoff_remaining(),
            },
        }


def _pick(value: float | None, default: float) -> float:
    return default if value is None else value
