"""The composition root: builds every part from a config and owns their lifetimes."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from modelyard.auth.authenticator import Authenticator
from modelyard.config.schema import GatewayConfig
from modelyard.lora.manager import LoraManager
from modelyard.observability.activity_log import log_event, log_request
from modelyard.observability.event_store import EventStore, open_event_store
from modelyard.observability.events import EventBus
from modelyard.observability.metrics import GatewayMetrics
from modelyard.observability.node_metrics import NodeCollector
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
from modelyard.runtime import ProcessRegistry, ProcessRuntime
from modelyard.runtime.vllm_sleep import VllmSleepControl
from modelyard.scheduler.scheduler import Scheduler
from modelyard.scheduler.supervisor import EngineStarter, SleepControl
from modelyard.scheduler.watchdog import EngineWatchdog, WatchdogSettings, health_probe
from modelyard.state import SetAside, StateDirectory

if TYPE_CHECKING:  # Ray is imported only when the config says `runtime: ray`
    from modelyard.runtime.ray import RayCluster

log = logging.getLogger("modelyard")


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
    cluster: RayCluster | None = None

    def __post_init__(self) -> None:
        # Observability hangs off the two hooks every part already feeds: events, requests.
        self.metrics = GatewayMetrics(self, self.config.models)
        self.events.add_sink(self.metrics.observe_event)
        self.events.add_sink(log_event)
        self.request_observers += [self.metrics.observe_request, log_request]
        if self.cluster is not None:
            self.metrics.registry.register(
                NodeCollector(self.node_status, self.gpu_status, self._model_nodes)
            )

    @classmethod
    def create(cls, config: GatewayConfig, start_engine: EngineStarter | None = None) -> Gateway:
        """Build the parts (call inside a running event loop).

        `start_engine` replaces the process runtime (the in-process test harness passes
        engines that run in the test's own event loop)."""
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
        if start_engine is None:
            if cluster is not None:
                start_engine = RayRuntime(cluster, state_dir, health_session).start
            else:
                start_engine = ProcessRuntime(state_dir, health_session, registry).start
        coordinator = _placement_for(config, state_dir, events, cluster)
        # Without managed GPUs the scheduler plans on an unlimited inventory: one behaviour.
        scheduler = Scheduler(
            config,
            start_engine,
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
            auth=Authenticator.create(config.auth, state),
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

    async def close(self) -> None:
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
            await self.auth.usage.close()
        await self.upstream.close()
        await self.health_session.close()
        if self.cluster is not None:
            await self.cluster.close()
        if self.event_store is not None:
            self.event_store.close()  # last: the engines' stop events are written first

    def lora_manager(self) -> LoraManager:
        """The adapter manager (only asked for when a target is an adapter, so one exists)."""
        assert self.lora is not None
        return self.lora

    def adapter_servable(self, name: str) -> bool:
        adapter = self.lora.adapters.get(name) if self.lora is not None else None
        return adapter is not None and adapter.problem is None

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
            name: getattr(self.scheduler.live_engine(name), "node", None)
            for name in self.scheduler.models()
        }

    def node_status(self) -> list[dict[str, Any]]:
        """Ray nodes: address, liveness, GPUs, engines (empty unless `runtime: ray`)."""
        return self.cluster.node_status() if self.cluster is not None else []

    def model_status(self, name: str) -> dict[str, object]:
        status = self.scheduler.model_status(name)
        if self.placement is not None:
            status.update(self.placement.model_placement(name))
        if self.cluster is not None:
            engine = self.scheduler.live_engine(name)
            status["node"] = getattr(engine, "node", None)
            status["node_gpus"] = self.cluster.node_gpus(status.get("gpus"))
            status["ray_actor"] = getattr(engine, "actor_name", None)
        return status

    def observe(self, record: RequestRecord) -> None:
        for observer in self.request_observers:
            observer(record)


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
