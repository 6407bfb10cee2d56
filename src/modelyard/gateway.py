"""The composition root: builds every part from a config and owns their lifetimes."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from modelyard.config.schema import GatewayConfig
from modelyard.observability.events import EventBus
from modelyard.proxy.forward import UpstreamClient
from modelyard.runtime import ProcessRegistry, ProcessRuntime
from modelyard.scheduler.yard import Yard

log = logging.getLogger("modelyard")


@dataclass(frozen=True)
class RequestRecord:
    """One proxied request, for metrics and the request log."""

    model: str
    route: str
    key_name: str
    status: int
    duration_s: float
    first_byte_s: float | None
    streamed: bool
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


RequestObserver = Callable[[RequestRecord], None]


@dataclass
class Gateway:
    config: GatewayConfig
    state_dir: Path
    events: EventBus
    yard: Yard
    upstream: UpstreamClient
    health_session: aiohttp.ClientSession
    registry: ProcessRegistry
    request_observers: list[RequestObserver] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)

    @classmethod
    def create(cls, config: GatewayConfig) -> Gateway:
        """Build the parts (call inside a running event loop)."""
        state_dir = Path(config.state_dir).expanduser()
        state_dir.mkdir(parents=True, exist_ok=True)
        events = EventBus()
        registry = ProcessRegistry(state_dir / "engines")
        health_session = aiohttp.ClientSession()
        runtime = ProcessRuntime(state_dir, health_session, registry)
        yard = Yard(config, runtime.start, events)
        upstream = UpstreamClient(
            config.limits.upstream_connect_timeout, config.limits.upstream_read_timeout
        )
        return cls(config, state_dir, events, yard, upstream, health_session, registry)

    async def start(self) -> None:
        for orphan in self.registry.stop_orphans():
            self.events.emit(
                "orphan_stopped",
                orphan.name,
                f"engine pid {orphan.pid} left by an earlier gateway was "
                + ("stopped" if orphan.stopped else "still running after SIGKILL"),
            )
            log.warning("stopped orphaned engine %s (pid %d)", orphan.name, orphan.pid)
        self.yard.start_background()

    async def close(self) -> None:
        await self.yard.shutdown(self.config.limits.shutdown_grace)
        await self.upstream.close()
        await self.health_session.close()

    def gpu_status(self) -> list[dict[str, object]]:
        """GPUs with total, used and planned memory (empty without managed GPUs)."""
        return []

    def observe(self, record: RequestRecord) -> None:
        for observer in self.request_observers:
            observer(record)
