"""The composition root: builds every part from a config and owns their lifetimes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from modelyard.auth.authenticator import Authenticator
from modelyard.auth.exposure import exposure_problem
from modelyard.checking.checks import load_checked_config
from modelyard.config.loader import ConfigError
from modelyard.config.schema import GatewayConfig
from modelyard.engines import engine_kind
from modelyard.engines.base import LaunchSpec
from modelyard.lifecycle import EngineHandle, EngineStarter, ModelState, SleepControl
from modelyard.lora.manager import LoraManager
from modelyard.observability.activity_log import log_event, log_request
from modelyard.observability.event_store import EventStore, open_event_store
from modelyard.observability.events import EventBus
from modelyard.observability.key_metrics import KeyUsageCollector
from modelyard.observability.metrics import GatewayMetrics
from modelyard.observability.node_metrics import NodeCollector
from modelyard.observability.queue_metrics import KeyQueueCollector
from modelyard.observability.requests import RequestObserver, RequestRecord
from modelyard.placement.coordinator import PlacementCoordinator
from modelyard.placement.footprints import FootprintStore
from modelyard.placement.inventory import (
    DeclaredInventory,
    GpuInventory,
    GpuInventoryError,
    NvmlInventory,
)
from modelyard.proxy.forward import UpstreamClient
from modelyard.redaction import register_secrets
from modelyard.runtime import ProcessRegistry, ProcessRuntime
from modelyard.runtime.remote import RemoteConnector, remote_answers
from modelyard.runtime.vllm_sleep import VllmSleepControl
from modelyard.scheduler.reload_plan import ReloadPlan, plan_reload
from modelyard.scheduler.scheduler import Scheduler
from modelyard.scheduler.watchdog import EngineWatchdog, WatchdogSettings, health_probe
from modelyard.sharing.fair_queue import FairQueues
from modelyard.state import SetAside, StateDirectory

if TYPE_CHECKING:  # Ray is imported only when the config says `runtime: ray`
    from modelyard.runtime.ray import RayCluster

log = logging.getLogger("modelyard")


@dataclass(frozen=True)
class ReloadReport:
    """What a reload did: the answer of POST /admin/reload and `modelyard reload`."""

    file: str
    plan: ReloadPlan

    def to_json(self) -> dict[str, object]:
        return {
            "file": self.file,
            "changes": [change.to_json() for change in self.plan.changes],
            "not_applied": self.plan.not_applied,
        }


@dataclass
class Gateway:
    config: GatewayConfig
    state_dir: Path
    events: EventBus
    scheduler: Scheduler
    upstream: UpstreamClient
    health_session: aiohttp.ClientSession
    registry: ProcessRegistry
    placement: PlacementCoordinator | None = None
    request_observers: list[RequestObserver] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    event_store: EventStore | None = None
    metrics: GatewayMetrics = field(init=False)
    state: StateDirectory | None = None
    auth: Authenticator | None = None
    watchdog: EngineWatchdog | None = None
    lora: LoraManager | None = None
    _background: set[asyncio.Task[None]] = field(default_factory=set)
    # The file `modelyard reload`, SIGHUP and POST /admin/reload read again (None: no file).
    config_path: Path | None = None
    # Called with the new config after a reload is applied (the log format, the body limit;
    # TLS certificates when the gateway serves TLS). Keep each one quick and synchronous.
    reload_hooks: list[Callable[[GatewayConfig], None]] = field(default_factory=list)
    _reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    cluster: RayCluster | None = None
    # Requests beyond a model's max_in_flight wait here, served fairly across keys.
    fair_queues: FairQueues = field(default_factory=FairQueues)

    def __post_init__(self) -> None:
        # The config file's `listen` (it differs from config.listen when --host or --port
        # replaced it): a reload reports `listen` as not applied only when the file changed it.
        self.file_listen = self.config.listen
        # Observability hangs off the two hooks every part already feeds: events, requests.
        self.metrics = GatewayMetrics(self, self.config.models)
        self.events.add_sink(self.metrics.observe_event)
        self.events.add_sink(log_event)
        self.request_observers += [self.metrics.observe_request, log_request]
        self.metrics.registry.register(KeyUsageCollector(lambda: self.auth))
        self.metrics.registry.register(KeyQueueCollector(self.fair_queues.counts))
        if self.cluster is not None:
            self.metrics.registry.register(
                NodeCollector(self.node_status, self.gpu_status, self._model_nodes)
            )

    @classmethod
    def create(cls, config: GatewayConfig, start_engine: EngineStarter | None = None) -> Gateway:
        """Build the parts (call inside a running event loop).

        `start_engine` replaces the process runtime (the in-process test harness passes
        engines that run in the test's own event loop); `engine: remote` models are still
        connected to where they run."""
        # Before anything can log or record: `modelyard serve` registers them too, and
        # registering twice costs nothing (embedded and test gateways have no `serve`).
        register_secrets(config.secret_values())
        state_dir = Path(config.state_dir).expanduser()
        state_dir.mkdir(parents=True, exist_ok=True)
        event_store = open_event_store(state_dir)  # the history survives restarts
        events = EventBus(archive=event_store)
        registry = ProcessRegistry(state_dir / "engines")
        cluster: RayCluster | None = None
        if config.runtime == "ray":
            from modelyard.runtime.ray import RayCluster, RayRuntime

            cluster = RayCluster(config.ray, events)
            cluster.connect()  # first: a cluster that cannot be reached fails the start
            cluster.discover()  # the nodes' agents (they stop orphans) and their GPUs
        health_session = aiohttp.ClientSession()
        local: EngineStarter = (
            RayRuntime(cluster, state_dir, health_session).start
            if cluster is not None
            else ProcessRuntime(state_dir, health_session, registry).start
        )
        remote = RemoteConnector(state_dir, health_session)
        coordinator = _placement_for(config, state_dir, events, cluster)
        # Without managed GPUs the scheduler plans on an unlimited inventory: one behaviour.
        scheduler = Scheduler(
            config,
            engine_starter(start_engine or local, remote),
            events,
            placement=coordinator,
            sleep_control=_sleep_control(health_session, cluster),
        )
        upstream = UpstreamClient(
            config.limits.upstream_connect_timeout, config.limits.upstream_read_timeout
        )
        state = StateDirectory(state_dir, report=_state_reporter(events))
        for record in event_store.set_aside if event_store is not None else []:
            state.note(record)  # the event history was set aside before the bus existed
        watchdog = _watchdog_for(config, scheduler, health_session)
        auth = Authenticator.create(config.auth, state)
        auth.require_unique_names(config.auth, "the config")  # a key added while stopped
        auth.open_routes = scheduler.open_routes()
        lora = (
            LoraManager(config, scheduler, health_session, events)
            if any(model.lora is not None for model in config.models.values())
            else None
        )
        return cls(
            config,
            state_dir,
            events,
            scheduler,
            upstream,
            health_session,
            registry,
            coordinator,
            event_store=event_store,
            state=state,
            auth=auth,
            watchdog=watchdog,
            request_observers=[_watchdog_observer(watchdog)],
            lora=lora,
            cluster=cluster,
        )

    async def start(self) -> None:
        if self.cluster is not None:
            await self.cluster.start()  # agents first: they stop orphans, report GPUs
        for orphan in self.registry.stop_orphans():
            self.events.emit(
                "orphan_stopped",
                orphan.name,
                f"engine pid {orphan.pid} left by an earlier gateway was "
                + ("stopped" if orphan.stopped else "still running after SIGKILL"),
            )
            log.warning("stopped orphaned engine %s (pid %d)", orphan.name, orphan.pid)
        self.scheduler.start_background()
        if self.lora is not None:
            self.lora.start_background()
        if self.watchdog is not None:
            self.watchdog.start()
        if self.auth is not None:
            self.auth.usage.start()
            self.auth.ledger.start()
        self.preload(self.config.models)
        self._in_background(self._watch_down_remotes())

    def in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` as a task the gateway cancels when it closes."""
        self._in_background(work)

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _watch_down_remotes(self) -> None:
        """Reconnect to a remote engine once it answers again, so status shows it is back
        without waiting for a request (the watchdog checks remotes only while they are up)."""
        while True:
            interval = self.config.limits.health_check_interval
            await asyncio.sleep(interval if interval > 0 else 10.0)
            for name, model in list(self.config.models.items()):
                if model.engine != "remote" or name not in self.scheduler.models():
                    continue
                if self.scheduler.state_of(name) is not ModelState.FAILED:
                    continue
                spec = engine_kind("remote").launch_spec(name, model, self.config, 0, None)
                if await remote_answers(self.health_session, spec):
                    self._in_background(self._preload_one(name, reason="remote answers again"))

    def preload(self, names: Iterable[str]) -> None:
        """Start the models marked `preload: true` among `names`, in the background, and
        connect to remote engines (already running: status shows at once whether they answer,
        and the watchdog's health checks follow them from then on)."""
        for name in names:
            model = self.config.models.get(name)
            if model is not None and (model.preload or model.engine == "remote"):
                reason = "connect" if model.engine == "remote" else "preload"
                self._in_background(self._preload_one(name, reason))

    async def _preload_one(self, name: str, reason: str) -> None:
        try:
            await self.scheduler.load(name, reason=reason)
        except Exception as error:  # the failure is already an event; requests retry
            log.warning("preload of %s failed: %s", name, error)

    async def reload(self) -> ReloadReport:
        """Read the config file again and apply what changed, without stopping what runs.

        A file that does not validate changes nothing (`ConfigError` names the file, the key
        and the problem). One reload at a time.
        """
        async with self._reload_lock:
            if self.config_path is None:
                raise ConfigError(["this gateway was not started from a config file"])
            try:
                new = load_checked_config(self.config_path)
                plan = self._apply(new)
            except ConfigError as error:
                self.events.emit(
                    "reload_failed", None, "; ".join(error.problems), file=str(self.config_path)
                )
                raise
            for change in plan.changes:
                self.events.emit("config_changed", change.model, change.detail, change=change.what)
            summary = f"{len(plan.changes)} change(s)" if plan.changes else "no changes"
            self.events.emit(
                "reload",
                None,
                f"{self.config_path}: {summary}",
                file=str(self.config_path),
                not_applied=plan.not_applied,
            )
            return ReloadReport(str(self.config_path), plan)

    def _apply(self, new: GatewayConfig) -> ReloadPlan:
        # The listen address may come from the command line (--host/--port); it is bound
        # at start either way.
        file_listen = new.listen
        new = new.model_copy(update={"listen": self.config.listen})
        problem = exposure_problem(new)
        if problem is not None:
            raise ConfigError([f"{self.config_path}: auth: {problem}"])
        if (
            self.auth is not None
            and self.auth.runtime_keys
            and not any(key.admin for key in new.auth.keys)
        ):
            # Runtime keys keep access control on: nobody could manage them any more.
            raise ConfigError(
                [
                    f"{self.config_path}: auth.keys: no admin key left, but runtime keys exist "
                    "(keep an admin key in the config, or revoke the runtime keys first)"
                ]
            )
        if self.auth is not None:
            # Refused whole: nothing changes.
            self.auth.require_unique_names(new.auth, str(self.config_path))
        register_secrets(new.secret_values())  # a reloaded file may bring new secrets
        plan = plan_reload(self.config, new)
        if file_listen != self.file_listen and file_listen != self.config.listen:
            plan.not_applied.append("listen: bound when the gateway starts; restart to change it")
        self.file_listen = file_listen
        self.scheduler.apply_config(new, plan)  # the placement's config too
        if self.lora is not None:
            # Removed base models take their adapters with them; other LoRA settings change
            # at the next restart (reported in `not_applied`).
            self.lora.keep_bases(new.models)
        if self.auth is not None:
            self.auth.replace_config_keys(new.auth)
            self.auth.open_routes = self.scheduler.open_routes()
        limits = new.limits
        self.upstream.set_timeouts(limits.upstream_connect_timeout, limits.upstream_read_timeout)
        if self.watchdog is not None:
            self.watchdog.reconfigure(
                WatchdogSettings(
                    limits.health_check_interval,
                    limits.health_check_timeout,
                    limits.health_check_failures,
                )
            )
        self.config = new
        for hook in self.reload_hooks:
            hook(new)
        self.preload(plan.added)
        return plan

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        # No error of a background part may stop the engines' shutdown (issue 11, defect 2:
        # one stored error once left every engine running): each is logged and passed over.
        if self.watchdog is not None:
            with _logged("closing the watchdog"):
                await self.watchdog.close()  # first: a stopping engine is not a hung one
        if self.lora is not None:
            with _logged("closing the adapter manager"):
                await self.lora.close()
        await self.scheduler.shutdown(self.config.limits.shutdown_grace)
        if self.auth is not None:
            await self.auth.close()
        await self.upstream.close()
        await self.health_session.close()
        if self.cluster is not None:
            await self.cluster.close()
        if self.event_store is not None:
            # Last: the engines' stop events are written first. In a thread, as it waits for
            # the queued events to be written (and for a locked file, up to a grace).
            await asyncio.to_thread(self.event_store.close)

    def lora_manager(self) -> LoraManager:
        """The adapter manager (only asked for when a target is an adapter, so one exists)."""
        assert self.lora is not None
        return self.lora

    def adapter_servable(self, name: str) -> bool:
        adapter = self.lora.adapters.get(name) if self.lora is not None else None
        return adapter is not None and adapter.problem is None

    def events_dropped(self) -> int:
        """Events the history could not keep (a write queue full behind a locked database)."""
        return self.event_store.dropped if self.event_store is not None else 0

    def gpu_status(self) -> list[dict[str, object]]:
        """GPUs with total, used and planned memory (empty without managed GPUs)."""
        if self.placement is None:
            return []
        try:
            return self.placement.gpu_status()
        except GpuInventoryError as error:
            log.warning("GPU status unavailable: %s", error)
            return []

    def _model_nodes(self) -> dict[str, str | None]:
        return {
            name: engine.node if (engine := self.scheduler.live_engine(name)) else None
            for name in self.scheduler.models()
        }

    def node_status(self) -> list[dict[str, Any]]:
        """Ray nodes: address, liveness, GPUs, engines (empty unless `runtime: ray`)."""
        return self.cluster.node_status() if self.cluster is not None else []

    def model_status(self, name: str) -> dict[str, object]:
        status = self.scheduler.model_status(name)
        # The fair queue in front of the engine: its limit and each key's share of it.
        model = self.config.models.get(name)  # None while a reload retires it
        status["max_in_flight"] = model.max_in_flight if model is not None else None
        status["waiting_turn"] = self.fair_queues.waiting(name)
        status["keys"] = {
            key: {
                "waiting": counts.waiting,
                "in_flight": counts.in_flight,
                "served": counts.served,
                "waited": counts.queued,
                "mean_wait_s": round(counts.wait_seconds / counts.queued, 3)
                if counts.queued
                else 0.0,
                "longest_wait_s": round(counts.longest_wait_s, 3),
            }
            for key, counts in self.fair_queues.counts().get(name, {}).items()
        }
        if self.placement is not None and not self.scheduler.is_remote(name):
            status.update(self.placement.model_placement(name))
        if self.cluster is not None:
            engine = self.scheduler.live_engine(name)
            status["node"] = engine.node if engine is not None else None
            status["node_gpus"] = self.cluster.node_gpus(status.get("gpus"))
            status["ray_actor"] = engine.actor_name if engine is not None else None
        return status

    def observe(self, record: RequestRecord) -> None:
        for observer in self.request_observers:
            observer(record)


def engine_starter(local: EngineStarter, remote: RemoteConnector) -> EngineStarter:
    """Our runtime (processes here, or actors on a Ray cluster) for the engines we run, a
    connection for those that run elsewhere."""

    async def start(name: str, spec_for_port: Callable[[int], LaunchSpec]) -> EngineHandle:
        if spec_for_port(0).remote_url is not None:
            return await remote.start(name, spec_for_port)
        return await local(name, spec_for_port)

    return start


@contextlib.contextmanager
def _logged(what: str) -> Iterator[None]:
    try:
        yield
    except Exception:
        log.exception("%s failed; shutting down the rest", what)


def _placement_for(
    config: GatewayConfig, state_dir: Path, events: EventBus, cluster: RayCluster | None = None
) -> PlacementCoordinator | None:
    """Declared GPUs, else NVML when a driver answers, else no GPU management (CPU engines).

    On a Ray cluster the cluster is the inventory: every node's GPUs, read by its agent
    through NVML; a cluster without GPUs at the gateway's start runs CPU engines unplanned.
    """
    inventory: GpuInventory
    if cluster is not None:
        if not cluster.gpus():
            return None  # CPU engines: the runtime spreads them over the nodes
        inventory, measures = cluster, True
    elif config.gpus is not None:
        inventory, measures = DeclaredInventory.from_config(config.gpus), False
    else:
        nvml = NvmlInventory()
        try:
            if not nvml.gpus():
                return None
        except GpuInventoryError as error:
            log.info("no GPU management: %s", error)
            return None
        inventory, measures = nvml, True

    def corrupt(path: Path, detail: str) -> None:
        events.emit("state_file_corrupt", None, f"{path} was unreadable ({detail}); set aside")

    footprints = FootprintStore(state_dir, on_corrupt=corrupt)
    return PlacementCoordinator(config, inventory, footprints, events, measures)


def _sleep_control(session: aiohttp.ClientSession, cluster: RayCluster | None) -> SleepControl:
    control = VllmSleepControl(session)
    if cluster is None:
        return control
    from modelyard.runtime.ray.sleep import ClusterSleepControl

    return ClusterSleepControl(control, cluster)


def _state_reporter(events: EventBus) -> Callable[[SetAside], None]:
    """A damaged state file is an event (and a log line), never a silent loss."""

    def report(record: SetAside) -> None:
        events.emit(
            "state_file_corrupt",
            None,
            record.describe(),
            path=str(record.path),
            moved_to=str(record.moved_to),
        )

    return report


def _watchdog_for(
    config: GatewayConfig, scheduler: Scheduler, session: aiohttp.ClientSession
) -> EngineWatchdog:
    limits = config.limits
    settings = WatchdogSettings(
        limits.health_check_interval, limits.health_check_timeout, limits.health_check_failures
    )
    return EngineWatchdog(scheduler, health_probe(session), settings)


def _watchdog_observer(watchdog: EngineWatchdog) -> RequestObserver:
    # 504 is what serving answers when the engine sent nothing within the read timeout.
    return lambda record: watchdog.observe_request(
        record.model, record.status, timed_out=record.status == 504
    )
