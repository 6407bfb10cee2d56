"""Which adapters exist, which each base engine holds, and loading them when asked for.

vLLM loads adapters at run time (`POST /v1/load_lora_adapter`, with
VLLM_ALLOW_RUNTIME_LORA_UPDATING) and lists them in `/v1/models` with `parent` set to the
base. The gateway keeps the record: one load per adapter however many requests arrive
together, the least recently used adapter unloaded when the engine would hold more than
`max_cpu_loras`, and adapters loaded again after the engine restarts. Adapters are checked
before any of this, so a bad one never reaches (or starts) the engine.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from modelyard.config.schema import GatewayConfig, ModelConfig
from modelyard.lifecycle import EngineHandle
from modelyard.lora.adapters import Adapter, read_adapter, scan_adapter_dir
from modelyard.observability.events import EventBus
from modelyard.scheduler.names import Target
from modelyard.scheduler.scheduler import Scheduler

log = logging.getLogger("modelyard.lora")

LOAD_TIMEOUT_S = 120.0


class AdapterError(Exception):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass
class EngineAdapters:
    """The adapters one engine instance holds, least recently used first."""

    engine_id: tuple[int, int]  # (pid, wakes): a new process or a level-2 wake starts empty
    loaded: collections.OrderedDict[str, float] = field(default_factory=collections.OrderedDict)


class LoraManager:
    def __init__(
        self,
        config: GatewayConfig,
        scheduler: Scheduler,
        session: aiohttp.ClientSession,
        events: EventBus,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.scheduler = scheduler
        self.events = events
        self._session = session
        self._clock = clock
        self.bases: dict[str, ModelConfig] = {
            name: model for name, model in config.models.items() if model.lora is not None
        }
        self.adapters: dict[str, Adapter] = {}
        # By (base, engine pid): with replicas a base has several engines, each its own set.
        self._engines: dict[tuple[str, int], EngineAdapters] = {}
        self._loading: dict[tuple[int, str], asyncio.Future[None]] = {}
        # Unloads asked of an engine and not answered yet: the adapter is still on the
        # record (the engine may still hold it) but no request may take it.
        self._unloading: dict[tuple[int, str], asyncio.Future[bool]] = {}
        self._in_use: collections.Counter[str] = collections.Counter()
        # Requests inside `_acquire` for an adapter: it is not unloaded under them between
        # its load and their taking it (else bursts churn: load, evict, load again).
        self._wanted: collections.Counter[str] = collections.Counter()
        self._changed: dict[str, asyncio.Event] = {}
        self._scanner: asyncio.Task[None] | None = None
        scheduler.adapter_loaded = self.holds  # LoRA affinity in the request path
        self.refresh()

    def keep_bases(self, models: Collection[str]) -> None:
        """A reload: base models no longer configured take their adapters with them (at the
        next scan). Other LoRA settings change at the next restart."""
        self.bases = {name: model for name, model in self.bases.items() if name in models}

    # ----- which adapters exist -----

    def refresh(self) -> tuple[list[str], list[str]]:
        """Read the configured adapters and scan the adapter folders; returns (added, removed)."""
        return self._apply(self._collect())

    def _collect(self) -> dict[str, Adapter]:
        """Every adapter on disk, checked (file reads only: safe to run in a thread)."""
        found: dict[str, Adapter] = {}
        taken = set(self.scheduler.model_names())
        for base, model in self.bases.items():
            lora = model.lora
            assert lora is not None
            candidates = [(name, path, True) for name, path in lora.adapters.items()]
            for directory in lora.adapter_dirs:
                candidates += [
                    (n, p, False)
                    for n, p in scan_adapter_dir(directory).items()
                    if n not in lora.adapters
                ]
            for name, path, static in candidates:
                adapter = read_adapter(name, base, path, model.model, lora.max_rank, static)
                if name in taken:
                    adapter = dataclasses.replace(
                        adapter,
                        status=409,
                        problem=f"adapter folder {name!r} has the name of a model or alias; "
                        "rename the folder",
                    )
                elif name in found:
                    adapter = dataclasses.replace(
                        adapter,
                        status=409,
                        problem=f"adapter {name!r} is offered by two base models "
                        f"({found[name].base!r} and {base!r})",
                    )
                found.setdefault(name, adapter)
        return found

    def _apply(self, found: dict[str, Adapter]) -> tuple[list[str], list[str]]:
        taken = set(self.scheduler.model_names())
        added = sorted(set(found) - set(self.adapters))
        removed = sorted(set(self.adapters) - set(found))
        for name in added:
            adapter = found[name]
            if adapter.problem:
                self.events.emit("adapter_refused", adapter.base, adapter.problem, adapter=name)
            else:
                self.events.emit(
                    "adapter_added", adapter.base, f"adapter {name} at {adapter.path}", adapter=name
                )
        for name in removed:
            self.events.emit(
                "adapter_removed",
                self.adapters[name].base,
                f"adapter {name} is gone from disk",
                adapter=name,
            )
        self.adapters = found
        self.scheduler.set_adapter_targets(
            {
                name: Target(model=a.base, public_name=name, upstream_name=name, adapter=name)
                for name, a in found.items()
                if name not in taken
            }
        )
        return added, removed

    def start_background(self) -> None:
        intervals = [
            m.lora.scan_interval
            for m in self.bases.values()
            if m.lora is not None and m.lora.adapter_dirs
        ]
        if intervals:
            self._scanner = asyncio.create_task(self._scan_forever(min(intervals)))

    async def close(self) -> None:
        if self._scanner is not None:
            self._scanner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scanner

    async def _scan_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                # Directory walks can be slow on network disks: read in a thread, apply here.
                self._apply(await asyncio.to_thread(self._collect))
                await self.unload_removed()
            except Exception:  # a scan must never end the scanner
                log.exception("adapter scan failed")

    async def unload_removed(self) -> list[str]:
        """Unload adapters whose folders are gone from the engines that hold them.

        Otherwise the engine would go on listing (and serving, through /upstream) an adapter
        the gateway no longer knows, and a new folder of the same name would be taken for
        the old one, still loaded. One in use is retried at the next scan.
        """
        dropped = []
        for (base, pid), record in list(self._engines.items()):
            engine = next((e for e in self.scheduler.ready_engines_of(base) if e.pid == pid), None)
            if engine is None or record.engine_id[0] != engine.pid:
                continue
            for name in [n for n in record.loaded if n not in self.adapters]:
                if await self.unload(base, name, engine, reason="its folder is gone"):
                    dropped.append(name)
        return dropped

    def listed(self) -> list[Adapter]:
        """Adapters to show in /v1/models: the ones that can be served."""
        return [a for a in self.adapters.values() if a.problem is None]

    def check(self, target: Target) -> Adapter:
        """The adapter for a request, or an error before any engine is started."""
        assert target.adapter is not None
        adapter = self.adapters.get(target.adapter)
        if adapter is None:
            raise AdapterError(404, f"adapter {target.adapter!r} is gone", "adapter_not_found")
        if adapter.problem is not None:
            raise AdapterError(adapter.status, adapter.problem, "adapter_invalid")
        return adapter

    # ----- which adapters an engine holds -----

    @contextlib.asynccontextmanager
    async def use(self, target: Target, engine: EngineHandle) -> AsyncIterator[None]:
        """Hold an adapter loaded in `engine` for one request.

        At most `max_cpu_loras` adapters are loaded at once: a request for another one
        unloads the least recently used idle adapter, or waits until one is idle.
        """
        adapter = self.check(target)
        self._wanted[adapter.name] += 1
        try:
            await self._acquire(adapter, engine)
        finally:
            self._wanted[adapter.name] -= 1
            if not self._wanted[adapter.name]:
                del self._wanted[adapter.name]
        try:
            yield
        finally:
            self._in_use[adapter.name] -= 1
            if not self._in_use[adapter.name]:
                del self._in_use[adapter.name]
                self._notify(adapter.base)

    def _forget_loading(self, key: tuple[int, str]) -> Callable[[asyncio.Future[None]], None]:
        def forget(_future: asyncio.Future[None]) -> None:
            self._loading.pop(key, None)

        return forget

    def _change_event(self, base: str) -> asyncio.Event:
        if base not in self._changed:
            self._changed[base] = asyncio.Event()
        return self._changed[base]

    def _notify(self, base: str) -> None:
        """An adapter of `base` became idle, loaded or unloaded: waiters look again."""
        self._change_event(base).set()
        self._changed[base] = asyncio.Event()

    def _limit(self, base: str) -> int:
        lora = self.bases[base].lora
        assert lora is not None
        return lora.max_cpu_loras or lora.max_loras

    async def _acquire(self, adapter: Adapter, engine: EngineHandle) -> None:
        base = adapter.base
        while True:
            # Taken before looking, with no await in between: no change is missed.
            changed = self._change_event(base)
            record = self._record_for(base, engine)
            unloading = self._unloading.get((engine.pid, adapter.name))
            if unloading is not None:  # wait for the engine's answer, then load it again
                with contextlib.suppress(AdapterError):
                    await asyncio.shield(unloading)
                continue
            if adapter.name in record.loaded:
                record.loaded[adapter.name] = self._clock()
                record.loaded.move_to_end(adapter.name)
                self._in_use[adapter.name] += 1  # no await since the check: it stays loaded
                return
            key = (engine.pid, adapter.name)
            pending = self._loading.get(key)
            if pending is not None:  # one load for all the requests that want it
                await asyncio.shield(pending)
                continue
            loading = sum(1 for pid, _name in self._loading if pid == engine.pid)
            if len(record.loaded) + loading < self._limit(base):
                pending = asyncio.ensure_future(self._load(adapter, engine, record))
                self._loading[key] = pending
                pending.add_done_callback(self._forget_loading(key))
                await asyncio.shield(pending)
                continue
            victim = next(
                (
                    n
                    for n in record.loaded
                    if not self._in_use.get(n)
                    and not self._wanted.get(n)
                    and (engine.pid, n) not in self._unloading
                ),
                None,
            )
            if victim is not None:
                await self.unload(base, victim, engine, reason="least recently used")
                continue
            await changed.wait()

    def _record_for(self, base: str, engine: EngineHandle) -> EngineAdapters:
        level_two = self.bases[base].sleep == 2
        engine_id = (engine.pid, self.scheduler.wakes_of(base) if level_two else 0)
        record = self._engines.get((base, engine.pid))
        if record is None or record.engine_id != engine_id:
            # A new engine (or one that dropped its weights asleep): it holds only the
            # adapters given on its command line. Those it held before come back on demand.
            record = EngineAdapters(engine_id)
            for adapter in self.adapters.values():
                if adapter.base == base and adapter.static and adapter.problem is None:
                    record.loaded[adapter.name] = 0.0
            live = {e.pid for e in self.scheduler.live_engines(base)} | {engine.pid}
            for gone in [k for k in self._engines if k[0] == base and k[1] not in live]:
                del self._engines[gone]  # engines that are gone hold nothing
            self._engines[(base, engine.pid)] = record
        return record

    def holds(self, base: str, name: str, pid: int) -> bool:
        """Whether the engine `pid` of `base` has adapter `name` loaded (as far as we know)."""
        record = self._engines.get((base, pid))
        return record is not None and name in record.loaded

    async def _load(self, adapter: Adapter, engine: EngineHandle, record: EngineAdapters) -> None:
        began = self._clock()
        status, text = await self._post(
            engine, "/v1/load_lora_adapter", {"lora_name": adapter.name, "lora_path": adapter.path}
        )
        if status >= 400 and "already been loaded" not in text:
            self.events.emit("adapter_load_failed", adapter.base, text[:500], adapter=adapter.name)
            raise AdapterError(
                400 if status < 500 else 502,
                f"the engine refused adapter {adapter.name!r}: {text[:500]}",
                "adapter_load_failed",
            )
        record.loaded[adapter.name] = self._clock()
        self._notify(adapter.base)
        self.events.emit(
            "adapter_load",
            adapter.base,
            f"loaded {adapter.name}",
            self._clock() - began,
            adapter=adapter.name,
        )

    async def unload(self, base: str, name: str, engine: EngineHandle, reason: str) -> bool:
        """Unload an idle adapter; the record changes only once the engine has answered.

        Taking it off the record before the answer (as once) let a request load it again
        while the late unload then removed it on the engine: the gateway believed it loaded,
        the engine did not, and every request for it got a 404 (issue 11, defect 3). Now
        requests for it wait for the answer and then load it again.
        """
        key = (engine.pid, name)
        record = self._record_for(base, engine)
        if name not in record.loaded or self._in_use.get(name) or key in self._unloading:
            return False
        pending = asyncio.ensure_future(self._unload(base, name, engine, record, reason))
        self._unloading[key] = pending
        try:
            return await asyncio.shield(pending)
        finally:
            if pending.done():
                self._unloading.pop(key, None)
            else:  # our caller was cancelled: the unload goes on and cleans up after itself
                pending.add_done_callback(lambda _f: self._unloading.pop(key, None))

    async def _unload(
        self, base: str, name: str, engine: EngineHandle, record: EngineAdapters, reason: str
    ) -> bool:
        try:
            status, text = await self._post(engine, "/v1/unload_lora_adapter", {"lora_name": name})
            if status >= 400 and status != 404:
                # The engine says no: it still holds the adapter, so the record keeps it.
                log.warning("unloading adapter %s answered %s: %s", name, status, text[:200])
                return False
            record.loaded.pop(name, None)  # 404: it did not hold it, which is the same end
            self.events.emit("adapter_unload", base, f"unloaded {name}: {reason}", adapter=name)
            return True
        finally:
            self._unloading.pop((engine.pid, name), None)
            self._notify(base)

    async def _post(self, engine: EngineHandle, path: str, body: dict[str, Any]) -> tuple[int, str]:
        timeout = aiohttp.ClientTimeout(total=LOAD_TIMEOUT_S)
        try:
            async with self._session.post(
                engine.base_url + path, json=body, timeout=timeout
            ) as response:
                return response.status, await response.text()
        except (aiohttp.ClientError, TimeoutError) as error:
            raise AdapterError(
                502, f"the engine did not answer {path}: {error}", "upstream_error"
            ) from error

    # ----- status -----

    def loaded_in(self, base: str) -> list[str]:
        """The adapters loaded in any of the base's engines (its own engine's first)."""
        names: dict[str, None] = {}
        for engine in self.scheduler.live_engines(base):
            record = self._engines.get((base, engine.pid))
            if record is not None:
                names.update(dict.fromkeys(record.loaded))
        return list(names)

    def status(self) -> list[dict[str, Any]]:
        result = []
        for adapter in sorted(self.adapters.values(), key=lambda a: a.name):
            result.append(
                {
                    "name": adapter.name,
                    "base": adapter.base,
                    "path": adapter.path,
                    "rank": adapter.rank,
                    "static": adapter.static,
                    "state": "invalid"
                    if adapter.problem
                    else (
                        "loaded" if adapter.name in self.loaded_in(adapter.base) else "available"
                    ),
                    "problem": adapter.problem,
                    "in_use": self._in_use.get(adapter.name, 0),
                }
            )
        return result
