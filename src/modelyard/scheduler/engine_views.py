"""The scheduler's engines as others read them: every model's engine slots (its own, then
its replicas), removed models' engines still draining, and the questions api/, lora/,
observability/ and the watchdog ask about them.

`Scheduler` is built on this class: it keeps the records (`_supervisors`, `_replicas`,
`_retiring`) and alone changes them; nothing here changes anything.
"""

from __future__ import annotations

from collections.abc import Callable

from modelyard.config.schema import GatewayConfig
from modelyard.runtime.start_progress import ProgressView
from modelyard.scheduler.supervisor import EngineHandle, Failure, ModelState, ModelSupervisor


class EngineViews:
    config: GatewayConfig
    _clock: Callable[[], float]
    _supervisors: dict[str, ModelSupervisor]  # each configured model's own engine slot
    _replicas: dict[str, list[ModelSupervisor]]  # its other engines (replicas 2..max)
    _retiring: dict[str, ModelSupervisor]  # removed by a reload and draining, by engine key

    def _slots(self, name: str) -> list[ModelSupervisor]:
        """Every engine slot of a configured model: its own first, then its replicas."""
        return [self._supervisors[name], *self._replicas.get(name, ())]

    def _slot(self, key: str) -> ModelSupervisor | None:
        """The configured engine slot with this key (None: a reload removed it)."""
        for supervisor in self._slots_of_all():
            if supervisor.key == key:
                return supervisor
        return None

    def _slots_of_all(self) -> list[ModelSupervisor]:
        return [s for name in self._supervisors for s in self._slots(name)]

    def _all_supervisors(self) -> list[ModelSupervisor]:
        """Configured models' supervisors and those of removed models still draining."""
        return [*self._slots_of_all(), *self._retiring.values()]

    def _engines_by_key(self) -> dict[str, ModelSupervisor]:
        """Every engine's owner by its key: what every decision sees."""
        return {supervisor.key: supervisor for supervisor in self._all_supervisors()}

    def is_remote(self, name: str) -> bool:
        """Whether the model's engine runs elsewhere (never started or stopped by us)."""
        model = self.config.models.get(name)
        return model is not None and model.engine == "remote"

    def state_of(self, name: str) -> ModelState:
        return self._supervisors[name].state

    def in_backoff(self, name: str) -> bool:
        """The model failed and its next start waits out its crash back-off."""
        return self._supervisors[name].backoff_remaining() > 0

    def exclusive_peer_running(self, name: str) -> bool:
        """Another member of the model's exclusive group holds an engine now."""
        group = self.config.exclusive_group_of(name)
        if group is None:
            return False
        members = self.config.groups[group].members
        return any(
            member != name
            and member in self._supervisors
            and self._supervisors[member].state not in (ModelState.STOPPED, ModelState.FAILED)
            for member in members
        )

    def supervisor(self, name: str) -> ModelSupervisor:
        return self._supervisors[name]

    def now(self) -> float:
        return self._clock()

    def start_progress(self, name: str) -> ProgressView | None:
        """The phase of the model's start in progress (downloading, loading weights, ...)."""
        supervisor = self._supervisors.get(name)
        return supervisor.start_view() if supervisor is not None else None

    def engine_of(self, name: str) -> EngineHandle | None:
        """The model's engine when it is ready (None otherwise); `name` may be a replica's
        key (`coder#2`)."""
        supervisor = self._supervisors.get(name) or self._slot(name)
        if supervisor is None:
            raise KeyError(name)
        return supervisor.engine if supervisor.state is ModelState.READY else None

    def ready_engines(self) -> dict[str, EngineHandle]:
        return {
            name: s.engine
            for name, s in self._supervisors.items()
            if s.state is ModelState.READY and s.engine is not None
        }

    def ready_engines_by_key(self) -> dict[str, EngineHandle]:
        """Every ready engine, replicas included, by its key (the watchdog checks each)."""
        return {
            s.key: s.engine
            for s in self._slots_of_all()
            if s.state is ModelState.READY and s.engine is not None
        }

    def ready_replicas(self) -> dict[str, tuple[str, EngineHandle]]:
        """Every ready engine, replicas included, by its key: (its model, the engine)."""
        return {
            s.key: (name, s.engine)
            for name in self._supervisors
            for s in self._slots(name)
            if s.state is ModelState.READY and s.engine is not None
        }

    def load_counts(self, name: str) -> tuple[int, int]:
        """Requests (in flight, queued) for a model, over all its engines."""
        slots = self._slots(name)
        return sum(s.in_flight for s in slots), sum(s.waiting for s in slots)

    def replica_loads(self, name: str) -> list[tuple[str, ModelState, int]]:
        """Each engine slot of a model that holds an engine: (key, state, in flight)."""
        return [
            (s.key, s.state, s.in_flight)
            for s in self._slots(name)
            if s.state not in (ModelState.STOPPED, ModelState.FAILED)
        ]

    def wakes_of(self, name: str) -> int:
        return self._supervisors[name].timings.wakes

    def failure_of(self, name: str) -> Failure | None:
        return self._supervisor_of(name).failure

    def log_tail(self, name: str) -> list[str]:
        """The last lines of the stopped engine of a model, or of a replica (by its key)."""
        return self._engine_slot(name).last_log_tail

    def _engine_slot(self, key: str) -> ModelSupervisor:
        """A model's own engine slot by the model's name, a replica's by its key."""
        found = self._supervisors.get(key) or self._slot(key)
        if found is None:
            raise KeyError(key)
        return found

    def has_engine_key(self, key: str) -> bool:
        """Whether `key` names a configured model or one of its replicas (`coder#2`)."""
        return key in self._supervisors or self._slot(key) is not None

    def model_of_engine(self, key: str) -> str:
        """The model a replica's key (or the model's own name) belongs to."""
        return self._engine_slot(key).name

    def engine_state(self, key: str) -> ModelState:
        """The state of a model's own engine, or of a replica's (by its key)."""
        return self._engine_slot(key).state

    def engine_keys(self, name: str) -> list[str]:
        """The keys of the model's engines: its own, then each replica that holds or held
        an engine (a running one, or one whose last lines are kept)."""
        return [
            s.key
            for s in self._slots(name)
            if s is self._supervisors[name] or s.engine is not None or s.last_log_tail
        ]

    def live_engines(self, name: str) -> list[EngineHandle]:
        """Every engine of the model whatever its state, its own first, then its replicas'."""
        return [s.engine for s in self._slots(name) if s.engine is not None]

    def ready_engines_of(self, name: str) -> list[EngineHandle]:
        """The model's ready engines, its own first."""
        return [
            s.engine
            for s in self._slots(name)
            if s.state is ModelState.READY and s.engine is not None
        ]

    def live_engine(self, name: str) -> EngineHandle | None:
        """The model's engine process whatever its state (for following its log); a
        replica's by its key (`coder#2`)."""
        return self._engine_slot(name).engine

    def _supervisor_of(self, name: str) -> ModelSupervisor:
        """The model's supervisor, also while a reload that removed it drains its engine
        (then the latest such engine of that name)."""
        found = self._supervisors.get(name) or self._retiring.get(name)
        if found is None:
            found = [s for s in self._retiring.values() if s.name == name][-1]
        return found
