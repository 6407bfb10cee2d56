"""GPU memory as the scheduler sees it: where each engine is, what it holds, what it measured.

The scheduler (scheduler/scheduler.py) asks it for the planning inputs (`gpu_capacities`,
`engines`, `target`), records its decisions here (`place`), and the supervisors report each
change of residency (`finished`), from which footprints are measured and learned. It decides
nothing: the decision is `scheduler.decide.decide`, on top of the pure `plan_placement`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from modelyard.config.schema import GatewayConfig
from modelyard.engines.base import MemoryBudget
from modelyard.lifecycle import EngineOwner, ModelState
from modelyard.observability.events import EventBus
from modelyard.placement.estimate import estimate_bytes, weights_bytes
from modelyard.placement.footprints import Footprint, FootprintStore, engine_fingerprint
from modelyard.placement.inventory import GpuInventory, GpuInventoryError
from modelyard.placement.planning import POLICY_STATE as POLICY_STATE
from modelyard.placement.planning import engine_record
from modelyard.placement.policy import Engine, GpuCapacity, Target

log = logging.getLogger("modelyard.placement")

# Without per-process measurement (declared GPUs), a sleeping vLLM engine is assumed to keep
# this share of its memory (CUDA context, allocator pools); measured values replace it.
ASSUMED_SLEEP_RESIDUAL = 0.1
MEMORY_RETURN_TIMEOUT_S = 10.0
MEMORY_POLL_S = 0.1


@dataclass
class Residency:
    """What one engine holds on the GPUs, as planned and then as measured."""

    gpus: tuple[int, ...]
    awake_bytes_per_gpu: int
    asleep_bytes_per_gpu: int
    measured: bool = False
    # vLLM fills whatever budget it gets: a start planned as "the whole GPU" (unknown size,
    # or the retry after an OOM) measures the budget, not the model, so it is not learned.
    learnable: bool = True
    # As it was started: an engine outlives its model's place in the config (a reload).
    sleep_level: int = 0


@dataclass(frozen=True)
class _Record:
    """Measurements to store for one model's configuration."""

    model: str
    fingerprint: str
    awake_bytes_per_gpu: int | None = None
    asleep_bytes_per_gpu: int | None = None
    start_seconds: float | None = None
    wake_seconds: float | None = None


class PlacementCoordinator:
    def __init__(
        self,
        config: GatewayConfig,
        inventory: GpuInventory,
        footprints: FootprintStore,
        events: EventBus,
        measures_processes: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.inventory = inventory
        self.footprints = footprints
        self.events = events
        # NVML sees each process's memory; a declared inventory does not.
        self.measures_processes = measures_processes
        self._clock = clock
        self._engines: Callable[[], Mapping[str, EngineOwner]] = dict
        self.residency: dict[str, Residency] = {}  # by engine key
        self._whole_gpu_next: set[str] = set()  # after an OOM: plan the next try generously
        self.last_plan: dict[str, str] = {}
        # What decisions need from disk, read off the event loop (`read_inputs`) and kept:
        # a decision is synchronous and must not walk a weights folder or wait on SQLite.
        self._footprints: dict[tuple[str, str], Footprint | None] = {}
        self._disk_bytes: dict[str, int | None] = {}
        self._writes: set[asyncio.Future[None]] = set()

    def attach(self, engines: Callable[[], Mapping[str, EngineOwner]]) -> None:
        """`engines`: every engine's owner by its key, configured or draining after a reload
        removed its model (issue 22: an engine is seen until its process is gone)."""
        self._engines = engines

    def rekey(self, old: str, new: str) -> None:
        """An engine's key changed (its model was removed): its memory goes with it."""
        if old in self.residency:
            self.residency[new] = self.residency.pop(old)

    # ----- called by the scheduler -----

    def place(
        self, supervisor: EngineOwner, gpus: tuple[int, ...], bytes_per_gpu: int, why: str
    ) -> MemoryBudget:
        """The scheduler decided: record where the engine goes and return its budget."""
        name = supervisor.name
        model = self.config.models[name]
        self.last_plan[supervisor.key] = why
        residency = self.residency.get(supervisor.key)  # a replica's is its own
        if supervisor.state is ModelState.SLEEPING and residency is not None:
            return MemoryBudget(
                residency.gpus, residency.awake_bytes_per_gpu, self._total(residency.gpus)
            )
        unknown = name in self._whole_gpu_next or self.target(supervisor).bytes_per_gpu is None
        self.residency[supervisor.key] = Residency(
            gpus,
            bytes_per_gpu,
            int(bytes_per_gpu * ASSUMED_SLEEP_RESIDUAL) if model.sleep else 0,
            learnable=not unknown or model.engine != "vllm",
            sleep_level=(model.sleep or 0) if supervisor.can_sleep else 0,
        )
        self._whole_gpu_next.discard(name)
        self.events.emit(
            "placed", name, why, gpus=list(gpus), bytes_per_gpu=bytes_per_gpu, engine=supervisor.key
        )
        return MemoryBudget(gpus, bytes_per_gpu, self._total(gpus))

    def note_plan(self, name: str, why: str) -> None:
        """What the scheduler plans for `name` while it waits (shown in status)."""
        self.last_plan[name] = why

    async def finished(self, supervisor: EngineOwner, ok: bool) -> None:
        """After a start, wake, sleep or stop: measure and learn."""
        name = supervisor.name
        record = None
        if supervisor.key != name:  # draining after a reload removed its model: no learning
            if supervisor.state in (ModelState.STOPPED, ModelState.FAILED):
                self.residency.pop(supervisor.key, None)
            return
        try:
            # After a start, `finished` comes before the supervisor marks the model ready: it
            # is still STARTING here, and the engine already holds its full footprint.
            if ok and supervisor.state in (ModelState.READY, ModelState.STARTING):
                record = self._learn_awake(supervisor)
            elif supervisor.state is ModelState.SLEEPING:
                record = self._learn_asleep(supervisor)
            elif supervisor.state in (ModelState.STOPPED, ModelState.FAILED):
                self.residency.pop(supervisor.key, None)
        except GpuInventoryError as error:
            log.warning("could not measure %s: %s", name, error)
        if record is not None:
            # Stored in the background: the engine is ready now, whatever SQLite does.
            task = asyncio.ensure_future(self._write(record))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    def note_out_of_memory(self, supervisor: EngineOwner) -> None:
        """The engine ran out of GPU memory while starting: plan its retry generously."""
        self._whole_gpu_next.add(supervisor.name)

    # ----- planning inputs -----

    def _fingerprint(self, supervisor: EngineOwner) -> str:
        spec = supervisor.launch_spec_for(0, None)
        return engine_fingerprint(
            spec.argv, spec.env, self.config.models[supervisor.name].model, port=0
        )

    async def read_inputs(self, supervisor: EngineOwner) -> None:
        """Read what decisions for `supervisor` need from disk, in a thread: its footprint
        (SQLite, which may wait up to its busy timeout on another process's lock) and, with
        no footprint or memory hint, the weights' size (a folder walk). Both are kept; each
        footprint write here refreshes the copy, and the writes run in a thread too."""
        model = self.config.models.get(supervisor.name)
        if model is None:
            return
        key = (supervisor.name, self._fingerprint(supervisor))
        if key not in self._footprints:
            try:
                self._footprints[key] = await asyncio.to_thread(self.footprints.get, *key)
            except Exception as error:  # planned on its hint or its weights; read next time
                log.warning("could not read the footprint of %s: %s", supervisor.name, error)
        if not model.model or model.memory is not None:
            return
        if self._footprints.get(key) is not None or model.model in self._disk_bytes:
            return
        self._disk_bytes[model.model] = await asyncio.to_thread(weights_bytes, model.model)

    def _footprint(self, supervisor: EngineOwner) -> Footprint | None:
        """The footprint read by `read_inputs` (never read here: this runs on the event
        loop). An engine not yet read has none, and is planned on its hint or its weights."""
        return self._footprints.get((supervisor.name, self._fingerprint(supervisor)))

    def target(self, supervisor: EngineOwner) -> Target:
        name = supervisor.name
        model = self.config.models[name]
        if name in self._whole_gpu_next:
            need = None
        else:
            read = model.model in self._disk_bytes if model.model else False
            estimate = estimate_bytes(
                footprint=self._footprint(supervisor),
                hint_bytes=model.memory,
                model=None if read else model.model,
                tensor_parallel=model.tensor_parallel,
                disk_bytes=self._disk_bytes.get(model.model) if model.model else None,
            )
            need = estimate.bytes_per_gpu
        return Target(
            name=supervisor.key,  # a replica is planned as an engine of its own
            bytes_per_gpu=need,
            gpus=tuple(model.gpus or ()),
            tensor_parallel=model.tensor_parallel,
            exclusive_group=self.config.exclusive_group_of(name),
        )

    def _held_per_gpu(self) -> dict[int, int]:
        """Bytes our engines hold on each GPU as planned (a sleeping one, its residual)."""
        held: dict[int, int] = {}
        engines = self._engines()
        for key, residency in self.residency.items():
            supervisor = engines.get(key)
            asleep = supervisor is not None and (
                supervisor.state is ModelState.SLEEPING or supervisor.stopping_asleep
            )
            size = residency.asleep_bytes_per_gpu if asleep else residency.awake_bytes_per_gpu
            for index in residency.gpus:
                held[index] = held.get(index, 0) + size
        return held

    def gpu_capacities(self) -> list[GpuCapacity]:
        ours = self._held_per_gpu()
        capacities = []
        for gpu in self.inventory.gpus():
            # Memory we cannot account to our engines belongs to someone else (a desktop,
            # another user's job): the policy plans around it.
            foreign = (
                max(gpu.used_bytes - ours.get(gpu.index, 0), 0) if (self.measures_processes) else 0
            )
            capacities.append(GpuCapacity(gpu.index, gpu.total_bytes, foreign, node=gpu.node))
        return capacities

    def engines(self, target: str) -> list[Engine]:
        records = []
        for key, supervisor in self._engines().items():
            residency = self.residency.get(key)
            if residency is None:
                continue  # not placed (yet): it holds nothing
            # A removed model's engine (draining) is planned on as it was started.
            configured = key in self.config.models
            record = engine_record(
                key,
                supervisor,
                self.config,
                target,
                gpus=residency.gpus,
                awake_bytes_per_gpu=residency.awake_bytes_per_gpu,
                asleep_bytes_per_gpu=residency.asleep_bytes_per_gpu,
                sleep_level=residency.sleep_level,
                footprint=self._footprint(supervisor) if configured else None,
            )
            if record is not None:
                records.append(record)
        return records

    def host_ram_left(self) -> int | None:
        budget = self.config.host_ram_for_sleep
        if budget is None:
            return None
        held = sum(
            r.awake_bytes_per_gpu * len(r.gpus)
            for key, r in self.residency.items()
            if (s := self._engines().get(key)) is not None
            and s.state is ModelState.SLEEPING
            and s.sleep_level == 1
        )
        return max(budget - held, 0)

    def _total(self, gpus: tuple[int, ...]) -> int:
        totals = {gpu.index: gpu.total_bytes for gpu in self.inventory.gpus()}
        return min(totals[index] for index in gpus) if gpus else 0

    # ----- after evictions -----

    async def wait_memory_back(self, gpus: tuple[int, ...], need: int, target: str) -> None:
        """Until the GPUs really show the freed memory (stop verified the processes gone).

        The one poll left: the driver gives no event when memory returns.
        """
        if not self.measures_processes:
            return
        deadline = self._clock() + MEMORY_RETURN_TIMEOUT_S
        while True:
            free = {gpu.index: gpu.free_bytes for gpu in self.inventory.gpus()}
            if all(free.get(index, 0) >= need for index in gpus):
                return
            if any(index not in free for index in gpus):
                return  # its node was lost: nothing comes back there; the start plans again
            if self._clock() > deadline:
                self.events.emit(
                    "memory_not_returned",
                    target,
                    f"GPU memory did not come back within {MEMORY_RETURN_TIMEOUT_S:.0f}s after "
                    "evicting; planning again with what is free now",
                )
                return
            await asyncio.sleep(MEMORY_POLL_S)

    # ----- learning -----

    def _measure(self, supervisor: EngineOwner) -> dict[int, int] | None:
        if not self.measures_processes or supervisor.engine is None:
            return None
        # The inventory follows the process tree itself (on a cluster, on the engine's node).
        return self.inventory.process_memory([supervisor.engine.pid])

    def _learn_awake(self, supervisor: EngineOwner) -> _Record | None:
        name = supervisor.name
        residency = self.residency.get(name)
        if residency is None:
            return None
        measured = self._measure(supervisor)
        if measured:
            residency.awake_bytes_per_gpu = max(measured.values())
            residency.measured = True
        woke = (
            supervisor.timings.last_wake_s is not None
            and supervisor.timings.wakes > 0
            and (self._clock() - (supervisor.ready_since or 0) < 1.0)
        )
        return _Record(
            name,
            self._fingerprint(supervisor),
            awake_bytes_per_gpu=(
                residency.awake_bytes_per_gpu
                if residency.measured and residency.learnable
                else None
            ),
            start_seconds=None if woke else supervisor.timings.last_start_s,
            wake_seconds=supervisor.timings.last_wake_s if woke else None,
        )

    def _learn_asleep(self, supervisor: EngineOwner) -> _Record | None:
        residency = self.residency.get(supervisor.name)
        if residency is None:
            return None
        measured = self._measure(supervisor)
        if measured is None:
            return None
        residency.asleep_bytes_per_gpu = max(measured.values(), default=0)
        return _Record(
            supervisor.name,
            self._fingerprint(supervisor),
            asleep_bytes_per_gpu=residency.asleep_bytes_per_gpu,
        )

    async def written(self) -> None:
        """Wait until the measurements in flight are stored (for tests and shutdown)."""
        while self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)

    async def _write(self, record: _Record) -> None:
        """Store the measurements in a thread: SQLite may wait seconds for another process's
        lock (its busy timeout), and the event loop must not wait with it. A failure is
        reported, never raised: the engine it measured runs on (issue 22)."""
        try:
            footprint = await asyncio.to_thread(
                lambda: self.footprints.record(
                    record.model,
                    record.fingerprint,
                    awake_bytes_per_gpu=record.awake_bytes_per_gpu,
                    asleep_bytes_per_gpu=record.asleep_bytes_per_gpu,
                    start_seconds=record.start_seconds,
                    wake_seconds=record.wake_seconds,
                )
            )
        except Exception as error:
            log.warning("could not store the footprint of %s: %s", record.model, error)
            self.events.emit("bookkeeping_failed", record.model, str(error))
            return
        self._footprints[(record.model, record.fingerprint)] = footprint

    # ----- status -----

    def gpu_status(self) -> list[dict[str, Any]]:
        planned = self._held_per_gpu()
        result = []
        for gpu in self.inventory.gpus():
            used = gpu.used_bytes if self.measures_processes else planned.get(gpu.index, 0)
            result.append(
                {
                    "index": gpu.index,
                    **({"node": gpu.node, "node_gpu": gpu.local_index} if gpu.node else {}),
                    "name": gpu.name,
                    "total_bytes": gpu.total_bytes,
                    "used_bytes": used,
                    "planned_bytes": planned.get(gpu.index, 0),
                    "free_bytes": max(gpu.total_bytes - max(used, planned.get(gpu.index, 0)), 0),
                    "models": sorted(n for n, r in self.residency.items() if gpu.index in r.gpus),
                }
            )
        return result

    def model_placement(self, name: str) -> dict[str, Any]:
        residency = self.residency.get(name)
        supervisor = self._engines().get(name)
        footprint = self._footprint(supervisor) if supervisor else None
        return {
            "gpus": list(residency.gpus) if residency else [],
            "footprint_bytes": residency.awake_bytes_per_gpu
            if residency
            else (footprint.awake_bytes_per_gpu if footprint else None),
            "footprint_measured": bool(residency and residency.measured)
            or bool(footprint and footprint.awake_bytes_per_gpu),
            "last_plan": self.last_plan.get(name),
        }
