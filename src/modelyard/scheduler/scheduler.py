"""The scheduler: the one part that decides across models.

It owns every model's supervisor (private: api/, lora/, observability/ and the watchdog call
the methods below, and the read-only questions about its engines that it inherits from
`EngineViews`, scheduler/engine_views.py), name resolution, queue bounds, idle timers, and the
decision of when a model may start or wake. Decisions are made by the pure `decide()`
(scheduler/decide.py) on a snapshot of the world; this class only gathers the snapshot and
carries the decision out.

It is event-driven. A start or wake that must wait is woken by the event it waits for, never
by polling:

- a request arrives (`engine_for`), or ends (the supervisor's `use()` signals it);
- a start or wake finishes or fails, an engine exits, a stop completes (every supervisor
  state change signals it);
- a timer fires (the idle reaper's stops and sleeps are state changes too);
- the configuration changes: `apply_config()` is the seam for a live reload (see there).

A wait is bounded only by the waiting requests' own deadlines (each request's start timeout
from when it arrived); once its engine really starts, a request waits up to a full start
timeout from then. A refusal is always 503 with `Retry-After` and never an engine failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from modelyard.config.schema import GatewayConfig, ModelConfig
from modelyard.engines import engine_kind, served_name
from modelyard.engines.base import LaunchSpec, MemoryBudget
from modelyard.observability.events import EventBus
from modelyard.placement.coordinator import PlacementCoordinator
from modelyard.placement.planning import Planning, UnmanagedGpus
from modelyard.placement.policy import Action, Sleep
from modelyard.placement.policy import Target as PlacementTarget
from modelyard.runtime.process import EngineStartError
from modelyard.runtime.remote import RETRY_AFTER_S as RETRY_REMOTE_S
from modelyard.runtime.weights_cache import download_folder
from modelyard.scheduler.core import (
    Arrived,
    CancelPreWarm,
    CarryOut,
    Dropped,
    EvictionsDone,
    IdleCheck,
    IdleEngine,
    KeepIdle,
    PreWarmNow,
    PreWarmOver,
    PutToSleep,
    RefuseNow,
    ScaleCheck,
    ScaleUp,
    SchedulerCore,
    StartNow,
    StopIdle,
    WaitUntil,
    Wanted,
)
from modelyard.scheduler.decide import Ask, Snapshot
from modelyard.scheduler.engine_views import EngineViews
from modelyard.scheduler.names import Target, UnknownModel
from modelyard.scheduler.prewarm import ModelNow, Standing
from modelyard.scheduler.prewarming import PreWarming
from modelyard.scheduler.reload_plan import ReloadPlan
from modelyard.scheduler.replica_set import RUNNING, ReplicaRouting, model_load, replicas_status
from modelyard.scheduler.scaling import replica_key, spread
from modelyard.scheduler.supervisor import (
    EngineHandle,
    EngineStarter,
    ModelState,
    ModelSupervisor,
    ModelUnavailable,
    Refused,
    SleepControl,
    SupervisorSettings,
)

log = logging.getLogger("modelyard.scheduler")

# How often idle timers are checked: idle stops happen within this much of their timeout.
# Replicas are checked on the same beat (scheduler/scaling.py).
IDLE_CHECK_INTERVAL_S = 0.25
# A sleeper's wake before one was measured (vLLM documents 0.3-3 s).
WAKE_GUESS_S = 2.0
# A supervisor's state as pre-warming sees it (any other: neither a candidate nor a victim).
_STANDING = {
    ModelState.READY: Standing.READY,
    ModelState.SLEEPING: Standing.ASLEEP,
    ModelState.STOPPED: Standing.STOPPED,
}


class Scheduler(EngineViews):
    def __init__(
        self,
        config: GatewayConfig,
        start_engine: EngineStarter,
        events: EventBus,
        clock: Callable[[], float] = time.monotonic,
        placement: PlacementCoordinator | None = None,
        sleep_control: SleepControl | None = None,
    ) -> None:
        self.config = config
        self.events = events
        self._clock = clock
        self._placement = placement
        self._supervisors: dict[str, ModelSupervisor] = {}
        # A model's other engines (replicas 2..max), by model; stopped until load asks.
        self._replicas: dict[str, list[ModelSupervisor]] = {}
        self._routing = ReplicaRouting()  # which engine serves each request
        # Engines (by key) that refused a connection without being confirmed gone yet, and
        # until when (clock) requests go to the model's other ready engines instead.
        self._avoided: dict[str, float] = {}
        self._scaling: set[str] = set()  # engines starting for load: they never wait for room
        # Whether the engine (by pid) of a base model has a LoRA adapter loaded: set by the
        # adapter manager, for the request path's LoRA affinity.
        self.adapter_loaded: Callable[[str, str, int], bool] = lambda _base, _name, _pid: False
        self._names: dict[str, Target] = {}
        self._routes: dict[str, str] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._closing = False
        # Idle timeouts set by a request's keep_alive (`sharing.keep_alive`), until the next.
        self._kept_alive: dict[str, float] = {}
        # The decisions' records (rooms set aside while evictions run): changed only by
        # its synchronous `step`, so no lock is needed and none is held across slow work.
        self._core = SchedulerCore()
        self._evicting: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self._start_engine = start_engine
        self._sleep_control = sleep_control
        self._served_names: dict[str, Target] = {}
        # Removed by a reload and draining, by engine key (never by model name: a model
        # removed, re-added and removed again has two engines draining at once).
        self._retiring: dict[str, ModelSupervisor] = {}
        self._retired = 0
        self._reconfiguring: set[asyncio.Task[None]] = set()
        for name, model in config.models.items():
            self._add_model(name, model)
        self._index_names()
        if placement is not None:
            placement.attach(self._engines_by_key)
        # Where the decision's input comes from: placement's records with managed GPUs, one
        # boundless GPU per engine without.
        self._planning: Planning = (
            placement if placement is not None else UnmanagedGpus(config, self._engines_by_key)
        )
        self.adapter_targets: dict[str, Target] = {}
        self.prewarming = PreWarming(Path(config.state_dir).expanduser(), events, clock)

    def set_adapter_targets(self, targets: dict[str, Target]) -> None:
        """The LoRA adapters on disk now, by public name (the adapter manager's scan)."""
        self.adapter_targets = targets

    def _add_model(self, name: str, model: ModelConfig) -> None:
        """A supervisor for one configured model (its names: `_index_names`), and one for
        each of its other replicas."""
        self._supervisors[name] = self._new_supervisor(name, 1, model)
        self._replicas[name] = []
        self._resize_replicas(name, model)

    def _new_supervisor(self, name: str, number: int, model: ModelConfig) -> ModelSupervisor:
        supervisor = ModelSupervisor(
            name=name,
            spec_for=self._spec_factory(name, model),
            start_engine=self._start_engine,
            settings=self._settings_for(model),
            events=self.events,
            clock=self._clock,
            book=self._book_for(model),
            # A replica stops when idle rather than sleeping: the model's own engine is the
            # one to keep asleep for a quick wake.
            sleep_control=self._sleep_control if model.sleep and number == 1 else None,
        )
        supervisor.key = replica_key(name, number)
        supervisor.log_name = supervisor.key
        supervisor.on_change(self._notify)
        return supervisor

    def _resize_replicas(self, name: str, model: ModelConfig) -> None:
        """Slots 2..max for `name`; those beyond a lowered max drain and stop."""
        slots = self._replicas[name]
        while len(slots) + 1 < model.replicas.max:
            slots.append(self._new_supervisor(name, len(slots) + 2, model))
        while len(slots) + 1 > model.replicas.max:
            self._retire_slot(slots.pop(), "replicas.max lowered")

    def _retire_slot(self, supervisor: ModelSupervisor, reason: str) -> None:
        """Drain and stop one engine under a key of its own (its slot may be made again)."""
        self._retired += 1
        old = supervisor.key
        supervisor.key = f"{old} (removed #{self._retired})"
        if self._placement is not None:
            self._placement.rekey(old, supervisor.key)
        self._core.step(Dropped(old))
        self._retiring[supervisor.key] = supervisor
        self._in_background(self._retire(supervisor, reason))

    def _book_for(self, model: ModelConfig) -> PlacementCoordinator | None:
        # A remote engine holds none of our GPUs: placement and groups leave it alone.
        return None if model.engine == "remote" else self._placement

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
            start_timeout_max=_pick(model.start_timeout_max, defaults.start_timeout_max),
            weights_folder=download_folder(
                model.model if model.engine == "vllm" else None,
                {**os.environ, **defaults.env, **model.env},
            ),
        )

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

    def _spec_factory(
        self, name: str, model: ModelConfig
    ) -> Callable[[int, MemoryBudget | None], LaunchSpec]:
        kind = engine_kind(model.engine)
        return lambda port, budget: kind.launch_spec(name, model, self.config, port, budget)

    # ----- configuration -----

    def apply_config(self, config: GatewayConfig, plan: ReloadPlan) -> None:
        """Switch to a reloaded config (already validated), following `plan`.

        Names, routes, timeouts and queue bounds change at once. Unchanged engines are not
        touched (same process, requests in flight go on). A model whose engine configuration
        changed finishes its requests in flight on the old engine; requests that arrive
        meanwhile wait until it has drained and stopped, then are served by an engine with the
        new configuration (started again at once if the old one was running). A removed model
        takes no new requests; its engine drains, then stops. A new model is available at
        once. Every waiting start then decides again under the new limits.
        """
        self.config = config
        self._planning.config = config  # placement's too, when it plans
        retired = {}
        for name in plan.removed:
            for replica in self._replicas.pop(name, []):
                self._retire_slot(replica, "removed from the configuration")
            leaving = self._supervisors.pop(name)
            self._retired += 1
            leaving.key = f"{name} (removed #{self._retired})"
            if self._placement is not None:
                self._placement.rekey(name, leaving.key)
            retired[leaving.key] = leaving
            self._core.step(Dropped(name))  # no room is made for a model that is gone
        self._retiring.update(retired)
        for name, model in config.models.items():
            supervisor = self._supervisors.get(name)
            if supervisor is None:
                self._add_model(name, model)
                continue
            # The next start (only) uses these; a running engine is not affected.
            supervisor.settings = self._settings_for(model)
            supervisor.reconfigure(
                self._spec_factory(name, model),
                book=self._book_for(model),
                sleep_control=self._sleep_control if model.sleep else None,
            )
            self._resize_replicas(name, model)
            for replica in self._replicas[name]:
                replica.settings = self._settings_for(model)
                replica.reconfigure(
                    self._spec_factory(name, model),
                    book=self._book_for(model),
                    sleep_control=None,
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
            # A new engine configuration: requests from now on are for it, and the old one's
            # failures say nothing of it.
            self._supervisors[name].engine_config_changed()
            self._in_background(self._replace_engine(self._supervisors[name]))
            for replica in self._replicas[name]:
                # Its replicas stop (drained); load starts new ones with the new configuration.
                replica.engine_config_changed()
                self._in_background(self._stop_drained(replica, "engine configuration changed"))
        self._notify()

    def _in_background(
        self, work: Coroutine[Any, Any, None], into: set[asyncio.Task[None]] | None = None
    ) -> None:
        tasks = self._reconfiguring if into is None else into
        task = asyncio.create_task(work)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _retire(
        self, supervisor: ModelSupervisor, reason: str = "removed from the configuration"
    ) -> None:
        try:
            await supervisor.stop(reason, drain=True)
        finally:
            self._retiring.pop(supervisor.key, None)

    async def _stop_drained(self, supervisor: ModelSupervisor, reason: str) -> None:
        await supervisor.stop(reason, drain=True)

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

    def open_routes(self) -> dict[str, str]:
        """Routes (without '/') served without an API key (`open_route: true`) -> model."""
        return {
            model.route.strip("/"): name
            for name, model in self.config.models.items()
            if model.open_route and model.route
        }

    # ----- names -----

    def model_names(self) -> list[str]:
        """Configured models and their aliases (adapters may not take these names)."""
        return sorted(self._names)

    def models(self) -> list[str]:
        """The configured models, in configuration order."""
        return list(self._supervisors)

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

    # ----- serving -----

    def engine_for(
        self, model: str, key: str = "", affinity: str | None = None, adapter: str | None = None
    ) -> EngineFor:
        """A ready engine for one request, within the model's start timeout and queue bounds:
        `async with scheduler.engine_for(model) as engine`. `key`: who asks (an API key's
        name), for the habits pre-warming learns. With replicas, `affinity` (a digest of the
        conversation or session) and `adapter` (a LoRA adapter's name) pick the engine
        (scheduler/balance.py)."""
        return EngineFor(self, model, key, affinity, adapter)

    # ----- learned pre-warming -----

    def _model_now(self, name: str) -> ModelNow:
        """`name` as pre-warming sees it: where it stands, what a request for it would wait."""
        supervisor = self._supervisors[name]
        return ModelNow(
            name,
            _STANDING.get(supervisor.state, Standing.BUSY),
            _start_guess(supervisor),
            supervisor.timings.last_wake_s or WAKE_GUESS_S,
            self.prewarming.on(self.config, name),
        )

    def note_request(self, model: str, key: str) -> None:
        """A request for `model` from `key` came: learn from it. (The pre-warm it may lead to
        is asked for once it holds its engine: its own start goes first.)"""
        if not self.prewarming.anywhere(self.config):
            return
        self.prewarming.observe(model, key)
        if model in self._core.prewarming():
            self._core.step(PreWarmOver(model))  # a real start now: never cancelled

    def maybe_prewarm(self) -> None:
        """Offer the core the predictor's chances for the models that are not ready."""
        if not self.prewarming.anywhere(self.config) or self._closing or self.total_waiting():
            return
        ask = self.prewarming.ask(
            (self._model_now(name) for name in self._supervisors),
            lambda name: self._planning.target(self._supervisors[name]),
            lambda: self._snapshot(""),
        )
        if ask is None:
            return
        for command in self._core.step(ask):
            assert isinstance(command, PreWarmNow)
            self.prewarming.made(command.prewarm, ask)
            self._in_background(self._prewarm(command), self._evicting)

    async def _prewarm(self, command: PreWarmNow) -> None:
        """Make its room from idle engines, then load it as the admin API does."""
        prewarm = command.prewarm
        supervisor = self._supervisors.get(prewarm.target)
        try:
            ok = True
            for action in prewarm.actions:
                ok = await self._evict_one(action, prewarm.target) and ok
            if prewarm.actions:
                self._core.step(EvictionsDone(prewarm.target, command.number, ok))
            if supervisor is not None and prewarm.target in self._core.prewarming():
                await self._load(supervisor, f"pre-warm: {prewarm.reason}")
                # Its idle timer runs from now (not from its last use, maybe hours ago): a
                # request has until its idle timeout to use it.
                supervisor.last_used = self._clock()
        except Exception as error:  # a cancelled or failed pre-warm: nobody waited for it
            log.info("pre-warm of %s ended: %s", prewarm.target, error)
        finally:
            self._core.step(PreWarmOver(prewarm.target))
            self._notify()
            self.maybe_prewarm()  # one at a time: the next may go now

    def _cancel_prewarm(self, cancel: CancelPreWarm) -> None:
        """A real request needs what this pre-warm holds. A cold start under way stops at
        once (its start slot is free). Nothing else is stopped: a pre-warm that has not
        begun never will (`_prewarm` loads only what the core still pre-warms), and a wake is
        left to finish (vLLM would be left half awake); the woken engine is then idle like
        any other, for the planner to evict (put back to sleep) if the request needs its
        room. Stopping a sleeper would turn its next wake into a cold start."""
        self.events.emit("prewarm_cancelled", cancel.target, cancel.reason)
        self.prewarming.gone(cancel.target, "cancelled")
        supervisor = self._supervisors.get(cancel.target)
        if supervisor is not None:
            supervisor.cancel_prewarm()

    def _supervisor_to_wait_on(
        self, model: str, affinity: str | None = None, adapter: str | None = None
    ) -> ModelSupervisor:
        """The engine's supervisor for a request that may wait for it (or ModelUnavailable)."""
        if self._closing:
            raise ModelUnavailable(
                "the gateway is shutting down", retry_after=5.0, code="shutting_down"
            )
        supervisor = self._choose_slot(model, affinity, adapter)
        if supervisor.state is not ModelState.READY:
            self._check_queue_bounds(supervisor)
        return supervisor

    def _choose_slot(
        self, model: str, affinity: str | None, adapter: str | None
    ) -> ModelSupervisor:
        """The engine for one request (scheduler/replica_set.py)."""
        primary = self._supervisors[model]
        replicas = self._replicas.get(model)
        if not replicas:
            return primary  # one engine: the request path stays as it was, no lookups

        def has_adapter(slot: ModelSupervisor) -> bool:
            engine = slot.engine
            return (
                adapter is not None
                and engine is not None
                and (self.adapter_loaded(model, adapter, engine.pid))
            )

        target = self.config.models[model].replicas.target_in_flight
        avoided: set[str] = set()
        if self._avoided:
            now = self._clock()
            for key, until in list(self._avoided.items()):
                if until > now:
                    avoided.add(key)
                else:
                    del self._avoided[key]
        return self._routing.choose(
            model, [primary, *replicas], target, affinity, has_adapter, avoided
        )

    def avoid_replica(self, model: str, key: str, seconds: float) -> bool:
        """The engine `key` of `model` refused a connection and was not confirmed gone: for
        `seconds` (the time its checks take to reach a verdict), requests go to the model's
        other ready engines. Whether there is one (a request it never saw may go there)."""
        if model not in self._supervisors:
            return False  # a reload removed it meanwhile
        others = [
            s
            for s in self._slots(model)
            if s.key != key and s.state is ModelState.READY and s.engine is not None
        ]
        if not others:
            return False
        self._avoided[key] = self._clock() + seconds
        return True

    async def forget_remote(self, name: str, reason: str) -> None:
        """A remote engine stopped answering while serving: forget the connection (the next
        request, or the gateway's check, connects again)."""
        await self._supervisor_of(name).declare_hung(reason)

    @property
    def closing(self) -> bool:
        """Shutting down: new requests are refused, engines are being stopped."""
        return self._closing

    def retry_after_loss(self, name: str) -> float:
        """When a client whose request was on a lost engine may come back: at once for an
        engine of ours (its next request starts a fresh one), after the crash-loop back-off
        when there is one, and after a few seconds for a remote server (not ours to
        restart)."""
        supervisor = self._supervisor_of(name)
        if self.is_remote(name):
            return RETRY_REMOTE_S
        return max(1.0, supervisor.backoff_remaining())

    async def notice_exit(self, name: str, timeout: float) -> None:
        await self._supervisor_of(name).notice_exit(timeout)

    def mark_serving_healthy(self, name: str) -> None:
        self._supervisors[name].mark_serving_healthy()

    def _check_queue_bounds(self, supervisor: ModelSupervisor) -> None:
        limits = self.config.limits
        model_limit = self.config.models[supervisor.name].max_queue
        if model_limit is None:
            model_limit = limits.max_queue_per_model
        arrived = Arrived(
            supervisor.name,
            supervisor.waiting,
            model_limit,
            self.total_waiting(),
            limits.max_queue,
            self._retry_hint(supervisor),
        )
        for refusal in self._core.step(arrived):
            assert isinstance(refusal, RefuseNow)
            raise ModelUnavailable(
                refusal.message, retry_after=refusal.retry_after, code=refusal.code
            )

    def _retry_hint(self, supervisor: ModelSupervisor) -> float:
        # The typical time for this model to come up is a fair hint for when to try again.
        return max(1.0, round(supervisor.timings.last_start_s or 5.0))

    def total_waiting(self) -> int:
        return sum(s.waiting for s in self._slots_of_all())

    # ----- bringing an engine up: the decision here, then the supervisor's start or wake -----

    async def _hold(self, supervisor: ModelSupervisor, deadline: float) -> EngineHandle:
        """Hold the model's ready engine for one request; when nothing under way would make
        it ready, begin its start or wake (shared by every request that waits for it)."""
        while True:
            try:
                engine = await supervisor.hold(deadline)
            except ModelUnavailable as error:
                if error.code != "prewarm_cancelled":
                    raise
                # It joined a pre-warm that gave way to another model's request as it came:
                # this request is real, so it waits for a start of its own like any other.
                continue
            if engine is not None:
                return engine
            self._bring_up(supervisor)

    def _bring_up(self, supervisor: ModelSupervisor) -> None:
        # Chosen now, as the supervisor handed the request back: an asleep engine wakes.
        if supervisor.state is ModelState.SLEEPING:
            supervisor.begin(self._wake(supervisor))
        else:
            supervisor.begin(self._start(supervisor))

    async def _start(self, supervisor: ModelSupervisor) -> None:
        """Decide where the engine goes, then have the supervisor start it there."""
        try:
            await self._start_once(supervisor)
        except Exception as error:
            if isinstance(error, EngineStartError) and error.node_lost:
                # It went to a node that was lost meanwhile (planned on before its loss was
                # known): the node is out of the plan now, so once more, elsewhere.
                self.events.emit(
                    "node_lost_retry",
                    supervisor.name,
                    f"its node was lost during the start; starting it once more elsewhere: {error}",
                )
                await self._start_once(supervisor)
                return
            if supervisor.port_was_taken:
                # Another program bound the port between the gateway's choice and the
                # engine's bind (vLLM binds once its imports are done, seconds later): not
                # the engine's fault, so once more, on another port.
                self.events.emit(
                    "port_taken_retry",
                    supervisor.name,
                    f"its port was taken by another program; starting it once more: {error}",
                )
                await self._start_once(supervisor)
                return
            if self._placement is None or self._remote(supervisor):
                raise
            if not supervisor.ran_out_of_memory:
                raise
            # vLLM sized itself on memory that was not really free (an estimate was low, or
            # another program grew): make more room and try once more.
            self._placement.note_out_of_memory(supervisor)
            self.events.emit(
                "oom_retry",
                supervisor.name,
                "engine ran out of GPU memory while starting; evicting more and retrying once",
            )
            await self._start_once(supervisor)

    async def _start_once(self, supervisor: ModelSupervisor) -> None:
        with supervisor.placing_start():
            budget = await self._room_for(supervisor)
        await supervisor.start(budget)

    async def _wake(self, supervisor: ModelSupervisor) -> None:
        with supervisor.placing_wake():
            budget = await self._room_for(supervisor)
        await supervisor.wake(budget)

    def _remote(self, supervisor: ModelSupervisor) -> bool:
        """Its engine runs elsewhere and holds none of our GPUs: no room to make for it."""
        name = supervisor.name
        return self._supervisors.get(name) is supervisor and self.is_remote(name)

    # ----- deciding where an engine starts or wakes -----

    def _notify(self) -> None:
        """Something changed: every waiting start decides again."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def _room_for(self, supervisor: ModelSupervisor) -> MemoryBudget | None:
        """Wait (on events) until `supervisor` may start or wake; its memory budget then.

        Each turn is one synchronous step of the pure core: no lock is held, and no slow
        work (a stop, a sleep, the wait for memory to come back) happens here. Evictions run
        as their own tasks and end as events, so a slow stop on one GPU never holds a
        decision for another: a start on a free GPU never waits for a stop elsewhere.
        """
        if self._remote(supervisor):
            return None
        name = supervisor.key  # the model's name, or its replica's key
        try:
            if self._placement is not None:
                await self._placement.read_inputs(supervisor)  # a folder walk, in a thread
            while True:
                if self._closing:
                    raise Refused("the gateway is shutting down", 5.0, "shutting_down")
                if self._slot(name) is not supervisor:
                    # A reload removed (or replaced) the model while it waited: its waiters
                    # get a clear 503, not a KeyError from the new config.
                    raise Refused(
                        f"model {name!r} was removed from the configuration while it waited "
                        "to start",
                        5.0,
                        "model_removed",
                    )
                if supervisor.waiting == 0:
                    # Every request that wanted it went away while it waited for room: do
                    # not evict anything or start an engine for nobody.
                    raise Refused(f"nobody waits for {name!r} any more", 1.0, "abandoned")
                wanted = Wanted(
                    Ask(self._target_for(supervisor), supervisor.wait_deadline()),
                    self._snapshot(name),
                    # Each eviction round changes some engine's state; more rounds than
                    # models means the evictions are failing: refuse rather than spin.
                    max_eviction_rounds=len(self._supervisors) + 1,
                    no_wait=supervisor.key in self._scaling,
                )
                changed = self._changed  # taken before the step: no change is missed
                until = self._clock()
                for command in self._core.step(wanted):
                    if isinstance(command, CancelPreWarm):
                        self._cancel_prewarm(command)
                        continue
                    if isinstance(command, StartNow):
                        return self._go(supervisor, command)
                    if isinstance(command, RefuseNow):
                        self.events.emit("placement_refused", name, command.message)
                        raise Refused(command.message, command.retry_after, command.code)
                    if isinstance(command, CarryOut):
                        self._in_background(self._carry_out(command), self._evicting)
                        until = supervisor.wait_deadline()
                    else:
                        assert isinstance(command, WaitUntil)
                        if self._placement is not None:
                            self._placement.note_plan(name, command.explanation)
                        until = command.until
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), max(until - self._clock(), 0))
        finally:
            # Started, refused or abandoned: the room the core set aside for it is free. (A
            # removed model's room was freed by the reload; the name may be another's now.)
            if self._slot(name) is supervisor:
                self._core.step(Dropped(name))

    def _target_for(self, supervisor: ModelSupervisor) -> PlacementTarget:
        """What the engine needs, on GPUs that hold none of its model's other engines where
        the model may use such a GPU (a replica refuses otherwise; the model's own engine
        then goes wherever it fits, as without replicas)."""
        target = self._planning.target(supervisor)
        siblings = [s.key for s in self._slots(supervisor.name) if s is not supervisor]
        if len(siblings) == 0:
            return target
        gpus = [gpu.index for gpu in self._planning.gpu_capacities()]
        spread_out = spread(target, siblings, self._planning.engines(supervisor.key), gpus)
        if spread_out is not None:
            return spread_out
        if supervisor.key != supervisor.name:
            raise Refused(
                f"no GPU left for another engine of {supervisor.name!r}", 5.0, "no_room_for_replica"
            )
        return target

    def _go(self, supervisor: ModelSupervisor, go: StartNow) -> MemoryBudget | None:
        if self._placement is None:
            return None
        return self._placement.place(supervisor, go.gpus, go.bytes_per_gpu, go.explanation)

    async def _carry_out(self, evict: CarryOut) -> None:
        """Make room for `evict.target` (the core's command), then tell the core it is done."""
        ok = True
        try:
            for action in evict.actions:
                ok = await self._evict_one(action, evict.target) and ok
            if self._placement is not None:
                await self._placement.wait_memory_back(
                    evict.gpus, evict.bytes_per_gpu, evict.target
                )
        except Exception:  # the target decides again; the core counts the failed round
            log.exception("making room for %s failed", evict.target)
            ok = False
        finally:
            self._core.step(EvictionsDone(evict.target, evict.number, ok))
            self._notify()

    async def _evict_one(self, action: Action, target: str) -> bool:
        """Sleep or stop one victim; whether it is asleep or stopped now."""
        victim = self._engines_by_key()[action.name]
        self.prewarming.gone(victim.name, "evicted")
        group = self.config.exclusive_group_of(target)
        if group is not None and self.config.exclusive_group_of(action.name) == group:
            reason = f"exclusive group: {target!r} is starting"
        else:
            reason = f"evicted to make room for {target!r}"
        self.events.emit(
            "evict",
            victim.name,
            reason,
            for_model=target,
            action="sleep" if isinstance(action, Sleep) else "stop",
        )
        try:
            if isinstance(action, Sleep) and await victim.sleep(action.level, reason):
                return True
            await victim.stop(reason)
            return True
        except Exception as error:  # a failed sleep falls back to a stop
            log.warning("evicting %s: %s; stopping it instead", victim.name, error)
            try:
                await victim.stop(reason)
            except Exception:
                return False
            return True

    def _snapshot(self, target: str) -> Snapshot:
        """The decision's input, the same way with managed GPUs or without (`_planning`)."""
        starts = {
            name: s.timings.last_start_s
            for name, s in self._supervisors.items()
            if s.timings.last_start_s is not None
        }
        return Snapshot(
            now=self._clock(),
            gpus=tuple(self._planning.gpu_capacities()),
            engines=tuple(self._planning.engines(target)),
            host_ram_for_sleep=self._planning.host_ram_left(),
            start_seconds=starts,
        )

    # ----- timers and lifecycle -----

    def start_background(self) -> None:
        self._reaper = asyncio.create_task(self._reap_idle_forever())

    async def _reap_idle_forever(self) -> None:
        while True:
            await asyncio.sleep(IDLE_CHECK_INTERVAL_S)
            try:
                if await self.prewarming.tick(self.config):
                    self.maybe_prewarm()
                await self.reap_idle(self._clock())
                self.check_scale()
            except Exception:  # the reaper must outlive any one bug (issue 11, defect 2)
                log.exception("idle check failed; checking again")

    async def reap_idle(self, now: float) -> list[str]:
        """Stop (or put to sleep) every engine idle past its timeout; returns their names.

        One model's failure (a `/sleep` answering 404, an engine killed mid-call) never
        stops the others' idle timers: a failed sleep falls back to a stop.
        """
        acted = []
        engines = tuple(
            IdleEngine(
                s.key,
                s.idle_for(now),
                self._kept_alive.get(name, s.settings.idle_timeout),
                self.config.models[name].pinned and s.key == name,
                (self.config.models[name].sleep or 0) if s.can_sleep else 0,
                model=name,
                running=s.state in RUNNING,
                min_replicas=self.config.models[name].replicas.min,
            )
            for name in self._supervisors
            for s in self._slots(name)
        )
        expected = self.prewarming.expected_while_idle(self.config, engines)
        snapshot = self._snapshot("") if expected else None
        verdicts = self._core.step(IdleCheck(engines, expected, snapshot))
        kept = {v.key: v.reason for v in verdicts if isinstance(v, KeepIdle)}
        self.prewarming.note_kept(kept, self._kept_engine)
        for verdict in verdicts:
            if isinstance(verdict, KeepIdle):
                continue
            assert isinstance(verdict, (PutToSleep, StopIdle))
            found, reason = self._slot(verdict.key), verdict.reason
            if found is None:
                continue  # removed by a reload meanwhile
            supervisor = found
            if supervisor.idle_for(self._clock()) is None:
                continue  # a request came while an earlier verdict was carried out
            try:
                if isinstance(verdict, PutToSleep):
                    try:
                        done = await supervisor.sleep(verdict.level, reason)
                    except Exception as error:
                        self.events.emit(
                            "sleep_failed", supervisor.name, f"{error}; stopping it instead"
                        )
                        done = await supervisor.stop(reason, if_idle=True)
                else:
                    done = await supervisor.stop(reason, if_idle=True)
            except Exception as error:
                log.exception("idle stop of %s failed", supervisor.name)
                self.events.emit("idle_stop_failed", supervisor.name, str(error))
                continue
            if done:
                self.prewarming.gone(supervisor.name, "idle")
                acted.append(supervisor.key)
                if isinstance(verdict, StopIdle) and verdict.scale_down:
                    self.events.emit("scale_down", supervisor.name, reason, replica=supervisor.key)
        return acted

    def _prewarm_status(self, name: str) -> dict[str, Any]:
        """Whether pre-warming is on for `name`, and, while it is stopped or asleep, what the
        predictor expects of it now: why it was pre-warmed, or was not yet."""
        model = self._model_now(name)
        chance = self.prewarming.outlook(model)  # (None when pre-warming is off for it)
        return {
            "on": model.prewarm,
            "chance": None if chance is None else round(chance.probability, 3),
            "within_s": None if chance is None else round(chance.horizon_s, 1),
            "reason": None if chance is None else chance.reason,
        }

    def _kept_engine(self, key: str) -> tuple[str, float] | None:
        """A kept engine's model and what its start would cost (None: gone by a reload)."""
        supervisor = self._slot(key)
        if supervisor is None:
            return None
        return supervisor.name, _start_guess(supervisor)

    def check_scale(self) -> list[str]:
        """Add a replica to each model above its target for a moment (the core decides);
        returns the keys of the engines it starts."""
        if self._closing:
            return []
        loads = [
            model_load(name, self._slots(name), m.replicas, self._planning.target)
            for name, m in self.config.models.items()
            if m.replicas.max > 1
        ]
        if not loads:
            return []
        started = []
        for command in self._core.step(ScaleCheck(self._snapshot(""), tuple(loads))):
            assert isinstance(command, ScaleUp)
            replica = self._slot(command.key)
            if replica is None:
                continue
            self.events.emit("scale_up", command.model, command.reason, replica=command.key)
            self._in_background(self._scale_up(replica, command.reason), self._evicting)
            started.append(command.key)
        return started

    async def _scale_up(self, replica: ModelSupervisor, reason: str) -> None:
        """Start (or wake) one more engine of its model; a refusal (the room went to another
        start meanwhile) or a failed start is an event, and the next check decides again."""
        self._scaling.add(replica.key)
        try:
            await self._load(replica, f"scale up: {reason}")
            replica.last_used = self._clock()  # its idle timer runs from its start
        except Exception as error:
            self.events.emit("scale_up_failed", replica.name, str(error), replica=replica.key)
        finally:
            self._scaling.discard(replica.key)
            self._notify()

    async def load(self, model: str, reason: str = "admin load") -> None:
        await self._load(self._supervisors[model], reason)

    async def _load(self, supervisor: ModelSupervisor, reason: str) -> None:
        """Make the engine ready without a request (the admin API, a pre-warm, a reload)."""
        deadline = self._clock() + supervisor.settings.start_timeout
        while await supervisor.load(deadline, reason) is None:
            self._bring_up(supervisor)

    def keep_alive(self, model: str, seconds: float | None) -> None:
        """The idle timeout a request's keep_alive set for `model`, until the next request
        sets another (None: the configured one again)."""
        if seconds is None:
            self._kept_alive.pop(model, None)
        else:
            self._kept_alive[model] = seconds

    def kept_alive(self, model: str) -> float | None:
        """The idle timeout the last request's keep_alive set (None: the configured one)."""
        return self._kept_alive.get(model)

    async def stop_if_idle(self, model: str, reason: str) -> bool:
        """Stop the engine unless a request is in flight or waiting for it."""
        return await self._supervisors[model].stop(reason, if_idle=True)

    async def unload(self, model: str, reason: str) -> bool:
        return await self._supervisors[model].stop(reason)

    async def sleep(self, model: str, level: int, reason: str) -> bool:
        return await self._supervisors[model].sleep(level, reason)

    async def declare_hung(self, model: str, pid: int, reason: str) -> bool:
        """The watchdog's verdict on the engine with `pid` (ignored if it changed meanwhile)."""
        supervisor = self._supervisors.get(model) or self._slot(model)  # or a replica's key
        if supervisor is None or supervisor.engine is None or supervisor.engine.pid != pid:
            return False
        return await supervisor.declare_hung(reason)

    def begin_shutdown(self) -> None:
        """Refuse new requests and abandon starts in progress; requests in flight go on."""
        self._closing = True
        for supervisor in self._all_supervisors():
            supervisor.cancel_start()
        self._notify()  # starts waiting for room give up now

    def in_flight(self) -> int:
        return sum(s.in_flight for s in self._all_supervisors())

    async def drained(self, grace: float) -> bool:
        """Wait up to `grace` for every request in flight; whether all finished."""
        busy = [s.drained() for s in self._all_supervisors() if s.in_flight]
        if not busy:
            return True
        try:
            await asyncio.wait_for(asyncio.gather(*busy), grace)
        except TimeoutError:
            return False
        return True

    async def shutdown(self, grace: float) -> None:
        """Stop every engine: wait up to `grace` for requests in flight, then stop all."""
        self.begin_shutdown()
        if self._reaper is not None:
            self._reaper.cancel()
            # A reaper that died of an error must not abort the shutdown (issue 11, defect 2).
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reaper
        await self.drained(grace)
        if self.prewarming.anywhere(self.config):
            with contextlib.suppress(Exception):  # losing what was learned never blocks a stop
                await self.prewarming.save()
        await asyncio.gather(
            *(s.stop("gateway shutdown", drain=False) for s in self._all_supervisors()),
            return_exceptions=True,
        )
        for task in [*self._reconfiguring, *self._evicting]:
            task.cancel()
        await asyncio.gather(*self._reconfiguring, *self._evicting, return_exceptions=True)
        if self._placement is not None:
            await self._placement.written()  # the last measurements are stored

    def kill_engines_now(self) -> None:
        """Last resort on gateway exit: kill any engine still there without waiting."""
        for supervisor in self._all_supervisors():
            if supervisor.engine is not None:
                supervisor.engine.kill_now()

    # ----- status -----

    def model_status(self, name: str) -> dict[str, Any]:
        supervisor = self._supervisors[name]
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
            "port": None if supervisor.engine is None or remote else supervisor.engine.port,
            "in_flight": sum(s.in_flight for s in self._slots(name)),
            "queued": sum(s.waiting for s in self._slots(name)),
            "replicas": replicas_status(
                self._slots(name),
                model.replicas,
                self._core.scale_blocked.get(name),
                self._routing.counts.get(name, (0, 0)),
            ),
            "waiting_for_room": supervisor.placing,
            # While starting: phase (downloading, loading weights, compiling), fraction, detail.
            "progress": None if (view := supervisor.start_view()) is None else view.to_json(),
            "idle_s": supervisor.idle_for(now),
            "last_used_ago_s": None if supervisor.last_used is None else now - supervisor.last_used,
            "idle_timeout_s": supervisor.settings.idle_timeout,
            "last_start_s": supervisor.timings.last_start_s,
            "last_wake_s": supervisor.timings.last_wake_s,
            "starts": supervisor.timings.starts,
            "crashes": supervisor.timings.crashes,
            "gpus": list(supervisor.budget.gpu_indexes) if supervisor.budget else [],
            "prewarm": self._prewarm_status(name),
            "failure": None
            if failure is None
            else {
                "message": failure.message,
                "exit_code": failure.exit_code,
                "log_tail": failure.log_tail,
                "retry_in_s": supervisor.backoff_remaining(),
            },
        }


def _start_guess(supervisor: ModelSupervisor) -> float:
    """What a start of its model takes: the last one measured, or a fifth of its timeout."""
    return supervisor.timings.last_start_s or supervisor.settings.start_timeout / 5


def _pick(value: float | None, default: float) -> float:
    return default if value is None else value


class EngineFor:
    """`Scheduler.engine_for`'s context: the engine is held from entry to exit.

    A class rather than a generator-based context manager: it is on every request's path,
    and for a ready engine its entry takes no await and creates no generator.
    """

    __slots__ = ("_adapter", "_affinity", "_key", "_model", "_scheduler", "_supervisor", "lost")

    def __init__(
        self,
        scheduler: Scheduler,
        model: str,
        key: str = "",
        affinity: str | None = None,
        adapter: str | None = None,
    ) -> None:
        self._scheduler = scheduler
        self._model = model
        self._key = key
        self._affinity = affinity
        self._adapter = adapter
        self._supervisor: ModelSupervisor | None = None
        # Once entered: completes, with the reason, if the held engine is lost (it crashed,
        # was declared hung, a remote was declared down, its node was lost).
        self.lost: asyncio.Future[str] | None = None

    async def __aenter__(self) -> EngineHandle:
        scheduler = self._scheduler
        scheduler.note_request(self._model, self._key)
        supervisor = scheduler._supervisor_to_wait_on(self._model, self._affinity, self._adapter)
        deadline = scheduler._clock() + supervisor.settings.start_timeout
        engine = await scheduler._hold(supervisor, deadline)
        self._supervisor = supervisor
        self.lost = supervisor.lost_signal  # read with no await since the hold: this engine's
        scheduler.maybe_prewarm()
        return engine

    @property
    def engine_key(self) -> str:
        """Once entered, the held engine's key (the model's, or a replica's: `coder#2`), by
        which the watchdog checks it."""
        return self._supervisor.key if self._supervisor is not None else self._model

    async def __aexit__(self, *exc_info: object) -> None:
        if self._supervisor is not None:
            self._supervisor.let_go()
            self._supervisor = None
